"""The SGLang backend on CPU: the server command line, hand-off accounting, and the backend's
own logic (start, self-check, batches, restart, per-call stats, environment) against a stand-in
for `python -m sglang.launch_server`. SGLang itself needs a GPU: the backend against a real
SGLang server is tests/test_sglang_gpu.py; the stand-in only answers SGLang's HTTP API."""

import json
import textwrap

import numpy as np
import pytest
import requests

from eslora.backends import make_backend, sglang_plugin
from eslora.backends.base import BackendError, CallStats, Sampling, ServerCrashed
from eslora.backends.sglang import SGLangBackend, build_command, uncovered, uncovered_spans
from eslora.config import load_config
from eslora.lora import Adapter, LoraSpec


def test_command_binds_loopback_and_names_lora_limits():
    cfg = load_config("configs/countdown_sglang.yaml", ["lora.r=2", "lora.target_modules=[q_proj,v_proj]"])
    cmd = build_command(cfg.backend, LoraSpec.from_config(cfg.lora), cfg.model.dtype, "/models/m", 31000)
    joined = " ".join(cmd)
    assert "--host 127.0.0.1 --port 31000" in joined
    assert "--max-loras-per-batch 8" in joined and "--max-lora-rank 2" in joined
    assert cmd[cmd.index("--lora-target-modules") + 1 : cmd.index("--lora-target-modules") + 3] == ["q_proj", "v_proj"]


def test_cuda_graph_batch_limit_is_passed_only_when_set():
    cfg = load_config("configs/countdown_sglang.yaml")
    spec = LoraSpec.from_config(cfg.lora)
    assert "--cuda-graph-max-bs" not in build_command(cfg.backend, spec, cfg.model.dtype, "/models/m", 31000)
    cfg = load_config("configs/countdown_learn.yaml")
    cmd = build_command(cfg.backend, LoraSpec.from_config(cfg.lora), cfg.model.dtype, "/models/m", 31000)
    # the learning run's calls are 8 members x 64 prompts: the decode graphs must cover all 512
    assert cmd[cmd.index("--cuda-graph-max-bs") + 1] == "512"
    assert cfg.backend.max_loras_per_batch * cfg.task.num_prompts <= cfg.backend.sglang.cuda_graph_max_bs


def sglang_command(*overrides: str) -> list[str]:
    """The server command line of configs/countdown_sglang.yaml with `overrides`."""
    cfg = load_config("configs/countdown_sglang.yaml", list(overrides))
    return build_command(cfg.backend, LoraSpec.from_config(cfg.lora), cfg.model.dtype, "/models/m", 31000)


def test_csgmv_chunk_size_is_passed_only_when_set_and_only_to_csgmv():
    assert "--max-lora-chunk-size" not in sglang_command()
    cmd = sglang_command("backend.sglang.lora_backend=csgmv", "backend.sglang.max_lora_chunk_size=128")
    assert cmd[cmd.index("--max-lora-chunk-size") + 1] == "128"
    with pytest.raises(ValueError, match="max_lora_chunk_size is csgmv's; backend.sglang.lora_backend='triton'"):
        sglang_command("backend.sglang.max_lora_chunk_size=128", "backend.sglang.lora_backend=triton")


def test_lora_prefill_graphs_are_for_eslora_backends_with_cuda_graphs_on():
    assert "--disable-cuda-graph" not in sglang_command("backend.sglang.lora_backend=fused",
                                                       "backend.sglang.lora_prefill_graphs=true")
    with pytest.raises(ValueError, match="lora_prefill_graphs=true is for eslora's LoRA backends .*lora_backend='triton'"):
        sglang_command("backend.sglang.lora_prefill_graphs=true")
    with pytest.raises(ValueError, match="lora_prefill_graphs=true but backend.sglang.disable_cuda_graph=true"):
        sglang_command("backend.sglang.lora_backend=gathered", "backend.sglang.lora_prefill_graphs=true",
                       "backend.sglang.disable_cuda_graph=true")


