"""Accuracy at equal wall-clock: the global, local and hourglass pixel transformers trained for the same time.

Fashion-MNIST at 28x28 (784 pixel tokens, the full 60,000-image training set), one CPU thread per run, one run at a
time. For each family the training step is timed once (in this process, the run's batch size; kept in the committed
``calibration.json``) and every run of it gets as many steps as fit in ``--budget-s`` seconds of training on that
machine; its cosine schedule then ends on time. ``cls``: test top-1
on the first ``--limit-test`` test images at the end. ``dit``: FID on the features of a ``cls`` classifier (the
pit_mini seed-0 run of this experiment) and the accuracy of that classifier on the samples, with DPM-Solver++.

Run from the repository root (``apt-get install dataset-fashion-mnist`` first)::

    nohup nice -n 5 python benchmarks/equal_time.py --task cls --seeds 0,1,2 > equal_time_cls.log 2>&1 &   # ~2 h
    python benchmarks/equal_time.py --task dit --seeds 0
    python benchmarks/equal_time.py --task cls --equal-steps   # the cheap families at the global one's step count
    python benchmarks/equal_time.py --report            # table and plot from the committed points

Each finished point writes ``docs/results/equal_time/<task>/<model>-s<seed>.json`` at once, and a point whose file
exists is skipped, so a stopped sweep continues where it stopped (commit the files as they appear). ``--report``
writes ``summary.json`` and ``equal_time.png`` there from whatever points exist.

``--equal-steps`` is the control that says what the cheap families give up: each trains for the global pit_mini's
step count (same images, same schedule length) instead of the same time, into ``<task>/equal_steps/``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "equal_time"
FAMILIES = ("pit_mini", "pit_hourglass_mini", "pit_local_mini")
COMMON = ["data=fashion_mnist", "logger=disabled", "trainer.accelerator=cpu", "trainer.precision=32-true",
          "trainer.progress_bar=false", "trainer.eval_every_epochs=null", "trainer.log_every_steps=10"]
TASK_ARGS = {
    "cls": ["task=cls", "data.batch_size=32", "optim.lr=1e-3", "optim.warmup_steps=30"],
    "dit": ["task=dit", "data.batch_size=32", "optim.lr=3e-4", "task.ema_decay=0.999", "task.num_eval_samples=100",
            "task.sample_steps=20", "task.untrained_baseline=false", "task.samples_per_class=4"],
}


def step_seconds(task: str, model: str, batch: int, steps: int = 6) -> float:
    """Median seconds of one training step (forward, loss, backward, AdamW) of ``task`` with ``model`` at 28x28."""
    import torch

    sys.path.insert(0, str(ROOT))
    from pixelformer.config import compose
    from pixelformer.data import DataInfo
    from pixelformer.task import get_task

    torch.set_num_threads(1)
    cfg = compose([f"task={task}", f"model={model}", "data=fashion_mnist", "logger=disabled"])
    data = DataInfo("fashion_mnist", 10, 1, 28, (0.286,), (0.353,))
    torch.manual_seed(0)
    module = get_task(task).build_module(cfg, data).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    images, labels = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        loss = module((images, labels))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrated_steps(task: str, model: str, batch: int, budget_s: float) -> tuple[float, int, dict]:
    """(seconds per step, steps that fit ``budget_s``, the machine timed on) for ``model``, from the committed
    ``calibration.json`` when it holds this task, model and budget, else timed here and written there.

    Timed once and kept: every seed, on whatever machine a later session runs on, trains the same number of steps,
    so "equal wall-clock" always means equal time on the machine the calibration names (CPUs differ by 3x between
    sessions here)."""
    path = OUT / "calibration.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    key = f"{task}/{model}/batch{batch}/budget{budget_s:g}"
    if key not in table:
        per_step = step_seconds(task, model, batch)
        table[key] = dict(step_s=per_step, steps=max(10, int(budget_s / per_step)), machine=machine())
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    entry = table[key]
    return entry["step_s"], entry["steps"], entry["machine"]


def run_point(task: str, model: str, seed: int, budget_s: float, limit_test: int, classifier: Path | None,
              steps_of: str | None = None) -> dict:
    """One run; ``steps_of`` names another family whose calibrated step count it trains for (the equal-steps
    control) instead of its own."""
    batch = 32
    per_step, steps, calibrated_on = calibrated_steps(task, model, batch, budget_s)
    if steps_of:
        steps = calibrated_steps(task, steps_of, batch, budget_s)[1]
    run_dir = ROOT / "runs" / "equal_time" / (f"{task}-equal_steps" if steps_of else task) / f"{model}-s{seed}"
    args = [*COMMON, *TASK_ARGS[task], f"model={model}", f"run.seed={seed}", f"run.dir={run_dir}",
            f"trainer.max_steps={steps}", f"data.limit_test={limit_test}", "resume=auto"]
    if task == "dit":
        args.append(f"task.classifier_ckpt={classifier}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.time()
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    total = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"{task} {model} seed {seed} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = [r for r in records if "train/loss" in r]
    report = json.loads((run_dir / "eval.json").read_text())
    return dict(task=task, model=model, seed=seed, budget_s=budget_s, step_s_calibrated=per_step, steps=steps,
                batch=batch, images_seen=steps * batch, train_s=trained[-1]["time"] - started if trained else None,
                total_s=total, metrics=report["metrics"], params=report.get("architecture", {}).get("params"),
                limit_test=limit_test, args=args, machine=machine(), calibrated_on=calibrated_on, steps_of=steps_of,
                **({"classifier": classifier_identity(classifier)} if task == "dit" else {}))


def classifier_identity(path: Path) -> dict:
    """Which classifier gave a DiT point its FID: the checkpoint's sha256 and its top-1. FIDs compare only on one
    classifier's features, and a classifier rebuilt on another CPU differs (its float rounding does)."""
    report = json.loads((path.parent.parent / "eval.json").read_text())
    return dict(sha256=hashlib.sha256(path.read_bytes()).hexdigest()[:16], acc1=report["metrics"].get("test/acc1"))


