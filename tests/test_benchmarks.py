"""The throughput benchmark's core runs on a tiny model and counts FLOPs as documented (no timing thresholds)."""
import importlib.util
import json
import math
from dataclasses import asdict
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_process

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"


def _load_benchmark():
    # By path: `benchmarks/` is a script folder, not an installed package, and pytest may not have the repo on sys.path.
    spec = importlib.util.spec_from_file_location("pixelformer_bench_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


def test_benchmark_row_on_tiny_model():
    bench = _load_benchmark()
    cfg = bench.BenchConfig("pit_tiny", img=8, patch=1, precision="fp32", batch=2, depth=1, embed_dim=32, num_heads=2)
    peaks = {"fp32": 1e11, "bf16-mixed": 1e12}  # stand-ins: the matmul peak is measured by main(), not here
    row = bench.benchmark_config(cfg, torch.device("cpu"), peaks, warmup=2, iters=2, memory=True)

    assert row["ours_img_s"] > 0 and row["timm_img_s"] > 0 and row["loader_img_s"] > 0
    assert row["on_device_loader_img_s"] > 0
    assert row["weights_shared"]  # timm's VisionTransformer took our state dict key for key
    assert row["ours_peak_mib"] > 0 and row["timm_peak_mib"] > 0
    assert (row["tokens"], row["batch"], row["depth"], row["embed_dim"]) == (64, 2, 1, 32)

    # Hand count, FLOPs = 2 x MACs, N = 64 pixels + 1 CLS = 65, D = 32, MLP hidden 128, 3 channels, 100 classes:
    embed = 2 * 64 * 3 * 32                      # 1x1 patch projection: 12,288
    linear = 2 * 65 * (32 * 96 + 32 * 32 + 2 * 32 * 128)  # qkv + proj + fc1 + fc2 = 24 N D^2: 1,597,440
    attention = 2 * 2 * 65 * 65 * 32             # Q K^T and attn @ V = 4 N^2 D: 540,800
    head = 2 * 32 * 100                          # 6,400
    forward = embed + linear + attention + head  # 2,156,928
    assert linear == 24 * 65 * 32 ** 2 and attention == 4 * 65 ** 2 * 32
    assert bench.forward_flops(8, 1, 3, 32, 1, 100) == forward == 2_156_928
    assert math.isclose(row["train_gflop_per_img"], 3 * forward / 1e9)
    assert math.isclose(row["ours_tflop_s"], row["ours_img_s"] * 3 * forward / 1e12)
    assert row["ratio_min"] <= row["ratio_q1"] <= row["ratio_paired"] <= row["ratio_q3"] <= row["ratio_max"]


def test_paired_ratios_pair_steps_taken_together():
    bench = _load_benchmark()
    # Load drifts 2x over the run; each round's two steps share it, so every paired ratio is timm/ours = 1.25.
    ours = [1.0, 1.5, 2.0, 1.2]
    timm = [1.25 * t for t in ours]
    summary = bench.paired_ratios(ours, timm)
    assert all(math.isclose(v, 1.25) for v in summary.values()), summary
    summary = bench.paired_ratios([1.0, 1.0, 1.0, 1.0, 1.0], [0.8, 0.9, 1.0, 1.1, 1.2])
    assert (summary["ratio_min"], summary["ratio_q1"], summary["ratio_paired"], summary["ratio_q3"],
            summary["ratio_max"]) == (0.8, 0.9, 1.0, 1.1, 1.2)


def _load_switches():
    spec = importlib.util.spec_from_file_location("pixelformer_bench_switches", SCRIPT.parent / "switches.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_switches_worker_applies_each_switch():
    sw = _load_switches()
    shape = sw.Shape("pit_mini", img=8, batch=4, in_chans=1, num_classes=10)
    spec = {"shape": asdict(shape), "device": "cpu", "warmup": 2, "iters": 2, "memory": True}
    results = {}
    for switches in (sw.Switches("baseline"), sw.Switches("ckpt", grad_checkpointing=True, adamw="for-loop"),
                     sw.Switches("bf16", precision="bf16-mixed", adamw="foreach")):
        results[switches.name] = sw.run_worker({**spec, "switches": asdict(switches)})
    for result in results.values():
        assert len(result["step_times"]) == 2 and result["first_step_s"] > 0 and result["peak_bytes"] > 0
    # Recomputing blocks in backward holds fewer activations; bf16 activations are half the bytes (not timed).
    assert results["ckpt"]["peak_bytes"] < results["baseline"]["peak_bytes"]
    assert results["bf16"]["peak_bytes"] < results["baseline"]["peak_bytes"]


@pytest.mark.slow
def test_switches_subprocess_reports_errors_and_rows():
    sw = _load_switches()
    shape = sw.Shape("pit_mini", img=8, batch=2, in_chans=1, num_classes=10)
    ok = sw.measure(shape, sw.Switches("baseline"), "cpu", warmup=2, iters=1, memory=False)
    assert "error" not in ok and len(ok["step_times"]) == 1
    bad = sw.measure(sw.Shape("no_such_model", 8, 2), sw.Switches("baseline"), "cpu", 2, 1, False)
    assert "no_such_model" in bad["error"]
    row = sw.summarise(shape, sw.Switches("baseline"), [ok, bad])
    assert math.isclose(row["img_s"], 2 / ok["step_times"][0]) and row["error"] == ""


@pytest.mark.slow
def test_gpu_mfu_helper_on_cpu(tmp_path):
    """benchmarks/gpu_mfu.py (gpu_check.sh's MFU part) runs on CPU at a tiny size and writes the documented rows."""
    import json
    
    out = tmp_path / "mfu.json"
    cmd = [sys.executable, str(SCRIPT.parent / "gpu_mfu.py"), "--device", "cpu", "--models", "pit_tiny",
           "--tokens", "16", "--steps", "1", "--warmup", "1", "--batch", "2", "--depth", "1", "--embed-dim", "32",
           "--heads", "2", "--matmul-size", "64", "--out", str(out)]
    proc = run_process(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["impl"] for r in rows] == ["pixelformer", "timm"]
    required = {"model", "tokens", "batch", "img_s", "tflop_s", "mfu", "mfu_analytic", "train_gflop_per_img",
                "train_gflop_per_img_counted", "train_gflop_per_img_analytic", "flops_source", "ratio_vs_timm", "error"}
    for row in rows:
        assert required <= row.keys(), required - row.keys()
        assert row["error"] is None and row["tokens"] == 16 and row["batch"] == 2 and row["img_s"] > 0
        assert math.isclose(row["tflop_s"], row["img_s"] * row["train_gflop_per_img"] / 1e3)
        assert row["mfu"] > 0 and math.isclose(row["mfu"], row["tflop_s"] / result["meta"]["peak_tflops"])
    # Analytic training FLOPs: 3 x forward, N = 16 + 1 tokens, D = 32, 1 block, 3 channels, 100 classes.
    n, d = 17, 32
    forward = 2 * 16 * 3 * d + 24 * n * d * d + 4 * n * n * d + 2 * d * 100
    assert math.isclose(rows[0]["train_gflop_per_img_analytic"], 3 * forward / 1e9)
    assert rows[0]["params"] == rows[1]["params"]  # the same shape on both sides
    assert "pixelformer:pit_tiny" in proc.stdout and "MFU" in proc.stdout  # the printed table


@pytest.mark.parametrize("name", ["gpu_check.sh", "gpu_race.sh"])
def test_gpu_scripts_parse_and_name_only_known_variants(name):
    script = SCRIPT.parent / name
    proc = run_process(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    spec = importlib.util.spec_from_file_location("pixelformer_bench_tta6", SCRIPT.parent / "time_to_accuracy.py")
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    import re
    for names in re.findall(r"--variants ([\w,]+)", script.read_text()):  # a renamed variant would fail on the GPU
        assert set(names.split(",")) <= set(tta.VARIANTS), names


def test_time_to_accuracy_clocks_each_phase_at_its_own_step_time():
    spec = importlib.util.spec_from_file_location("pixelformer_bench_tta", SCRIPT.parent / "time_to_accuracy.py")
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    steps = 100
    phases = tta.phases("drop50_lowres_1ep", steps)  # 14x14 with half the tokens, 28x28 with half, then all
    assert phases == [(40, 14, 0.5), (50, 28, 0.5), (10, 28, 0.0)]
    assert tta.phases("plain", steps) == [(100, 28, 0.0)]
    assert tta.phases("budget", steps) == [(98, 28, 0.75), (2, 28, 0.0)]  # recipe=budget: 3/4 dropped, then all
    table = {f"cpu/{tta.MODEL}/batch{tta.BATCH}/side{side}/drop{drop:g}": dict(step_s=s, train_flops_per_image=f)
             for side, drop, s, f in ((14, 0.5, 1.0, 10), (28, 0.5, 4.0, 30), (28, 0.0, 10.0, 100))}
    seconds, flops = tta.clock("drop50_lowres_1ep", steps, table)
    assert len(seconds) == steps + 1 and seconds[40] == 40 and seconds[90] == 40 + 200 and seconds[-1] == 340
    assert flops == tta.BATCH * (40 * 10 + 50 * 30 + 10 * 100)
    curve = [dict(acc1=a, calibrated_s=t) for a, t in ((50, 1), (84.9, 2), (85.0, 3), (90, 4))]
    assert tta.crossing(curve, 85.0)["calibrated_s"] == 3 and tta.crossing(curve, 95) is None


def _equal_time(monkeypatch, out: Path):
    spec = importlib.util.spec_from_file_location("pixelformer_bench_equal_time", SCRIPT.parent / "equal_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", out)
    return module


def _point(task, model, seed, value, steps, sha="aaaa"):
    metric = {"cls": "test/acc1", "dit": "test/fid"}[task]
    point = dict(task=task, model=model, seed=seed, budget_s=720.0, step_s_calibrated=720.0 / steps, steps=steps,
                 batch=32, images_seen=steps * 32, train_s=700.0, total_s=800.0,
                 metrics={metric: value, **({"test/loss": value / 100, "test/sample_acc": 12.0} if task == "dit" else {})},
                 machine=dict(cpu="Test CPU", threads=1, cores=2), calibrated_on=dict(cpu="Test CPU"), steps_of=None)
    if task == "dit":
        point["classifier"] = dict(sha256=sha, acc1=30.45)
    return point


def test_equal_time_report_reads_the_verdicts_off_the_points_and_names_the_fid_classifier(tmp_path, monkeypatch):
    bench = _equal_time(monkeypatch, tmp_path)
    for task in ("cls", "dit"):
        (tmp_path / task).mkdir()
    for seed, (glob, local) in enumerate(((25.0, 40.0), (27.0, 42.0))):
        for model, value, steps in (("pit_mini", glob, 100), ("pit_local_mini", local, 150)):
            (tmp_path / "cls" / f"{model}-s{seed}.json").write_text(json.dumps(_point("cls", model, seed, value, steps)))
    for model, fid, steps in (("pit_mini", 20.0, 90), ("pit_hourglass_mini", 25.0, 250)):
        (tmp_path / "dit" / f"{model}-s0.json").write_text(json.dumps(_point("dit", model, 0, fid, steps)))
    bench.report()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cls"]["pit_local_mini"]["mean"] == 41.0 and summary["cls"]["pit_mini"]["std"] > 0
    section = (tmp_path / "section.md").read_text()
    assert "`pit_local_mini` beats the global `pit_mini` (41.00 vs 26.00) with 1.5x its steps" in section
    assert "`pit_hourglass_mini` loses to the global `pit_mini` (25.00 vs 20.00)" in section  # FID: lower is better
    assert "top-1 30.45 %, sha256 aaaa" in section and "do not compare" not in section
    assert "it reached 30.45 % where the committed point reached 25.00 %" in section  # the cross-CPU scale
    assert "| pit_hourglass_mini | 0.2500 ± 0.0000 | 0.2500 | 12 |" in section  # the less noisy DiT measures
    assert "`pit_hourglass_mini` loses to the global `pit_mini` (0.2500 vs 0.2000)" in section

    # A DiT point on another classifier: the section says its FIDs do not compare.
    (tmp_path / "dit" / "pit_mini-s1.json").write_text(json.dumps(_point("dit", "pit_mini", 1, 21.0, 90, sha="bbbb")))
    bench.report()
    assert "used 2 different classifiers, so their FIDs do not compare" in (tmp_path / "section.md").read_text()


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_time_to_accuracy_continues_a_run_from_its_committed_state_on_a_new_machine(tmp_path, monkeypatch):
    # A point longer than a session: its state is kept (committed) under inflight/, the machine and its run
    # directory go, and the next start puts the state back and resumes to the same weights as one straight run.
    import shutil

    from conftest import on_step, tiny_cfg
    from pixelformer.checkpoint import read_checkpoint
    from pixelformer.engine import fit

    spec = importlib.util.spec_from_file_location("pixelformer_bench_tta2", SCRIPT.parent / "time_to_accuracy.py")
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    args = ("trainer.max_steps=12", "trainer.ckpt_every_steps=4", "trainer.eval_every_steps=4")
    straight = fit(tiny_cfg(tmp_path / "straight", *args))
    run, kept = tmp_path / "run", tmp_path / "inflight" / "plain-s0"
    assert not tta.persist(run, kept)  # nothing to keep before the first checkpoint

    def stop_at_6(trainer, step):
        if step == 6:
            raise _Stop()
    on_step(monkeypatch, stop_at_6)
    with pytest.raises(_Stop):
        fit(tiny_cfg(run, *args))
    monkeypatch.undo()
    assert tta.persist(run, kept) and read_checkpoint(kept / "checkpoints" / "last.ckpt")["progress"]["step"] == 4
    shutil.rmtree(run)  # a new machine: runs/ is not kept
    assert tta.restore(kept, run) and not tta.restore(kept, run)  # never over a run directory that has a checkpoint
    resumed = fit(tiny_cfg(run, *args, "resume=auto"))
    a = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")["model"]
    b = read_checkpoint(run / "checkpoints" / "last.ckpt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed == straight


def test_time_to_accuracy_report_times_each_recipe_to_the_target_and_their_ratio(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("pixelformer_bench_tta3", SCRIPT.parent / "time_to_accuracy.py")
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    monkeypatch.setattr(tta, "OUT", tmp_path)
    (tmp_path / "points").mkdir()
    (tmp_path / "calibration.json").write_text(json.dumps(
        {"cpu/pit_mini/batch64/side28/drop0": dict(step_s=4.0, train_flops_per_image=1, machine=dict(cpu="Test"))}))
    for variant, minutes, final in (("plain", (60, 90), 86.0), ("budget", (9, 12), 85.5)):
        for seed, m in enumerate(minutes):
            curve = [dict(step=1, calibrated_s=m * 30, measured_s=0, acc1=80.0),
                     dict(step=2, calibrated_s=m * 60, measured_s=0, acc1=85.2)]
            (tmp_path / "points" / f"{variant}-s{seed}.json").write_text(json.dumps(dict(
                variant=variant, seed=seed, recipe={}, steps=2, batch=64, train_images=60000, epochs=1, curve=curve,
                train_s_calibrated=m * 60, train_flops=1e15, final_acc1=final, batch_size=64)))
    summary = tta.report(85.0)
    # each crossing interpolated between the evaluations around it (80.0 % at m/2 minutes, 85.2 % at m)
    at = [m * 30 * (1 + 5 / 5.2) for m in (9, 12)]
    assert summary["plain"]["mean_seconds_to_target"] == pytest.approx(75 * 30 * (1 + 5 / 5.2))
    assert summary["budget"]["seconds_to_target"] == pytest.approx(at)
    assert summary["ratio"] == pytest.approx(10.5 / 75)
    section = (tmp_path / "section.md").read_text()
    assert ("| budget | every token, every step | `pit_mini` | 1 | 2 | 8.8, 11.8 | 10.3 | 10.5 | 85.50 | 1.00 |"
            in section)
    assert "0.14 (target <= 0.2)" in section
    assert summary["plain_acc1_at_1h"] == [85.2, 80.0]  # the last evaluation within the plain clock's first hour
    assert "after one hour of its clock: 85.2, 80.0 % (seeds 0, 1)" in section
    assert summary["target_acc1"] == 85.0  # their mean, 82.6, is under the floor

    # plain reaching more than the floor in its first hour raises the target to that (the mean over its seeds)
    for seed, acc in ((0, 87.0), (1, 88.0)):
        point = json.loads((tmp_path / "points" / f"plain-s{seed}.json").read_text())
        point["curve"] = [dict(step=1, calibrated_s=3000, measured_s=0, acc1=acc),
                          dict(step=2, calibrated_s=4000, measured_s=0, acc1=89.0)]
        (tmp_path / "points" / f"plain-s{seed}.json").write_text(json.dumps(point))
    summary = tta.report(85.0)
    assert summary["target_acc1"] == 87.5 and summary["target_floor"] == 85.0
    assert summary["plain"]["seconds_to_target"] == [3250, 3000]
    assert summary["budget"]["seconds_to_target"] == [None] * 2
    assert "the target is the larger of their mean (to 0.1) and 85 %" in (tmp_path / "section.md").read_text()
    assert tta.acc_at([dict(calibrated_s=3000, acc1=88.0)], 3600) is None  # a run shorter than the hour says nothing
    assert tta.describe(dict(token_drop=0.75, token_drop_schedule="constant", low_res_scale=None, low_res_frac=0.5,
                             full_frac=0.02)) == "75% dropped; every token in the last 2%"
    assert tta.describe(dict(token_drop=0.0, low_res_scale=0.58, low_res_frac=0.4, full_frac=0.05)) == \
        "16x16 images for 40% of the steps; every token in the last 5%"  # the side the runs train at, not the scale


def test_time_to_accuracy_times_new_phases_beside_the_committed_reference_and_reruns_a_redefined_variant(
        tmp_path, monkeypatch):
    # A phase added in a later session (another CPU) is timed in the same process as the plain recipe's committed
    # step and scaled onto the first machine; a committed point whose variant was redefined is not skipped.
    import argparse

    spec = importlib.util.spec_from_file_location("pixelformer_bench_tta4", SCRIPT.parent / "time_to_accuracy.py")
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    monkeypatch.setattr(tta, "OUT", tmp_path)
    reference = "cpu/pit_mini/batch64/side28/drop0"
    (tmp_path / "calibration.json").write_text(json.dumps({reference: dict(step_s=4.0, train_flops_per_image=1)}))
    here = {("pit_mini", 28, 0.0): 2.0, ("pit_mini", 28, 0.75): 0.5, ("pit_hourglass_mini", 16, 0.0): 0.25}
    monkeypatch.setattr(tta, "step_seconds", lambda model, side, drop: here[(model, side, drop)])
    monkeypatch.setattr(tta, "train_flops", lambda model, side, drop: 7)
    table = tta.calibration({("pit_mini", 28, 0.0), ("pit_mini", 28, 0.75), ("pit_hourglass_mini", 16, 0.0)})
    assert table[reference]["step_s"] == 4.0  # the committed reference is kept, not re-timed
    assert table["cpu/pit_mini/batch64/side28/drop0.75"]["step_s"] == 1.0  # 0.5 s here x (4.0 / 2.0)
    assert table["cpu/pit_hourglass_mini/batch64/side16/drop0"]["scale"] == 2.0
    assert json.loads((tmp_path / "calibration.json").read_text()) == table

    monkeypatch.setitem(tta.VARIANTS, "trial", (["model=pit_hourglass_mini", "recipe=plain"], 1))
    assert tta.model_of("trial") == "pit_hourglass_mini" and tta.model_of("plain") == "pit_mini"
    assert tta.arguments("trial").count("model=pit_hourglass_mini") == 1
    args = argparse.Namespace(epochs={}, eval_every=100, eval_images=1000)
    old = dict(model="pit_hourglass_mini", recipe=tta.recipe_of("trial"), epochs=1, eval_every=100, eval_images=1000)
    assert tta.same_point(old, "trial", args)
    assert not tta.same_point({**old, "args": ["optim.lr=2e-3"]}, "trial", args)  # another learning rate
    assert not tta.same_point({**old, "batch": 2 * tta.BATCH}, "trial", args)  # another batch
    monkeypatch.setitem(tta.VARIANTS, "trial", (["model=pit_hourglass_mini", "recipe=budget",
                                                 "recipe.token_drop=0"], 1))
    assert not tta.same_point(old, "trial", args)


def test_time_to_accuracy_keeps_only_the_running_runs_files_and_never_an_earlier_step(tmp_path, monkeypatch):
    # A point restarted with another schedule: its kept state must not mix the new checkpoint with the old records;
    # and a run that started over must neither overwrite a later kept step nor hide it from the restore.
    spec = importlib.util.spec_from_file_location("pixelformer_bench_tta5", SCRIPT.parent / "time_to_accuracy.py")
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    ckpt = "checkpoints/last.ckpt"
    monkeypatch.setattr(tta, "_ckpt_step", lambda d: int((d / ckpt).read_text().split()[-1])  # "<who> <step>"
                        if (d / ckpt).is_file() else None)
    run, kept = tmp_path / "run", tmp_path / "kept"

    def write(folder, names, step):
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(f"{folder.name} {step}")
    write(kept, tta.RESUMABLE, 3)
    write(run, (ckpt, "config.yaml"), 5)
    assert tta.persist(run, kept)
    assert (kept / ckpt).read_text() == "run 5"
    assert not (kept / "metrics.jsonl").exists()  # the old run's records went with it

    write(kept, tta.RESUMABLE, 9)  # committed further along than this machine's run directory
    assert not tta.persist(run, kept) and (kept / ckpt).read_text() == "kept 9"
    assert tta.restore(kept, run) and (run / ckpt).read_text() == "kept 9"
    assert [p.name.split("-")[0] for p in tmp_path.glob("run.older-*")] == ["run.older"]  # the earlier run, set aside
    assert not tta.restore(kept, run)  # as far along: nothing to do


def test_time_to_accuracy_sets_aside_a_run_directory_of_another_schedule_or_evaluation(tmp_path):
    # The trainer would resume (or return) a finished run of other settings under the new point's name.
    from omegaconf import OmegaConf
    from pixelformer.config import compose

    spec = importlib.util.spec_from_file_location("pixelformer_bench_tta6", SCRIPT.parent / "time_to_accuracy.py")
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    run = tmp_path / "plain-s0"
    args = [*tta.arguments("plain"), f"run.dir={run}", "trainer.max_steps=40", "trainer.eval_every_steps=10",
            "data.limit_test=100"]
    run.mkdir()
    OmegaConf.save(compose([*args, "data.root=/nonexistent"]), run / "config.yaml")
    tta.set_aside_if_redefined(run, args)
    assert run.is_dir() and not list(tmp_path.glob("*.stale-*"))  # the same run: resumed
    tta.set_aside_if_redefined(run, [*args, "trainer.eval_every_steps=20"])
    assert not run.exists() and len(list(tmp_path.glob("plain-s0.stale-*"))) == 1
