"""EvolutionStrategy: the estimate, the optimizers, replicas, resume, and its errors."""

from __future__ import annotations

import io
import os
import pickle
import random
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from eslora.config import ESConfig
from eslora.es import EvolutionStrategy, Population

SHAPES = {"m.lora_A.weight": (2, 8), "m.lora_B.weight": (16, 2)}  # D = 32


def quadratic(seed: int = 0):
    """f(theta) = -1/2 sum c * (theta - target)^2 over SHAPES; returns (f, grad, target)."""
    rng = np.random.default_rng(seed)
    target = {n: rng.normal(size=s) for n, s in SHAPES.items()}
    curv = {n: rng.uniform(0.5, 2.0, size=s) for n, s in SHAPES.items()}

    def f(theta) -> float:
        return -0.5 * sum(float(np.sum(curv[n] * (theta[n].astype(np.float64) - target[n]) ** 2)) for n in SHAPES)

    def grad(theta) -> np.ndarray:
        return np.concatenate([(-curv[n] * (theta[n].astype(np.float64) - target[n])).ravel() for n in sorted(SHAPES)])

    return f, grad, target


def zeros():
    return {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[n], np.float64).ravel() for n in sorted(arrays)])


def cosine(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_generation(es: EvolutionStrategy, f) -> dict:
    pop = es.ask()
    return es.tell(pop, [f(es.member_params(pop, m)) for m in pop.members()])


# -- the estimate ------------------------------------------------------------------------------
@pytest.mark.parametrize("shaping", ["raw", "zscore"])
def test_gradient_estimate_aligns_with_true_gradient_as_population_grows(shaping):
    f, grad, _ = quadratic()
    start = {n: np.full(s, 0.3, np.float32) for n, s in SHAPES.items()}
    true = grad(start)
    populations = [4, 16, 64, 256, 1024]
    cos = {}
    for n in populations:
        vals = []
        for seed in range(4):
            cfg = ESConfig(population=n, sigma=0.05, lr=1.0, seed=seed, shaping=shaping, lr_includes_sigma=False)
            es = EvolutionStrategy(cfg, start)
            run_generation(es, f)
            vals.append(cosine(flat(es.mean) - flat(start), true))  # sgd, lr=1: the step is g_hat
        cos[n] = float(np.mean(vals))
    assert all(cos[a] < cos[b] for a, b in zip(populations, populations[1:])), cos
    assert cos[1024] > 0.9, cos


def test_update_matches_a_direct_computation():
    f, _, _ = quadratic(1)
    start = {n: np.full(s, 0.5, np.float32) for n, s in SHAPES.items()}
    cfg = ESConfig(population=6, sigma=0.1, lr=0.01, shaping="raw", lr_includes_sigma=False, seed=3)
    es = EvolutionStrategy(cfg, start)
    pop = es.ask()
    fit = np.array([f(es.member_params(pop, m)) for m in pop.members()])
    es.tell(pop, fit)
    for name, shape in SHAPES.items():
        # theta += lr/(N sigma) * sum_m F_m * sign_m * eps_k(m), written out member by member
        g = sum(fit[m] * pop.noise(m, name, shape).astype(np.float64) for m in pop.members()) / (pop.size * pop.sigma)
        np.testing.assert_allclose(es.mean[name], start[name] + cfg.lr * g, rtol=1e-6, atol=1e-7)
    # and the members really were mean + sign * sigma * eps
    fresh = EvolutionStrategy(cfg, start)
    for m in pop.members():
        params = fresh.member_params(pop, m)
        for name, shape in SHAPES.items():
            np.testing.assert_allclose((params[name] - start[name]) / pop.sigma, pop.noise(m, name, shape), atol=1e-5)


def test_lr_includes_sigma_folds_one_over_sigma_into_lr():
    f, _, _ = quadratic(2)
    start = zeros()
    steps = {}
    for folded in (True, False):
        cfg = ESConfig(population=8, sigma=0.01, lr=0.001, shaping="zscore", lr_includes_sigma=folded)
        es = EvolutionStrategy(cfg, start)
        stats = run_generation(es, f)
        steps[folded] = flat(es.mean)
        assert stats["grad_norm"] > 0
    np.testing.assert_allclose(steps[False], steps[True] / 0.01, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_es_minimises_a_quadratic(optimizer):
    f, _, target = quadratic(3)
    lr = 0.02 if optimizer == "sgd" else 0.05
    cfg = ESConfig(population=16, sigma=0.05, lr=lr, optimizer=optimizer, shaping="centered_rank", lr_includes_sigma=False)
    es = EvolutionStrategy(cfg, zeros())
    start_loss = -f(es.mean)
    for _ in range(300):
        run_generation(es, f)
    assert -f(es.mean) < 0.02 * start_loss, (start_loss, -f(es.mean))


def test_equal_fitness_gives_no_update_and_no_nan():
    for shaping in ("zscore", "centered_rank"):
        es = EvolutionStrategy(ESConfig(shaping=shaping), {n: np.ones(s) for n, s in SHAPES.items()})
        before = flat(es.mean)
        stats = es.tell(es.ask(), [0.7] * 8)
        assert np.array_equal(flat(es.mean), before)
        assert stats["grad_norm"] == 0.0 and stats["update_norm"] == 0.0
        assert all(np.isfinite(v) for v in stats.values())


def test_decoupled_weight_decay_shrinks_the_mean():
    es = EvolutionStrategy(ESConfig(lr=0.5, weight_decay=0.1), {n: np.ones(s) for n, s in SHAPES.items()})
    es.tell(es.ask(), [1.0] * 8)  # no signal: only the decay acts
    np.testing.assert_array_equal(flat(es.mean), np.float32(0.95))


def test_stats_report_norms_and_fitness():
    f, _, _ = quadratic(4)
    es = EvolutionStrategy(ESConfig(population=4, sigma=0.1, lr=0.1), {n: np.ones(s) for n, s in SHAPES.items()})
    before = flat(es.mean)
    pop = es.ask()
    fit = [f(es.member_params(pop, m)) for m in pop.members()]
    stats = es.tell(pop, fit)
    step = np.linalg.norm(flat(es.mean) - before)
    assert stats["update_norm"] == pytest.approx(step, rel=1e-9)
    assert stats["update_ratio"] == pytest.approx(step / np.linalg.norm(before), rel=1e-9)
    assert stats["fitness_max"] == max(fit) and stats["fitness_min"] == min(fit)
    assert stats["fitness_mean"] == pytest.approx(np.mean(fit)) and stats["fitness_std"] == pytest.approx(np.std(fit))


# -- fp32 master weights ---------------------------------------------------------------------------
def test_master_weights_are_fp32_whatever_comes_in():
    half = {n: np.ones(s, np.float16) for n, s in SHAPES.items()}
    es = EvolutionStrategy(ESConfig(lr=1e-5, sigma=1e-3), half)
    assert all(a.dtype == np.float32 for a in es.mean.values())
    half["m.lora_A.weight"][0, 0] = 7  # a copy was taken
    assert es.mean["m.lora_A.weight"][0, 0] == 1
    pop = es.ask()
    assert all(a.dtype == np.float32 for a in es.member_params(pop, 0).values())
    es.tell(pop, np.arange(8.0))
    step = flat(es.mean) - 1.0
    # steps of ~1e-5 are below fp16's resolution at 1.0 (~1e-3) and would vanish there
    assert 0 < np.abs(step).max() < 1e-4
    assert np.any(np.float16(flat(es.mean)) == 1.0)
    bf16 = {n: torch.ones(s, dtype=torch.bfloat16) for n, s in SHAPES.items()}
    assert all(a.dtype == np.float32 for a in EvolutionStrategy(ESConfig(), bf16).mean.values())


# -- replicas: 1 vs 3 actors, shuffled arrival -------------------------------------------------
def simulate(num_actors: int, generations: int, cfg: ESConfig, shuffle_seed: int):
    """Driver + `num_actors` replicas built from the driver's state_dict; members dealt out
    round-robin, scored by whichever replica got them, results arriving in shuffled order."""
    f, _, _ = quadratic(5)
    driver = EvolutionStrategy(cfg, {n: np.full(s, 0.1, np.float32) for n, s in SHAPES.items()})
    actors = []
    for _ in range(num_actors):
        replica = EvolutionStrategy(cfg, zeros())
        replica.load_state_dict(driver.state_dict())
        actors.append(replica)
    arrival = random.Random(shuffle_seed)
    for _ in range(generations):
        pop = driver.ask()
        results = [(m, f(actors[m % num_actors].member_params(pop, m))) for m in pop.members()]
        arrival.shuffle(results)
        fitness = np.full(pop.size, np.nan)
        for m, score in results:
            fitness[m] = score
        driver.tell(pop, fitness)
        for replica in actors:
            replica.tell(pop, fitness)
        assert {r.fingerprint() for r in actors} == {driver.fingerprint()}
    return driver


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_and_three_actors_give_identical_bytes(optimizer):
    cfg = ESConfig(population=12, sigma=0.05, lr=0.01, optimizer=optimizer, weight_decay=0.01, shaping="centered_rank")
    one = simulate(1, 5, cfg, shuffle_seed=0)
    three = simulate(3, 5, cfg, shuffle_seed=1)
    assert one.fingerprint() == three.fingerprint()
    for name in SHAPES:
        assert one.mean[name].tobytes() == three.mean[name].tobytes()


# -- resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_is_bit_identical(optimizer):
    f, _, _ = quadratic(6)
    cfg = ESConfig(population=8, sigma=0.05, lr=0.01, optimizer=optimizer, weight_decay=0.01)
    start = {n: np.full(s, 0.2, np.float32) for n, s in SHAPES.items()}
    straight = EvolutionStrategy(cfg, start)
    for _ in range(7):
        run_generation(straight, f)

    first = EvolutionStrategy(cfg, start)
    for _ in range(3):
        run_generation(first, f)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain tensors and scalars only

    resumed = EvolutionStrategy(cfg, zeros())
    resumed.load_state_dict(state)
    assert resumed.generation == 3 and resumed.fingerprint() == first.fingerprint()
    for _ in range(4):
        run_generation(resumed, f)
    assert resumed.generation == straight.generation == 7
    assert resumed.fingerprint() == straight.fingerprint()
    for name in SHAPES:
        assert resumed.mean[name].tobytes() == straight.mean[name].tobytes()
    assert resumed.state_dict()["config"] == straight.state_dict()["config"]


def test_load_state_dict_refuses_mismatches():
    es = EvolutionStrategy(ESConfig(), zeros())
    state = es.state_dict()
    with pytest.raises(ValueError, match="optimizer"):
        EvolutionStrategy(ESConfig(optimizer="adam"), zeros()).load_state_dict(state)
    with pytest.raises(ValueError, match="names/shapes"):
        EvolutionStrategy(ESConfig(), {"m.lora_A.weight": np.zeros((2, 8))}).load_state_dict(state)
    state["mean"]["m.lora_A.weight"][0, 0] = 1.0  # tampered tensors no longer match the fingerprint
    with pytest.raises(ValueError, match="fingerprint"):
        EvolutionStrategy(ESConfig(), zeros()).load_state_dict(state)
    with pytest.warns(UserWarning, match="changed config"):
        EvolutionStrategy(ESConfig(lr=0.5), zeros()).load_state_dict(es.state_dict())


# -- errors ----------------------------------------------------------------------------------
def test_odd_population_with_antithetic_is_a_clear_error():
    with pytest.raises(ValueError, match="population=7 must be even"):
        EvolutionStrategy(ESConfig(population=7), zeros())
    assert EvolutionStrategy(ESConfig(population=7, antithetic=False), zeros()).ask().size == 7


def test_stale_population_is_refused():
    es = EvolutionStrategy(ESConfig(), zeros())
    old = es.ask()
    es.tell(old, np.arange(8.0))
    fingerprint = es.fingerprint()
    with pytest.raises(ValueError, match="stale"):
        es.tell(old, np.arange(8.0))
    with pytest.raises(ValueError, match="stale"):
        es.member_params(old, 0)
    assert es.fingerprint() == fingerprint
    with pytest.raises(ValueError, match="does not match"):
        es.tell(replace(es.ask(), sigma=0.5), np.arange(8.0))


def test_bad_fitness_is_refused_and_leaves_the_state_alone():
    es = EvolutionStrategy(ESConfig(), zeros())
    pop, fingerprint = es.ask(), es.fingerprint()
    with pytest.raises(ValueError, match="need 8 fitness"):
        es.tell(pop, np.arange(7.0))
    with pytest.raises(ValueError, match=r"non-finite fitness for members \[3\]"):
        es.tell(pop, [0, 1, 2, np.nan, 4, 5, 6, 7])
    assert es.fingerprint() == fingerprint and es.generation == 0


@pytest.mark.parametrize(
    "override, message",
    [({"sigma": 0.0}, "sigma"), ({"shaping": "softmax"}, "shaping"), ({"optimizer": "lion"}, "optimizer"),
     ({"lr": -1.0}, "lr"), ({"weight_decay": -0.1}, "weight_decay")],
)
def test_bad_config_is_refused(override, message):
    with pytest.raises(ValueError, match=message):
        EvolutionStrategy(replace(ESConfig(), **override), zeros())


def test_ask_is_pure_and_generation_seeds_differ():
    es = EvolutionStrategy(ESConfig(), zeros())
    assert es.ask() == es.ask()
    first = es.ask()
    es.tell(first, np.arange(8.0))
    second = es.ask()
    assert second.generation == 1 and second.seed != first.seed
    assert isinstance(first, Population) and list(first.members()) == list(range(8))
    other_seed = EvolutionStrategy(ESConfig(seed=1), zeros()).ask()
    assert other_seed.seed != first.seed


# -- across processes ----------------------------------------------------------------------------
def test_population_pickles_and_another_process_reaches_the_same_bytes():
    cfg = ESConfig(population=6, sigma=0.05, lr=0.01, optimizer="adam", seed=42)
    es = EvolutionStrategy(cfg, {n: np.full(s, 0.1, np.float32) for n, s in SHAPES.items()})
    pop = es.ask()
    assert pickle.loads(pickle.dumps(pop)) == pop
    fitness = [float(m * m % 5) for m in range(6)]
    for _ in range(3):
        es.tell(es.ask(), fitness)
    code = f"""
import numpy as np
from eslora.config import ESConfig
from eslora.es import EvolutionStrategy
shapes = {SHAPES!r}
es = EvolutionStrategy(ESConfig(population=6, sigma=0.05, lr=0.01, optimizer="adam", seed=42),
                       {{n: np.full(s, 0.1, np.float32) for n, s in shapes.items()}})
for _ in range(3):
    es.tell(es.ask(), {fitness!r})
print(es.fingerprint())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "777"})
    assert out.stdout.strip() == es.fingerprint()
