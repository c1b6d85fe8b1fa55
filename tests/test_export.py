"""Shipping a run (issue 17 item 3) on real transformers + PEFT with the tiny model, fp32.

The merged model must generate, greedy and token for token, what base + adapter through PEFT
generate; the adapter folder must carry its base's name as the user gave it, the tokenizer and a
model card; export never writes into a folder that holds files, and a push without a reachable
hub fails with an EsloraError, leaving nothing half-written.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eslora.config import to_yaml
from eslora.errors import EsloraError
from eslora.export import ExportError, export_run, finish_adapter
from eslora.lora import Adapter, AdapterError, LoraSpec, adapter_shapes, load_adapter
from peft_reference import peft_generate
from tiny_run import tiny_config

PROMPTS = ["the cat sat on", "numbers and words", "What is the capital of France?"]
TOKENS = 12
CARD = {"task": "conciseness", "generations": 2, "es": {"population": 8, "sigma": 0.3},
        "held_out_before": {"reward": -7.5}, "held_out_after": {"reward": -3.25}}


def make_run(folder: Path, model_path: Path, seed: int = 0) -> Path:
    """A run folder as train() leaves it: config.yaml + adapter/ saved by lora.py (base named by
    its absolute path, as the driver saved it before finish_adapter existed)."""
    cfg = tiny_config(model_path, "lora.r=2", f"run.dir={folder.parent}", f"run.name={folder.name}")
    spec = LoraSpec.from_config(cfg.lora)
    rng = np.random.default_rng(seed)
    # Random A and B (PEFT's init has B = 0, a no-op): the adapter visibly changes the output.
    tensors = {k: (rng.standard_normal(s) * 0.5).astype(np.float32)
               for k, s in adapter_shapes(str(model_path), spec).items()}
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    Adapter("mean", spec, tensors).save(folder / "adapter", base_model=str(model_path))
    return folder


def test_merged_model_generates_what_peft_base_plus_adapter_generates(tmp_path, tiny_model_path):
    run = make_run(tmp_path / "run", tiny_model_path)
    merged = export_run(run, merge_to=tmp_path / "merged")

    assert merged == tmp_path / "merged"
    with_peft = peft_generate(tiny_model_path, run / "adapter", PROMPTS, TOKENS)
    from_merged = peft_generate(merged, None, PROMPTS, TOKENS)  # plain transformers, no PEFT
    assert [ids for ids, _ in from_merged] == [ids for ids, _ in with_peft]
    base_only = peft_generate(tiny_model_path, None, PROMPTS, TOKENS)
    assert [ids for ids, _ in base_only] != [ids for ids, _ in with_peft], "the adapter must matter"

    # An ordinary transformers folder: safetensors + config.json + tokenizer, nothing pickled.
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    assert not [n for n in names if n.startswith("adapter_")], "a merged model carries no adapter"
    base_config = json.loads((tiny_model_path / "config.json").read_text())
    merged_config = json.loads((merged / "config.json").read_text())
    assert merged_config["dtype"] == base_config["dtype"] == "float32"
    # transformers 5 drops these on save; the transformers 4.x of SGLang / vLLM environments reads them.
    assert merged_config["rope_theta"] == base_config["rope_theta"]
    assert merged_config["torch_dtype"] == base_config["torch_dtype"]
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the base's tokenizer, byte for byte
        assert (merged / name).read_bytes() == (tiny_model_path / name).read_bytes()
    card = (merged / "README.md").read_text()
    assert "library_name: transformers" in card and "- eslora" in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no partial folder left"


def test_merged_model_keeps_the_base_dtype_rounding_once(tmp_path, tiny_model_path):
    """A bf16 base: the merge runs in fp32 and is rounded to bf16 once, as PEFT's fp32 merge is."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (base / name).write_bytes((tiny_model_path / name).read_bytes())
    run = make_run(tmp_path / "run", base)
    merged = export_run(run, merge_to=tmp_path / "merged")

    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          str(run / "adapter")).merge_and_unload().to(torch.bfloat16).state_dict()
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), reference[key]), key


