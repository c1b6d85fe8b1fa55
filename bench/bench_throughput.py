"""Issue 14 in one run: eslora's ES generation against the best plain SGLang serving the same
completions (P1), against a full-weight ES peer on the same engine and the HF reference loop (P2),
and the exposed adapter hand-off, for one or more models; writes `$OUT/throughput.json`.

    PYTHONPATH=/tmp/site:. python3 bench/bench_throughput.py \
        --model qwen2.5-coder-0.5b=/tmp/model05 --model qwen2.5-coder-1.5b=/tmp/model [--repeats 2]

Per model, each server started once and stopped before the next (one GPU):
1. eslora, the default (`configs/countdown_sglang.yaml`: population 32 x 32 Countdown prompts,
   256 new tokens, greedy, 8 adapters per batch): whole generations through the backend, fed as
   the training run feeds an actor (calls of one batch, `cluster.calls_in_flight` = 2 at once, so
   the next call's members are admitted as slots free), and, on the same server, as one call
   whose batches run one after another (the shape of issue 14's first measurement); median of
   `--repeats` after a warm-up, with the exposed hand-off share (time the server generated nothing).
2. eslora "wide": every member of the generation loaded at once (`backend.max_loras_per_batch` =
   population, decode CUDA graphs covering all its requests): the faster mode the issue allows
   behind a config key. A member's slot is held until its longest completion stops, so with 8
   slots a generation needs about population / 8 rounds of max-length decoding; with all members
   loaded, one round.
3. Plain SGLang (no LoRA), tuned (`--cuda-graph-max-bs` and `--max-running-requests` = all the
   generation's requests), the same base-model requests in three shapes: one call holding all,
   eslora's shape (calls of 8 members' prompts, 2 in flight, as the actor is fed), and those calls
   one after another; each with natural stops and forced to the token limit (`ignore_eos`). Best
   plain = the fastest natural-stop shape.
4. Full-weight peer: an in-process `sglang.Engine` of the same model; per member, every weight +
   sigma * N(0, 1) from the member's seed, the prompts generated, the weights restored; the whole
   population, same prompts and tokens. Two ways, the faster one is the peer: in place in the
   model process by a custom weight loader (bench/inplace_perturb.py, 16 bytes per update), and
   as CUDA tensors built here and sent with `update_weights_from_tensor`.
5. HF reference loop (bench_reference.py's structure), `--reference-members` run, extrapolated.
6. Variants (`--variant 'NAME KEY=VALUE ...'`, repeatable): eslora with config overrides, fed as
   in 1; each one's texts compared with 1's (the run-to-run agreement of 1 is the floor:
   continuous batching is not batch-invariant), its wall and load seconds with 1's. Without
   `--variant`, one: "lean", the levers of eslora's SGLang plugin, `backend.sglang.adapter_layers_only`
   (LoRA kernels on lora.layers only) and `lean_adapter_loads` (loads without SGLang's
   cache-emptying memory queries). Run for every model after all models' parts 1-5, so they
   only use what time is left (`--no-variants` skips them).

`--skip wide,plain,peer,reference` leaves out parts 2-5 (a lease that measures levers only);
`one_call` leaves out part 1's one-call generations. With several models and variants, each
variant runs on every model before the next variant starts, so a lease cut short has the first
variant on every model.
Every timed run is written to throughput.json as it ends (`in_progress` and `runs_so_far` in the
part's place until the part is done), so a lease cut mid-part keeps what that part measured.

Ratios are wall-time ratios (greedy completions under different weights stop at different lengths;
the per-token ratio is reported next to each).
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, device_name, generation_inputs, median, out_path, versions  # noqa: E402


def timed_median(runs: Sequence[dict[str, Any]], key: str) -> float:
    """Median of `key` over the timed runs (the first run is the warm-up and is dropped)."""
    return median([r[key] for r in list(runs[1:]) or list(runs)])


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median wall and tokens of the timed runs."""
    wall, tokens = timed_median(runs, "wall_s"), timed_median(runs, "tokens")
    return {"wall_s": wall, "tokens": tokens, "s_per_token": wall / max(tokens, 1), "runs": list(runs)}