@pytest.mark.parametrize("name", ["dense", "gathered", "fused"])
def test_eslora_lora_backends_start_sglang_on_triton(name):
    # eslora's plugin puts its backend in the place of SGLang's triton backend (sglang_plugin.py)
    cmd = sglang_command(f"backend.sglang.lora_backend={name}")
    assert cmd[cmd.index("--lora-backend") + 1] == "triton" and name not in cmd
    assert sglang_command()[sglang_command().index("--lora-backend") + 1] == "triton"  # measured faster than csgmv


def test_server_lora_slots_default_to_the_batch_and_can_exceed_it():
    """backend.sglang.lora_slots: the server's --max-loras-per-batch, so several calls' batches of
    backend.max_loras_per_batch run at once; eslora still cuts and loads batches of 8."""
    def slots(*overrides: str) -> str:
        cmd = sglang_command(*overrides)
        assert cmd.count("--max-loras-per-batch") == 1
        return cmd[cmd.index("--max-loras-per-batch") + 1]

    assert slots() == "8"
    assert slots("backend.sglang.lora_slots=0") == "8"
    assert slots("backend.sglang.lora_slots=32") == "32"
    cfg = load_config("configs/countdown_sglang.yaml", ["backend.sglang.lora_slots=32"])
    assert make_backend(cfg.backend, "/models/m", LoraSpec.from_config(cfg.lora), cfg.model.dtype).max_loras_per_batch == 8


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_command_honours_model_dtype(dtype):
    cfg = load_config("configs/countdown_sglang.yaml", [f"model.dtype={dtype}"])
    cmd = build_command(cfg.backend, LoraSpec.from_config(cfg.lora), cfg.model.dtype, "/models/m", 31000)
    assert cmd[cmd.index("--dtype") + 1] == dtype


def test_unknown_dtype_is_refused_naming_the_key():
    cfg = load_config("configs/countdown_sglang.yaml")
    with pytest.raises(BackendError, match="model.dtype='int8'"):
        SGLangBackend(cfg.backend, "/models/m", LoraSpec.from_config(cfg.lora), "int8")


@pytest.mark.parametrize(
    "start, end, intervals, expected",
    [
        (0.0, 1.0, [], 1.0),  # nothing generating: the whole wait is exposed
        (0.0, 1.0, [(-1.0, 2.0)], 0.0),  # hidden behind another call's generation
        (0.0, 1.0, [(0.2, 0.5)], 0.7),
        (0.0, 1.0, [(0.2, 0.5), (0.4, 0.6), (0.9, 3.0)], 0.5),  # overlapping intervals count once
        (0.0, 1.0, [(1.5, 2.0), (-2.0, -1.0)], 1.0),  # outside the wait
    ],
)
def test_exposed_wait_excludes_time_hidden_by_generation(start, end, intervals, expected):
    assert uncovered(start, end, intervals) == pytest.approx(expected)
    gaps = uncovered_spans(start, end, intervals)
    assert sum(b - a for a, b in gaps) == pytest.approx(expected)
    assert all(start <= a < b <= end for a, b in gaps) and gaps == sorted(gaps)


def test_two_calls_waiting_at_once_count_the_servers_idle_time_once():
    # With calls in flight, two calls can wait for their adapters while the server is idle; each
    # idle second is one exposed second of the generation, so the calls' sum must not count it twice.
    cfg = load_config("configs/countdown_sglang.yaml")
    backend = SGLangBackend(cfg.backend, "/models/m", LoraSpec.from_config(cfg.lora), cfg.model.dtype)
    backend._generating = [[10.2, 10.5], [11.8, None]]  # one request done, one still running
    first = backend.claim_idle_seconds(10.0, 11.0)
    second = backend.claim_idle_seconds(10.0, 11.0)  # the other call, same wait
    third = backend.claim_idle_seconds(10.5, 12.0)  # overlaps the first wait, then the running request
    assert first == pytest.approx(0.7) and second == 0.0 and third == pytest.approx(0.8)
    assert first + second + third == pytest.approx(backend.idle_seconds(10.0, 12.0))


