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

import json
import shutil
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from eslora.backends import sglang_plugin
from eslora.backends.base import BackendError, CallStats, Completion, Sampling, ServerCrashed
from eslora.backends.common import batched, check_adapter, split_rows
from eslora.backends.server_backend import ServerBackend
from eslora.lora import Adapter, LoraSpec, adapter_shapes

SELF_CHECK_PROMPT = "Question: What is the capital of France? Answer in one sentence.\nAnswer:"
# SGLang 0.5.17's decode CUDA graphs cover this many running requests by default on an H200 (fewer
# on smaller cards); past it decode runs without graphs (backend.sglang.cuda_graph_max_bs).
DEFAULT_DECODE_GRAPH_LIMIT = 256


def build_command(backend_cfg: Any, spec: LoraSpec, dtype: str, model_path: str, port: int, dummy_path: str = "") -> list[str]:
    """The `python -m sglang.launch_server ...` command line (`backend_cfg`: the `backend` section,
    `spec`: the LoRA spec, `dtype`: `model.dtype`)."""
    sg = backend_cfg.sglang
    n = int(sg.lora_slots or backend_cfg.max_loras_per_batch)  # adapters one server batch may mix
    cmd = [
        sg.python or sys.executable, "-m", "sglang.launch_server",
        "--model-path", model_path,
        "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora",
        "--max-loras-per-batch", str(n),
        "--max-lora-rank", str(sg.max_lora_rank or spec.r),
        "--lora-target-modules", *spec.target_modules,
        # dense, gathered and fused are eslora's plugin backends, which take the place of SGLang's triton backend
        "--lora-backend", "triton" if sg.lora_backend in sglang_plugin.LORA_BACKEND_CLASSES else sg.lora_backend,
        *(["--max-lora-chunk-size", str(sg.max_lora_chunk_size)] if sg.max_lora_chunk_size else []),
        "--dtype", dtype,
    ]
    if sg.disable_radix_cache:
        cmd.append("--disable-radix-cache")
    if sg.deterministic:
        cmd.append("--enable-deterministic-inference")
    if sg.lora_overlap_loading:
        # SGLang 0.5.17 pins overlap-loaded adapters in CPU memory and then demands
        # max_loaded_loras <= 2 * max_loras_per_batch; two batches is what our hand-off keeps
        # (with lora_slots, two server batches' worth).
        cmd += ["--enable-lora-overlap-loading", "--max-loaded-loras", str(2 * n)]
    if sg.attention_backend:
        cmd += ["--attention-backend", sg.attention_backend]
    if sg.sampling_backend:
        cmd += ["--sampling-backend", sg.sampling_backend]
    if sg.disable_cuda_graph:
        cmd.append("--disable-cuda-graph")
    if sg.cuda_graph_max_bs:
        cmd += ["--cuda-graph-max-bs", str(sg.cuda_graph_max_bs)]
    if sg.mem_fraction_static:
        cmd += ["--mem-fraction-static", str(sg.mem_fraction_static)]
    if dummy_path:
        cmd += ["--lora-paths", f"dummy={dummy_path}"]
    cmd += list(sg.extra_args)
    return cmd