def test_exported_adapter_names_its_base_and_carries_card_and_tokenizer(tmp_path, tiny_model_path):
    run = make_run(tmp_path / "run", tiny_model_path)
    shipped = export_run(run)  # no merge, no push: finishes the adapter in place

    assert shipped == run / "adapter"
    config = json.loads((shipped / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_path)  # config.yaml's model.name_or_path
    assert (shipped / "tokenizer.json").read_bytes() == (tiny_model_path / "tokenizer.json").read_bytes()
    card = (shipped / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card
    assert "- eslora" in card and "- evolution-strategies" in card
    assert "`conciseness`" in card and "  population: 8\n" in card and "  sigma: 0.3\n" in card
    assert "base_model:" not in card, "a local path is no hub id: the hub would refuse the card"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The folder alone gives the tokenizer; PEFT loads the adapter onto the base.
    assert AutoTokenizer.from_pretrained(shipped)("a b c")["input_ids"] == \
        AutoTokenizer.from_pretrained(tiny_model_path)("a b c")["input_ids"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(shipped))


@pytest.mark.parametrize("base_model, revision, yaml_base, how_to_get", [
    ("Qwen/Qwen2.5-0.5B-Instruct", "v1", "base_model: Qwen/Qwen2.5-0.5B-Instruct", None),
    ("smollm2-135m", "", None, "eslora models fetch smollm2-135m"),
])
def test_finish_adapter_writes_the_base_as_named(tmp_path, tiny_model_path, base_model, revision, yaml_base, how_to_get):
    adapter_dir = make_run(tmp_path / "run", tiny_model_path) / "adapter"
    finish_adapter(adapter_dir, str(tiny_model_path), base_model, CARD, revision=revision)

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_model and config["revision"] == (revision or None)
    card = (adapter_dir / "README.md").read_text()
    metadata = card.split("---\n")[1]
    assert (yaml_base in metadata) if yaml_base else ("base_model" not in metadata)
    assert how_to_get is None or how_to_get in card
    assert not revision or f'from_pretrained(base, revision="{revision}")' in card
    assert "| reward | -7.5000 | -3.2500 |" in card  # held-out before / after, as given
    assert load_adapter(adapter_dir).spec.r == 2  # still a loadable adapter


def test_finish_adapter_without_tokenizer_says_to_load_it_from_the_base(tmp_path, tiny_model_path):
    """with_tokenizer=False (an adapter committed to a repository): no tokenizer files beside the
    weights, and the card's usage loads the tokenizer from the base, which PEFT then runs with."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = make_run(tmp_path / "run", tiny_model_path) / "adapter"
    finish_adapter(adapter_dir, str(tiny_model_path), str(tiny_model_path), CARD, with_tokenizer=False)

    assert not any(p.name.startswith("tokenizer") for p in adapter_dir.iterdir())
    card = (adapter_dir / "README.md").read_text()
    assert "tokenizer = AutoTokenizer.from_pretrained(base)  # the base's tokenizer (not saved here)" in card
    assert "from_pretrained(adapter)" not in card
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)  # what the card says, with BASE = the base folder
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(adapter_dir))
    assert model(**tokenizer("a b c", return_tensors="pt")).logits.shape[-1] == model.config.vocab_size


def test_real_run_on_a_hub_id_exports_naming_that_id(tmp_path, tiny_model_path, monkeypatch, capsys):
    """A real short train() run on local Ray with model.name_or_path=acme/tiny-qwen at
    model.revision=v1, resolved from a hub-style local cache offline: the run trains on that
    revision's snapshot, the adapter names `acme/tiny-qwen` and the revision, its card has the
    held-out scores and the hub id as base_model, and the merge equals base + adapter through PEFT."""
    import ray

    from eslora.cluster.pool import start_local_ray
    from eslora.train import train
    from test_model_resolve import TAGGED, make_hub_cache

    snapshot = make_hub_cache(tmp_path / "hub", tiny_model_path) / "snapshots" / TAGGED
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start_local_ray(num_cpus=2)
    try:
        run = train(tiny_config("acme/tiny-qwen", "model.revision=v1", f"run.dir={tmp_path}", "run.name=real",
                                "run.generations=1", "run.eval_every=1", "task.eval_prompts=2",
                                "task.eval_max_new_tokens=4"))
    finally:
        ray.shutdown()
    assert f"eslora: model {snapshot} " in capsys.readouterr().out  # the revision's snapshot was trained
    merged = export_run(run, merge_to=tmp_path / "merged")

    adapter = run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "acme/tiny-qwen" and config["revision"] == "v1"
    card = (adapter / "README.md").read_text()
    assert "base_model: acme/tiny-qwen" in card.split("---\n")[1]
    assert "| reward |" in card and "**Generations:** 1" in card
    assert "base_model: acme/tiny-qwen" in (merged / "README.md").read_text()
    with_peft = peft_generate(snapshot, adapter, PROMPTS, TOKENS)
    assert [ids for ids, _ in peft_generate(merged, None, PROMPTS, TOKENS)] == [ids for ids, _ in with_peft]


def test_export_refuses_a_folder_that_holds_files(tmp_path, tiny_model_path):
    run = make_run(tmp_path / "run", tiny_model_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier export")
    with pytest.raises(ExportError, match="not empty"):
        export_run(run, merge_to=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "an earlier export"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_run(run, merge_to=empty) == empty and (empty / "model.safetensors").is_file()


def test_export_of_a_folder_that_is_no_run_is_refused(tmp_path):
    with pytest.raises(ExportError, match="config.yaml"):
        export_run(tmp_path)


def test_export_names_the_key_when_the_base_model_is_gone(tmp_path, tiny_model_path):
    import shutil

    base = tmp_path / "moved-base"
    shutil.copytree(tiny_model_path, base)
    run = make_run(tmp_path / "run", base)
    shutil.rmtree(base)
    with pytest.raises(EsloraError, match=f"model.name_or_path='{base}'"):
        export_run(run, merge_to=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def eslora_export(run: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`eslora export RUN ...` as a user runs it, with the hub settings in the environment
    (huggingface_hub reads them at import)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "eslora", "export", str(run), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The CLI's report of an EsloraError: exit 1 and one line `error: ...` on stderr."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_cli_export_merges_and_refuses_a_used_folder(tmp_path, tiny_model_path):
    run = make_run(tmp_path / "run", tiny_model_path)
    proc = eslora_export(run, "--merge", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    again = one_error_line(eslora_export(run, "--merge", str(tmp_path / "merged")))
    assert again == f"error: {tmp_path / 'merged'} exists and is not empty; export writes only into a new or empty folder"


def test_push_to_an_unreachable_hub_fails_cleanly(tmp_path, tiny_model_path):
    run = make_run(tmp_path / "run", tiny_model_path)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    proc = eslora_export(run, "--push-to-hub", "someone/eslora-test",
                         env={"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")})
    assert one_error_line(proc).startswith(f"error: push of {run / 'adapter'} to {endpoint}/someone/eslora-test failed")
    adapter = run / "adapter"  # the adapter was finished before the push: whole, and nothing else
    assert (adapter / "README.md").is_file() and load_adapter(adapter).spec.r == 2
    assert not [p for p in adapter.iterdir() if p.name.startswith(".")]


def test_push_with_the_hub_offline_fails_before_merging(tmp_path, tiny_model_path):
    run = make_run(tmp_path / "run", tiny_model_path)
    proc = eslora_export(run, "--merge", str(tmp_path / "merged"), "--push-to-hub", "someone/eslora-test",
                         env={"HF_HUB_OFFLINE": "1"})
    assert one_error_line(proc).startswith("error: cannot push to someone/eslora-test: HF_HUB_OFFLINE is set")
    assert not (tmp_path / "merged").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


class _WritesMarker:
    """A pickle that, when loaded, creates a file: what loading pickled weights could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


@pytest.mark.parametrize("weights_name", ["adapter_model.bin", "adapter_model.safetensors"])
def test_a_crafted_adapter_is_refused_naming_the_file_and_runs_nothing(tmp_path, tiny_model_path, weights_name):
    run = make_run(tmp_path / "run", tiny_model_path)
    adapter = run / "adapter"
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "marker"
    (adapter / weights_name).write_bytes(pickle.dumps(_WritesMarker(marker)))

    with pytest.raises(AdapterError, match=re.escape(str(adapter / weights_name))) as err:
        load_adapter(adapter)
    assert isinstance(err.value, EsloraError)
    with pytest.raises(AdapterError, match=weights_name):
        export_run(run, merge_to=tmp_path / "merged")
    with pytest.raises(AdapterError, match=weights_name):
        finish_adapter(adapter, str(tiny_model_path), "x", {})
    assert not marker.exists(), "reading an adapter must never run code"
    assert not (tmp_path / "merged").exists() and not (adapter / "README.md").exists()


def test_an_adapter_for_another_model_is_refused_before_writing(tmp_path, tiny_model_path):
    run = make_run(tmp_path / "run", tiny_model_path)
    adapter = load_adapter(run / "adapter")
    wider = {k: np.zeros((v.shape[0] + 1, v.shape[1]), np.float32) if "lora_A" in k else v
             for k, v in adapter.tensors.items()}  # rank 3 tensors under a rank 2 config
    Adapter("other", adapter.spec, wider).save(run / "adapter")
    with pytest.raises(AdapterError, match="does not fit the model: size mismatch"):
        export_run(run, merge_to=tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_quantized_base_is_refused_for_merging(tmp_path, tiny_model_path):
    import shutil

    base = tmp_path / "quantized-base"
    shutil.copytree(tiny_model_path, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (base / "config.json").write_text(json.dumps(config))
    run = make_run(tmp_path / "run", base)
    with pytest.raises(ExportError, match="is a quantized model: merging needs a full-precision base"):
        export_run(run, merge_to=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_an_adapter_config_that_is_not_json_is_refused_naming_it(tmp_path, tiny_model_path):
    adapter = make_run(tmp_path / "run", tiny_model_path) / "adapter"
    (adapter / "adapter_config.json").write_text("r: 2\n")
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter(adapter)