# A stand-in for `python -m sglang.launch_server` (found first on PYTHONPATH): SGLang's health,
# load/unload and native /generate endpoints on the port it is given. A completion is a digest of
# the adapter file's bytes and the prompt, so the same weights give the same text on any server.
STAND_IN = textwrap.dedent('''
    import hashlib, http.server, json, os, sys
    argv = sys.argv[1:]
    port = int(argv[argv.index("--port") + 1])
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    loaded = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                return self.answer(200, {})
            if self.path == "/env":
                return self.answer(200, {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE"), "argv": argv})
            self.answer(404, {"message": "no such path"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/load_lora_adapter":
                weights = os.path.join(body["lora_path"], "adapter_model.safetensors")
                if not os.path.isfile(weights):
                    return self.answer(400, {"message": "no adapter at " + body["lora_path"]})
                loaded[body["lora_name"]] = hashlib.sha256(open(weights, "rb").read()).hexdigest()[:12]
                return self.answer(200, {"success": True, "loaded_adapters": sorted(loaded)})
            if self.path == "/unload_lora_adapter":
                loaded.pop(body["lora_name"], None)
                return self.answer(200, {"success": True})
            if self.path == "/generate":
                names = body.get("lora_path") or [None] * len(body["text"])
                if any(n is not None and n not in loaded for n in names):
                    return self.answer(400, {"message": "unknown adapter"})
                out = [{"text": (loaded[n] if n else "base") + "|" + t[:8], "meta_info": {"completion_tokens": 3}}
                       for n, t in zip(names, body["text"])]
                return self.answer(200, out)
            self.answer(404, {"message": "no such path"})

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
''')

PROMPTS = ["the cat sat on", "numbers and words"]


