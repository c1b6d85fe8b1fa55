"""LoRA adapters as plain tensors: the shapes a model gives them, PEFT files in and out.

An `Adapter` is a name, a `LoraSpec` and a dict of fp32 numpy arrays keyed by PEFT's saved names
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ...). The ES engine sees only
the dict; backends see only `Adapter`s; this module is the one place that knows PEFT's layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from eslora.errors import EsloraError
from eslora.files import write_atomic

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterError(EsloraError, ValueError):
    """An adapter folder that cannot be read safely (missing, unsafe or malformed file)."""


@dataclass(frozen=True)
class LoraSpec:
    r: int = 1
    alpha: float = 2.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    layers: Optional[tuple[int, ...]] = tuple(range(10))  # None = every layer

    def __post_init__(self) -> None:
        # Order carries no meaning (PEFT stores a set): normalise so equal specs compare equal.
        object.__setattr__(self, "target_modules", tuple(sorted(self.target_modules)))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(self.layers)))

    @classmethod
    def from_config(cls, cfg) -> "LoraSpec":  # cfg: eslora.config.LoraConfig
        layers = None if cfg.layers is None else tuple(int(x) for x in cfg.layers)
        return cls(r=int(cfg.r), alpha=float(cfg.alpha), target_modules=tuple(cfg.target_modules), layers=layers)

    def peft_config(self, base_model: str = ""):
        """The PEFT LoraConfig: simple module names + layers_to_transform (what SGLang accepts)."""
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=self.r,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            layers_to_transform=None if self.layers is None else list(self.layers),
            lora_dropout=0.0,
            bias="none",
            base_model_name_or_path=base_model or None,
        )


@dataclass
class Adapter:
    """One LoRA adapter: what a backend loads. Tensors are fp32; backends cast as they need."""

    name: str
    spec: LoraSpec
    tensors: Mapping[str, np.ndarray] = field(repr=False)

    def save(self, folder: str | Path, base_model: str = "", dtype: torch.dtype = torch.float32) -> Path:
        """Write PEFT's files (adapter_config.json + adapter_model.safetensors) into `folder`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.spec.peft_config(base_model).to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        # np.array copies: arrays from Ray's object store are read-only, torch wants writable memory.
        tensors = {k: torch.from_numpy(np.array(v)).to(dtype) for k, v in self.tensors.items()}
        save_file(tensors, str(folder / WEIGHTS_FILE))
        return folder


def load_adapter(folder: str | Path, name: str = "") -> Adapter:
    """Read a PEFT adapter folder (as written by `Adapter.save` or PEFT's save_pretrained).

    Only JSON and safetensors are read, never a pickle (`adapter_model.bin` is refused): a file
    this tool reads must not be able to run code. Raises AdapterError naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not weights_path.is_file() and (folder / "adapter_model.bin").is_file():
        raise AdapterError(
            f"{folder / 'adapter_model.bin'}: pickled PEFT weights are refused (loading a pickle can "
            f"run code); save the adapter with safe_serialization=True ({WEIGHTS_FILE})"
        )
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterError(f"{folder} is not a PEFT adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = read_adapter_config(folder)
    try:
        check_simple_target_modules(config, where=str(config_path))
        layers = config.get("layers_to_transform")
        if isinstance(layers, int):
            layers = [layers]
        spec = LoraSpec(
            r=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            target_modules=(config["target_modules"],) if isinstance(config["target_modules"], str) else tuple(config["target_modules"]),
            layers=None if layers is None else tuple(layers),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterError(f"{config_path}: not a LoRA adapter config ({type(err).__name__}: {err})") from None
    try:
        tensors = {k: v.float().numpy() for k, v in load_file(str(weights_path)).items()}
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{weights_path}: not a safetensors file ({err})") from None
    return Adapter(name=name or folder.name, spec=spec, tensors=tensors)


def read_adapter_config(folder: str | Path) -> dict:
    """adapter_config.json of a PEFT folder as a dict (AdapterError if absent or not JSON)."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{path}: cannot read the adapter config ({err})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: the adapter config is not a JSON object")
    return config


