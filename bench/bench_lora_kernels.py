"""One decode step's LoRA work, kernel by kernel backend, on a GPU (issue 14: where the LoRA server's
decode time goes). GPU only; no server: SGLang's own LoRA backend classes on SGLang's buffer layouts.

    PYTHONPATH=/tmp/site:. python3 bench/bench_lora_kernels.py --model /tmp/model   # writes $OUT/lora_kernels.json

For each decode batch (tokens x adapter slots, rank 1, the 7 projection modules of every layer of
the model at --model; members' tokens contiguous as eslora sends them, or with --shuffled in a
random order, as a server's running batch holds them once requests finish and others join), each
backend's LoRA for all layers is captured in one CUDA graph (as SGLang's decode graphs hold it)
and replayed: milliseconds per decode step, against the same step's base projection GEMMs
captured alike. The backends: SGLang's triton (`TritonLoRABackend`) and csgmv
(`ChunkedSgmvLoRABackend`, chunk 16 and 128), and eslora's dense and gathered
(`sglang_plugin.plugin_backend_class`). Each backend's output is also compared with triton's on
the same inputs (relative max difference). eslora's fused backend puts the LoRA inside the base
GEMM, so it is timed with the projections (`fused_projections_ms`; `fused_ms` is that less the
base projections); `fused_nodown` leaves down_proj's LoRA to gathered's kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import out_path  # noqa: E402


class DecodeMode:
    """ForwardBatch.forward_mode for a decode batch (what the backends ask of it)."""

    def is_extend(self) -> bool:
        return False

    is_target_verify = is_draft_extend_v2 = is_cuda_graph = is_decode_or_idle = is_extend

    def is_decode(self) -> bool:
        return True


def model_dims(model: str) -> dict[str, int]:
    cfg = json.loads((Path(model) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return {"hidden": cfg["hidden_size"], "intermediate": cfg["intermediate_size"], "layers": cfg["num_hidden_layers"],
            "q": cfg["num_attention_heads"] * head_dim, "kv": cfg["num_key_value_heads"] * head_dim}


def layer_buffers(d: dict[str, int], slots: int, rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer's LoRA memory-pool buffers (SGLang's layouts), small random weights."""
    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device="cuda") * 0.05).to(torch.bfloat16)

    h, q, kv, inter = d["hidden"], d["q"], d["kv"], d["intermediate"]
    return {"qkv_a": rnd(slots, 3 * rank, h), "qkv_b": rnd(slots, q + 2 * kv, rank),
            "o_a": rnd(slots, rank, q), "o_b": rnd(slots, h, rank),
            "gate_up_a": rnd(slots, 2 * rank, h), "gate_up_b": rnd(slots, 2 * inter, rank),
            "down_a": rnd(slots, rank, inter), "down_b": rnd(slots, h, rank)}