def uncovered_spans(start: float, end: float, intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts (a, b) of [start, end] not covered by any of `intervals` (a, b), in order."""
    gaps, reach = [], start
    for a, b in sorted((max(a, start), min(b, end)) for a, b in intervals if b > start and a < end):
        if a > reach:
            gaps.append((reach, a))
        reach = max(reach, b)
    if reach < end:
        gaps.append((reach, end))
    return gaps


def uncovered(start: float, end: float, intervals: Sequence[tuple[float, float]]) -> float:
    """Length of [start, end] not covered by any of `intervals` (a, b)."""
    return sum(b - a for a, b in uncovered_spans(start, end, intervals))


class SGLangBackend(ServerBackend):
    """Multi-LoRA generation on one SGLang server that this object starts, pins and stops.

    `backend_cfg`: the config's `backend` section; `spec`: the LoRA spec; `dtype`: `model.dtype`
    (the server's `--dtype` and the adapter files' dtype).
    """

    concurrent_calls = True
    kind = "sglang"
    display = "SGLang"
    load_path = "/load_lora_adapter"
    unload_path = "/unload_lora_adapter"

    def __init__(self, backend_cfg: Any, model_path: str, spec: LoraSpec, dtype: str) -> None:
        self.sg = backend_cfg.sglang
        super().__init__(backend_cfg, model_path, spec, dtype,
                         adapter_dir=self.sg.adapter_dir, start_timeout_s=self.sg.start_timeout_s)
        self.backend_cfg = backend_cfg
        self.max_lora_rank = int(self.sg.max_lora_rank or spec.r)
        self.target_modules = tuple(spec.target_modules)
        self.self_check_outputs: list[str] = []
        self._dummy = ""  # the field notes' start-up adapter, unloaded once the server is up
        # [start, end or None] of recent /generate requests, so a call's wait for its adapters can
        # be split into exposed time and time hidden behind another call's generation.
        self._generating: list[list[Optional[float]]] = []
        # Idle spans a call already counted as its exposed hand-off: with two calls waiting at once
        # the server's idle second is exposed once, so the calls' sum is the server's idle time.
        self._claimed_idle: list[tuple[float, float]] = []
        self._shapes: Optional[dict[str, tuple[int, ...]]] = None
        self._warned_graph_limit = False
        self.plugin_report: Optional[dict[str, Any]] = None  # what eslora's SGLang plugin did, if asked

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """First start + self-check. Idempotent; a server that died later is replaced by `restart`."""
        if self.server is None:
            self._check(self.spec, where="lora config")
        super().start()

    def _command(self, port: int) -> list[str]:
        self._plugin_report.unlink(missing_ok=True)  # a restart's server must write its own
        self._dummy = ""
        if self.sg.preload_dummy:
            # The field notes' start-up: the server sees one adapter at launch, we unload it after.
            self._dummy = str(self._write(self.random_adapter("dummy", seed=12345, scale=0.0)))
        return build_command(self.backend_cfg, self.spec, self.dtype, self.model_path, port, self._dummy)

    @property
    def kept_layers(self) -> Optional[tuple[int, ...]]:
        """The layers the server runs LoRA kernels on when adapter_layers_only (None = all)."""
        return self.spec.layers if self.sg.adapter_layers_only else None

    @property
    def _plugin_report(self) -> Path:
        return self.adapter_root / "sglang_plugin.json"

    @property
    def plugin_keys(self) -> list[str]:
        """The config keys that need eslora's SGLang plugin in the server, as set."""
        keys = [f"backend.sglang.{key}=true" for key in ("adapter_layers_only", "lean_adapter_loads", "lora_prefill_graphs")
                if getattr(self.sg, key)]
        plugin_backend = self.sg.lora_backend in sglang_plugin.LORA_BACKEND_CLASSES
        return keys + ([f"backend.sglang.lora_backend={self.sg.lora_backend}"] if plugin_backend else [])

    def _env(self) -> dict[str, str]:
        env = super()._env()
        if self.kept_layers is not None:
            env[sglang_plugin.LAYERS_ENV] = sglang_plugin.format_layers(self.kept_layers)
        if self.sg.lean_adapter_loads:
            env[sglang_plugin.LEAN_LOADS_ENV] = "1"
        if self.sg.lora_backend in sglang_plugin.LORA_BACKEND_CLASSES:
            env[sglang_plugin.LORA_BACKEND_ENV] = self.sg.lora_backend
        if self.sg.lora_prefill_graphs:
            env[sglang_plugin.PREFILL_GRAPHS_ENV] = "1"
        if self.plugin_keys:
            env[sglang_plugin.REPORT_ENV] = str(self._plugin_report)
        return env

    def _check_plugin(self) -> None:
        """The plugin must have done, in this server, what the config asked of it."""
        try:
            report = json.loads(self._plugin_report.read_text())
        except (OSError, ValueError):
            raise BackendError(
                f"{' and '.join(self.plugin_keys)}, but eslora's SGLang plugin did not run in the server "
                f"({self._plugin_report} was not written): install eslora in the server's Python "
                f"(backend.sglang.python={self.sg.python or sys.executable!r}; `pip install -e .` registers the "
                "entry point `eslora` of the group sglang.srt.plugins), and do not leave it out of SGLANG_PLUGINS"
            ) from None
        expected = [i for i in self.kept_layers or range(report["layers"]) if i < report["layers"]]
        plugin_classes = set(sglang_plugin.LORA_BACKEND_CLASSES.values())
        built = report.get("lora_backend")
        wanted = sglang_plugin.LORA_BACKEND_CLASSES.get(self.sg.lora_backend)
        fused_nothing = self.sg.lora_backend == "fused" and not report.get("fused_modules")
        prefill_graphs = bool(report.get("prefill_graphs"))
        if (report["kept_layers"] != expected or report["lean_loads"] != self.sg.lean_adapter_loads
                or (built != wanted if wanted else built in plugin_classes) or fused_nothing
                or prefill_graphs != self.sg.lora_prefill_graphs):
            raise BackendError(f"eslora's SGLang plugin kept LoRA on layers {report['kept_layers']} with lean loads "
                               f"{report['lean_loads']}, prefill graphs {prefill_graphs} and the LoRA backend "
                               f"{report.get('lora_backend')}; the config asked for layers {expected}, lean loads "
                               f"{self.sg.lean_adapter_loads}, lora_prefill_graphs {self.sg.lora_prefill_graphs}, "
                               f"lora_backend {self.sg.lora_backend}" + (" (it fused no projection's GEMM)" if fused_nothing else ""))
        self.plugin_report = report

    def _on_started(self) -> None:
        if self.plugin_keys:
            self._check_plugin()
        if self._dummy:
            self._post(self.unload_path, {"lora_name": "dummy"})
            shutil.rmtree(self._dummy, ignore_errors=True)

    def _on_first_start(self) -> None:
        self._self_check()

    def drain(self) -> None:
        """Wait for queued hand-off work (the last batch's unload), e.g. before reading stats."""
        if self._pool is not None:
            self._pool.submit(lambda: None).result()

    def _check(self, spec: LoraSpec, where: str) -> None:
        check_adapter(spec, self.max_lora_rank, where, server_modules=self.target_modules)
        kept = self.kept_layers
        if kept is not None and (spec.layers is None or not set(spec.layers) <= set(kept)):
            # the server would ignore the adapter's weights on the unwrapped layers
            outside = "every layer" if spec.layers is None else sorted(set(spec.layers) - set(kept))
            raise BackendError(f"{where}: has LoRA weights on {outside}, outside lora.layers {list(kept)}, which "
                               "backend.sglang.adapter_layers_only=true serves without LoRA kernels")

    # ------------------------------------------------------------------ adapters
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

    # ------------------------------------------------------------------ generation
    def _generate_request(
        self, prompts: Sequence[str], names: Sequence[Optional[str]], sampling: Sampling,
        call: Optional[CallStats] = None,
    ) -> list[list[Completion]]:
        """ONE native /generate request: every prompt under every name; returns out[name][prompt]."""
        texts = [p for _ in names for p in prompts]
        self._check_graph_limit(len(texts))
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
        if call is not None:
            call.generate_s += time.perf_counter() - t0
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
                self._check(adapter.spec, where=f"adapter {adapter.name}")
        out: list[Optional[list[Completion]]] = [None] * len(adapters)
        base_idx, lora_idx = split_rows(adapters)
        batches = batched(lora_idx, self.max_loras_per_batch)
        call = CallStats(members=len(adapters), prompts=len(prompts), batches=len(batches) + (1 if base_idx else 0))
        wall0 = time.perf_counter()

        if base_idx:  # base-model requests go in their own server batch
            rows = self._rerun_on_crash(lambda: self._generate_request(prompts, [None] * len(base_idx), sampling, call))
            for i, row in zip(base_idx, rows):
                out[i] = row

        if batches:
            handoff = self._threads(1)  # ONE hand-off thread: loads and unloads of all calls queue on it
            # The first load also goes through the hand-off thread, queued behind the previous
            # call's last unload, so the server never holds more than two batches.
            pending: Optional[Future] = handoff.submit(self._load_batch, [adapters[i] for i in batches[0]], call)

            def run_batch(k: int) -> list[list[Completion]]:
                nonlocal pending
                batch = [adapters[i] for i in batches[k]]
                try:
                    t0 = time.perf_counter()
                    names = pending.result() if pending is not None else self._load_batch(batch, call)
                    call.exposed_handoff_s += self.claim_idle_seconds(t0, time.perf_counter())
                    pending = None
                    if k + 1 < len(batches):  # overlap: next batch loads while this one generates
                        pending = handoff.submit(self._load_batch, [adapters[i] for i in batches[k + 1]], call)
                    rows = self._generate_request(prompts, names, sampling, call)
                    # Unload on the hand-off thread, queued after the next load: at most 2 batches resident.
                    handoff.submit(self._unload, names)
                    return rows
                except ServerCrashed:
                    if pending is not None:  # let the doomed pre-load finish failing before restarting
                        try:
                            pending.result()
                        except Exception:
                            pass
                        pending = None
                    raise  # batch k reruns on the fresh server: same inputs, greedy -> same outputs

            for k in range(len(batches)):
                for i, row in zip(batches[k], self._rerun_on_crash(lambda: run_batch(k))):
                    out[i] = row

        self._finish_call(call, out, wall0)
        return out  # type: ignore[return-value]

    def _check_graph_limit(self, requests: int) -> None:
        """Say once when one request holds more prompts than the default decode CUDA graphs cover."""
        sg = self.sg
        if self._warned_graph_limit or sg.cuda_graph_max_bs or sg.disable_cuda_graph or requests <= DEFAULT_DECODE_GRAPH_LIMIT:
            return
        self._warned_graph_limit = True
        print(f"warning: SGLang: one /generate holds {requests} requests, more than the {DEFAULT_DECODE_GRAPH_LIMIT} "
              f"running requests SGLang's decode CUDA graphs cover by default, so decode runs without them while more run; "
              f"set backend.sglang.cuda_graph_max_bs={requests} (the 1.5B learning run: 28.4 -> 18.2 s per generation "
              f"at 512, docs/sglang.md)", file=sys.stderr, flush=True)

    def idle_seconds(self, start: float, end: float) -> float:
        """Seconds of [start, end] during which no /generate request of this backend ran (the
        server idle, whatever the number of calls in flight: a generation's exposed hand-off)."""
        with self._lock:
            return uncovered(start, end, self._busy_until(end))

    def _busy_until(self, end: float) -> list[tuple[float, float]]:
        """The recent /generate intervals, a running one as if it ended at `end` (hold _lock)."""
        return [(a, b if b is not None else end) for a, b in self._generating]

    def claim_idle_seconds(self, start: float, end: float) -> float:
        """`idle_seconds(start, end)` less the idle time another call already counted, which this
        call now counts: summed over concurrent calls, the server's idle time, never twice."""
        with self._lock:
            gaps = uncovered_spans(start, end, self._busy_until(end) + self._claimed_idle)
            self._claimed_idle = [iv for iv in self._claimed_idle if iv[1] > end - 600] + gaps
        return sum(b - a for a, b in gaps)

    # ------------------------------------------------------------------ self-check
    def _self_check(self) -> None:
        """Base and two different random adapters on one prompt must not all agree, else adapters
        are being ignored (wrong selection API, wrong target modules) and ES would learn nothing."""
        sampling = Sampling(max_new_tokens=16)
        a1 = self.random_adapter("selfcheck-a", seed=1, scale=0.5)
        a2 = self.random_adapter("selfcheck-b", seed=2, scale=0.5)
        try:
            names = self._load_batch([a1, a2])
            rows = self._generate_request([SELF_CHECK_PROMPT], [None, *names], sampling)
            self._unload(names)
        except ServerCrashed as err:
            log = self.server.log_tail() if self.server else ""
            raise BackendError(f"SGLang server died during the self-check ({err}); last log lines:\n{log}") from None
        texts = [row[0].text for row in rows]
        self.self_check_outputs = texts
        if len(set(texts)) == 1:
            self.stop()
            raise BackendError(
                "SGLang self-check failed: base model and two different LoRA adapters gave the same output "
                f"{texts[0]!r}; adapters are being ignored, refusing to run"
            )