def ratios(eslora: dict[str, Any], plain: dict[str, dict[str, Any]], same_shape: str) -> dict[str, Any]:
    """P1 of `eslora` (a summary) against the fastest natural-stop plain shape and the same shape."""
    natural = {name: s for name, s in plain.items() if not name.endswith("_forced")}
    best = min(natural, key=lambda name: natural[name]["wall_s"])
    return {
        "best_plain_shape": best,
        "p1_vs_best_plain": eslora["wall_s"] / natural[best]["wall_s"],
        "p1_vs_best_plain_per_token": eslora["s_per_token"] / natural[best]["s_per_token"],
        "p1_vs_same_shape": eslora["wall_s"] / plain[same_shape]["wall_s"],
        "p1_vs_same_shape_per_token": eslora["s_per_token"] / plain[same_shape]["s_per_token"],
    }


def _no_progress(label: str, run: dict[str, Any]) -> None:
    pass


_on_run: Callable[[str, dict[str, Any]], None] = _no_progress  # set by measured_part while a part runs


def report_run(label: str, run: dict[str, Any], warm_up: bool = False) -> None:
    """Print one timed run and hand it to the running part's progress record."""
    print(f"[{label}{' warm-up' if warm_up else ''}] {run['wall_s']:.3f} s, {run['tokens']} tokens", flush=True)
    _on_run(label + (" warm-up" if warm_up else ""), run)


def timed_runs(fn: Callable[[], dict[str, Any]], repeats: int, label: str) -> list[dict[str, Any]]:
    runs = []
    for i in range(repeats + 1):
        runs.append(fn())
        report_run(f"{label} {i}", runs[-1], warm_up=i == 0)
    return runs


def members_per_call(cfg: Any, population: int) -> int:
    """Members in one call to the one actor, as ActorPool.calls cuts them: cluster.batches_per_call
    batches of max_loras_per_batch (0 = one equal share per actor: with one actor, all)."""
    batches = cfg.cluster.batches_per_call
    return batches * cfg.backend.max_loras_per_batch if batches else population


def same_share(texts: Sequence[str], reference: Sequence[str]) -> Optional[float]:
    """Share of completions (member x prompt, in order) equal to `reference`'s; None without one."""
    if not reference or len(reference) != len(texts):
        return None
    return sum(a == b for a, b in zip(texts, reference)) / len(texts)


def fed_generation(backend: Any, prompts: list[str], members: list, sampling: Any, per_call: int,
                   in_flight: int, texts: Optional[list[str]] = None) -> dict[str, Any]:
    """One generation fed to `backend` as an actor is fed: calls of `per_call` members, `in_flight`
    of them at once (the actor's max_concurrency = cluster.calls_in_flight; the queue hands the
    next call to the first free slot). The exposed hand-off is the time the server generated
    nothing (`idle_seconds`); `calls_exposed_handoff_s`, the calls' own exposed seconds summed (what
    the training metrics report), is that idle time within the calls' waits (a second once).
    `texts`, if given, is replaced by the completions' texts (member by member, prompt by prompt)."""
    calls = [members[i:i + per_call] for i in range(0, len(members), per_call)]
    first = len(backend.history)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="bench-call") as pool:
        outputs = list(pool.map(lambda call: backend.generate(prompts, call, sampling), calls))
    backend.drain()  # the last unload, so the records hold the whole hand-off
    t1 = time.perf_counter()
    wall, idle = t1 - t0, backend.idle_seconds(t0, t1)
    records = backend.history[first:]
    if texts is not None:
        texts[:] = [c.text for rows in outputs for row in rows for c in row]
    out = {k: sum(r[k] for r in records) for k in ("tokens", "write_s", "load_s", "unload_s")}
    return {"wall_s": wall, **out, "tokens_per_s": out["tokens"] / wall, "exposed_handoff_s": idle,
            "handoff_share": idle / wall, "calls_exposed_handoff_s": sum(r["exposed_handoff_s"] for r in records),
            "calls": len(calls), "per_call": per_call, "in_flight": in_flight}