def machine() -> dict:
    from pixelformer.runtime import cpu_name

    return dict(cpu=cpu_name(), threads=1, cores=os.cpu_count())


def _rows(points: list[dict], metric: str) -> dict:
    rows = {}
    for model in FAMILIES:
        mine = [p for p in points if p["model"] == model and metric in p["metrics"]]
        if not mine:
            continue
        values = [p["metrics"][metric] for p in mine]
        rows[model] = dict(seeds=[p["seed"] for p in mine], values=values, mean=statistics.mean(values),
                           std=statistics.stdev(values) if len(values) > 1 else 0.0,
                           steps=[p["steps"] for p in mine], train_s=[p["train_s"] for p in mine],
                           images_seen=[p["images_seen"] for p in mine],
                           step_s=[p["step_s_calibrated"] for p in mine])
        if metric == "test/fid":  # 100 samples make a noisy FID: the test loss and sample accuracy go beside it
            rows[model]["sample_acc"] = [p["metrics"].get("test/sample_acc") for p in mine]
            losses = [p["metrics"].get("test/loss") for p in mine]
            rows[model]["test_loss"] = losses
            if None not in losses:  # the mean and sd once, for the table and the verdict
                rows[model]["test_loss_mean"] = statistics.mean(losses)
                rows[model]["test_loss_std"] = statistics.stdev(losses) if len(losses) > 1 else 0.0
    return rows


