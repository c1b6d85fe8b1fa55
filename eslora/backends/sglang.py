"""SGLang backend: one GPU-pinned SGLang server per actor, LoRA members loaded and unloaded per batch.

Follows the field notes in ../shared/seeds (SGLang multi-LoRA serving with dynamic adapter loading,
simple `target_modules` + `layers_to_transform`) and SGLang 0.5.17's HTTP API:
`/load_lora_adapter`, `/unload_lora_adapter`, and native `/generate` with one `lora_path` per
prompt. An adapter is never selected with `model=<lora_name>` in the OpenAI API: SGLang silently
serves the base model then (measured; see docs/sglang.md).

A generation's members are cut into batches of at most `max_loras_per_batch`. While batch k
generates, a single hand-off thread writes and loads batch k+1 and unloads batch k-1, so the
server holds at most two batches' adapters in CPU memory (what `--max-loaded-loras 2N` allows
with `--enable-lora-overlap-loading`) and its GPU pool of N slots evicts finished adapters.
Two threads may call `generate` at once (the Ray actor's next call): their loads queue on the
same hand-off thread, so the second call's adapters load while the first call generates.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import requests
import torch

from eslora.backends.base import Backend, BackendError, Completion, Sampling
from eslora.backends.server import ServerProcess, free_port
from eslora.lora import Adapter, LoraSpec, adapter_shapes, check_servable

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

SELF_CHECK_PROMPT = "Question: What is the capital of France? Answer in one sentence.\nAnswer:"


class ServerCrashed(RuntimeError):
    """The server process died or stopped answering while serving a batch (restartable)."""


def build_command(cfg, model_path: str, port: int, dummy_path: str = "") -> list[str]:
    """The `python -m sglang.launch_server ...` command line for `cfg` (eslora.config.Config)."""
    sg = cfg.backend.sglang
    n = int(cfg.backend.max_loras_per_batch)
    cmd = [
        sg.python or sys.executable, "-m", "sglang.launch_server",
        "--model-path", model_path,
        "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora",
        "--max-loras-per-batch", str(n),
        "--max-lora-rank", str(sg.max_lora_rank or cfg.lora.r),
        "--lora-target-modules", *cfg.lora.target_modules,
        "--lora-backend", sg.lora_backend,
    ]
    if cfg.model.dtype in _DTYPES:
        cmd += ["--dtype", cfg.model.dtype]
    if sg.disable_radix_cache:
        cmd.append("--disable-radix-cache")
    if sg.deterministic:
        cmd.append("--enable-deterministic-inference")
    if sg.lora_overlap_loading:
        # SGLang 0.5.17 pins overlap-loaded adapters in CPU memory and then demands
        # max_loaded_loras <= 2 * max_loras_per_batch; two batches is what our hand-off keeps.
        cmd += ["--enable-lora-overlap-loading", "--max-loaded-loras", str(2 * n)]
    if sg.attention_backend:
        cmd += ["--attention-backend", sg.attention_backend]
    if sg.sampling_backend:
        cmd += ["--sampling-backend", sg.sampling_backend]
    if sg.disable_cuda_graph:
        cmd.append("--disable-cuda-graph")
    if sg.mem_fraction_static:
        cmd += ["--mem-fraction-static", str(sg.mem_fraction_static)]
    if dummy_path:
        cmd += ["--lora-paths", f"dummy={dummy_path}"]
    cmd += list(sg.extra_args)
    return cmd


def uncovered(start: float, end: float, intervals: Sequence[tuple[float, float]]) -> float:
    """Length of [start, end] not covered by any of `intervals` (a, b)."""
    spans = sorted((max(a, start), min(b, end)) for a, b in intervals if b > start and a < end)
    covered, reach = 0.0, start
    for a, b in spans:
        if b > reach:
            covered += b - max(a, reach)
            reach = b
    return max(0.0, (end - start) - covered)


def check_adapter_spec(spec: LoraSpec, max_rank: int, server_modules: Sequence[str], where: str) -> None:
    """Refuse adapters SGLang would crash on or silently mis-serve, before they reach the server."""
    try:
        check_servable(spec, max_rank, where=where)
    except ValueError as err:
        raise BackendError(str(err)) from None
    extra = sorted(set(spec.target_modules) - set(server_modules))
    if extra:
        raise BackendError(
            f"{where}: target_modules {extra} are not among the server's --lora-target-modules "
            f"{list(server_modules)} (set lora.target_modules for both)"
        )


class SGLangBackend(Backend):
    """Multi-LoRA generation on one SGLang server that this object starts, pins and stops."""

    concurrent_calls = True

    def __init__(self, cfg, model_path: str) -> None:
        self.cfg = cfg
        self.model_path = str(model_path)
        self.sg = cfg.backend.sglang
        self.max_loras_per_batch = int(cfg.backend.max_loras_per_batch)
        self.max_restarts = int(cfg.backend.max_restarts)
        self.request_timeout_s = float(cfg.backend.request_timeout_s)
        self.spec = LoraSpec.from_config(cfg.lora)
        self.max_lora_rank = int(self.sg.max_lora_rank or cfg.lora.r)
        self.target_modules = tuple(cfg.lora.target_modules)
        self.adapter_dtype = _DTYPES.get(cfg.model.dtype, torch.bfloat16)
        # One private folder per backend: two actors on one host never share adapter files.
        self.tag = f"es{os.getpid()}{uuid.uuid4().hex[:6]}"
        self.adapter_root = Path(self.sg.adapter_dir or "/dev/shm") / f"eslora-sglang-{self.tag}"
        self.server: Optional[ServerProcess] = None
        self.restarts = 0
        self._counter = 0
        self._lock = threading.Lock()
        self._restart_lock = threading.Lock()
        self._local = threading.local()  # each calling thread's own last-call stats
        self._handoff: Optional[ThreadPoolExecutor] = None
        self.self_check_outputs: list[str] = []
        # Running totals in seconds (hand-off ones are added from the hand-off thread).
        self.totals: dict[str, float] = {k: 0.0 for k in ("write_s", "load_s", "unload_s", "generate_s", "server_start_s", "self_check_s")}
        self.start_seconds: list[float] = []  # every server start, restarts included
        self.history: list[dict[str, float]] = []  # one record per generate() call (bench/ reads it)
        self._reported_start_s = 0.0
        self._unreported_unload_s = 0.0  # unloads finish on the hand-off thread after their call
        # [start, end or None] of recent /generate requests, so a call's wait for its adapters can
        # be split into exposed time and time hidden behind another call's generation.
        self._generating: list[list[Optional[float]]] = []
        self._shapes: Optional[dict[str, tuple[int, ...]]] = None
        self.loaded_count = 0  # adapters loaded so far (tests watch it to crash a server mid-batch)

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        if self.server is None:
            raise BackendError("SGLang server not started")
        return self.server.url

    def start(self) -> None:
        """First start + self-check. Idempotent; a server that died later is replaced by `restart`."""
        with self._restart_lock:
            if self.server is not None:
                return
            check_adapter_spec(self.spec, self.max_lora_rank, self.target_modules, where="lora config")
            self._start_server()
            self._self_check()

    def _start_server(self) -> None:
        self.adapter_root.mkdir(parents=True, exist_ok=True)
        dummy = ""
        if self.sg.preload_dummy:
            # The field notes' start-up: the server sees one adapter at launch, we unload it after.
            dummy = str(self._write(self.random_adapter("dummy", seed=12345, scale=0.0)))
        port = free_port()
        env = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        # CUDA_VISIBLE_DEVICES is inherited: inside a Ray actor with num_gpus=1 Ray has set it.
        self.server = ServerProcess(
            build_command(self.cfg, self.model_path, port, dummy), port=port, env=env,
            name=f"sglang-{self.tag}",
        )
        try:
            seconds = self.server.start(timeout_s=float(self.sg.start_timeout_s))
        except BackendError:
            self.server = None  # so a later start() tries afresh
            raise
        self.start_seconds.append(seconds)
        self._add("server_start_s", seconds)
        if dummy:
            self._post("/unload_lora_adapter", {"lora_name": "dummy"})
            shutil.rmtree(dummy, ignore_errors=True)

    def drain(self) -> None:
        """Wait for queued hand-off work (the last batch's unload), e.g. before reading stats."""
        if self._handoff is not None:
            self._handoff.submit(lambda: None).result()

    def stop(self) -> None:
        if self._handoff is not None:
            self._handoff.shutdown(wait=True, cancel_futures=True)
            self._handoff = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        shutil.rmtree(self.adapter_root, ignore_errors=True)

    @property
    def stats(self) -> dict[str, float]:  # type: ignore[override]
        """The calling thread's last generate() record, floats only: the driver sums it over actors."""
        return getattr(self._local, "stats", {})

    def restart(self, failed: Optional[ServerProcess] = None) -> None:
        """Replace the server `failed` (the one the caller saw die or hang, None = none was up)
        with a fresh one; counts against backend.max_restarts. If another thread has replaced
        it already, return: the caller retries on the new one."""
        with self._restart_lock:
            if self.server is not None and self.server is not failed:
                return
            if self.restarts >= self.max_restarts:
                log = self.server.log_tail() if self.server is not None else "(no server)"
                raise BackendError(f"SGLang server failed and was already restarted {self.restarts} times; last log lines:\n{log}")
            self.restarts += 1
            if self.server is not None:
                # Reaps the whole group, so the GPU is free for the next one. self.server keeps
                # pointing at the dead one until replaced: a concurrent call fails on it and waits here.
                self.server.stop(grace_s=5.0)
            shutil.rmtree(self.adapter_root, ignore_errors=True)
            self._start_server()

    # ------------------------------------------------------------------ HTTP
    def _post(self, path: str, payload: dict, timeout: Optional[float] = None) -> Any:
        server = self.server
        if server is None:
            raise ServerCrashed("no server")
        try:
            resp = requests.post(server.url + path, json=payload, timeout=timeout or self.request_timeout_s)
        except requests.RequestException as err:
            # A refused/reset connection or a timeout: the server is dead or hung.
            raise ServerCrashed(f"{path}: {type(err).__name__}: {err}") from None
        if resp.status_code >= 500:
            raise ServerCrashed(f"{path}: HTTP {resp.status_code} {resp.text[:300]}")
        if resp.status_code != 200:
            raise BackendError(f"SGLang {path} failed: HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    # ------------------------------------------------------------------ adapters
    def _write(self, adapter: Adapter, name: str = "") -> Path:
        folder = self.adapter_root / (name or adapter.name)
        return adapter.save(folder, base_model=self.model_path, dtype=self.adapter_dtype)

    def random_adapter(self, name: str, seed: int, scale: float) -> Adapter:
        """A = N(0, 1/sqrt(in)), B = scale * N(0, 1): scale 0 is a no-op adapter, large scale changes output."""
        rng = np.random.default_rng(seed)
        tensors = {}
        if self._shapes is None:
            self._shapes = adapter_shapes(self.model_path, self.spec)
        for key, shape in self._shapes.items():
            if "lora_A" in key:
                tensors[key] = rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-1])
            else:
                tensors[key] = (scale * rng.standard_normal(shape)).astype(np.float32)
        return Adapter(name=name, spec=self.spec, tensors=tensors)

    def _load_batch(self, adapters: Sequence[Adapter], timing: Optional[dict[str, float]] = None) -> list[str]:
        """Write and load one batch; returns the server-side names. Runs on the hand-off thread.
        `timing` (the calling generate()'s own record) gets write_s / load_s added."""
        names = []
        with self._lock:
            base = self._counter
            self._counter += len(adapters)
        for i, adapter in enumerate(adapters):
            name = f"{self.tag}-{base + i}"
            t0 = time.perf_counter()
            path = self._write(adapter, name)
            t1 = time.perf_counter()
            try:
                self._post("/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
            except Exception:
                shutil.rmtree(path, ignore_errors=True)
                self._unload(names)
                raise
            t2 = time.perf_counter()
            self._add("write_s", t1 - t0)
            self._add("load_s", t2 - t1)
            if timing is not None:
                timing["write_s"] += t1 - t0
                timing["load_s"] += t2 - t1
            names.append(name)
            self.loaded_count += 1
        return names

    def _unload(self, names: Sequence[str]) -> None:
        for name in names:
            t0 = time.perf_counter()
            try:
                self._post("/unload_lora_adapter", {"lora_name": name})
            except (ServerCrashed, BackendError):
                pass  # a dead server holds nothing; a restart starts clean
            seconds = time.perf_counter() - t0
            self._add("unload_s", seconds)
            with self._lock:
                self._unreported_unload_s += seconds
            shutil.rmtree(self.adapter_root / name, ignore_errors=True)

    # ------------------------------------------------------------------ generation
    def _generate_request(
        self, prompts: Sequence[str], names: Sequence[Optional[str]], sampling: Sampling,
        timing: Optional[dict[str, float]] = None,
    ) -> list[list[Completion]]:
        """ONE native /generate request: every prompt under every name; returns out[name][prompt]."""
        texts = [p for _ in names for p in prompts]
        params: dict[str, Any] = {
            "max_new_tokens": int(sampling.max_new_tokens),
            "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p),
        }
        if sampling.temperature > 0 and self.sg.deterministic:
            params["sampling_seed"] = int(sampling.seed)
        payload: dict[str, Any] = {"text": texts, "sampling_params": params}
        if any(n is not None for n in names):
            payload["lora_path"] = [n for n in names for _ in prompts]
        t0 = time.perf_counter()
        interval: list[Optional[float]] = [t0, None]
        with self._lock:
            self._generating = [iv for iv in self._generating if iv[1] is None or iv[1] > t0 - 600] + [interval]
        try:
            result = self._post("/generate", payload)
        finally:
            interval[1] = time.perf_counter()
        self._add("generate_s", time.perf_counter() - t0)
        if timing is not None:
            timing["generate_s"] += time.perf_counter() - t0
        if isinstance(result, dict):
            result = [result]
        if len(result) != len(texts):
            raise BackendError(f"SGLang /generate returned {len(result)} outputs for {len(texts)} prompts")
        flat = [Completion(text=r["text"], num_tokens=int(r["meta_info"]["completion_tokens"])) for r in result]
        return [flat[i * len(prompts):(i + 1) * len(prompts)] for i in range(len(names))]

    def generate(
        self, prompts: Sequence[str], adapters: Sequence[Optional[Adapter]], sampling: Sampling
    ) -> list[list[Completion]]:
        self.start()
        prompts = list(prompts)
        for adapter in adapters:
            if adapter is not None:
                check_adapter_spec(adapter.spec, self.max_lora_rank, self.target_modules, where=f"adapter {adapter.name}")
        out: list[Optional[list[Completion]]] = [None] * len(adapters)
        base_idx = [i for i, a in enumerate(adapters) if a is None]
        lora_idx = [i for i, a in enumerate(adapters) if a is not None]
        n = self.max_loras_per_batch
        batches = [lora_idx[k:k + n] for k in range(0, len(lora_idx), n)]
        timing = {"write_s": 0.0, "load_s": 0.0, "generate_s": 0.0}
        wall0 = time.perf_counter()
        waited = 0.0

        if base_idx:  # base-model requests go in their own server batch
            rows = self._with_restarts(lambda: self._generate_request(prompts, [None] * len(base_idx), sampling, timing))
            for i, row in zip(base_idx, rows):
                out[i] = row

        if batches:
            if self._handoff is None:
                self._handoff = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eslora-handoff")
            # The first load also goes through the hand-off thread, queued behind the previous
            # call's last unload, so the server never holds more than two batches.
            pending: Optional[Future] = self._handoff.submit(self._load_batch, [adapters[i] for i in batches[0]], timing)
            k = 0
            while k < len(batches):
                batch = [adapters[i] for i in batches[k]]
                server = self.server
                try:
                    t0 = time.perf_counter()
                    names = pending.result() if pending is not None else self._load_batch(batch, timing)
                    waited += self._exposed(t0, time.perf_counter())
                    pending = None
                    if k + 1 < len(batches):  # overlap: next batch loads while this one generates
                        pending = self._handoff.submit(self._load_batch, [adapters[i] for i in batches[k + 1]], timing)
                    rows = self._generate_request(prompts, names, sampling, timing)
                    # Unload on the hand-off thread, queued after the next load: at most 2 batches resident.
                    self._handoff.submit(self._unload, names)
                except ServerCrashed:
                    if pending is not None:  # let the doomed pre-load finish failing before restarting
                        try:
                            pending.result()
                        except Exception:
                            pass
                        pending = None
                    self.restart(failed=server)
                    continue  # rerun batch k on the fresh server: same inputs, greedy -> same outputs
                for i, row in zip(batches[k], rows):
                    out[i] = row
                k += 1

        wall = time.perf_counter() - wall0
        with self._lock:
            unload_s, self._unreported_unload_s = self._unreported_unload_s, 0.0
            start_s, self._reported_start_s = self.totals["server_start_s"] - self._reported_start_s, self.totals["server_start_s"]
        tokens = sum(c.num_tokens for row in out if row is not None for c in row)
        record = {
            "wall_s": wall,
            "members": float(len(adapters)),
            "prompts": float(len(prompts)),
            "batches": float(len(batches) + (1 if base_idx else 0)),
            "tokens": float(tokens),
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "generate_s": timing["generate_s"],
            # Hand-off work of this call (on the hand-off thread, mostly hidden); unloads finish
            # after their call, so each call reports those done since the previous report.
            "write_s": timing["write_s"],
            "load_s": timing["load_s"],
            "unload_s": unload_s,
            # Hand-off time the caller waited for while the server generated nothing of this
            # backend's (a wait hidden behind another call's generation is not exposed).
            "exposed_handoff_s": waited,
            "handoff_share": waited / wall if wall > 0 else 0.0,
            # Server starts (first start, self-check, restarts) since the previous call.
            "server_start_s": start_s,
            "restarts": float(self.restarts),
        }
        self.history.append(record)
        # Only additive numbers go to the driver (summed over actors); ratios stay in history.
        self._local.stats = {k: v for k, v in record.items() if k not in ("tokens_per_s", "handoff_share")}
        return out  # type: ignore[return-value]

    def _exposed(self, start: float, end: float) -> float:
        """Seconds of [start, end] during which no /generate request of this backend ran."""
        with self._lock:
            busy = [(a, b if b is not None else end) for a, b in self._generating]
        return uncovered(start, end, busy)

    def _add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.totals[key] += seconds

    def _with_restarts(self, fn):
        while True:
            server = self.server
            try:
                return fn()
            except ServerCrashed:
                self.restart(failed=server)

    # ------------------------------------------------------------------ self-check
    def _self_check(self) -> None:
        """Base and two different random adapters on one prompt must not all agree, else adapters
        are being ignored (wrong selection API, wrong target modules) and ES would learn nothing."""
        t0 = time.perf_counter()
        sampling = Sampling(max_new_tokens=16)
        a1 = self.random_adapter("selfcheck-a", seed=1, scale=0.5)
        a2 = self.random_adapter("selfcheck-b", seed=2, scale=0.5)
        try:
            names = self._load_batch([a1, a2])
            rows = self._generate_request([SELF_CHECK_PROMPT], [None, *names], sampling)
            self._unload(names)
        except ServerCrashed as err:
            raise BackendError(f"SGLang server died during the self-check ({err}); last log lines:\n{self.server.log_tail() if self.server else ''}") from None
        texts = [row[0].text for row in rows]
        self.self_check_outputs = texts
        self._add("self_check_s", time.perf_counter() - t0)
        if len(set(texts)) == 1:
            self.stop()
            raise BackendError(
                "SGLang self-check failed: base model and two different LoRA adapters gave the same output "
                f"{texts[0]!r}; adapters are being ignored, refusing to run"
            )