def eslora_runs(cfg: Any, model_path: str, prompts: list[str], members: list, repeats: int, label: str,
                one_call: bool = True, texts: Optional[list[str]] = None) -> dict[str, Any]:
    """Whole generations through eslora's SGLang backend, on one server, fed two ways:
    - as the training run feeds one actor (the summary itself): calls of cluster.batches_per_call
      batches of max_loras_per_batch members, cluster.calls_in_flight at once, so the server holds
      the next call's requests and admits them as a member's slot frees (continuous feeding);
    - `one_call`: all members in one generate() call, its batches one after another (the shape
      issue 14's first measurement used: 6.09 s on the 0.5B), unless `one_call` is false.
    `same_text_share_run_to_run`: the last two fed runs' completions that agree (greedy, but
    continuous batching is not batch-invariant: the noise floor of a text comparison); `texts`,
    if given, gets the last fed run's completions (for a comparison with another part's)."""
    from eslora.backends import make_backend
    from eslora.backends.base import Sampling
    from eslora.lora import LoraSpec

    sampling = Sampling(max_new_tokens=cfg.task.max_new_tokens, temperature=cfg.task.temperature)
    backend = make_backend(cfg.backend, model_path, LoraSpec.from_config(cfg.lora), cfg.model.dtype)
    slots = cfg.backend.max_loras_per_batch
    per_call = members_per_call(cfg, len(members))
    try:
        backend.start()
        run_texts: list[list[str]] = []  # each fed run's completions

        def fed() -> dict[str, Any]:
            run_texts.append([])
            return fed_generation(backend, prompts, members, sampling, per_call, cfg.cluster.calls_in_flight, run_texts[-1])

        out = summarize(timed_runs(fed, repeats, label))
        out["same_text_share_run_to_run"] = same_share(run_texts[-1], run_texts[-2] if len(run_texts) > 1 else [])
        if texts is not None:
            texts[:] = run_texts[-1]
        if one_call:
            out["one_call"] = summarize(timed_runs(lambda: fed_generation(backend, prompts, members, sampling, len(members), 1),
                                                   repeats, f"{label} one call"))
        out["server_start_s"] = backend.start_seconds[0]
        out["handoff_exposed_share"] = timed_median(out["runs"], "handoff_share")
        out["max_loras_per_batch"] = slots
        out["cuda_graph_max_bs"] = cfg.backend.sglang.cuda_graph_max_bs
        out["calls_in_flight"] = cfg.cluster.calls_in_flight
        return out
    finally:
        backend.stop()


def shape_key(per_call: int, in_flight: int, default: tuple[int, int]) -> str:
    """The plain shape eslora fed by calls of `per_call` members, `in_flight` at once, is compared
    with: `eslora_shape` for the config's own (`default`), else named by both."""
    if (per_call, in_flight) == tuple(default):
        return "eslora_shape"
    return f"eslora_shape_calls_of_{per_call}_{in_flight}_in_flight"


