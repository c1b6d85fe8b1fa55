"""Config schema: YAML + overrides, strict keys and types, messages that name the key."""

import pytest

from eslora.config import Config, ConfigError, from_dict, load_config, to_dict


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("es:\n  population: 16\nrun:\n  name: x\n")
    cfg = load_config(path, ["es.sigma=0.05", "lora.layers=[0,1]", "cluster.address=auto"])
    assert isinstance(cfg, Config)
    assert cfg.es.population == 16 and cfg.es.sigma == 0.05
    assert cfg.lora.layers == [0, 1] and cfg.run.name == "x" and cfg.cluster.address == "auto"
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["es.popsize=8"], "popsize"),
        (["nonsense.key=1"], "nonsense"),
        (["es.population=many"], "es.population"),
        (["es.population=7"], "even"),
        (["es.shaping=softmax"], "es.shaping"),
        (["backend.name=tgi"], "backend.name"),
        (["lora.target_modules=[model.layers.0.self_attn.q_proj]"], "simple module names"),
        (["es.population"], "key=value"),
        (["cluster.num_actors=-1"], "cluster.num_actors"),
        (["cluster.calls_in_flight=0"], "cluster.calls_in_flight"),
        (["run.time_limit_min=-5"], "run.time_limit_min"),
        # Rules owned by the sections' packages, still checked at load (before Ray starts).
        (["task.name=nope"], "task.name"),
        (["task.reward=best"], "task.reward"),
        (["task.eval_prompts=0"], "task.eval_prompts"),
        (["task.eval_max_new_tokens=0"], "task.eval_max_new_tokens"),
        (["model.dtype=fp8"], "model.dtype"),
        (["es.sigma=inf"], "es.sigma"),
        (["es.lr=nan"], "es.lr"),
        (["backend.max_restarts=-1"], "backend.max_restarts"),
        (["lora.alpha=0"], "lora.alpha"),
        (["backend.name=sglang", "backend.sglang.adapter_layers_only=true", "lora.layers=null"], "adapter_layers_only"),
    ],
)
def test_bad_config_names_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_bad_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task:\n  nmae: countdown\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "nmae" in str(err.value) and "bad.yaml" in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/file.yaml")


def test_shipped_configs_load():
    import pathlib

    for path in sorted(pathlib.Path(__file__).parent.parent.joinpath("configs").glob("*.yaml")):
        load_config(path)


def test_cli_bad_key_exits_2(capsys):
    from eslora.cli import main

    assert main(["train", "configs/demo.yaml", "es.sigmaa=1"]) == 2
    assert "sigmaa" in capsys.readouterr().err