def set_base_model(folder: str | Path, base_model: str, revision: str = "") -> None:
    """Name the adapter's base in adapter_config.json as the user named it (hub id, path, name).

    PEFT's AutoPeftModel loads `base_model_name_or_path` (at `revision`); an absolute cache path
    there would not travel. Written atomically: an interrupted write leaves the old config whole.
    """
    config = read_adapter_config(folder)
    config["base_model_name_or_path"] = base_model
    config["revision"] = revision or None
    write_atomic(Path(folder) / CONFIG_FILE, json.dumps(config, indent=2, default=str).encode())


def peft_model_with(model, adapter: Adapter, base_model: str = ""):
    """`model` (a transformers causal LM) wrapped by PEFT with `adapter`'s weights loaded.

    Builds the PeftModel from the spec and sets the tensors (what `load_adapter` read safely),
    instead of letting PEFT open files itself; every tensor must land (no missing, no unexpected).
    """
    from peft import get_peft_model, set_peft_model_state_dict

    if not adapter.tensors:
        raise AdapterError(f"adapter {adapter.name!r} holds no tensors")
    peft_model = get_peft_model(model, adapter.spec.peft_config(base_model))
    dtype = next(model.parameters()).dtype
    state = {k: torch.from_numpy(np.array(v)).to(dtype) for k, v in adapter.tensors.items()}
    try:
        result = set_peft_model_state_dict(peft_model, state)
    except RuntimeError as err:  # torch's "size mismatch for <name>": trained for another model
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else repr(err))
        raise AdapterError(f"adapter {adapter.name!r} does not fit the model: {detail}") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise AdapterError(
            f"adapter {adapter.name!r} does not fit the model: unexpected {list(result.unexpected_keys)[:3]}, "
            f"missing {missing[:3]}"
        )
    return peft_model


def check_simple_target_modules(adapter_config: Mapping, where: str = "adapter") -> None:
    """Refuse explicit per-layer paths in target_modules: SGLang crashes on them
    (NotImplementedError in get_hidden_dim); simple names + layers_to_transform work."""
    modules = adapter_config.get("target_modules") or []
    if isinstance(modules, str):
        modules = [modules]
    paths = [m for m in modules if "." in m]
    if paths:
        raise ValueError(
            f"{where}: target_modules holds explicit per-layer paths such as {paths[0]!r}; "
            "use simple module names (q_proj, k_proj, ...) plus layers_to_transform instead"
        )


def check_rank(adapter_config: Mapping, max_rank: int, where: str = "adapter") -> None:
    r = int(adapter_config.get("r", 0))
    if r > max_rank:
        raise ValueError(f"{where}: LoRA rank r={r} exceeds the server's max LoRA rank {max_rank}")


def check_servable(spec: LoraSpec, max_rank: int, where: str = "adapter") -> None:
    """What every backend checks before an adapter reaches it: simple module names, rank <= max."""
    config = {"r": spec.r, "target_modules": list(spec.target_modules)}
    check_simple_target_modules(config, where=where)
    check_rank(config, max_rank, where=where)


def shape_mismatch(expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, np.ndarray]) -> Optional[str]:
    """What keeps `tensors` from being the LoRA tensors `expected` (name -> shape), or None if they are."""
    got = {name: tuple(np.shape(t)) for name, t in tensors.items()}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(n for n in set(expected) & set(got) if tuple(expected[n]) != got[n])
    parts = (
        f"missing {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "") if missing else "",
        f"unexpected {extra[0]}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "") if extra else "",
        f"{wrong[0]} has shape {got[wrong[0]]}, the model needs {tuple(expected[wrong[0]])}" if wrong else "",
    )
    return "; ".join(part for part in parts if part) or None


def adapter_shapes(model_path: str, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every LoRA tensor PEFT creates for `spec` on this model.

    Builds the model on the meta device (no weights read), so it costs a second even for 7B.
    """
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(model, spec.peft_config(model_path))
    state = get_peft_model_state_dict(peft_model)
    if not state:
        raise ValueError(f"LoRA spec {spec} matches no module of {model_path}")
    return {name: tuple(t.shape) for name, t in sorted(state.items())}