def plain_shapes(url: str, prompts: list[str], population: int, per_call: int, max_new_tokens: int,
                 repeats: int, in_flight: int = 2, other_feeds: Sequence[tuple[int, int]] = ()) -> dict[str, dict[str, Any]]:
    """The generation's base-model requests in three shapes, natural and forced stops: one call
    holding all; eslora's shape (calls of `per_call` members' prompts, `in_flight` at once, as the
    actor is fed), and that of each (per_call, in_flight) in `other_feeds` (the variants' own, under
    `shape_key`'s names); the same calls one after another."""
    from bench.bench_sglang import post_generate

    def calls_of(members: int) -> list[list[str]]:
        return [prompts * min(members, population - start) for start in range(0, population, members)]

    calls = calls_of(per_call)

    def tokens(texts: list[str], forced: bool) -> int:
        return post_generate(url, texts, max_new_tokens, forced)[1]

    def fed(members: int, at_once: int) -> Callable[[bool], int]:
        def run(forced: bool) -> int:
            with ThreadPoolExecutor(at_once) as pool:
                return sum(pool.map(lambda call: tokens(call, forced), calls_of(members)))
        return run

    shapes: dict[str, Callable[[bool], int]] = {
        "one_call": lambda forced: tokens([t for call in calls for t in call], forced),
        "eslora_shape": fed(per_call, in_flight),
        "sequential_calls": lambda forced: sum(tokens(call, forced) for call in calls),
    }
    for members, at_once in other_feeds:
        shapes.setdefault(shape_key(members, at_once, (per_call, in_flight)), fed(members, at_once))

    def timed(shape: Callable[[bool], int], forced: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        generated = shape(forced)
        return {"wall_s": time.perf_counter() - t0, "tokens": generated}

    out = {}
    for name, shape in shapes.items():
        for forced in (False, True):
            key = name + ("_forced" if forced else "")
            out[key] = summarize(timed_runs(lambda: timed(shape, forced), repeats, f"plain {key}"))
    return out


def plain_runs(cfg: Any, model_path: str, prompts: list[str], repeats: int,
               other_feeds: Sequence[tuple[int, int]] = ()) -> dict[str, Any]:
    """A plain server (the LoRA server's flags minus LoRA, plus graph and running limits covering
    the whole generation) and the request shapes, with eslora's shape also as each variant feeds it
    (`other_feeds`: (members per call, calls in flight) pairs)."""
    from bench.bench_sglang import plain_command
    from eslora.backends.server import ServerProcess, free_port

    population = cfg.es.population
    per_call = members_per_call(cfg, population)
    requests_all = population * len(prompts)
    port = free_port()
    cmd = plain_command(cfg, model_path, port) + ["--cuda-graph-max-bs", str(requests_all), "--max-running-requests", str(requests_all)]
    server = ServerProcess(cmd, port=port, name="sglang-plain")
    try:
        start_s = server.start(timeout_s=cfg.backend.sglang.start_timeout_s)
        shapes = plain_shapes(server.url, prompts, population, per_call, cfg.task.max_new_tokens, repeats,
                              cfg.cluster.calls_in_flight, other_feeds)
    finally:
        server.stop()
    return {"server_start_s": start_s, "command_flags": cmd[3:], "shapes": shapes}


def perturbed(base: dict[str, Any], seed: int, sigma: float) -> list[tuple[str, Any]]:
    """Every weight + sigma * N(0, 1), the noise regenerated from `seed` on the weights' device."""
    import torch

    out = []
    for i, (name, weight) in enumerate(base.items()):
        gen = torch.Generator(device=weight.device).manual_seed(seed * 1_000_003 + i)
        noise = torch.randn(weight.shape, generator=gen, device=weight.device, dtype=torch.float32)
        out.append((name, (weight.float() + sigma * noise).to(weight.dtype)))
    return out


def base_weights(model_path: str, device: str = "cuda") -> dict[str, Any]:
    """The model's weights as HF names them, from its safetensors files (no code runs)."""
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for path in sorted(Path(model_path).glob("*.safetensors")):
        weights.update(load_file(str(path), device=device))
    return weights


def fullweight_peer(cfg: Any, model_path: str, prompts: list[str], sigma: float, repeats: int) -> dict[str, Any]:
    """Full-weight ES on one in-process SGLang engine: perturb / generate / restore per member, two
    ways: `inplace` (the weights perturbed where they live, from the seed, by a custom weight
    loader: 16 bytes sent per update) and `tensors` (the perturbed weights built here on the GPU and
    sent as CUDA tensors through `update_weights_from_tensor`, the originals sent back)."""
    import sglang
    import torch

    from bench.inplace_perturb import LOADER

    sg = cfg.backend.sglang
    kwargs = {"model_path": model_path, "dtype": cfg.model.dtype, "disable_radix_cache": True,
              "mem_fraction_static": 0.6, "custom_weight_loader": [LOADER]}
    kwargs.update({k: v for k, v in (("attention_backend", sg.attention_backend), ("sampling_backend", sg.sampling_backend)) if v})
    t0 = time.perf_counter()
    engine = sglang.Engine(**kwargs)
    start_s = time.perf_counter() - t0
    params = {"temperature": 0.0, "max_new_tokens": cfg.task.max_new_tokens}

    def update(named: list, load_format: Any = None) -> None:
        ok, message = engine.update_weights_from_tensor(named, load_format=load_format, flush_cache=False)
        if not ok:
            raise RuntimeError(f"update_weights_from_tensor failed: {message}")

    try:
        base = base_weights(model_path)
        original = list(base.items())
        ways = {
            "inplace": (lambda m: update([("seed_scale", torch.tensor([m, sigma], dtype=torch.float64))], LOADER),
                        lambda m: update([("seed_scale", torch.tensor([m, -sigma], dtype=torch.float64))], LOADER)),
            "tensors": (lambda m: update(perturbed(base, seed=m, sigma=sigma)), lambda m: update(original)),
        }

        def generation(perturb: Callable[[int], None], restore: Callable[[int], None],
                       members: int = cfg.es.population) -> dict[str, Any]:
            update_s = generate_s = restore_s = 0.0
            tokens = 0
            t_gen = time.perf_counter()
            for member in range(members):
                t0 = time.perf_counter()
                perturb(member)
                t1 = time.perf_counter()
                outs = engine.generate(prompt=prompts, sampling_params=params)
                tokens += sum(int(o["meta_info"]["completion_tokens"]) for o in outs)
                t2 = time.perf_counter()
                restore(member)
                torch.cuda.synchronize()
                t3 = time.perf_counter()
                update_s, generate_s, restore_s = update_s + t1 - t0, generate_s + t2 - t1, restore_s + t3 - t2
            return {"wall_s": time.perf_counter() - t_gen, "tokens": tokens, "members": members,
                    "update_s": update_s, "generate_s": generate_s, "restore_s": restore_s}

        out: dict[str, Any] = {"engine_start_s": start_s, "weights": len(base),
                               "parameters": int(sum(w.numel() for w in base.values()))}
        for way, (perturb, restore) in ways.items():
            # the warm-up is one member (the same update, generate and restore path), not a whole
            # population: 32 sequential member generations are minutes on the 1.5B, in a lease
            runs = [generation(perturb, restore, members=1)]
            report_run(f"full-weight peer {way} 1 member", runs[0], warm_up=True)
            for i in range(max(repeats, 1)):
                runs.append(generation(perturb, restore))
                report_run(f"full-weight peer {way} {i + 1}", runs[-1])
            out[way] = summarize(runs)
        out["fastest"] = min(ways, key=lambda way: out[way]["wall_s"])
        out["wall_s"] = out[out["fastest"]]["wall_s"]
        return out
    finally:
        engine.shutdown()
        gc.collect()


def measured_part(record: dict[str, Any], key: str, fn: Callable[[], Any], save: Callable[[], None]) -> Any:
    """record[key] = fn(), or {"error": ...} if it raised: one part failing on the GPU (a server
    that does not start, an engine API that differs) must not cost the parts already measured or
    the ones after it, in a lease that cannot be repeated cheaply. While it runs, record[key] holds
    its timed runs so far, saved after each; the record is saved again when the part ends."""
    global _on_run
    progress: dict[str, Any] = {"in_progress": True, "runs_so_far": []}
    record[key] = progress

    def on_run(label: str, run: dict[str, Any]) -> None:
        progress["runs_so_far"].append({"label": label, **{k: v for k, v in run.items() if not isinstance(v, (dict, list))}})
        save()

    _on_run = on_run
    try:
        record[key] = fn()
    except Exception as err:  # noqa: BLE001 - any failure of a part is recorded, then the next runs
        record[key] = {"error": f"{type(err).__name__}: {err}"[:2000], "runs_so_far": progress["runs_so_far"],
                       "traceback": traceback.format_exc(limit=8)[-4000:]}
        print(f"[throughput] part {key!r} failed: {record[key]['error']}", flush=True)
    finally:
        _on_run = _no_progress
    save()
    return None if "error" in record[key] else record[key]


LEAN = ["backend.sglang.adapter_layers_only=true", "backend.sglang.lean_adapter_loads=true"]
OPTIONAL_PARTS = ("one_call", "wide", "plain", "peer", "reference")


def measure_model(name: str, model_path: str, args: argparse.Namespace,
                  save: Callable[[dict[str, Any]], None] = lambda record: None,
                  later: Optional[list[Callable[[], None]]] = None) -> dict[str, Any]:
    """One model's object of throughput.json; `save(record)` is called after every part (and
    every timed run) with the record so far. A ratio whose parts did not both run is None (its
    part holds the error). The variants (record["variants"][name]) are appended to `later`, to
    run once every model's other parts are done (run here when `later` is None)."""
    from eslora.config import load_config

    overrides = [f"model.name_or_path={model_path}", *args.overrides]
    cfg = load_config(args.config, overrides)
    variant_cfgs = {vname: load_config(args.config, [*overrides, *extra]) for vname, extra in args.variants}  # bad keys fail now
    prompts, members, _, _ = generation_inputs(cfg, model_path)
    population = len(members)

    def feed(run_cfg: Any) -> tuple[int, int]:  # how a config feeds the actor: members per call, calls in flight
        return members_per_call(run_cfg, population), run_cfg.cluster.calls_in_flight

    record: dict[str, Any] = {"model": name, "model_path": model_path, "device": device_name(),
                              "population": population, "prompts": len(prompts), "max_new_tokens": cfg.task.max_new_tokens,
                              "greedy": cfg.task.temperature == 0.0}
    keys = ("p1_vs_best_plain", "p1_vs_same_shape", "p1_wide_vs_best_plain",
            "p2_vs_fullweight_peer", "p2_vs_hf_reference", "handoff_exposed_share")
    record.update(dict.fromkeys(keys))  # every ratio key (the among them) is present, measured or None

    def part(key: str, fn: Callable[[], Any], into: Optional[dict[str, Any]] = None) -> Any:
        return measured_part(record if into is None else into, key, fn, lambda: save(record))

    skip = set(args.skip)
    default_texts: list[str] = []
    eslora = part("eslora", lambda: eslora_runs(cfg, model_path, prompts, members, args.repeats, "eslora",
                                                one_call="one_call" not in skip, texts=default_texts))
    if eslora:
        record["handoff_exposed_share"] = eslora["handoff_exposed_share"]
    wide = plain = None
    if "wide" not in skip:
        wide_cfg = load_config(args.config, [*overrides, f"backend.max_loras_per_batch={population}",
                                             f"backend.sglang.cuda_graph_max_bs={population * len(prompts)}"])
        wide = part("eslora_wide", lambda: eslora_runs(wide_cfg, model_path, prompts, members, args.repeats, "eslora wide",
                                                       one_call=False))  # all members in one call already
    if "plain" not in skip:
        plain = part("plain", lambda: plain_runs(cfg, model_path, prompts, args.repeats,
                                                 [feed(v) for v in variant_cfgs.values()]))
    if plain and eslora:
        record.update(ratios(eslora, plain["shapes"], "eslora_shape"))
        if "one_call" in eslora:
            record["eslora_one_call"] = ratios(eslora["one_call"], plain["shapes"], "sequential_calls")
    if plain and wide:
        record["wide"] = ratios(wide, plain["shapes"], "one_call")
        record["p1_wide_vs_best_plain"] = record["wide"]["p1_vs_best_plain"]
    if "peer" not in skip:
        peer = part("fullweight_peer", lambda: fullweight_peer(cfg, model_path, prompts, cfg.es.sigma, args.peer_repeats))
        if peer and eslora:
            record["p2_vs_fullweight_peer"] = peer["wall_s"] / eslora["wall_s"]
    if args.reference_members and "reference" not in skip:
        from bench.bench_reference import reference_generation

        reference = part("hf_reference", lambda: reference_generation(
            model_path, prompts, cfg.task.max_new_tokens, args.reference_members, cfg.es.sigma, population))
        if reference and eslora:
            record["p2_vs_hf_reference"] = reference["generation_s_extrapolated"] / eslora["wall_s"]
    save(record)

    def variant_part(vname: str, extra: list[str]) -> None:
        variants = record.setdefault("variants", {})
        texts: list[str] = []
        out = part(vname, lambda: eslora_runs(variant_cfgs[vname], model_path, prompts, members, args.repeats,
                                              f"eslora {vname}", one_call=False, texts=texts), into=variants)
        if not out:
            return
        out["overrides"] = extra
        out["same_text_share_vs_default"] = same_share(texts, default_texts)
        if plain:  # the same shape is the variant's own feed (its calls in flight, its members per call)
            out.update(ratios(out, plain["shapes"], shape_key(*feed(variant_cfgs[vname]), feed(cfg))))
        if eslora:
            out["speedup_vs_default"] = eslora["wall_s"] / out["wall_s"]
            out["load_s_vs_default"] = timed_median(out["runs"], "load_s") / max(timed_median(eslora["runs"], "load_s"), 1e-9)
        save(record)

    for vname, extra in args.variants:
        task = (lambda vname=vname, extra=extra: variant_part(vname, extra))
        if later is None:
            task()
        else:
            later.append(task)
    return record


def parse_variants(raw: Optional[list[str]], enabled: bool) -> list[tuple[str, list[str]]]:
    """Each --variant 'NAME KEY=VALUE ...' as (name, overrides); the lean levers when none is given."""
    if not enabled:
        return []
    if not raw:
        return [("lean", LEAN)]
    variants = []
    for name, *extra in (shlex.split(text) or [""] for text in raw):
        if "=" in name or not extra or not all("=" in kv for kv in extra):
            raise ValueError(f"--variant takes a NAME and then KEY=VALUE overrides, got {[name, *extra]}")
        variants.append((name, extra))
    if len({name for name, _ in variants}) != len(variants):
        raise ValueError(f"--variant names must differ: {[name for name, _ in variants]}")
    return variants


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a model to measure (repeatable)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "countdown_sglang.yaml"))
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up, per measurement")
    ap.add_argument("--skip", default="", metavar="PART,...",
                    help=f"parts to leave out, of {','.join(OPTIONAL_PARTS)} (eslora fed as trained always runs: the "
                         "variants compare with it)")
    ap.add_argument("--peer-repeats", type=int, default=1,
                    help="the peer's timed generations after its one-member warm-up, per way (each is 32 "
                         "sequential member generations: minutes on a 1.5B, so fewer than --repeats)")
    ap.add_argument("--variant", action="append", metavar="'NAME KEY=VALUE ...'",
                    help="eslora with these config overrides (one quoted argument, so the trailing overrides "
                         "stay the run's), after every model's other parts; repeatable; default: 'lean "
                         + " ".join(LEAN) + "'")
    ap.add_argument("--no-variants", dest="with_variants", action="store_false", help="run no variant")
    ap.add_argument("--reference-members", type=int, default=2, help="HF reference members run (0 = skip)")
    ap.add_argument("overrides", nargs="*", help="config key=value for every model")
    args = ap.parse_args()
    models = [m.split("=", 1) for m in args.model]
    if any(len(m) != 2 for m in models):
        ap.error("--model takes NAME=PATH")
    args.skip = [part for part in args.skip.split(",") if part]
    if unknown := [part for part in args.skip if part not in OPTIONAL_PARTS]:
        ap.error(f"--skip {','.join(unknown)}: the parts that can be left out are {','.join(OPTIONAL_PARTS)}")
    try:
        args.variants = parse_variants(args.variant, args.with_variants)
    except ValueError as err:
        ap.error(str(err))
    command = shlex.join(["python3", "bench/bench_throughput.py", *sys.argv[1:]])
    records: list[dict[str, Any]] = []
    target = out_path("throughput.json")

    def save(record: dict[str, Any]) -> None:
        # after every part of every model, so a lease lost mid-run keeps what was measured
        record.update({"command": command, "versions": versions(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if not any(r is record for r in records):
            records.append(record)
        if target:
            Path(target).write_text(json.dumps(records, indent=1, default=str))

    variants_per_model: list[list[Callable[[], None]]] = []  # run once every model has its other parts
    for name, path in models:
        variants_per_model.append([])
        measure_model(name, path, args, save, variants_per_model[-1])
    for same_variant in zip(*variants_per_model):  # each variant on every model, then the next variant
        for variant in same_variant:
            variant()
    for record in records:
        print(json.dumps({k: v for k, v in record.items() if not isinstance(v, dict)}, indent=1, default=str), flush=True)
    return 0 if all(record.get("p1_vs_best_plain") is not None for record in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
