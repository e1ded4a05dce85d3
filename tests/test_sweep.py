"""Experiment grids (tools/sweep.py, pixelformer/sweep.py) and the report built from their summaries."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_tool, run_process, spawn
from pixelformer.cli import report as report_cli
from pixelformer.cli import sweep as sweep_cli
from pixelformer.config import compose
from pixelformer.errors import UserError
from pixelformer.sweep import (SCALES, find_same_training, list_experiments, load_experiment, module_fingerprint,
                               plan, same_training, summary_is_current)

TINY = ["task=cls", "data=digits", "model=vit_mini", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
        "data.limit_train=96", "data.limit_test=40", "trainer.accelerator=cpu", "trainer.precision=32-true"]


def write_experiment(path: Path, max_steps: int = 4, extra: str = "", seeds: str = "[0, 1]") -> Path:
    path.write_text(f"""
metric: test/acc1
x: tokens
scales:
  small:
    args: [{', '.join(TINY)}, trainer.max_steps={max_steps}, trainer.eval_every_steps=2, trainer.ckpt_every_steps=1]
    seeds: {seeds}
    grid: {{model.patch_size: [4, 2]}}
{extra}""")
    return path


@pytest.mark.slow
def test_every_committed_experiment_plans_and_composes(tmp_path):
    """Each point of every experiment and scale composes into a valid config: a typo in a file fails here."""
    assert set(list_experiments()) >= {"patch_size", "fixed_tokens", "pos_embed", "mae_vs_scratch", "dit_tokens"}
    for name in list_experiments():
        exp = load_experiment(name)
        # the paper's five findings run at both CPU scales; the project's own experiments at least at the small one
        findings = ("patch_size", "fixed_tokens", "pos_embed", "mae_vs_scratch", "dit_tokens")
        assert exp.paper and set(exp.scales) <= set(SCALES) and \
            ({"small", "medium"} if name in findings else {"small"}) <= set(exp.scales)
        for scale in exp.scales:
            shared, points = plan(exp, scale, tmp_path / "runs", tmp_path / "out")
            assert points and len({p.name for p in points}) == len(points)
            for point in shared + points:
                for stage in point.stages:
                    cfg = compose([a for a in stage.args if a != "resume=auto"])
                    assert cfg.run.dir == stage.run_dir and "{" not in " ".join(stage.args).replace("${", "")
            if scale != "paper" and name in findings:
                assert len({p.seed for p in points}) >= (1 if name == "dit_tokens" else 3)


def test_stages_refer_to_earlier_stages_and_shared_runs(tmp_path):
    path = write_experiment(tmp_path / "e.yaml", extra="""
    arms:
      two:
        pre: [task=mae]
        ft: ["init_from={pre}/checkpoints/last.ckpt", "task.label_smoothing=0.1"]
    shared:
      judge: [task=cls, data=digits]
""")
    shared, points = plan(load_experiment(str(path)), "small", tmp_path / "runs", tmp_path / "out")
    assert [p.name for p in shared] == ["shared-judge"] and shared[0].stages[0].args[:2] == ["task=cls", "data=digits"]
    assert [p.name for p in points] == ["two_patch_size4-s0", "two_patch_size4-s1", "two_patch_size2-s0",
                                        "two_patch_size2-s1"]
    pre, ft = points[0].stages
    assert f"init_from={pre.run_dir}/checkpoints/last.ckpt" in ft.args and "run.seed=0" in ft.args
    assert pre.run_dir == str(tmp_path / "runs" / "e" / "small" / "two_patch_size4-s0" / "pre")
    bad = write_experiment(tmp_path / "bad.yaml", extra="""
    arms:
      a: ["init_from={nothing}/x.ckpt"]
