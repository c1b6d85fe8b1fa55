"""The driver's files without Ray: checkpoints (safe load, fallback, disk full, what is kept),
metrics.jsonl repair, the run folder's refusal and lock, resume's config check."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from eslora.checkpoint import CheckpointError, Checkpoints, find_checkpoint, load_checkpoint, run_changes
from eslora.config import Config, load_config, to_dict
from eslora.es import EvolutionStrategy
from eslora.files import FileWriteError
from eslora.lora import LoraSpec
from eslora.metrics import DROPPED, MetricsLogger, read_metrics, repair_metrics
from eslora.run_folder import RunFolder, RunFolderError
from eslora.startup import initial_strategy
from tiny_run import tiny_config

FIXTURES = Path(__file__).parent / "fixtures"


def small_es(generations: int = 0, optimizer: str = "adam") -> tuple[EvolutionStrategy, Config]:
    cfg = load_config(None, ["es.population=4", f"es.optimizer={optimizer}"])
    es = EvolutionStrategy(cfg.es, {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)})
    for g in range(generations):
        es.tell(es.ask(), [1.0, 2.0 + g, 0.5, 3.0])
    return es, cfg


def tell(es: EvolutionStrategy) -> None:
    es.tell(es.ask(), [1.0, 2.0, 0.5, 3.0 + es.generation])


# -- loading without running code ----------------------------------------------------------------
class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_runs_nothing_and_is_refused(tmp_path):
    marker = tmp_path / "marker"
    es, cfg = small_es(1)
    folder = tmp_path / "run" / "checkpoints"
    Checkpoints(tmp_path / "run", 0).save(es, cfg)
    good = folder / "gen_00001.pt"
    # The newest checkpoint is a real one with one field replaced by the payload.
    payload = torch.load(good, weights_only=True)
    payload["generation"] = RunsCode(marker)
    torch.save(payload, folder / "gen_00002.pt")
    (folder / "latest").write_text("gen_00002.pt")
    for where in (folder / "gen_00002.pt", tmp_path / "run"):
        with pytest.raises(CheckpointError, match=r"gen_00002\.pt: refused: .*would run code"):
            load_checkpoint(where)  # no fallback to gen_00001.pt past an attack
    assert not marker.exists()


def test_checkpoint_written_before_the_hardening_still_loads(tiny_model_path):
    # tests/fixtures/checkpoint_2aec921_gen_00002.pt: written by eslora at commit 2aec921
    # (train.save_checkpoint) for tiny_config(model, "es.optimizer=adam"), 2 generations told
    # fitness arange(8) * (g + 1); its ES fingerprint then was d8297136755e444c.
    checkpoint = load_checkpoint(FIXTURES / "checkpoint_2aec921_gen_00002.pt")
    assert checkpoint["generation"] == 2
    cfg = tiny_config(tiny_model_path, "es.optimizer=adam")
    # Only where the tiny model was built differs: the old config reads as a config of today.
    assert [c.split(":")[0] for c in run_changes(checkpoint["config"], to_dict(cfg))] == ["model.name_or_path"]
    es = initial_strategy(cfg, str(tiny_model_path), LoraSpec.from_config(cfg.lora))
    es.load_state_dict(checkpoint["es"])
    assert es.generation == 2 and es.fingerprint() == "d8297136755e444c"


# -- broken files --------------------------------------------------------------------------------
def test_zero_byte_and_truncated_checkpoints_name_the_file_and_fall_back(tmp_path, capsys):
    es, cfg = small_es()
    checkpoints = Checkpoints(tmp_path, keep_every=1)
    for _ in range(3):
        tell(es)
        checkpoints.save(es, cfg)
    folder = tmp_path / "checkpoints"
    whole = (folder / "gen_00003.pt").read_bytes()
    (folder / "gen_00003.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"gen_00003\.pt: empty checkpoint file \(0 bytes\)"):
        load_checkpoint(folder / "gen_00003.pt")
    (folder / "gen_00002.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=r"gen_00002\.pt: unreadable checkpoint, truncated"):
        load_checkpoint(folder / "gen_00002.pt")
    capsys.readouterr()
    path, checkpoint = find_checkpoint(tmp_path)
    assert path == folder / "gen_00001.pt" and checkpoint["generation"] == 1
    log = capsys.readouterr().out
    assert "gen_00003.pt: empty checkpoint file" in log and "gen_00002.pt: unreadable" in log
    assert f"using the older checkpoint {folder / 'gen_00001.pt'}" in log
    (folder / "latest").write_text("gen_00004.pt")  # names a file that is gone: fall back, say so
    capsys.readouterr()
    assert find_checkpoint(tmp_path)[0] == folder / "gen_00001.pt"
    assert f"{folder / 'gen_00004.pt'}: cannot read the checkpoint (No such file or directory)" in capsys.readouterr().out
    (folder / "gen_00001.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no readable checkpoint in"):
        load_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*empty \(no checkpoints/gen_\*\.pt\)"):
        load_checkpoint(tmp_path / "empty")


def test_disk_full_names_the_file_and_leaves_the_last_good_checkpoint(tmp_path):
    es, cfg = small_es(1)
    checkpoints = Checkpoints(tmp_path, keep_every=0)
    checkpoints.save(es, cfg)
    tell(es)
    folder = tmp_path / "checkpoints"
    # The kernel's own ENOSPC: the file's .tmp is /dev/full, where every write fails "No space left".
    (folder / "gen_00002.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(FileWriteError, match=r"cannot write .*gen_00002\.pt: No space left on device"):
        checkpoints.save(es, cfg)
    assert sorted(p.name for p in folder.iterdir()) == ["gen_00001.pt", "latest"]  # no partial file
    assert load_checkpoint(tmp_path)["generation"] == 1
    checkpoints.save(es, cfg)  # space again: the next save works
    assert load_checkpoint(tmp_path)["generation"] == 2


def test_every_generation_is_on_disk_and_every_nth_is_kept(tmp_path):
    for keep_every, kept in ((0, ["gen_00005.pt"]), (2, ["gen_00002.pt", "gen_00004.pt", "gen_00005.pt"])):
        es, cfg = small_es()
        checkpoints = Checkpoints(tmp_path / str(keep_every), keep_every)
        for generation in range(1, 6):
            tell(es)
            checkpoints.save(es, cfg)
            assert load_checkpoint(tmp_path / str(keep_every))["generation"] == generation
        assert sorted(p.name for p in (tmp_path / str(keep_every) / "checkpoints").glob("*.pt")) == kept


# -- resume's config check -----------------------------------------------------------------------
def test_run_changes_lists_what_changes_the_trajectory():
    saved = to_dict(load_config(None, ["lora.alpha=2.0", "es.lr=0.001"]))
    del saved["task"]["eval_prompts"]  # a key an older checkpoint lacks: compared as its default
    same = load_config(None, ["es.init_seed=7", "task.eval_prompts=3", "task.eval_max_new_tokens=9",
                              "lora.target_modules=[v_proj,q_proj,k_proj,o_proj,gate_proj,up_proj,down_proj]",
                              "cluster.num_actors=3", "backend.max_loras_per_batch=3", "run.generations=99"])
    assert run_changes(saved, to_dict(same)) == []
    other = load_config(None, ["lora.alpha=4.0", "es.lr=0.002", "model.name_or_path=other", "task.name=countdown"])
    assert run_changes(saved, to_dict(other)) == [
        "model.name_or_path: 'smollm2-135m' -> 'other'", "lora.alpha: 2.0 -> 4.0", "es.lr: 0.001 -> 0.002",
        "task.name: 'conciseness' -> 'countdown'",
    ]


# -- metrics.jsonl -------------------------------------------------------------------------------
def record(generation: int) -> dict:
    return {"generation": generation, "reward_mean": 0.5, "reward_max": 1.0, "reward_min": 0.0, "seconds": 1.0, "tokens": 3}


def test_cut_off_last_line_is_moved_aside_with_its_path_and_resume_keeps_the_rest(tmp_path, capsys):
    logger = MetricsLogger(tmp_path)
    for g in range(3):
        logger.log(record(g))
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"generation": 3, "reward_me')  # disk full mid-line
    assert [r["generation"] for r in read_metrics(path)] == [0, 1, 2]
    capsys.readouterr()
    repair_metrics(path, 2)  # resume at generation 2: generation 2 runs again
    out = capsys.readouterr().out
    assert f"warning: {path}: 1 cut-off or unreadable line(s) moved to {tmp_path / DROPPED}" in out
    assert [json.loads(x)["generation"] for x in path.read_text().splitlines()] == [0, 1]
    assert (tmp_path / DROPPED).read_text().splitlines() == ['{"generation": 3, "reward_me', json.dumps(record(2))]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_metrics_line_that_cannot_be_written_names_the_file(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC, from the kernel
    with pytest.raises(FileWriteError, match=r"cannot write .*metrics\.jsonl: No space left on device"):
        MetricsLogger(tmp_path).log(record(0))


# -- the run folder ------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fresh_run_of_an_existing_run_folder_is_refused_and_changes_nothing(tmp_path):
    folder = tmp_path / "run"
    with RunFolder(folder, resume=False) as run:
        run.accept("run: {name: run}\n")
        (folder / "metrics.jsonl").write_text("")
    with RunFolder(folder, resume=False) as run:  # its start finished no generation: usable again
        (folder / "metrics.jsonl").write_text(json.dumps(record(0)) + "\n")
    before = snapshot(folder)
    with pytest.raises(RunFolderError, match=r"already holds a run \(metrics.jsonl\); nothing was changed.*resume=true"):
        RunFolder(folder, resume=False)
    assert snapshot(folder) == before
    with RunFolder(folder, resume=True):
        pass


def test_a_second_process_on_the_same_run_folder_is_refused(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from eslora.run_folder import RunFolder
        with RunFolder({str(folder)!r}, resume=False):
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"run folder {folder} is in use by another eslora run \(pid {holder.pid}\)"):
            RunFolder(folder, resume=True)
    finally:
        holder.communicate("", timeout=30)
    with RunFolder(folder, resume=True):  # released when its process ended
        pass


def test_the_curve_draws_the_base_models_held_out_accuracy_across_the_run(tmp_path, monkeypatch):
    # The learning goal is measured against the base model, so the accuracy panel carries it as a
    # line over every generation, labelled with its value.
    import json

    from matplotlib.figure import Figure

    from eslora.metrics import plot

    rows = [{"generation": g, "reward_mean": 0.1 * g, "reward_min": 0.0, "reward_max": 0.2 * g, "answer_mean": 0.05 * g}
            for g in range(4)]
    rows[0].update(eval_initial_answer=0.016, eval_initial_reward=0.05)
    rows[3].update(eval_answer=0.12, eval_reward=0.2)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    saved = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), real_savefig(fig, *a, **k))[1])
    assert plot(metrics, tmp_path / "curve.png") == tmp_path / "curve.png" and (tmp_path / "curve.png").stat().st_size > 0
    accuracy_panel = saved[0].axes[1]
    lines = {line.get_label(): line for line in accuracy_panel.get_lines()}
    base = lines["base model, held-out (1.6 %)"]
    assert list(base.get_ydata()) == [1.6, 1.6] and base.get_linestyle() == "--"
    held_out = lines["held-out accuracy (mean adapter, greedy)"]
    assert list(held_out.get_xdata()) == [0, 4] and list(held_out.get_ydata()) == [1.6, 12.0]
