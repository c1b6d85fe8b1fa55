"""One config for the tests' small ES runs: the tiny model, the conciseness task, a few tokens.

Later `key=value` arguments override earlier ones, so each test states only what it is about.
"""

from eslora.config import Config, load_config


def tiny_config(model, *extra: str) -> Config:
    return load_config(
        None,
        [
            f"model.name_or_path={model}",
            "lora.layers=null",
            "es.population=8",
            "es.sigma=0.3",
            "es.lr=0.05",
            "task.name=conciseness",
            "task.num_prompts=2",
            "task.max_new_tokens=4",
            "task.target_length=10",
            "backend.max_loras_per_batch=2",
            "cluster.batches_per_call=1",
            "cluster.cpus_per_actor=0.5",
            *extra,
        ],
    )