def report() -> None:
    """summary.json and equal_time.png from the points on disk."""
    from matplotlib.figure import Figure

    summary = {}
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    for ax, (task, metric, label) in zip(axes, (("cls", "test/acc1", "test top-1 (%)"),
                                                ("dit", "test/fid", "FID (classifier features, lower is better)"))):
        points = [json.loads(p.read_text()) for p in sorted((OUT / task).glob("*.json"))]
        rows = _rows(points, metric)
        for i, model in enumerate(FAMILIES):
            if model not in rows:
                continue
            ax.scatter([i] * len(rows[model]["values"]), rows[model]["values"], s=18,
                       label="equal time" if i == 0 else None, color="C0")
            ax.errorbar([i], [rows[model]["mean"]], yerr=[rows[model]["std"]], fmt="_", color="black", ms=14)
        control = _rows([json.loads(p.read_text()) for p in sorted((OUT / task / "equal_steps").glob("*.json"))],
                        metric)
        for i, model in enumerate(m for m in FAMILIES if m in control):
            ax.scatter([FAMILIES.index(model) + 0.15] * len(control[model]["values"]), control[model]["values"], s=18,
                       marker="x", color="C3", label="equal steps (the global one's)" if i == 0 else None)
        if control:
            ax.legend(fontsize=7)
            summary.setdefault("equal_steps", {})[task] = control
        if rows:
            budget = points[0]["budget_s"]
            ax.set(xticks=range(len(FAMILIES)), xticklabels=[f.replace("pit_", "") for f in FAMILIES], ylabel=label,
                   title=f"{task}: {budget / 60:.0f} min of training each, Fashion-MNIST 28x28")
        summary[task] = rows
    fig.tight_layout()
    fig.savefig(OUT / "equal_time.png", dpi=110)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (OUT / "section.md").write_text(section(summary))
    controls = [(f"{task}, equal steps", rows) for task, rows in summary.get("equal_steps", {}).items()]
    for task, rows in [*_tasks(summary), *controls]:
        for model, row in rows.items():
            print(f"{task:4} {model:20} mean {row['mean']:7.2f} +- {row['std']:5.2f}  seeds {row['seeds']}  "
                  f"steps {row['steps']}  train_s {[round(s) for s in row['train_s'] if s]}")


def _tasks(summary: dict) -> list[tuple[str, dict]]:
    return [(task, rows) for task, rows in summary.items() if task != "equal_steps"]


