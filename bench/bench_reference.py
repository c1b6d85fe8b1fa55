"""P2 of issue 7: one ES generation as the ES paper's reference code runs it, for comparison.

The structure of the reference implementation of "Evolution Strategies at Scale: LLM Fine-Tuning
Beyond Reinforcement Learning" (Qiu et al., 2025): for each member, perturb EVERY weight of the
full model in place with Gaussian noise regenerated from the member's seed, generate the
generation's prompt batch with HF `generate`, then restore the weights by regenerating the same
noise and subtracting it. Same prompts (32 Countdown problems), 256 new tokens, greedy, bf16.

    PYTHONPATH=/tmp/site:. python3 bench/bench_reference.py --model /tmp/model --members 4

Timing `--members` members and multiplying by the population (32) gives the generation's time;
the JSON says how many members were really run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import ROOT, generation_inputs, median, out_path, write_json  # noqa: E402
from eslora.config import load_config  # noqa: E402


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
    """In-place `w += scale * N(0, 1)` on every parameter, noise regenerated from `seed`."""
    for i, param in enumerate(model.parameters()):
        gen = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + i)
        noise = torch.randn(param.shape, generator=gen, device=param.device, dtype=param.dtype)
        param.add_(noise, alpha=scale)
        del noise


def reference_generation(model_path: str, prompts: list[str], max_new_tokens: int, members: int, sigma: float,
                         population: int) -> dict:
    """Run `members` members of the loop (perturb / generate / restore) and extrapolate to `population`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).cuda().eval()
    load_s = time.perf_counter() - t0
    try:
        batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
        gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        per_member, tokens = [], []
        # Member -1 is the warm-up: a whole member, untimed. An 8-token generate was not enough:
        # the first timed member still took 2.5-3.6x the next (17.2 vs 5.7 s on the H100,
        # 24.5 vs 6.8 s and 18.5 vs 7.5 s on the H200), which would inflate P2.
        for m in range(-1, members):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            perturb(model, seed=m, scale=sigma)
            out = model.generate(**batch, **gen_kwargs)
            perturb(model, seed=m, scale=-sigma)  # restore: the same noise, subtracted
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            new = out[:, batch["input_ids"].shape[1]:]
            generated = int((new != tok.pad_token_id).sum())
            print(f"[reference member {m}{' warm-up' if m < 0 else ''}] {seconds:.2f} s, {generated} tokens", flush=True)
            if m < 0:
                warmup_s = seconds
                continue
            per_member.append(seconds)
            tokens.append(generated)
    finally:
        del model
        torch.cuda.empty_cache()
    return {
        "what": "full-weight HF generate loop, perturb in place from a seed / generate / restore (ES paper structure)",
        "model_load_s": load_s, "warmup_member_s": warmup_s, "members_run": members, "population": population,
        "prompts": len(prompts), "max_new_tokens": max_new_tokens,
        "seconds_per_member": per_member, "tokens_per_member": tokens,
        "generation_s_extrapolated": median(per_member) * population,
        "tokens_per_s": sum(tokens) / sum(per_member),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/model")
    ap.add_argument("--config", default=str(ROOT / "configs" / "countdown_sglang.yaml"))
    ap.add_argument("--members", type=int, default=4, help="members actually run (the rest extrapolated)")
    ap.add_argument("--sigma", type=float, default=1e-3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    cfg = load_config(args.config, [f"model.name_or_path={args.model}", *args.overrides])
    prompts, _, _, _ = generation_inputs(cfg, args.model)
    record = reference_generation(args.model, prompts, cfg.task.max_new_tokens, args.members, args.sigma, cfg.es.population)
    print(f"[reference] median {median(record['seconds_per_member']):.2f} s/member -> "
          f"{record['generation_s_extrapolated']:.1f} s per generation of {record['population']}")
    write_json(out_path("bench_reference.json"), record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
