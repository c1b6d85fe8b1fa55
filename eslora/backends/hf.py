"""In-process backend: transformers + PEFT, several adapters in one mixed batch.

The CPU default. PEFT's `adapter_names=` puts a different adapter on each row of one
`generate` call, so a batch of K adapters × P prompts is a single batched generation, the same
shape of work a multi-LoRA server does. Adapters live in K fixed slots whose weights are
overwritten per batch, so memory does not grow with the population.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from eslora.backends.base import Backend, BackendError, CallStats, Completion, Sampling
from eslora.backends.common import check_adapter, row_batches, torch_dtype
from eslora.lora import Adapter, LoraSpec


class HFBackend(Backend):
    """`backend_cfg`: the config's `backend` section; `dtype`: `model.dtype`."""

    def __init__(self, backend_cfg: Any, model_path: str, spec: LoraSpec, dtype: str, device: str = "") -> None:
        super().__init__()
        self.model_path = model_path
        self.spec = spec
        self.max_loras_per_batch = int(backend_cfg.max_loras_per_batch)
        self.dtype = torch_dtype(dtype)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = None
        self.tokenizer = None
        self._slots = [f"slot{i}" for i in range(self.max_loras_per_batch)]
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.model is not None:
            return
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype).to(self.device)
        base.eval()
        peft_config = self.spec.peft_config(self.model_path)
        model = get_peft_model(base, peft_config, adapter_name=self._slots[0])
        for slot in self._slots[1:]:
            model.add_adapter(slot, peft_config)
        model.eval()
        self.model, self.tokenizer = model, tokenizer

    def stop(self) -> None:
        self.model = None
        self.tokenizer = None

    def generate(
        self, prompts: Sequence[str], adapters: Sequence[Optional[Adapter]], sampling: Sampling
    ) -> list[list[Completion]]:
        self.start()
        for adapter in adapters:
            if adapter is not None:
                self._check(adapter)
        results: list[Optional[list[Completion]]] = [None] * len(adapters)
        batches = row_batches(adapters, self.max_loras_per_batch)
        call = CallStats(members=len(adapters), prompts=len(prompts), batches=len(batches))
        started = time.perf_counter()
        with self._lock:
            for rows in batches:
                outs = self._generate_batch(prompts, [adapters[i] for i in rows], sampling, call)
                for row, out in zip(rows, outs):
                    results[row] = out
        self._finish_call(call, results, started)
        return results  # type: ignore[return-value]

    def _check(self, adapter: Adapter) -> None:
        check_adapter(adapter.spec, self.spec.r, where=f"adapter {adapter.name}")
        if adapter.spec != self.spec:
            raise BackendError(f"adapter {adapter.name}: spec {adapter.spec} differs from the backend's {self.spec}")

    @torch.no_grad()
    def _generate_batch(
        self, prompts: Sequence[str], adapters: Sequence[Optional[Adapter]], sampling: Sampling, call: CallStats
    ) -> list[list[Completion]]:
        from peft import set_peft_model_state_dict

        model, tokenizer = self.model, self.tokenizer
        names: list[str] = []
        loading = time.perf_counter()
        for slot, adapter in zip(self._slots, adapters):
            if adapter is None:
                names.append("__base__")  # PEFT's name for "no adapter on this row"
                continue
            # a copy: the tensors may be read-only views (Ray's object store), which torch warns about
            state = {k: torch.tensor(np.asarray(v)) for k, v in adapter.tensors.items()}
            result = set_peft_model_state_dict(model, state, adapter_name=slot)
            if getattr(result, "unexpected_keys", None):
                raise BackendError(f"adapter {adapter.name}: tensors the model does not have: {result.unexpected_keys[:3]}")
            names.append(slot)
        # Filling the slots is this backend's hand-off: nothing generates meanwhile.
        seconds = time.perf_counter() - loading
        call.load_s += seconds
        call.exposed_handoff_s += seconds
        rows = [(a, p) for a in range(len(adapters)) for p in range(len(prompts))]
        enc = tokenizer([prompts[p] for _, p in rows], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed)
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        generating = time.perf_counter()
        out = model.generate(**enc, adapter_names=[names[a] for a, _ in rows], **kwargs)
        call.generate_s += time.perf_counter() - generating
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        results: list[list[Completion]] = [[] for _ in adapters]
        for (a, _), ids in zip(rows, new_tokens.tolist()):
            length = next((i + 1 for i, t in enumerate(ids) if t in stop_ids), len(ids))
            text = tokenizer.decode(ids[:length], skip_special_tokens=True)
            results[a].append(Completion(text=text, num_tokens=length))
        return results