@pytest.fixture
def stand_in(tiny_model_path, tmp_path, monkeypatch):
    """An SGLangBackend (from the config, through make_backend, with `build(*overrides)`) whose
    server is the stand-in."""
    package = tmp_path / "site" / "sglang"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "launch_server.py").write_text(STAND_IN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    base = ["lora.layers=null", "backend.max_loras_per_batch=2", "backend.max_restarts=2",
            f"backend.sglang.adapter_dir={tmp_path / 'adapters'}", "backend.sglang.start_timeout_s=60"]
    cfg = load_config("configs/countdown_sglang.yaml", base)
    backends = []

    def build(*overrides: str):
        config = load_config("configs/countdown_sglang.yaml", [*base, *overrides]) if overrides else cfg
        backend = make_backend(config.backend, str(tiny_model_path), LoraSpec.from_config(config.lora), config.model.dtype)
        backends.append(backend)
        return backend

    yield build
    for backend in backends:
        backend.stop()
        assert not backend.adapter_root.exists(), "stop() must delete the adapter folder"


def server_env(backend) -> dict:
    return requests.get(backend.url + "/env", timeout=30).json()


def test_restarts_are_counted_per_call_and_batches_rerun(stand_in):
    backend = stand_in()
    assert isinstance(backend, SGLangBackend)
    backend.start()
    assert len(set(backend.self_check_outputs)) == 3  # base and two random adapters differ
    members = [backend.random_adapter(f"m{i}", seed=i, scale=0.1) for i in range(5)]  # 2 + 2 + 1
    sampling = Sampling(max_new_tokens=4)
    reference = backend.generate(PROMPTS, [None, *members], sampling)
    backend.drain()
    first = backend.stats
    assert list(first) == list(CallStats().as_dict())
    assert first["batches"] == 4 and first["members"] == 6 and first["restarts"] == 0
    assert first["server_start_s"] > 0, "the first start is reported by the first call"
    assert first["write_s"] > 0 and first["load_s"] > 0 and first["tokens"] == 6 * len(PROMPTS) * 3

    old = backend.server.process.pid
    backend.server.kill()  # a crash between calls: found by the next request, rerun on a fresh server
    again = backend.generate(PROMPTS, [None, *members], sampling)
    backend.drain()
    assert [[c.text for c in row] for row in again] == [[c.text for c in row] for row in reference]
    assert backend.server.process.pid != old and backend.restarts == 1
    assert backend.stats["restarts"] == 1 and backend.stats["server_start_s"] > 0
    backend.generate(PROMPTS, members[:1], sampling)
    # Per call, so the driver's sum over calls is the number of restarts (was a lifetime total).
    assert backend.stats["restarts"] == 0 and backend.stats["server_start_s"] == 0
    assert sum(record["restarts"] for record in backend.history) == backend.restarts == 1


def test_restart_budget_spent_is_server_crashed(stand_in):
    backend = stand_in()
    backend.max_restarts = 0
    backend.start()
    backend.server.kill()
    with pytest.raises(ServerCrashed, match="already restarted 0 times"):
        backend.generate(PROMPTS, [backend.random_adapter("z", seed=5, scale=0.1)], Sampling(max_new_tokens=4))


def test_refused_requests_are_backend_errors_not_crashes(stand_in):
    backend = stand_in()
    backend.start()
    with pytest.raises(BackendError, match="no adapter at /nonexistent") as err:
        backend._post(backend.load_path, {"lora_name": "x", "lora_path": "/nonexistent"})
    assert not isinstance(err.value, ServerCrashed) and backend.healthy() and backend.restarts == 0
    too_big = LoraSpec(r=backend.max_lora_rank + 1, target_modules=backend.spec.target_modules, layers=None)
    with pytest.raises(BackendError, match="max LoRA rank"):
        backend.generate(PROMPTS, [Adapter("big", too_big, {})], Sampling(max_new_tokens=4))


def test_server_sees_the_users_environment_offline_only_when_set(stand_in, monkeypatch):
    backend = stand_in()
    backend.start()
    assert server_env(backend)["HF_HUB_OFFLINE"] is None, "offline must not be forced"
    assert "--dtype" in server_env(backend)["argv"]
    backend.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = stand_in()
    offline.start()
    assert server_env(offline)["HF_HUB_OFFLINE"] == "1", "the user's choice passes through"


def test_plugin_keys_without_eslora_in_the_servers_python_fail_at_start(stand_in):
    # The stand-in is not SGLang: no plugin runs in it, as in a server Python without eslora.
    backend = stand_in("lora.layers=[0,1]", "backend.sglang.adapter_layers_only=true")
    assert backend._env()[sglang_plugin.LAYERS_ENV] == "0,1"
    with pytest.raises(BackendError, match="adapter_layers_only=true(.|\n)*entry point `eslora` of the group sglang.srt.plugins"):
        backend.start()
    assert backend.server is None, "a server that failed its start-up check must not keep running"
    lean = stand_in("backend.sglang.lean_adapter_loads=true")
    env = lean._env()
    assert env[sglang_plugin.LEAN_LOADS_ENV] == "1" and sglang_plugin.LAYERS_ENV not in env
    with pytest.raises(BackendError, match="^backend.sglang.lean_adapter_loads=true, but eslora's SGLang plugin did not run"):
        lean.start()
    gathered = stand_in("backend.sglang.lora_backend=gathered")
    env = gathered._env()
    assert env[sglang_plugin.LORA_BACKEND_ENV] == "gathered" and sglang_plugin.REPORT_ENV in env
    with pytest.raises(BackendError, match="^backend.sglang.lora_backend=gathered, but eslora's SGLang plugin did not run"):
        gathered.start()
    graphs = stand_in("backend.sglang.lora_backend=fused", "backend.sglang.lora_prefill_graphs=true")
    assert graphs._env()[sglang_plugin.PREFILL_GRAPHS_ENV] == "1"
    with pytest.raises(BackendError, match="^backend.sglang.lora_prefill_graphs=true and backend.sglang.lora_backend=fused, "
                                           "but eslora's SGLang plugin did not run"):
        graphs.start()
    plain = stand_in("lora.layers=[0,1]")
    assert not {sglang_plugin.LAYERS_ENV, sglang_plugin.LEAN_LOADS_ENV, sglang_plugin.LORA_BACKEND_ENV,
                sglang_plugin.PREFILL_GRAPHS_ENV, sglang_plugin.REPORT_ENV} & set(plain._env())
    plain.start()  # without the keys nothing is asked of the server's Python


def test_a_server_that_did_not_build_the_asked_backend_is_refused(tmp_path):
    """The plugin's report names the LoRA backend class SGLang built: with lora_backend=dense,
    SGLang's own triton class (the plugin ran, but its backend was not put in place) is an error,
    and so is the other plugin class; the dense class is accepted. Without a plugin backend, a
    plugin class is an error too."""
    def checked(lora_backend: str, built: str, fused_modules: int = 0, prefill_graphs: bool = False,
                asked_prefill_graphs: bool = False) -> SGLangBackend:
        cfg = load_config("configs/countdown_sglang.yaml", [f"backend.sglang.lora_backend={lora_backend}",
                                                           f"backend.sglang.adapter_dir={tmp_path}",
                                                           "backend.sglang.lean_adapter_loads=true",
                                                           f"backend.sglang.lora_prefill_graphs={asked_prefill_graphs}"])
        backend = SGLangBackend(cfg.backend, "/models/m", LoraSpec.from_config(cfg.lora), cfg.model.dtype)
        backend.adapter_root.mkdir(parents=True, exist_ok=True)
        backend._plugin_report.write_text(json.dumps({"kept_layers": [0, 1], "unwrapped_modules": 0, "layers": 2,
                                                      "lean_loads": True, "lora_backend": built,
                                                      "fused_modules": fused_modules, "prefill_graphs": prefill_graphs}))
        backend._check_plugin()
        return backend

    with pytest.raises(BackendError, match="the LoRA backend TritonLoRABackend; the config asked .*lora_backend dense"):
        checked("dense", "TritonLoRABackend")
    assert checked("dense", "DenseLoRABackend").plugin_report["lora_backend"] == "DenseLoRABackend"
    with pytest.raises(BackendError, match="the LoRA backend GatheredLoRABackend; the config asked .*lora_backend dense"):
        checked("dense", "GatheredLoRABackend")
    assert checked("gathered", "GatheredLoRABackend").plugin_report["lora_backend"] == "GatheredLoRABackend"
    # fused's class, but no projection given the fused GEMM: the server would run gathered's kernels
    with pytest.raises(BackendError, match=r"the LoRA backend FusedLoRABackend; .*lora_backend fused \(it fused no projection's GEMM\)"):
        checked("fused", "FusedLoRABackend")
    assert checked("fused", "FusedLoRABackend", fused_modules=8).plugin_report["fused_modules"] == 8
    with pytest.raises(BackendError, match="the LoRA backend GatheredLoRABackend; the config asked .*lora_backend fused"):
        checked("fused", "GatheredLoRABackend", fused_modules=8)
    with pytest.raises(BackendError, match="the LoRA backend GatheredLoRABackend; the config asked .*lora_backend csgmv"):
        checked("csgmv", "GatheredLoRABackend")
    with pytest.raises(BackendError, match="the LoRA backend DenseLoRABackend; the config asked .*lora_backend triton"):
        checked("triton", "DenseLoRABackend")
    assert checked("triton", "TritonLoRABackend").plugin_report["lora_backend"] == "TritonLoRABackend"
    # prefill graphs: the server's backend class must have taken them as asked, either way
    assert checked("fused", "FusedLoRABackend", 8, prefill_graphs=True, asked_prefill_graphs=True).plugin_report["prefill_graphs"]
    with pytest.raises(BackendError, match="prefill graphs False and the LoRA backend FusedLoRABackend; .*lora_prefill_graphs True"):
        checked("fused", "FusedLoRABackend", 8, prefill_graphs=False, asked_prefill_graphs=True)
    with pytest.raises(BackendError, match="prefill graphs True and the LoRA backend GatheredLoRABackend; .*lora_prefill_graphs False"):
        checked("gathered", "GatheredLoRABackend", prefill_graphs=True)


def test_adapter_layers_only_refuses_adapters_the_server_would_mis_serve():
    cfg = load_config("configs/countdown_sglang.yaml", ["lora.layers=[0,1,2]", "backend.sglang.adapter_layers_only=true"])
    backend = SGLangBackend(cfg.backend, "/models/m", LoraSpec.from_config(cfg.lora), cfg.model.dtype)
    backend._check(LoraSpec(layers=(0, 2)), where="adapter inside")  # a subset is served exactly
    with pytest.raises(BackendError, match=r"adapter outside: has LoRA weights on \[5\], outside lora.layers \[0, 1, 2\]"):
        backend._check(LoraSpec(layers=(1, 5)), where="adapter outside")
    with pytest.raises(BackendError, match="every layer"):
        backend._check(LoraSpec(layers=None), where="adapter all")


def test_a_server_that_cannot_come_back_is_server_crashed_naming_why(stand_in, tmp_path):
    backend = stand_in()
    backend.start()
    # From now on every start fails: the restarts are spent on attempts that never come up.
    (tmp_path / "site" / "sglang" / "launch_server.py").write_text("import sys; print('model folder is gone'); sys.exit(3)")
    backend.server.kill()
    with pytest.raises(ServerCrashed, match="already restarted 2 times(.|\n)*model folder is gone"):
        backend.generate(PROMPTS, [None], Sampling(max_new_tokens=4))
    assert backend.restarts == 2


def test_two_concurrent_calls_get_their_own_results_and_stats(stand_in):
    from concurrent.futures import ThreadPoolExecutor

    backend = stand_in()
    backend.start()
    calls = [[backend.random_adapter(f"c{i}", seed=40 + i, scale=0.1) for i in range(3)],
             [backend.random_adapter(f"d{i}", seed=50 + i, scale=0.1) for i in range(5)]]
    sampling = Sampling(max_new_tokens=4)
    alone = [[[c.text for c in row] for row in backend.generate(PROMPTS, members, sampling)] for members in calls]

    def run(members):
        out = backend.generate(PROMPTS, members, sampling)
        return [[c.text for c in row] for row in out], backend.stats  # this thread's own last call

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, calls))
    assert [texts for texts, _ in results] == alone
    assert [stats["members"] for _, stats in results] == [3, 5]
    assert [stats["batches"] for _, stats in results] == [2, 3]


