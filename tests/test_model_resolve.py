"""model.name_or_path as users name it: hub ids (+ model.revision) from a hub-style local cache,
a user's own .gguf file, and the errors that name the key. No network: the cache is laid out as
the hub writes it (models--org--name/snapshots/<commit>/, refs/<branch>), built from the tiny model.
"""

from __future__ import annotations

import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eslora.errors import EsloraError
from eslora.models import ModelError, ModelFetchError, build_tiny_model, is_complete, is_hub_id, resolve_model
from gguf_writer import write_tiny_gguf

MAIN = "a" * 40
TAGGED = "b" * 40


def make_hub_cache(root: Path, tiny_model_path: Path, repo: str = "acme/tiny-qwen") -> Path:
    """A Hugging Face hub cache holding `repo` at two commits: main (seed 0) and tag v1 (seed 1)."""
    org, name = repo.split("/")
    repo_dir = root / f"models--{org}--{name}"
    shutil.copytree(tiny_model_path, repo_dir / "snapshots" / MAIN)
    build_tiny_model(repo_dir / "snapshots" / TAGGED, seed=1)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(MAIN)
    (repo_dir / "refs" / "v1").write_text(TAGGED)
    return repo_dir


@pytest.fixture()
def hub_cache(tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "hub"
    repo_dir = make_hub_cache(root, tiny_model_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo_dir


def test_hub_id_resolves_to_its_snapshot_offline(hub_cache: Path) -> None:
    folder = resolve_model("acme/tiny-qwen")
    assert Path(folder) == hub_cache / "snapshots" / MAIN
    model = AutoModelForCausalLM.from_pretrained(folder)  # a folder every backend can read
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert AutoTokenizer.from_pretrained(folder).eos_token == "<|im_end|>"


def test_revision_picks_a_branch_tag_or_commit(hub_cache: Path) -> None:
    assert Path(resolve_model("acme/tiny-qwen", revision="main")) == hub_cache / "snapshots" / MAIN
    assert Path(resolve_model("acme/tiny-qwen", revision="v1")) == hub_cache / "snapshots" / TAGGED
    assert Path(resolve_model("acme/tiny-qwen", revision=TAGGED)) == hub_cache / "snapshots" / TAGGED
    main = (hub_cache / "snapshots" / MAIN / "model.safetensors").read_bytes()
    assert main != (hub_cache / "snapshots" / TAGGED / "model.safetensors").read_bytes()


def test_hub_errors_name_the_key(hub_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        resolve_model("acme/tiny-qwen", revision="no-such-branch")
    assert "model.revision='no-such-branch'" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)
    with pytest.raises(ModelError) as err:
        resolve_model("acme/not-cached")
    assert "model.name_or_path='acme/not-cached'" in str(err.value) and "local Hugging Face cache" in str(err.value)
    assert isinstance(err.value, EsloraError)  # the CLI prints it as one line
    with pytest.raises(ModelError, match="model.revision"):
        resolve_model(str(tmp_path), revision="v1")  # a revision means nothing for a local folder
    with pytest.raises(ModelError, match="model.revision"):
        resolve_model("smollm2-135m", revision="v1")


def test_hub_id_shape() -> None:
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and is_hub_id("acme/tiny_qwen.v2")
    assert not is_hub_id("smollm2-135m") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c")
    assert not is_hub_id("dir/model.gguf")


class _CountingHub(http.server.BaseHTTPRequestHandler):
    """A hub endpoint that is down (HTTP 503) and counts the requests it got."""

    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        self.send_response(503)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


def test_offline_is_a_choice_not_forced(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        _CountingHub.requests = []
        assert Path(resolve_model("acme/tiny-qwen")) == hub_cache / "snapshots" / MAIN
        assert _CountingHub.requests == []  # HF_HUB_OFFLINE=1: the hub is never asked
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        # Online: the hub is asked first; it is down, so the cached snapshot is used (as transformers does).
        assert Path(resolve_model("acme/tiny-qwen")) == hub_cache / "snapshots" / MAIN
        assert any("acme/tiny-qwen" in path for path in _CountingHub.requests)
    finally:
        server.shutdown()
        server.server_close()


def test_gguf_file_converts_once_to_a_folder(tiny_model_path: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESLORA_CACHE", str(tmp_path / "cache"))
    gguf_file = write_tiny_gguf(tiny_model_path, tmp_path / "mine.gguf")
    folder = Path(resolve_model(str(gguf_file)))
    assert is_complete(folder) and folder.parent == tmp_path / "cache" / "models"
    assert resolve_model(str(gguf_file)) == str(folder)  # cached by content: no second conversion
    assert len([p for p in folder.parent.iterdir() if not p.name.startswith(".")]) == 1

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    converted = AutoModelForCausalLM.from_pretrained(folder)
    for name, param in reference.state_dict().items():  # the GGUF's F32 weights, saved as bf16
        assert torch.equal(converted.state_dict()[name], param.to(torch.bfloat16)), name
    ours, theirs = AutoTokenizer.from_pretrained(tiny_model_path), AutoTokenizer.from_pretrained(folder)
    text = "What is 12 + 34? <answer> (11 - 5) * 4 </answer>"
    assert ours.encode(text) == theirs.encode(text)
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)


def test_bad_gguf_paths_are_refused_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESLORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "absent.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_text('{"not": "a gguf"}')
    with pytest.raises(ModelFetchError, match="not a GGUF file"):
        resolve_model(str(fake))
    assert not (tmp_path / "cache").exists()  # nothing half-built is left