""")
    with pytest.raises(UserError, match=r"\{nothing\} names no earlier stage or shared run"):
        plan(load_experiment(str(bad)), "small", tmp_path, tmp_path)


@pytest.mark.parametrize("text, message", [
    ("metric: test/acc1\nscales:\n  huge: {}\n", "unknown scale 'huge'"),
    ("metric: test/acc1\nscales:\n  small: {grids: {}}\n", "unknown key\\(s\\) grids"),
    ("scales: {}\n", "needs 'metric' and 'scales'"),
])
def test_a_wrong_experiment_file_is_named(tmp_path, text, message):
    (tmp_path / "x.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        load_experiment(str(tmp_path / "x.yaml"))


@pytest.mark.slow
def test_unknown_names_are_refused_in_one_line():
    # One as a user sees it (exit status 2, no traceback); the others in-process: the same main(), no start-up.
    result = run_tool("sweep", "experiment=patch_sise", "scale=small")
    assert result.returncode == 2 and "Did you mean: patch_size" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(UserError, match="^launcher=cluster: choose one of local, slurm, debug$"):
        sweep_cli.main(["experiment=patch_size", "scale=paper", "launcher=cluster"])
    with pytest.raises(UserError, match="^scale=tiny: choose one of small, medium, large, paper$"):
        sweep_cli.main(["experiment=patch_size", "scale=tiny"])


def _sweep(exp: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "sweep.py"), f"experiment={exp}", "scale=small",
            f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}", "logger=disabled", *extra]


@pytest.mark.slow
def test_a_killed_sweep_resumes_its_interrupted_point_and_skips_finished_ones(tmp_path, capsys, monkeypatch):
    # one seed: the first point finishes, the second is killed mid-run
    exp = write_experiment(tmp_path / "grid.yaml", max_steps=24, seeds="[0]")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # The sweep and its point processes in one process group of their own, killed together with SIGKILL: nothing
    # gets to save or clean up.
    proc = spawn(_sweep(exp, tmp_path), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = tmp_path / "out" / "grid" / "small"
    second = tmp_path / "runs" / "grid" / "small" / "patch_size2-s0" / "train" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not (second.exists() and (out / "patch_size4-s0.json").exists()) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first_summary = (out / "patch_size4-s0.json").read_text()
    assert not (out / "patch_size2-s0.json").exists()

    result = run_process(_sweep(exp, tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "patch_size4-s0: finished, skipped" in result.stdout
    assert (out / "patch_size4-s0.json").read_text() == first_summary  # not run again
    log = "".join(p.read_text() for p in (tmp_path / "runs" / "grid" / "small" / ".submitit").rglob("*_log.out"))
    assert "resumed from" in log and "patch_size2-s0" in log  # the killed point continued from its checkpoint
    summaries = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(summaries) == {"patch_size4-s0", "patch_size2-s0"}
    for name, summary in summaries.items():
        assert summary["stages"]["train"]["steps"] == 24 and summary["tokens"] == (4 if "size4" in name else 16)
        assert summary["params"] > 0 and summary["total"]["train_flops"] > 0
        assert summary["values"] == {"model.patch_size": 4 if "size4" in name else 2}
    # Pixel tokens cost more per image than patches of the same model.
    assert summaries["patch_size2-s0"]["stages"]["train"]["flops_per_image"] > \
        summaries["patch_size4-s0"]["stages"]["train"]["flops_per_image"]

    # Started again with every point done: nothing runs (in-process: the same main() as the program, no start-up;
    # the PYTHONPATH and SIGTERM handler it sets for its jobs are put back after the test).
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    assert sweep_cli.main(_sweep(exp, tmp_path)[2:]) in (0, None)
    again = capsys.readouterr().out
    assert again.count("finished, skipped") == 2 and "started" not in again

    # The report needs the summaries only: the run directories can go.
    shutil.rmtree(tmp_path / "runs")
    assert report_cli.main([f"out={tmp_path / 'out'}"]) in (0, None)
    readme = (tmp_path / "out" / "README.md").read_text()
    accuracy = summaries["patch_size2-s0"]["metrics"]["test/acc1"]
    row = next(line for line in readme.splitlines() if line.startswith("| patch_size2 | 16 |"))
    assert f"{accuracy:.2f}" in row
    assert all((out / name).stat().st_size > 1000 for name in ("metric.png", "cost.png", "curves.png"))


@pytest.mark.slow
def test_the_committed_report_is_rebuilt_from_the_committed_summaries(tmp_path):
    """docs/results/README.md is what tools/report.py writes from the summaries beside it, nothing else."""
    committed = REPO / "docs" / "results"
    if not (committed / "README.md").exists():
        pytest.skip("no committed results yet")
    copy = tmp_path / "results"
    shutil.copytree(committed, copy, ignore=shutil.ignore_patterns("README.md"))
    # The committed plots are kept: one section's are redrawn (all of them would cost the suite ~15 s), the README
    # is written in full either way.
    (copy / "patch_size" / "small" / "metric.png").unlink()
    result = run_tool("report", f"out={copy}", "experiment=patch_size", "scale=small")
    assert result.returncode == 0, result.stderr
    assert (copy / "README.md").read_text() == (committed / "README.md").read_text()
    assert (copy / "patch_size" / "small" / "metric.png").stat().st_size > 1000


def test_a_changed_experiment_reruns_only_the_changed_points(tmp_path):
    exp = write_experiment(tmp_path / "e.yaml")
    shared, points = plan(load_experiment(str(exp)), "small", tmp_path / "runs", tmp_path / "out")
    Path(points[0].summary_path).parent.mkdir(parents=True)
    Path(points[0].summary_path).write_text(json.dumps({"stages": {"train": {"args": points[0].stages[0].args}}}))
    assert summary_is_current(points[0]) and not summary_is_current(points[1])
    exp.write_text(exp.read_text().replace("trainer.max_steps=4", "trainer.max_steps=5"))
    _, changed = plan(load_experiment(str(exp)), "small", tmp_path / "runs", tmp_path / "out")
    assert not summary_is_current(changed[0])


def test_the_slurm_launcher_builds_a_job_array_executor(tmp_path, monkeypatch):
    """No cluster here: the SLURM executor is built and its parameters checked by submitit, nothing is submitted."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_tool", REPO / "tools" / "sweep.py")
    tool = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "sweep_tool", tool)  # dataclasses and omegaconf look their module up
    spec.loader.exec_module(tool)
    with pytest.raises(UserError, match="launcher=slurm needs SLURM's commands"):
        tool.make_executor(tool.parse(["experiment=patch_size", "launcher=slurm"]), tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    for command in ("srun", "sbatch"):
        (fake / command).write_text("#!/bin/sh\nexit 1\n")
        (fake / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    cfg = tool.parse(["experiment=patch_size", "scale=paper", "launcher=slurm", "launcher.partition=gpu",
                      "launcher.gpus_per_node=1", "launcher.parallel=4", "launcher.mem_gb=64"])
    executor = tool.make_executor(cfg, tmp_path)
    params = executor._executor.parameters
    assert params["partition"] == "gpu" and params["gpus_per_node"] == 1 and params["array_parallelism"] == 4
    assert params["mem"] == "64GB" and params["time"] == 24 * 60
    assert tool.make_executor(tool.parse(["experiment=patch_size"]), tmp_path).__class__.__name__ == "LocalExecutor"


def test_a_points_pictures_are_copied_even_before_its_output_folder_exists(tmp_path):
    # A shared classifier is the first point to finish, and cls runs draw confusion_matrix.png: its pictures are
    # copied before any summary has created the output folder.
    from pixelformer.sweep import _copy_pictures

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "confusion_matrix.png").write_bytes(b"png")
    summary = tmp_path / "out" / "exp" / "small" / "shared-classifier.json"
    assert _copy_pictures(run_dir, summary) == ["shared-classifier-confusion_matrix.png"]
    assert (summary.parent / "shared-classifier-confusion_matrix.png").read_bytes() == b"png"


# ------------------------------------------------------------------------------- hostile inputs (docs/bad-input.md)
def test_a_killed_attempts_time_is_added_to_the_wall_time(tmp_path):
    # Killed without a word (SIGKILL), an attempt never added its time: only the last attempt's was reported.
    from pixelformer.sweep import _add_wall, _start_attempt

    run_dir = tmp_path / "run"
    _start_attempt(run_dir)  # attempt 1 ...
    began = json.loads((run_dir / "wall_time.json").read_text())["attempt_started"]
    (run_dir / "metrics.jsonl").write_text("{}\n")
    os.utime(run_dir / "metrics.jsonl", (began + 30, began + 30))  # ... logged 30 s in, then was killed
    _start_attempt(run_dir)  # attempt 2 ran 5 s and ended
    _add_wall(run_dir, 5.0)
    assert json.loads((run_dir / "wall_time.json").read_text()) == {"seconds": pytest.approx(35.0)}


def test_a_config_yaml_with_an_unsafe_tag_is_named(tmp_path):
    from conftest import tiny_cfg
    from pixelformer.engine import fit
    from pixelformer.sweep import summarise_run

    run_dir = tmp_path / "run"
    fit(tiny_cfg(run_dir, "trainer.max_steps=2"))
    (run_dir / "config.yaml").write_text("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(UserError, match=rf"cannot read {run_dir / 'config.yaml'} \(could not determine a constructor "
                                        rf"for the tag .*: the run writes plain YAML there; delete the file and run "
                                        rf"the sweep again \(the run's config is then read from its checkpoint\)"):
        summarise_run(run_dir, [])
    (run_dir / "config.yaml").unlink()  # what the message says: the run's config comes from its checkpoint
    summary = summarise_run(run_dir, [])
    assert summary["task"] == "cls" and summary["steps"] == 2


def test_summary_strings_are_escaped_in_the_report(tmp_path):
    from pixelformer.cli.report import build

    folder = tmp_path / "grid" / "small"
    folder.mkdir(parents=True)
    hostile = "Title <img src=x onerror=alert(1)>\n## [click](http://evil) *bold* | cell"
    summary = {"experiment": "grid", "point": "a-s0", "seed": 0, "arm": None, "values": {},
               "metrics": {"test/acc1": 50.0},
               "tokens": 4, "params": 10, "command": "python tools/sweep.py `x`", "machine": {"device": "<b>cpu</b>"},
               "about": {"title": hostile, "paper": "<script>x</script>", "metric": "test/acc1", "mode": "max",
                         "x": "tokens"},
               "total": {"wall_s": 1.0, "train_flops": 1.0, "train_images": 1},
               "stages": {"train": {"metrics": {"test/acc1": 50.0}, "images_per_sec": 1.0, "train_flops": 1.0,
                                    "curve": [], "train_loss": [], "model": "m", "steps": 1, "wall_s": 1.0}},
               "pictures": ["x) ![y](z.png"]}
    (folder / "a-s0.json").write_text(json.dumps(summary))
    for name in ("metric.png", "cost.png", "curves.png"):
        (folder / name).write_bytes(b"png")
    readme = build(tmp_path, ["grid"], ["small"], replot=set()).read_text()
    assert "<img" not in readme and "<script>" not in readme and "<b>" not in readme
    assert "## Title &lt;img src=x onerror=alert(1)> ## \\[click\\](http://evil) \\*bold\\* \\| cell (small)" in readme
    assert "\n## [" not in readme and "](grid/small/x%29%20%21%5By%5D%28z.png)" in readme
    assert "Command: `` python tools/sweep.py `x` ``" in readme
    # a benchmark's own section (written by its --report) follows the experiments and gets an index entry
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "section.md").write_text("## Cost of a token\n\n| a | b |\n")
    readme = build(tmp_path, ["grid"], ["small"], replot=set()).read_text()
    assert readme.rstrip().endswith("## Cost of a token\n\n| a | b |") and "- [Cost of a token](#cost-of-a-token)" in readme
    (tmp_path / "bench" / "section.md").write_text("no heading")
    with pytest.raises(UserError, match="must start with a '## ' heading"):
        build(tmp_path, ["grid"], ["small"], replot=set())


def test_each_scale_of_the_report_names_its_data_size_tokens_and_epochs():
    from pixelformer.cli.report import scale_setting

    def point(side, tokens, *extra):
        args = ["task=cls", "data=fashion_mnist", f"data.img_size={side}", "data.train_subset=2000", *extra]
        return {"tokens": tokens, "stages": {"train": {"args": args, "epochs": 10}}}
    text = scale_setting([point(14, 196), point(7, 49, "data.limit_test=500")])
    assert text == ("Fashion-MNIST at 7x7/14x14 (49, 196 tokens), 2,000 training images (a stratified subset), "
                    "train 10 epoch(s); evaluated on the full test split (10,000 images)")
    text = scale_setting([{"tokens": 64, "stages": {"train": {"args": ["data=digits"], "epochs": 25}}}])
    assert text.startswith("scikit-learn digits at 8x8 (64 tokens), all 1,437 training images, train 25 epoch(s)")
    text = scale_setting([point(28, 784, "recipe=budget"), point(28, 196, "recipe=budget")])
    assert "train 10 epoch(s) of recipe=budget; evaluated" in text
    assert "recipe" not in scale_setting([point(28, 784, "recipe=budget"), point(28, 784)])  # one arm's recipe only


@pytest.mark.slow
def test_commit_true_commits_each_finished_points_summary_at_once(tmp_path, capsys, monkeypatch):
    # A sweep longer than a session keeps only what is committed: each finished point is its own commit.
    repo = tmp_path / "repo"
    repo.mkdir()
    for args in (["init", "-q"], ["config", "user.email", "t@example.org"], ["config", "user.name", "t"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    exp = write_experiment(tmp_path / "grid.yaml", seeds="[0]")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    assert sweep_cli.main([f"experiment={exp}", "scale=small", f"runs={tmp_path / 'runs'}", f"out={repo / 'results'}",
                           "logger=disabled", "launcher=debug", "commit=true"]) in (0, None)
    log = subprocess.run(["git", "log", "--format=%s", "--name-only"], cwd=repo, capture_output=True, text=True,
                         check=True).stdout
    assert log.count("results: grid/small ") == 2  # one commit per point
    assert "results/grid/small/patch_size4-s0.json" in log and "results/grid/small/patch_size2-s0.json" in log
    # ... with the report rebuilt: each commit is a consistent state, the first one lists one point, the last both.
    assert log.count("results/README.md") == 2 and log.count("results/grid/small/metric.png") == 2
    first = subprocess.run(["git", "show", "HEAD~1:results/README.md"], cwd=repo, capture_output=True, text=True,
                           check=True).stdout
    last = (repo / "results" / "README.md").read_text()
    assert ("patch_size2" in first) != ("patch_size4" in first) and "patch_size2" in last and "patch_size4" in last
    assert subprocess.run(["git", "status", "--porcelain", "results"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout == ""


def test_the_same_training_is_recognised_by_its_settings_and_its_network():
    """vit_mini at patch 1 is pit_mini (same settings, same built network, same initial weights); any setting that
    changes the training, or a network that differs, is not the same training; where and how a run is logged is."""
    pit = ["task=cls", "data=digits", "model=pit_mini", "trainer.max_steps=4", "run.seed=0"]
    vit1 = ["task=cls", "data=digits", "model=vit_mini", "model.patch_size=1", "trainer.max_steps=4", "run.seed=0",
            "run.dir=elsewhere", "logger=disabled", "logger.wandb.tags=[a,b]", "resume=auto"]
    assert same_training(pit, vit1)
    assert same_training(pit, [*pit, "model.pos_embed=sincos"])  # pit_mini's own default, now said
    assert not same_training(pit, [*pit, "model.pos_embed=learned"])  # another network
    assert not same_training(pit, ["task=cls", "data=digits", "model=vit_mini", "trainer.max_steps=4", "run.seed=0"])
    assert not same_training(pit, [*pit, "optim.lr=0.002"]) and not same_training(pit, [*pit[:-1], "run.seed=1"])
    assert not same_training(pit, [*pit, "data.img_size=16"])
    assert not same_training(pit, [*pit, "model.nonsense=1"])  # does not compose: never reused
    assert module_fingerprint(tuple(pit)) is not None and module_fingerprint(tuple(pit)) == module_fingerprint(
        tuple(vit1[:5]))
    assert module_fingerprint((*pit, "model.pos_embed=none")) != module_fingerprint(tuple(pit))
    assert module_fingerprint(("task=cls", "data=imagefolder", "data.img_size=8")) is None  # classes unknown here


def test_a_point_already_trained_by_another_experiment_reuses_its_summary(tmp_path, capsys):
    """The committed digits sweeps trained pit_mini twice: pos_embed's sin-cos PiT and patch_size's patch-1 ViT. A
    sweep now takes the other experiment's summary for such a point (named in ``reused_from``), trains nothing, and
    the report does not count its cost twice; with reuse=false the point is planned for training."""
    committed = REPO / "docs" / "results" / "pos_embed" / "small"
    out = tmp_path / "out"
    (out / "pos_embed" / "small").mkdir(parents=True)
    for name in ("pit_pos_embedsincos-s0.json", "pit_pos_embedlearned-s0.json"):
        shutil.copy(committed / name, out / "pos_embed" / "small" / name)
    exp = tmp_path / "patch_size.yaml"
    exp.write_text("metric: test/acc1\nscales:\n  small:\n    args: [task=cls, data=digits, model=vit_mini, "
                   "trainer.max_epochs=25, trainer.eval_every_epochs=5]\n    seeds: [0]\n"
                   "    grid: {model.patch_size: [1]}\n")
    argv = [f"experiment={exp}", "scale=small", f"runs={tmp_path / 'runs'}", f"out={out}", "launcher=debug"]
    sweep_cli.main([*argv, "reuse=false", "dry_run=true"])
    assert "] todo patch_size1-s0/train" in capsys.readouterr().out
    assert sweep_cli.main(argv) in (0, None)
    printed = capsys.readouterr().out
    assert "patch_size1-s0: the same training as" in printed and "pit_pos_embedsincos-s0.json" in printed
    assert not (tmp_path / "runs" / "patch_size").exists()  # nothing trained
    reused = json.loads((out / "patch_size" / "small" / "patch_size1-s0.json").read_text())
    original = json.loads((committed / "pit_pos_embedsincos-s0.json").read_text())
    assert reused["reused_from"] == "pos_embed/small/pit_pos_embedsincos-s0"
    assert reused["metrics"] == original["metrics"] and reused["values"] == {"model.patch_size": 1}
    assert reused["experiment"] == "patch_size" and reused["point"] == "patch_size1-s0"
    _, planned = plan(load_experiment(str(exp)), "small", tmp_path / "runs", out)
    assert summary_is_current(planned[0])  # a second sweep skips it as finished
    assert report_cli.main([f"out={out}"]) in (0, None)
    section = (out / "README.md").read_text().split("## patch_size (small)")[1].split("\n## ")[0]
    assert "1 point(s) are the same training" in section and "0.0 min of run time" in section
    # the original trained again (here: its metrics changed): the copy is no longer done, and is taken again
    source = out / "pos_embed" / "small" / "pit_pos_embedsincos-s0.json"
    source.write_text(json.dumps({**original, "metrics": {**original["metrics"], "test/acc1": 1.0}}))
    assert not summary_is_current(planned[0]) and find_same_training(planned[0], out) == source
    shared = dataclasses.replace(planned[0], seed=None, name="shared-x")
    assert find_same_training(shared, out) is None  # a shared run's directory is read by its points: never reused