def section(summary: dict) -> str:
    """The results report's section (``docs/results/equal_time/section.md``; ``tools/report.py`` includes it)."""
    points = [json.loads(p.read_text()) for task in ("cls", "dit") for p in sorted((OUT / task).glob("*.json"))]
    machines = sorted({p["machine"]["cpu"] for p in points})
    timed_on = sorted({p.get("calibrated_on", p["machine"])["cpu"] for p in points})
    budget = points[0]["budget_s"] if points else 0
    lines = ["## Pixel, local and hourglass transformers at equal wall-clock (Fashion-MNIST 28x28)", "",
             f"Dataset: Fashion-MNIST, 28x28 = 784 pixel tokens, the full 60,000-image training set (a fraction of an "
             f"epoch fits the budget), batch 32. Each run trains for {budget / 60:.0f} min of one CPU thread: each "
             f"family's step was timed once, back to back, on {', '.join(timed_on)} (`calibration.json`), and every "
             "run of it gets the steps that fit, so its cosine schedule ends on time and a run on another machine "
             f"trains the same steps (runs made on: {', '.join(machines)}). `cls`: top-1 on the first 2,000 test "
             "images; `dit`: FID on the features of the "
             f"`pit_mini` seed-0 classifier of this experiment{_classifier_words(points)}, on 100 samples "
             f"(DPM-Solver++, 20 steps), so compare FIDs only with each other.{_rerun_words(points)}", "",
             "Command: `python benchmarks/equal_time.py --task cls --seeds 0,1,2`, `--task dit --seeds 0,1,2`, "
             "`--task cls --equal-steps`, then "
             "`--report`. Cost: one budget per point plus evaluation.", "",
             "| task | model | metric mean ± sd | per seed | steps (images seen) | s per step |",
             "| --- | --- | ---: | --- | --- | ---: |"]
    controls = [(f"{task}, equal steps", rows) for task, rows in summary.get("equal_steps", {}).items()]
    for task, rows in [*_tasks(summary), *controls]:
        for model, row in rows.items():
            lines.append(f"| {task} | {model} | {row['mean']:.2f} ± {row['std']:.2f} | "
                         f"{', '.join(f'{v:.2f}' for v in row['values'])} | "
                         f"{', '.join(f'{s} ({i:,})' for s, i in zip(row['steps'], row['images_seen']))} | "
                         f"{statistics.mean(row['step_s']):.2f} |")
    dit = summary.get("dit", {})
    if dit and all("test_loss_mean" in row for row in dit.values()):
        lines += ["", "FID on 100 samples, on the 64 features of a classifier that is itself barely trained, is "
                  "noisy (see its spread across seeds above), so read the DiT comparison off the denoiser's "
                  "diffusion loss on the test split (the training objective, every test image). Beside it, the FID "
                  "classifier's accuracy on the samples (10 % is chance" +
                  (": none of these short runs draws its class yet" if max(
                      (a for row in dit.values() for a in row["sample_acc"] if a is not None), default=100) < 20
                   else "") + "):", "",
                  "| model | test diffusion loss mean ± sd | per seed | sample accuracy (%) per seed |",
                  "| --- | ---: | --- | --- |"]
        for model, row in dit.items():
            lines.append(f"| {model} | {row['test_loss_mean']:.4f} ± {row['test_loss_std']:.4f} | "
                         f"{', '.join(f'{v:.4f}' for v in row['test_loss'])} | "
                         f"{', '.join('-' if a is None else f'{a:g}' for a in row['sample_acc'])} |")
    if controls:
        lines += ["", "The *equal steps* rows are the control (`--equal-steps`): the cheap families trained for the "
                  "global `pit_mini`'s step count, the same images and schedule length, in less time. They say what "
                  "local attention and token merging cost per step, apart from the extra steps they buy."]
    lines += ["", *verdicts(summary), "", "![equal_time.png](equal_time/equal_time.png)", ""]
    return "\n".join(lines)


def _classifier_words(points: list[dict]) -> str:
    """Names the FID classifier of the DiT points; says so plainly when they used more than one."""
    used = {p["classifier"]["sha256"]: p["classifier"] for p in points if p["task"] == "dit" and "classifier" in p}
    if len(used) == 1:
        (one,) = used.values()
        top1 = "?" if one.get("acc1") is None else f"{one['acc1']:.2f}"
        return f" (top-1 {top1} %, sha256 {one['sha256']}...)"
    if len(used) > 1:
        return (f" — **the DiT points used {len(used)} different classifiers, so their FIDs do not compare**: rerun "
                "them with one (`--task dit`, after removing their files)")
    return ""


def _rerun_words(points: list[dict]) -> str:
    """How far the FID classifier, a rerun of the committed pit_mini seed-0 cls point, landed from that point: the
    scale a rerun on another CPU (other float rounding) moves a result by."""
    used = [p["classifier"] for p in points if p["task"] == "dit" and "classifier" in p]
    committed = next((p for p in points if p["task"] == "cls" and p["model"] == "pit_mini" and p["seed"] == 0), None)
    if not used or committed is None or used[0].get("acc1") is None or \
            abs(committed["metrics"]["test/acc1"] - used[0]["acc1"]) <= 0.5:
        return ""
    return (f" The FID classifier is the committed `cls` `pit_mini` seed-0 run trained again: it reached "
            f"{used[0]['acc1']:.2f} % where the committed point reached {committed['metrics']['test/acc1']:.2f} %, "
            "same seed and steps on another CPU (other float rounding); read the small gaps of this table on that "
            "scale.")


