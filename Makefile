# eslora: `make demo` runs ES on the embedded CPU default; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch: on the project's machines pip takes 2.13.0 from local disk; elsewhere
# set TORCH_SPEC or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu to avoid a CUDA download.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/demo.yaml
BACKEND ?= hf
ARGS ?=
RAY_ADDRESS ?= http://127.0.0.1:8265

.PHONY: venv install demo train test test-server vllm-env cluster-up cluster-down submit clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

venv install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m eslora.train $(CONFIG) backend.name=$(BACKEND) $(ARGS)

train: $(VENV)/.installed
	$(PY) -m eslora.train $(CONFIG) $(ARGS)

# pytest exits 5 when every test was deselected/skipped: not a failure of the suite.
test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

vllm-env:
	bash scripts/setup_vllm_env.sh .venv-vllm

test-server: $(VENV)/.installed vllm-env
	$(PY) -m pytest -q -m server $(ARGS)

# Local Ray cluster on 127.0.0.1 (cluster/README.md): make cluster-up [WORKERS=n CPUS=c
# OBJECT_STORE_MB=m RAY_PORT=p RAY_DASHBOARD_PORT=d]; cluster-down stops exactly that cluster.
# Job drivers run `python` from the head's PATH: up.sh puts this venv's bin first.
cluster-up: $(VENV)/.installed
	RAY=$(CURDIR)/$(VENV)/bin/ray bash cluster/up.sh

cluster-down:
	RAY=$(CURDIR)/$(VENV)/bin/ray bash cluster/down.sh

submit: $(VENV)/.installed
	RAY=$(CURDIR)/$(VENV)/bin/ray RAY_ADDRESS=$(RAY_ADDRESS) bash cluster/submit.sh $(CONFIG) $(ARGS)

clean:
	rm -rf runs .pytest_cache
