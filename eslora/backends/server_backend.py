"""What the SGLang and vLLM backends share: one local server per backend object.

The server's life (a private adapter folder, first start, restart within `backend.max_restarts`),
the HTTP error mapping (a dead or hung server is `ServerCrashed`, a request the live server
refuses is `BackendError`), adapter write / load / unload (unload tolerates a dead server), the
rerun-on-crash loop and the per-call `CallStats`. sglang.py and vllm.py add their command line,
request format and batching.

Fault classes, which the pool's fault policy relies on: inside a call a crash is retried on a
fresh server; once `backend.max_restarts` restarts are spent `restart` raises `ServerCrashed`
(the actor is lost, its calls rerun elsewhere). Everything a rerun cannot fix is `BackendError`.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import requests
import torch

from eslora.backends.base import Backend, BackendError, CallStats, Completion, ServerCrashed
from eslora.backends.common import torch_dtype
from eslora.backends.server import ServerProcess, free_port
from eslora.lora import Adapter, LoraSpec

T = TypeVar("T")


class ServerBackend(Backend):
    """Generation on one server process that this object starts, restarts and stops.

    Subclasses set `kind`, `display`, `load_path`, `unload_path` and write `_command` (and
    optionally `_env`, `_on_started`, `_stop_server`, `_check_folder`, `_crashed`).
    """

    kind = "server"  # folder, process and log names
    display = "server"  # in error messages
    load_path = ""
    unload_path = ""
    # False: nothing generates while adapters are written, loaded or unloaded, so all of that
    # is exposed hand-off; True: the subclass measures the exposed part itself.
    handoff_overlaps = True

    def __init__(
        self, backend_cfg: Any, model_path: str, spec: LoraSpec, dtype: str, *,
        adapter_dir: str, start_timeout_s: float, adapter_file_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.model_path = str(model_path)
        self.spec = spec
        self.dtype = dtype
        model_dtype = torch_dtype(dtype)  # refuses an unknown model.dtype before any server starts
        self.adapter_file_dtype = adapter_file_dtype or model_dtype
        self.max_loras_per_batch = int(backend_cfg.max_loras_per_batch)
        self.max_restarts = int(backend_cfg.max_restarts)
        self.request_timeout_s = float(backend_cfg.request_timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        # One private folder per backend: two actors on one host never share adapter files.
        self.tag = f"es{os.getpid()}{uuid.uuid4().hex[:6]}"
        self.adapter_root = Path(adapter_dir or "/dev/shm") / f"eslora-{self.kind}-{self.tag}"
        self.server: Optional[ServerProcess] = None
        self.restarts = 0  # over the backend's life
        self.start_seconds: list[float] = []  # every server start, restarts included
        self.loaded_count = 0  # adapters loaded so far (tests watch it to crash a server mid-batch)
        self._counter = 0
        self._lock = threading.Lock()  # counters, the pending record, the thread pool
        self._restart_lock = threading.RLock()  # one start or restart at a time (a failed self-check stops)
        self._pool: Optional[ThreadPoolExecutor] = None
        # Work no call has reported yet (server starts, restarts, unloads that finish after their
        # call): the next call to finish takes it, so sums over calls are exact.
        self._pending = CallStats()

    # ------------------------------------------------------------------ hooks
    def _command(self, port: int) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        """Added to the user's environment, which passes through (HF_HUB_OFFLINE only if set there)."""
        return {"PYTHONUNBUFFERED": "1"}

    def _on_started(self) -> None:
        """After every healthy start (first and restarts)."""

    def _on_first_start(self) -> None:
        """After the first start only (e.g. a self-check)."""

    def _check_folder(self, folder: Path, where: str) -> None:
        """A written adapter folder, before the server sees it."""

    def _crashed(self, server: ServerProcess, status: int) -> bool:
        """After an answer other than 200: is the server down (a crash), not refusing a request?"""
        return status >= 500

    def _stop_server(self, grace_s: float = 20.0) -> None:
        assert self.server is not None
        self.server.stop(grace_s=grace_s)

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        if self.server is None:
            raise BackendError(f"{self.display} server not started")
        return self.server.url

    def start(self) -> None:
        """First start. Idempotent; a server that died later is replaced by `restart`."""
        with self._restart_lock:
            if self.server is not None:
                return
            try:
                self._start_server()
                self._on_first_start()
            except BaseException:
                # A server that came up but failed its start-up work (self-check, dummy unload)
                # must not keep running, nor let the next start() skip that work.
                if self.server is not None:
                    self._stop_server()
                    self.server = None
                raise

    def _start_server(self) -> None:
        self.adapter_root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        # CUDA_VISIBLE_DEVICES is inherited: inside a Ray actor with num_gpus=1 Ray has set it.
        self.server = ServerProcess(self._command(port), port=port, env=self._env(), name=f"{self.kind}-{self.tag}")
        try:
            seconds = self.server.start(timeout_s=self.start_timeout_s)
        except BackendError:
            self.server = None  # so a later start() tries afresh
            raise
        self.start_seconds.append(seconds)
        with self._lock:
            self._pending.server_start_s += seconds
        self._on_started()

    def restart(self, failed: Optional[ServerProcess] = None) -> None:
        """Replace the server `failed` (the one the caller saw die or hang; None = none was up)
        with a fresh one, each attempt counting against backend.max_restarts; ServerCrashed once
        they are spent. If another thread has replaced it already, return: the caller retries."""
        with self._restart_lock:
            if self.server is not None and self.server is not failed:
                return
            last_error = ""
            while True:
                if self.restarts >= self.max_restarts:
                    log = last_error or (self.server.log_tail() if self.server is not None else "(no server)")
                    raise ServerCrashed(
                        f"{self.display} server failed and was already restarted {self.restarts} times "
                        f"(backend.max_restarts={self.max_restarts}); last log lines:\n{log}"
                    )
                self.restarts += 1
                with self._lock:
                    self._pending.restarts += 1
                if self.server is not None:
                    # Reaps the whole group, so the GPU is free for the next one. self.server keeps
                    # pointing at the dead one until replaced: a concurrent call fails on it and waits here.
                    self._stop_server(grace_s=5.0)
                shutil.rmtree(self.adapter_root, ignore_errors=True)
                try:
                    self._start_server()
                    return
                except ServerCrashed:
                    raise
                except BackendError as err:  # this attempt did not come up: the next one, if any
                    last_error = str(err)

    def stop(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._restart_lock:
            if self.server is not None:
                self._stop_server()
                self.server = None
        shutil.rmtree(self.adapter_root, ignore_errors=True)

    def healthy(self) -> bool:
        return self.server is not None and self.server.alive() and self.server.healthy()

    def _threads(self, workers: int) -> ThreadPoolExecutor:
        """The backend's worker threads (created on first use, stopped by `stop`)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"eslora-{self.kind}")
            return self._pool

    def _rerun_on_crash(self, fn: Callable[[], T]) -> T:
        """`fn()` until the server does not crash under it, each crash replacing the server.
        `fn` must be safe to rerun: same inputs, and greedy decoding gives the same outputs."""
        while True:
            server = self.server
            try:
                return fn()
            except ServerCrashed:
                self.restart(failed=server)

    # ------------------------------------------------------------------ HTTP
    def _post(self, path: str, payload: dict, timeout: Optional[float] = None) -> Any:
        """POST JSON, return the answer (JSON, else text). ServerCrashed if the server is dead or hung,
        BackendError (with the server's message) if the live server refused the request."""
        server = self.server
        if server is None or not server.alive():
            raise ServerCrashed(f"{path}: the {self.display} server is not running")
        try:
            resp = requests.post(server.url + path, json=payload, timeout=timeout or self.request_timeout_s)
        except requests.RequestException as err:
            # A refused/reset connection or a timeout: the server is dead or hung.
            raise ServerCrashed(f"{path}: {type(err).__name__}: {err}") from None
        if resp.status_code != 200:
            if self._crashed(server, resp.status_code):
                raise ServerCrashed(f"{path}: HTTP {resp.status_code} and the server is down: {error_message(resp)}")
            raise BackendError(f"{self.display} {path} failed: HTTP {resp.status_code}: {error_message(resp)}")
        try:
            return resp.json()
        except ValueError:  # vLLM's load/unload answer plain text
            return resp.text

    # ------------------------------------------------------------------ adapters
    def _next_names(self, count: int) -> list[str]:
        # Unique per load: a reused name with new weights could be served from stale cached state
        # (vLLM keys its prefix cache on (lora_name, lora_path)).
        with self._lock:
            first, self._counter = self._counter, self._counter + count
        return [f"{self.tag}-{first + i}" for i in range(count)]

    def _write(self, adapter: Adapter, name: str = "") -> Path:
        return adapter.save(self.adapter_root / (name or adapter.name), base_model=self.model_path,
                            dtype=self.adapter_file_dtype)

    def _load_batch(self, adapters: Sequence[Adapter], call: Optional[CallStats] = None) -> list[str]:
        """Write and load one batch; returns the server-side names. If any fails, what was loaded
        is unloaded and the files deleted, so nothing of a failed batch stays. `call` (the
        calling generate()'s own record) gets write_s / load_s added."""
        names: list[str] = []
        for adapter, name in zip(adapters, self._next_names(len(adapters))):
            t0 = time.perf_counter()
            try:  # a failed write (disk full, a bad tensor) also unloads the batch's earlier members
                path = self._write(adapter, name)
                t1 = time.perf_counter()
                self._check_folder(path, where=f"adapter {adapter.name}")
                self._post(self.load_path, {"lora_name": name, "lora_path": str(path)})
            except Exception:
                shutil.rmtree(self.adapter_root / name, ignore_errors=True)
                self._unload(names)
                raise
            t2 = time.perf_counter()
            if call is not None:
                call.write_s += t1 - t0
                call.load_s += t2 - t1
            names.append(name)
            self.loaded_count += 1
        return names

    def _unload(self, names: Sequence[str]) -> None:
        """Unload adapters and delete their files. A dead server holds nothing, so errors are
        ignored (a restart starts clean). The seconds go to the next call's record."""
        for name in names:
            t0 = time.perf_counter()
            try:
                self._post(self.unload_path, {"lora_name": name})
            except BackendError:
                pass
            seconds = time.perf_counter() - t0
            with self._lock:
                self._pending.unload_s += seconds
            shutil.rmtree(self.adapter_root / name, ignore_errors=True)

    # ------------------------------------------------------------------ stats
    def _finish_call(self, call: CallStats, out: Sequence[Optional[Sequence[Completion]]], started: float) -> None:
        """Add the work no call has reported yet, then complete and publish `call` as every backend does."""
        with self._lock:
            pending, self._pending = self._pending, CallStats()
        call.add(pending)
        if not self.handoff_overlaps:
            call.exposed_handoff_s = call.write_s + call.load_s + call.unload_s
        super()._finish_call(call, out, started)


def error_message(resp: requests.Response) -> str:
    """A server's error text: vLLM's JSON is {"error": {"message": ...}}, SGLang's {"message":
    ...}; else the raw text."""
    try:
        body = resp.json()
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else (body.get("message") if isinstance(body, dict) else None)
        if message:
            return re.sub(r"\s+", " ", str(message))[:1000]
    except ValueError:
        pass
    return resp.text[:1000]
