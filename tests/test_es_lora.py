"""The LoRA parametrisation on a real (tiny, random) Qwen2 + PEFT model: the mean starts at the
base model, and every member's perturbation changes the logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eslora.config import ESConfig
from eslora.es import EvolutionStrategy, init_lora_mean, member_noise
from eslora.lora import LoraSpec


# -- init, no model --------------------------------------------------------------------------
def test_init_is_b_zero_and_a_scaled_and_seeded():
    shapes = {"x.q_proj.lora_A.weight": (4, 300), "x.q_proj.lora_B.weight": (200, 4)}
    mean = init_lora_mean(shapes, seed=0, alpha=8.0)
    assert all(a.dtype == np.float32 for a in mean.values())
    assert not mean["x.q_proj.lora_B.weight"].any()
    assert mean["x.q_proj.lora_A.weight"].std() == pytest.approx(np.sqrt(4) / 8.0, rel=0.05)
    again = init_lora_mean(shapes, seed=0, alpha=8.0)
    assert mean["x.q_proj.lora_A.weight"].tobytes() == again["x.q_proj.lora_A.weight"].tobytes()
    other = init_lora_mean(shapes, seed=1, alpha=8.0)
    assert not np.array_equal(mean["x.q_proj.lora_A.weight"], other["x.q_proj.lora_A.weight"])
    # the init stream is kept apart from generation noise of the same (seed, member, name)
    assert not np.array_equal(mean["x.q_proj.lora_A.weight"] / 0.25, member_noise(0, 0, "x.q_proj.lora_A.weight", (4, 300)))


def test_init_a_std_override():
    shapes = {"x.lora_A.weight": (2, 4000), "x.lora_B.weight": (8, 2)}
    assert init_lora_mean(shapes, seed=0, a_std=0.01)["x.lora_A.weight"].std() == pytest.approx(0.01, rel=0.05)
    with pytest.raises(ValueError, match="a_std"):
        init_lora_mean(shapes, seed=0, a_std=0.0)


def test_init_refuses_non_lora_names():
    with pytest.raises(ValueError, match="not a LoRA tensor"):
        init_lora_mean({"x.q_proj.weight": (4, 4)}, seed=0)
    with pytest.raises(ValueError, match="2-D"):
        init_lora_mean({"x.lora_A.weight": (4,)}, seed=0)


@pytest.mark.parametrize("r, alpha", [(1, 2.0), (4, 8.0), (8, 16.0)])
def test_member_weight_change_has_per_entry_std_sigma(r, alpha):
    # At B = 0 a member changes W by (alpha/r) * (sigma*eps_B) @ (A + sigma*eps_A); with
    # A ~ N(0, r/alpha^2) its entries have std sigma, as in full-weight ES with the same sigma.
    shapes = {"l.lora_A.weight": (r, 512), "l.lora_B.weight": (384, r)}
    sigma = 1e-3
    es = EvolutionStrategy(ESConfig(sigma=sigma), init_lora_mean(shapes, seed=3, alpha=alpha))
    pop = es.ask()
    for m in (0, 1, 5):
        p = es.member_params(pop, m)
        delta_w = (alpha / r) * p["l.lora_B.weight"].astype(np.float64) @ p["l.lora_A.weight"].astype(np.float64)
        assert delta_w.std() / sigma == pytest.approx(1.0, rel=0.1)


# -- a tiny real model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits.clone()
    spec = LoraSpec(r=1, alpha=2.0, layers=None)  # all 7 modules of both layers
    peft_model = get_peft_model(model, spec.peft_config()).eval()
    shapes = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(peft_model).items()}
    return peft_model, ids, base, shapes, spec


def logits_with(peft_model, ids, params) -> torch.Tensor:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, {n: torch.from_numpy(a) for n, a in params.items()})
    assert not result.unexpected_keys
    with torch.no_grad():
        return peft_model(ids).logits.clone()


def test_mean_adapter_is_the_base_model(tiny):
    peft_model, ids, base, shapes, spec = tiny
    assert len(shapes) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    mean = init_lora_mean(shapes, seed=0, alpha=spec.alpha)
    assert torch.equal(logits_with(peft_model, ids, mean), base)


def test_every_member_changes_the_logits(tiny):
    peft_model, ids, base, shapes, spec = tiny
    es = EvolutionStrategy(ESConfig(), init_lora_mean(shapes, seed=0, alpha=spec.alpha))  # default sigma
    pop = es.ask()
    outs = [logits_with(peft_model, ids, es.member_params(pop, m)) for m in pop.members()]
    for m, out in enumerate(outs):
        change = (out - base).abs()
        # ~5e-3 mean |change| at sigma=1e-3 (fp32 noise floor ~1e-7): clearly visible
        assert change.mean().item() > 1e-3, (m, change.mean().item())
    for a in range(len(outs)):
        for b in range(a + 1, len(outs)):
            assert (outs[a] - outs[b]).abs().max().item() > 1e-3, (a, b)
    # antithetic partners move the logits in opposite directions (to first order)
    d0, d1 = (outs[0] - base).flatten(), (outs[1] - base).flatten()
    assert torch.nn.functional.cosine_similarity(d0, d1, dim=0).item() < -0.9


def test_noise_on_a_alone_does_nothing_while_b_is_zero(tiny):
    # Why the parametrisation matters: with B = 0, A's perturbation is invisible.
    peft_model, ids, base, shapes, spec = tiny
    mean = init_lora_mean(shapes, seed=0, alpha=spec.alpha)
    es = EvolutionStrategy(ESConfig(sigma=0.1), mean)
    member = es.member_params(es.ask(), 0)
    only_a = {n: (member[n] if ".lora_A." in n else mean[n]) for n in mean}
    assert torch.equal(logits_with(peft_model, ids, only_a), base)
