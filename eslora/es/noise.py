"""Perturbation noise rebuilt from seeds: one counter-based stream per (seed, member, tensor).

Follows the seed-only communication of Salimans et al. 2017, "Evolution Strategies as a Scalable
Alternative to Reinforcement Learning" (workers exchange seeds and scores, never weights), but
replaces their shared noise table, and the reference ES-for-LLM code's single seed reused for every
tensor, by a keyed counter-based generator (Philox, Salmon et al. 2011, "Parallel random numbers:
as easy as 1, 2, 3"). Each tensor's noise comes from its own key, so

- noise of two tensors in one member is independent (not one stream sliced, not one seed reused);
- any process rebuilds any tensor of any member on its own, in any order, with no shared state;
- the key is a cryptographic hash of the inputs, so it is the same on every machine and process
  (Python's `hash()` is salted per process and must never be used here).

Bit-identity holds for one numpy version: numpy pins the Philox bit stream, but its Generator
distributions (here the float32 ziggurat of `standard_normal`) may change between releases (NEP 19).
All replicas of a run must therefore share the numpy version; `NOISE_VERSION` names the scheme.
"""

from __future__ import annotations

import hashlib

import numpy as np

NOISE_VERSION = f"philox-blake2b-v1/numpy-{np.__version__}"

_U64 = 1 << 64


def tensor_key(seed: int, member: int, name: str) -> np.ndarray:
    """The 128-bit Philox key of one tensor's noise: blake2b(seed, member, name) as two uint64.

    Fixed-width little-endian integers followed by the UTF-8 name: no two distinct inputs share
    a byte string, so no two tensors share a stream.
    """
    if not 0 <= int(seed) < _U64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if not 0 <= int(member) < _U64:
        raise ValueError(f"member must be in [0, 2**64), got {member}")
    data = int(seed).to_bytes(8, "little") + int(member).to_bytes(8, "little") + name.encode("utf-8")
    digest = hashlib.blake2b(data, digest_size=16, person=b"eslora-noise").digest()
    return np.frombuffer(digest, dtype="<u8").astype(np.uint64)


def member_noise(seed: int, member: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 standard normal noise of `shape` for tensor `name` of `member` under `seed`.

    Pure: the same arguments give the same bytes in any process. This is the one noise function;
    perturbation (member parameters) and update (gradient estimate) both call it.
    """
    generator = np.random.Generator(np.random.Philox(key=tensor_key(seed, member, name)))
    return generator.standard_normal(size=tuple(int(d) for d in shape), dtype=np.float32)