def verdicts(summary: dict) -> list[str]:
    """One sentence per task, read off the table: which family leads, by how much, and with how many more steps;
    where a cheaper family does worse than the global one, it says so."""
    out = []
    for task, rows in _tasks(summary):
        if "pit_mini" not in rows or len(rows) < 2:
            continue
        higher = task == "cls"  # top-1: higher is better; FID: lower
        base = rows["pit_mini"]
        parts = []
        for model, row in rows.items():
            if model == "pit_mini":
                continue
            better = row["mean"] > base["mean"] if higher else row["mean"] < base["mean"]
            steps = statistics.mean(row["steps"]) / statistics.mean(base["steps"])
            parts.append(f"`{model}` {'beats' if better else 'loses to'} the global `pit_mini` "
                         f"({row['mean']:.2f} vs {base['mean']:.2f}) with {steps:.1f}x its steps")
        metric = "top-1" if higher else "FID"
        out.append(f"- `{task}` ({metric}, {len(base['seeds'])} seed(s)): " + "; ".join(parts) + ".")
        if task == "dit" and all("test_loss_mean" in row for row in rows.values()):
            loss = {model: row["test_loss_mean"] for model, row in rows.items()}
            out.append("- `dit` by test diffusion loss: " + "; ".join(
                f"`{model}` {'beats' if value < loss['pit_mini'] else 'loses to'} the global `pit_mini` "
                f"({value:.4f} vs {loss['pit_mini']:.4f})" for model, value in loss.items() if model != "pit_mini")
                + ".")
        control = summary.get("equal_steps", {}).get(task, {})
        parts = []
        for model, row in control.items():
            better = row["mean"] > base["mean"] if higher else row["mean"] < base["mean"]
            parts.append(f"`{model}` {'still beats' if better else 'loses to'} it ({row['mean']:.2f} vs "
                         f"{base['mean']:.2f}, {len(row['seeds'])} seed(s))")
        if parts:
            out.append(f"- `{task}` at the global one's step count: " + "; ".join(parts) + ".")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("cls", "dit"), default="cls")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--models", default=",".join(FAMILIES))
    parser.add_argument("--budget-s", type=float, default=720.0, help="training seconds per run")
    parser.add_argument("--limit-test", type=int, default=2000, help="test images of the final evaluation")
    parser.add_argument("--only", default=None, help="run only this model (the --models are still calibrated)")
    parser.add_argument("--equal-steps", action="store_true",
                        help="the control: the cheap families trained for pit_mini's calibrated step count")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.report:
        report()
        return
    classifier = ROOT / "runs" / "equal_time" / "cls" / "pit_mini-s0" / "checkpoints" / "best.ckpt"
    if args.task == "dit" and not classifier.is_file():
        raise SystemExit(f"{classifier} is missing: run --task cls --seeds 0 --models pit_mini first (FID features)")
    folder = OUT / args.task / "equal_steps" if args.equal_steps else OUT / args.task
    folder.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):  # every family timed back to back, under the same conditions
        calibrated_steps(args.task, model, 32, args.budget_s)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for model in [args.only] if args.only else args.models.split(","):
            if args.equal_steps and model == "pit_mini":
                continue
            path = folder / f"{model}-s{seed}.json"
            if path.exists() and json.loads(path.read_text())["budget_s"] == args.budget_s:
                print(f"skip {path.relative_to(ROOT)} (done)", flush=True)
                continue
            if path.exists():  # a point of another budget: its run directory would resume to the wrong length
                print(f"redo {path.relative_to(ROOT)} (budget was not {args.budget_s:g} s)", flush=True)
                shutil.rmtree(ROOT / "runs" / "equal_time" / (f"{args.task}-equal_steps" if args.equal_steps else
                                                               args.task) / f"{model}-s{seed}", ignore_errors=True)
            point = run_point(args.task, model, seed, args.budget_s, args.limit_test, classifier,
                              steps_of="pit_mini" if args.equal_steps else None)
            path.write_text(json.dumps(point, indent=1) + "\n")
            shown = {k: round(v, 3) for k, v in point["metrics"].items() if isinstance(v, float)}
            print(f"{args.task} {model} seed {seed}: {point['steps']} steps in {point['train_s']:.0f} s -> {shown}",
                  flush=True)


if __name__ == "__main__":
    main()
