"""One worker without Ray: members rebuilt from seeds give distinct adapters and generations."""

import numpy as np
import pytest

from eslora.config import load_config
from eslora.es import EvolutionStrategy
from eslora.es.init import init_lora_mean
from eslora.lora import AdapterError, LoraSpec, adapter_shapes
from eslora.worker import Worker


def test_two_members_differ_in_adapter_and_generation(tiny_model_path):
    cfg = load_config(None, [f"model.name_or_path={tiny_model_path}", "lora.layers=null", "es.population=4",
                             "es.sigma=0.3", "task.num_prompts=3", "task.max_new_tokens=8"])
    spec = LoraSpec.from_config(cfg.lora)
    es = EvolutionStrategy(cfg.es, init_lora_mean(adapter_shapes(str(tiny_model_path), spec), 0, alpha=spec.alpha))
    worker = Worker(cfg, str(tiny_model_path), es.state_dict())
    population = es.ask()
    p0, p2 = es.member_params(population, 0), es.member_params(population, 2)
    assert any(not np.array_equal(p0[k], p2[k]) for k in p0)
    problems = worker.task.train_problems(0, 3)
    from eslora.backends.base import Sampling
    from eslora.lora import Adapter

    outs = worker.backend.generate([p.prompt for p in problems],
                                   [Adapter("m0", spec, p0), Adapter("m2", spec, p2)], Sampling(max_new_tokens=8))
    assert [c.text for c in outs[0]] != [c.text for c in outs[1]]
    result = worker.evaluate(population, [0, 1, 2, 3])
    assert result.members == [0, 1, 2, 3] and len(result.fitness) == 4
    assert len(result.tokens) == 4 and all(0 < t <= 3 * 8 for t in result.tokens)
    # Replaying the driver's update keeps the replica identical to the driver.
    es.tell(population, result.fitness)
    assert worker.tell(population, result.fitness) == es.fingerprint()
    # An adapter to score must have this model's LoRA shapes: the adapter's error, naming the tensor.
    name = sorted(p0)[0]
    malformed = {**p0, name: np.zeros((p0[name].shape[0] + 1, p0[name].shape[1]), np.float32)}
    with pytest.raises(AdapterError, match=f"{name} has shape"):
        worker.score_adapter(malformed, "eval", 1, 8)
    worker.stop()
