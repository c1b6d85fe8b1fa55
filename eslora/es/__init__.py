"""ES math for LoRA weights: seeded noise, fitness shaping, optimizers, the ask / tell strategy.

Pure numpy (torch only to hand out `state_dict` tensors): no Ray, no backends, no model code.
See docs/es.md for the design and the LoRA parametrisation.
"""

from eslora.es.init import init_lora_mean
from eslora.es.noise import NOISE_VERSION, member_noise, tensor_key
from eslora.es.shaping import SHAPINGS, centered_rank, get_shaping, raw, zscore
from eslora.es.strategy import EvolutionStrategy, Population, generation_seed, noise_weighted_mean, validate_config

__all__ = [
    "EvolutionStrategy",
    "NOISE_VERSION",
    "Population",
    "SHAPINGS",
    "centered_rank",
    "generation_seed",
    "get_shaping",
    "init_lora_mean",
    "member_noise",
    "noise_weighted_mean",
    "raw",
    "tensor_key",
    "validate_config",
    "zscore",
]