def time_graph(fn: Callable[[], Any], replays: int) -> float:
    """Milliseconds per replay of `fn` captured in one CUDA graph (median of 5 timings)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()  # warm-up: triton compiles, cuBLAS picks its kernels
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return sorted(times)[2]


def make_backend(kind: str, slots: int, tokens: int) -> Any:
    if kind == "triton":
        from sglang.srt.lora.backend.triton_backend import TritonLoRABackend as cls
        backend = cls(slots, torch.device("cuda"))
    elif kind.startswith("csgmv"):
        from sglang.srt.lora.backend.chunked_backend import ChunkedSgmvLoRABackend as cls
        chunk = int(kind.removeprefix("csgmv") or 16)
        backend = cls(slots, torch.device("cuda"), server_args=SimpleNamespace(max_lora_chunk_size=chunk))
    else:  # eslora's dense, gathered, fused
        from eslora.backends.sglang_plugin import plugin_backend_class
        backend = plugin_backend_class(kind)(slots, torch.device("cuda"))
    backend.init_cuda_graph_batch_info(tokens, 1)
    return backend


def measure(d: dict[str, int], tokens: int, slots: int, rank: int, kinds: list[str], replays: int,
            shuffled: bool = False) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(tokens * 100 + slots)
    layers = [layer_buffers(d, slots, rank, gen) for _ in range(d["layers"])]
    h, q, kv, inter = d["hidden"], d["q"], d["kv"], d["intermediate"]
    x_h = torch.randn(tokens, h, generator=gen, device="cuda").to(torch.bfloat16)
    x_o = torch.randn(tokens, q, generator=gen, device="cuda").to(torch.bfloat16)
    x_d = torch.randn(tokens, inter, generator=gen, device="cuda").to(torch.bfloat16)
    qkv_off = [0, q, q + kv, q + 2 * kv]
    qkv_offsets = (torch.tensor(qkv_off, dtype=torch.int32, device="cuda"), torch.tensor(qkv_off, dtype=torch.int32))
    # made before any capture: a CPU tensor copied to the GPU inside a CUDA graph capture is an error
    one = {n: (torch.tensor([0, n], dtype=torch.int32, device="cuda"), torch.tensor([0, n], dtype=torch.int32))
           for n in (h, 2 * inter)}
    outs = {"qkv": torch.zeros(tokens, q + 2 * kv, dtype=torch.bfloat16, device="cuda"),
            "o": torch.zeros(tokens, h, dtype=torch.bfloat16, device="cuda"),
            "gate_up": torch.zeros(tokens, 2 * inter, dtype=torch.bfloat16, device="cuda"),
            "down": torch.zeros(tokens, h, dtype=torch.bfloat16, device="cuda")}
    # slot 0 is the base model's (rank 0) as in SGLang's pool; members fill slots 1.. contiguously
    weight_indices = [1 + t * (slots - 1) // tokens for t in range(tokens)]
    if shuffled:  # a server's running batch: requests of different members interleaved
        order = torch.randperm(tokens, generator=torch.Generator().manual_seed(tokens)).tolist()
        weight_indices = [weight_indices[i] for i in order]
    ranks = [0] + [rank] * (slots - 1)
    scalings = [0.0] + [2.0] * (slots - 1)
    batch = SimpleNamespace(batch_size=tokens, forward_mode=DecodeMode())

    def step(backend: Any) -> Callable[[], None]:
        def run() -> None:
            for w in layers:
                backend.run_qkv_lora(x=x_h, qkv_lora_a=w["qkv_a"], qkv_lora_b=w["qkv_b"], output_offset=qkv_offsets[0],
                                     output_offset_cpu=qkv_offsets[1], max_qkv_out_dim=max(q, kv), base_output=outs["qkv"])
                a = backend.run_lora_a_sgemm(x_o, w["o_a"])
                backend.run_lora_b_sgemm(x=a, weights=w["o_b"], output_offset=one[h][0], output_offset_cpu=one[h][1],
                                         base_output=outs["o"])
                backend.run_gate_up_lora(x=x_h, gate_up_lora_a=w["gate_up_a"], gate_up_lora_b=w["gate_up_b"],
                                         output_offset=one[2 * inter][0], output_offset_cpu=one[2 * inter][1],
                                         base_output=outs["gate_up"])
                a = backend.run_lora_a_sgemm(x_d, w["down_a"])
                backend.run_lora_b_sgemm(x=a, weights=w["down_b"], output_offset=one[h][0], output_offset_cpu=one[h][1],
                                         base_output=outs["down"])
        return run

    weights = [(torch.randn(q + 2 * kv, h, generator=gen, device="cuda").to(torch.bfloat16),
                torch.randn(h, q, generator=gen, device="cuda").to(torch.bfloat16),
                torch.randn(2 * inter, h, generator=gen, device="cuda").to(torch.bfloat16),
                torch.randn(h, inter, generator=gen, device="cuda").to(torch.bfloat16)) for _ in range(d["layers"])]

    def fused_step(backend: Any, fuse_down: bool) -> tuple[Callable[[], None], Callable[[], Callable[[], None]]]:
        """The four projections of every layer with their LoRA inside the GEMM (eslora's fused
        backend; down_proj's by gathered's kernels unless `fuse_down`): a step as the server runs
        it, and a step on zero base weights that writes the LoRA alone into the four outputs."""
        from eslora.backends import fused_lora

        built = []  # per module: x, A, B, slice offsets, output name, base weight, extended weight or None
        for w, (wqkv, wo, wgu, wd) in zip(layers, weights):
            for x, a, b, offsets, out, weight in ((x_h, w["qkv_a"], w["qkv_b"], qkv_off, "qkv", wqkv),
                                                  (x_o, w["o_a"], w["o_b"], [0, h], "o", wo),
                                                  (x_h, w["gate_up_a"], w["gate_up_b"], [0, inter, 2 * inter], "gate_up", wgu),
                                                  (x_d, w["down_a"], w["down_b"], [0, h], "down", wd)):
                extended = None
                if out != "down" or fuse_down:
                    extended = fused_lora.extend_weight(torch.zeros_like(weight), slots, a.shape[1])
                    for slot in range(slots):
                        fused_lora.write_slot(extended, weight.shape[1], b, slot, offsets)
                built.append((x, a, b, offsets, out, weight, extended))

        def lora_alone() -> None:  # the extended weights' base columns are still zero here
            for x, a, b, offsets, out, weight, extended in built:
                if extended is not None:
                    outs[out].add_(fused_lora.linear(x, extended, None, a, backend.token_slots, backend.scales))
                else:
                    backend.expand(backend.shrink(x, a), b, offsets, outs[out])

        def run() -> None:
            for x, a, b, offsets, out, weight, extended in built:
                if extended is not None:
                    fused_lora.linear(x, extended, None, a, backend.token_slots, backend.scales)
                else:
                    backend.expand(backend.shrink(x, a), b, offsets, torch.matmul(x, weight.t()))

        def with_base_weights() -> Callable[[], None]:
            for x, a, b, offsets, out, weight, extended in built:
                if extended is not None:
                    extended[:, :weight.shape[1]].copy_(weight)
            return run
        return lora_alone, with_base_weights

    result: dict[str, Any] = {"tokens": tokens, "slots": slots, "rank": rank, "shuffled": shuffled}
    reference = None
    for kind in kinds:
        try:
            fused = kind in ("fused", "fused_nodown")
            backend = make_backend("fused" if fused else kind, slots, tokens)
            backend.prepare_lora_batch(batch, weight_indices, ranks, scalings, use_cuda_graph=True)
            run, timed = step(backend), None
            if fused:
                run, timed = fused_step(backend, fuse_down=kind == "fused")
            for out in outs.values():
                out.zero_()
            run()  # one eager step: every layer's LoRA delta added into the four outputs
            torch.cuda.synchronize()
            got = torch.cat([out.float().flatten() for out in outs.values()])
            if reference is None:
                reference = got
            scale = reference.abs().max().item()
            result[f"{kind}_rel_max_diff_vs_{kinds[0]}"] = (got - reference).abs().max().item() / max(scale, 1e-30)
            if timed is None:
                result[f"{kind}_ms"] = time_graph(run, replays)
            else:  # the LoRA's share is known once the base projections are timed, below
                result[f"{kind}_projections_ms"] = time_graph(timed(), replays)
        except Exception as err:  # a backend that cannot run this shape: recorded, the others go on
            frame = traceback.extract_tb(err.__traceback__)[-1]  # an assert's message is often empty: where it failed
            result[f"{kind}_error"] = f"{type(err).__name__}: {err} ({Path(frame.filename).name}:{frame.lineno})"

    def base_step() -> None:
        for wqkv, wo, wgu, wd in weights:
            torch.matmul(x_h, wqkv.t()), torch.matmul(x_o, wo.t()), torch.matmul(x_h, wgu.t()), torch.matmul(x_d, wd.t())

    result["base_projections_ms"] = time_graph(base_step, replays)
    for kind in kinds:  # a fused backend's LoRA: what its projections take beyond the base ones
        if f"{kind}_projections_ms" in result:
            result[f"{kind}_ms"] = result[f"{kind}_projections_ms"] - result["base_projections_ms"]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/model", help="a model folder (its config.json gives the shapes)")
    ap.add_argument("--tokens", default="256,512,1024", help="decode batch sizes (running requests)")
    ap.add_argument("--slots", default="9,33", help="adapter slots (SGLang's --max-loras-per-batch + 1 for the base)")
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--backends", default="triton,dense,gathered,fused,fused_nodown,csgmv16,csgmv128")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--fused-column-multiple", type=int, default=0,
                    help="fused's extra K columns padded to a multiple of this (0 = fused_lora.COLUMN_MULTIPLE): "
                         "whether cuBLAS's choice for the extended K is what fused pays at few tokens")
    ap.add_argument("--shuffled", action="store_true",
                    help="tokens' slots in a random order (as a server's running batch holds them) instead of contiguous")
    args = ap.parse_args()
    d = model_dims(args.model)
    kinds = args.backends.split(",")
    from eslora.backends import fused_lora
    if args.fused_column_multiple:
        fused_lora.COLUMN_MULTIPLE = args.fused_column_multiple
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for slots in (int(s) for s in args.slots.split(",")):
            t0 = time.perf_counter()
            row = measure(d, tokens, slots, args.rank, kinds, args.replays, args.shuffled)
            torch.cuda.empty_cache()  # the shape's weights and graphs, before the next one's
            rows.append(row)
            print(json.dumps(row), f"({time.perf_counter() - t0:.1f} s)", flush=True)
    record = {"model": args.model, "dims": d, "device": torch.cuda.get_device_name(), "rows": rows,
              "fused_column_multiple": fused_lora.COLUMN_MULTIPLE,
              "command": " ".join(["python3", "bench/bench_lora_kernels.py", *sys.argv[1:]])}
    target = out_path("lora_kernels.json")
    if target:
        Path(target).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