def test_a_batch_whose_write_fails_leaves_nothing_loaded_or_written(stand_in):
    backend = stand_in()
    backend.start()
    good = backend.random_adapter("good", seed=7, scale=0.1)
    unwritable = Adapter("unwritable", backend.spec, {"x.lora_A.weight": np.array(["not a number"])})
    with pytest.raises(TypeError):
        backend._load_batch([good, unwritable])
    assert list(backend.adapter_root.iterdir()) == [], "the failed batch's files must be deleted"
    probe = backend._write(good, "probe")
    answer = backend._post(backend.load_path, {"lora_name": "probe", "lora_path": str(probe)})
    assert answer["loaded_adapters"] == ["probe"], "the batch's first member must have been unloaded"


def test_a_failed_self_check_stops_the_server_and_the_next_start_checks_again(stand_in, tmp_path):
    refusing = STAND_IN.replace(
        'if self.path == "/load_lora_adapter":\n',
        'if self.path == "/load_lora_adapter":\n            return self.answer(400, {"message": "loads refused"})\n', 1)
    assert refusing != STAND_IN
    (tmp_path / "site" / "sglang" / "launch_server.py").write_text(refusing)
    backend = stand_in()
    for _ in range(2):  # the second start() must not find a half-started server and skip the self-check
        with pytest.raises(BackendError, match="loads refused"):
            backend.start()
        assert backend.server is None


def test_a_request_past_the_default_graph_limit_is_warned_about_once(stand_in, capsys):
    backend = stand_in()  # max_loras_per_batch=2, cuda_graph_max_bs unset
    backend.start()
    sampling = Sampling(max_new_tokens=4)
    members = [backend.random_adapter(f"w{i}", seed=60 + i, scale=0.1) for i in range(2)]
    backend.generate(PROMPTS * 64, members, sampling)  # 2 x 128 = 256 requests: inside the graphs
    assert "cuda_graph_max_bs" not in capsys.readouterr().err
    backend.generate(PROMPTS * 65, members, sampling)  # 260 requests per /generate
    backend.generate(PROMPTS * 65, members, sampling)
    err = capsys.readouterr().err
    assert err.count("backend.sglang.cuda_graph_max_bs=260") == 1
