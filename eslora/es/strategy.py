"""Gaussian ES over a dict of fp32 tensors (a LoRA adapter), ask / tell, replicable bit for bit.

The estimator is Salimans et al. 2017 (OpenAI ES) with mirrored sampling, as used on LLM weights
by Qiu et al. 2025 ("Evolution Strategies at Scale: LLM Fine-Tuning Beyond Reinforcement
Learning"):

    theta_m   = theta + s_m * sigma * eps_k(m)           member m; pair k(m) = m // 2, s_m = +1 / -1
    direction = (1/N) * sum_m w_m * s_m * eps_k(m)       w = shape(fitness)
    g_hat     = direction / sigma                        the search-gradient estimate
    theta    += lr * direction          (lr_includes_sigma: the ES paper folds 1/sigma into lr)
    theta    += lr * g_hat              (otherwise; or Adam on the same quantity)

Shaped like evosax (`algorithms/base.py`, `distribution_based/open_es.py`): the strategy holds
the state, `ask` says what to evaluate, `tell` takes fitness and steps. Only a `Population`
(seeds and scalars) travels: every process rebuilds any member's tensors with `member_params`, and
any replica fed the same (population, fitness vector) by `tell` ends with the same bytes, because

- noise is rebuilt from (generation seed, noise index, tensor name) by `noise.member_noise`;
- the update walks tensors in sorted-name order and members in index order, elementwise in
  float64, rounded once to fp32 -- it never sees which actor scored whom or in what order;
- the RNG "position" is the generation counter itself: generation seeds are a hash of
  (es.seed, generation), so a checkpoint's generation restores the whole random stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from eslora.es import optim
from eslora.es.noise import NOISE_VERSION, member_noise
from eslora.es.shaping import SHAPINGS, get_shaping

STATE_FORMAT = "eslora.es/1"

# Config keys the engine reads (eslora.config.ESConfig); echoed into every state_dict.
_KEYS = (
    "population", "sigma", "lr", "seed", "antithetic", "shaping", "optimizer", "weight_decay",
    "lr_includes_sigma", "adam_beta1", "adam_beta2", "adam_eps", "init_seed",
)


def generation_seed(seed: int, generation: int) -> int:
    """The seed of one generation: a hash of (es.seed, generation), in [0, 2**63)."""
    data = int(seed).to_bytes(16, "little", signed=True) + int(generation).to_bytes(8, "little")
    digest = hashlib.blake2b(data, digest_size=8, person=b"eslora-gen").digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Population:
    """All that travels to actors for one generation: seeds and scalars, no tensors."""

    generation: int
    seed: int  # generation seed, derived from es.seed and generation
    size: int
    sigma: float
    antithetic: bool

    def members(self) -> range:
        return range(self.size)

    def noise_index(self, member: int) -> tuple[int, float]:
        """(k, sign): member m uses noise k with sign +1/-1. Antithetic: k = m // 2, + for even m."""
        if not 0 <= member < self.size:
            raise ValueError(f"member {member} outside population of size {self.size}")
        if self.antithetic:
            return member // 2, (1.0 if member % 2 == 0 else -1.0)
        return member, 1.0

    def noise(self, member: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """sign * eps of tensor `name` for `member`, float32; antithetic partners are exact negatives."""
        k, sign = self.noise_index(member)
        eps = member_noise(self.seed, k, name, shape)
        return eps if sign > 0 else -eps


@dataclass(frozen=True)
class _Settings:
    """The validated ES config the engine reads; any object with ESConfig's attributes works."""

    population: int
    sigma: float
    lr: float
    seed: int
    antithetic: bool
    shaping: str
    optimizer: str
    weight_decay: float
    lr_includes_sigma: bool
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    init_seed: int

    @classmethod
    def from_config(cls, cfg: Any) -> "_Settings":
        missing = [k for k in _KEYS if not hasattr(cfg, k)]
        if missing:
            raise ValueError(f"ES config lacks {', '.join('es.' + k for k in missing)}")
        s = cls(**{k: getattr(cfg, k) for k in _KEYS})
        checks = [
            (s.population >= 1, f"es.population={s.population} must be >= 1"),
            (not s.antithetic or s.population % 2 == 0,
             f"es.population={s.population} must be even when es.antithetic=true (members come in +/- pairs)"),
            (s.sigma > 0 and math.isfinite(s.sigma), f"es.sigma={s.sigma} must be finite and > 0"),
            (s.lr >= 0 and math.isfinite(s.lr), f"es.lr={s.lr} must be finite and >= 0"),
            (s.weight_decay >= 0, f"es.weight_decay={s.weight_decay} must be >= 0"),
            (s.shaping in SHAPINGS, f"es.shaping={s.shaping!r}: use {', '.join(SHAPINGS)}"),
            (s.optimizer in ("sgd", "adam"), f"es.optimizer={s.optimizer!r}: use sgd or adam"),
            (0 <= s.adam_beta1 < 1 and 0 <= s.adam_beta2 < 1, "es.adam_beta1 and es.adam_beta2 must be in [0, 1)"),
            (s.adam_eps > 0, f"es.adam_eps={s.adam_eps} must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return s

    def echo(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_config(cfg: Any) -> None:
    """The `es` section's value rules (raises ValueError naming the key); `load_config` calls it."""
    _Settings.from_config(cfg)


def noise_weighted_mean(population: Population, weights: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """(1/N) * sum_m weights[m] * sign_m * eps_k(m) per tensor, float64, fixed summation order.

    Members sharing a noise index (antithetic pairs) are merged first, so each eps is generated
    once; indices are summed in ascending order, tensors in sorted-name order.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (population.size,):
        raise ValueError(f"need {population.size} weights, got shape {weights.shape}")
    coef: dict[int, float] = {}
    for m in population.members():
        k, sign = population.noise_index(m)
        coef[k] = coef.get(k, 0.0) + sign * float(weights[m])
    out = {}
    for name in sorted(shapes):
        acc = np.zeros(shapes[name], np.float64)
        for k in sorted(coef):
            if coef[k] != 0.0:  # tied antithetic pairs carry no signal: skip their noise
                acc += coef[k] * member_noise(population.seed, k, name, shapes[name]).astype(np.float64)
        out[name] = acc / population.size
    return out


class EvolutionStrategy:
    """Ask / tell Gaussian ES on fp32 master weights; see the module docstring for the math."""

    def __init__(self, cfg: Any, mean: Mapping[str, np.ndarray]) -> None:
        self.cfg = _Settings.from_config(cfg)
        self._shaping = get_shaping(self.cfg.shaping)
        if not mean:
            raise ValueError("the mean has no tensors")
        self.mean: dict[str, np.ndarray] = {}
        for name in sorted(mean):
            value = mean[name]
            if hasattr(value, "detach"):  # a torch tensor, possibly bf16 (numpy has no bf16)
                value = value.detach().cpu().float().numpy()
            array = np.array(value, dtype=np.float32, copy=True)  # fp32 master copy, whatever came in
            if not np.all(np.isfinite(array)):
                raise ValueError(f"initial mean {name} has non-finite values")
            self.mean[name] = array
        self.generation = 0
        self._opt = optim.adam_init(self.mean) if self.cfg.optimizer == "adam" else {}

    # -- ask ---------------------------------------------------------------------------------
    def ask(self) -> Population:
        """The population of the current generation (pure: asking twice gives the same one)."""
        return Population(
            generation=self.generation,
            seed=generation_seed(self.cfg.seed, self.generation),
            size=self.cfg.population,
            sigma=float(self.cfg.sigma),
            antithetic=bool(self.cfg.antithetic),
        )

    def member_params(self, population: Population, member: int) -> dict[str, np.ndarray]:
        """mean + sign * sigma * eps for every tensor, fp32. Same arguments -> same bytes anywhere."""
        self._check_population(population)
        sigma = np.float32(population.sigma)
        return {
            name: self.mean[name] + sigma * population.noise(member, name, self.mean[name].shape)
            for name in self.mean
        }

    # -- tell --------------------------------------------------------------------------------
    def tell(self, population: Population, fitness: Sequence[float]) -> dict[str, float]:
        """Shape fitness (member order), estimate the gradient, step the mean; generation += 1."""
        self._check_population(population)
        f = np.asarray(fitness, dtype=np.float64)
        if f.shape != (population.size,):
            raise ValueError(f"generation {population.generation}: need {population.size} fitness values, got shape {f.shape}")
        if not np.all(np.isfinite(f)):
            bad = np.flatnonzero(~np.isfinite(f)).tolist()
            raise ValueError(f"generation {population.generation}: non-finite fitness for members {bad}")

        shapes = {name: array.shape for name, array in self.mean.items()}
        direction = noise_weighted_mean(population, self._shaping(f), shapes)
        if not self.cfg.lr_includes_sigma:
            direction = {name: d / population.sigma for name, d in direction.items()}

        old = self.mean
        if self.cfg.optimizer == "adam":
            new, self._opt = optim.adam_step(
                old, direction, self._opt, lr=self.cfg.lr, beta1=self.cfg.adam_beta1,
                beta2=self.cfg.adam_beta2, eps=self.cfg.adam_eps, weight_decay=self.cfg.weight_decay,
            )
        else:
            new = optim.sgd_step(old, direction, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if not all(np.all(np.isfinite(v)) for v in new.values()):
            raise FloatingPointError(f"generation {population.generation}: the update made the mean non-finite")
        self.mean = new
        self.generation += 1

        # g_hat = direction / sigma whichever way lr is scaled, so grad_norm compares across runs.
        scale = population.sigma if self.cfg.lr_includes_sigma else 1.0
        grad_norm = _norm(direction.values()) / scale
        update_norm = _norm(new[n].astype(np.float64) - old[n] for n in sorted(new))
        mean_norm = _norm(old.values())
        return {
            "grad_norm": grad_norm,
            "update_norm": update_norm,
            "update_ratio": update_norm / mean_norm if mean_norm > 0 else (math.inf if update_norm > 0 else 0.0),
            "mean_norm": _norm(new.values()),
            "fitness_mean": float(f.mean()),
            "fitness_max": float(f.max()),
            "fitness_min": float(f.min()),
            "fitness_std": float(f.std()),
        }

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain dict of torch CPU tensors and Python scalars: `torch.load(weights_only=True)`-safe.

        The RNG needs no stream state: noise is counter-based, so (config seed, generation) is
        its whole position.
        """
        import torch

        def tensors(arrays: Mapping[str, np.ndarray]) -> dict:
            return {name: torch.from_numpy(np.array(arrays[name], copy=True)) for name in sorted(arrays)}

        opt: dict[str, Any] = {"name": self.cfg.optimizer}
        if self.cfg.optimizer == "adam":
            opt.update(t=int(self._opt["t"]), m=tensors(self._opt["m"]), v=tensors(self._opt["v"]))
        return {
            "format": STATE_FORMAT,
            "generation": int(self.generation),
            "mean": tensors(self.mean),
            "optimizer": opt,
            "rng": {"seed": int(self.cfg.seed), "generation": int(self.generation), "noise": NOISE_VERSION},
            "config": self.cfg.echo(),
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore mean, optimizer moments and generation; the config stays this object's own.

        Names and shapes must match; an optimizer change is an error (moments would be invented);
        other config differences (e.g. a new lr) are allowed with a warning -- they break
        bit-identity with the original run, which is then the point.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an ES state ({STATE_FORMAT}): format={state.get('format')!r}")
        mean = {name: _to_numpy(v, np.float32) for name, v in state["mean"].items()}
        expected = {n: a.shape for n, a in self.mean.items()}
        got = {n: a.shape for n, a in mean.items()}
        if got != expected:
            diff = sorted(set(expected).symmetric_difference(got)) or sorted(n for n in expected if expected[n] != got[n])
            raise ValueError(f"ES state does not fit this adapter (names/shapes differ, e.g. {diff[:3]})")
        opt_name = state["optimizer"]["name"]
        if opt_name != self.cfg.optimizer:
            raise ValueError(f"ES state was written with optimizer {opt_name!r}, config says {self.cfg.optimizer!r}")
        changed = {k: (v, getattr(self.cfg, k)) for k, v in state.get("config", {}).items() if getattr(self.cfg, k, v) != v}
        if changed:
            warnings.warn(f"resuming ES state with changed config (old, new): {changed}", stacklevel=2)
        if state.get("rng", {}).get("noise", NOISE_VERSION) != NOISE_VERSION:
            warnings.warn(f"ES state noise {state['rng']['noise']!r} != this process's {NOISE_VERSION!r}: "
                          "perturbations may differ from the original run", stacklevel=2)

        self.mean = {name: mean[name] for name in sorted(mean)}
        self.generation = int(state["generation"])
        if self.cfg.optimizer == "adam":
            o = state["optimizer"]
            self._opt = {
                "t": int(o["t"]),
                "m": {n: _to_numpy(o["m"][n], np.float64) for n in sorted(self.mean)},
                "v": {n: _to_numpy(o["v"][n], np.float64) for n in sorted(self.mean)},
            }
        else:
            self._opt = {}
        if "fingerprint" in state and state["fingerprint"] != self.fingerprint():
            raise ValueError("ES state is corrupt: its fingerprint does not match its tensors")

    def fingerprint(self) -> str:
        """16 hex chars over generation, mean bytes and optimizer moments: replicas compare these."""
        h = hashlib.blake2b(digest_size=8, person=b"eslora-state")
        h.update(int(self.generation).to_bytes(8, "little"))
        arrays = [("mean", self.mean)]
        if self._opt:
            h.update(int(self._opt["t"]).to_bytes(8, "little"))
            arrays += [("m", self._opt["m"]), ("v", self._opt["v"])]
        for tag, group in arrays:
            for name in sorted(group):
                a = np.ascontiguousarray(group[name])
                h.update(f"{tag}:{name}:{a.dtype.str}:{a.shape}".encode())
                h.update(a.tobytes())
        return h.hexdigest()

    # -- helpers -----------------------------------------------------------------------------
    def _check_population(self, population: Population) -> None:
        if population.generation != self.generation:
            raise ValueError(
                f"stale population: generation {population.generation}, this ES is at generation {self.generation}"
            )
        expected = self.ask()
        if population != expected:
            raise ValueError(f"population {population} does not match this ES's config ({expected})")


def _norm(arrays) -> float:
    return math.sqrt(sum(float(np.dot(a.ravel().astype(np.float64), a.ravel().astype(np.float64))) for a in arrays))


def _to_numpy(value: Any, dtype) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype != dtype:
        raise ValueError(f"ES state tensor has dtype {array.dtype}, expected {np.dtype(dtype)}")
    return np.array(array, copy=True)
