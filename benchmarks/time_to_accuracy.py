"""Time to accuracy at 784 pixel tokens: the plain recipe raced against the token-budget recipe (and its levers).

Fashion-MNIST at 28x28 (784 pixel tokens), ``pit_mini`` (4 blocks x 64 wide), the full 60,000-image training set,
batch 64, AdamW 1e-3 with 100 warmup steps and a cosine schedule, one run at a time. Each run
is evaluated every ``--eval-every`` steps on the first ``--eval-images`` test images (cheap enough to time the
crossing) and at its end on the full 10,000-image test set (``tools/eval.py``). Variants (``VARIANTS``): ``plain``
(every token at full size every step, the default ``cls`` recipe) and ``budget`` (``recipe=budget``), 4 epochs each,
and the ablation: each lever alone and in combination at 2 epochs.

Time is training time: evaluation is left out for both recipes alike. Each phase's step time (model x image side x
share of tokens kept, one CPU thread, batch 64) is timed once, back to back in one process, and kept in the committed
``calibration.json``; a run's clock is the sum of its steps' calibrated times. So the race compares both recipes on
one machine's timings even when its runs are resumed in later sessions on other CPUs (they differ by 3x here) or run
with more threads (``--threads``); the measured seconds of each session are recorded beside them. A phase added later
is timed beside the plain step again and scaled onto the committed one.

Run from the repository root (``apt-get install dataset-fashion-mnist`` first)::

    nohup python benchmarks/time_to_accuracy.py --variants plain,budget --seeds 0,1,2 --commit --persist-min 60 \
        --threads 2 > tta.log 2>&1 &
    python benchmarks/time_to_accuracy.py --seeds 0 --commit \
        --variants drop75_nofull,drop75_lowres,drop50,lowres,hourglass,hourglass_lowres
    python benchmarks/time_to_accuracy.py --report     # summary.json, time_to_accuracy.png, section.md

A finished point writes ``docs/results/time_to_accuracy/points/<variant>-s<seed>.json`` (``--commit``: and commits
it) and is skipped when started again with the same arguments; an interrupted run resumes (``resume=auto``). A plain
point takes longer than a session (about 3.5 h with ``--threads 2``): ``--persist-min 60 --commit`` commits its
resumable state every hour under ``inflight/``, and at once when stopped by SIGTERM / SIGINT; the same command on a
new machine continues from there. Each keep adds a checkpoint (~2.5 MB for ``pit_mini``) to the git history, so the
interval only bounds what a hard kill loses.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "time_to_accuracy"
RUNS = ROOT / "runs" / "time_to_accuracy"
MODEL, BATCH, SIDE, LR = "pit_mini", 64, 28, "1e-3"
DEVICE = "cpu"  # --device cuda: one GPU, bf16-mixed (benchmarks/gpu_race.sh)
DATA_ROOT: str | None = None  # --data-root: the four Fashion-MNIST files elsewhere than the Debian package's folder


def common() -> list[str]:
    """The arguments every run of the race shares (the device's accelerator and precision among them)."""
    device = ["trainer.accelerator=cpu", "trainer.precision=32-true"] if DEVICE == "cpu" else \
        ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"]
    return ["task=cls", "data=fashion_mnist", f"data.batch_size={BATCH}", f"optim.lr={LR}",
            "optim.warmup_steps=100", "logger=disabled", *device, "trainer.progress_bar=false",
            "trainer.eval_every_epochs=null", "trainer.log_every_steps=50",
            *([f"data.root={DATA_ROOT}"] if DATA_ROOT else [])]
# name -> (recipe and model arguments, epochs); the model is MODEL unless the arguments name one. The race is plain
# against budget, 3 seeds each. The ablation (seed 0) spells every key out, so a change of configs/recipe/budget.yaml
# leaves its points alone: each lever alone and in combination, at 2 epochs, next to drop75 (the budget recipe's
# lever at 2 epochs), and the backbone lever. drop50_lowres_1ep is the first budget recipe (its point from 2026-12-06).
_ABLATE = ["recipe=plain", "recipe.name=ablation"]
VARIANTS: dict[str, tuple[list[str], float]] = {
    "plain": (["recipe=plain"], 4),
    "budget": (["recipe=budget"], 4),
    "drop75": ([*_ABLATE, "recipe.token_drop=0.75", "recipe.full_frac=0.05"], 2),
    "drop75_nofull": ([*_ABLATE, "recipe.token_drop=0.75"], 2),
    "drop50": ([*_ABLATE, "recipe.token_drop=0.5", "recipe.full_frac=0.05"], 2),
    "lowres": ([*_ABLATE, "recipe.low_res_scale=0.5", "recipe.low_res_frac=0.4", "recipe.full_frac=0.05"], 2),
    "drop75_lowres": ([*_ABLATE, "recipe.token_drop=0.75", "recipe.low_res_scale=0.5", "recipe.low_res_frac=0.4",
                       "recipe.full_frac=0.05"], 2),
    "drop50_lowres_1ep": ([*_ABLATE, "recipe.token_drop=0.5", "recipe.low_res_scale=0.5", "recipe.low_res_frac=0.4",
                           "recipe.full_frac=0.1"], 1),
    # the backbone lever: token merging (2.6x pit_mini's step at 784 tokens, benchmarks/token_cost.py) takes no token
    # dropping, so alone and with the resolution lever (16x16 early: its grid must divide by 4, 14 does not)
    "hourglass": ([*_ABLATE, "model=pit_hourglass_mini"], 2),
    "hourglass_lowres": ([*_ABLATE, "model=pit_hourglass_mini", "recipe.low_res_scale=0.58", "recipe.low_res_frac=0.4",
                          "recipe.full_frac=0.05"], 2),
}


def model_of(variant: str) -> str:
    """The backbone a variant trains: its own ``model=`` argument, else MODEL."""
    return next((a.split("=", 1)[1] for a in VARIANTS[variant][0] if a.startswith("model=")), MODEL)


def arguments(variant: str) -> list[str]:
    """A variant's training arguments: the shared ones, its model, its recipe."""
    return [*common(), f"model={model_of(variant)}", *(a for a in VARIANTS[variant][0] if not a.startswith("model="))]


def calib_key(model: str, side: int, drop: float) -> str:
    return f"{DEVICE}/{model}/batch{BATCH}/side{side}/drop{drop:g}"
TRAIN_IMAGES = 60_000


def steps_of(epochs: float) -> int:
    return max(1, int(round(epochs * TRAIN_IMAGES / BATCH)))


def recipe_of(variant: str) -> dict[str, Any]:
    """The composed ``recipe`` section of a variant."""
    sys.path.insert(0, str(ROOT))
    from omegaconf import OmegaConf
    from pixelformer.config import compose

    cfg = compose([*arguments(variant), "data.root=/nonexistent"])
    return OmegaConf.to_container(cfg.recipe)


def phases(variant: str, steps: int) -> list[tuple[int, int, float]]:
    """``(steps, image side, token drop)`` of each run of equal plans in the variant's schedule, in order."""
    from pixelformer.recipe import TokenBudget

    budget = TokenBudget(recipe_of(variant), steps, SIDE, 1)
    out: list[tuple[int, int, float]] = []
    for step in range(steps):
        plan = budget.plan(step)
        key = (plan.img_size or SIDE, round(plan.token_drop, 2))
        if out and out[-1][1:] == key:
            out[-1] = (out[-1][0] + 1, *key)
        else:
            out.append((1, *key))
    return out


def step_seconds(model: str, side: int, drop: float, steps: int = 5) -> float:
    """Median seconds of one training step (forward, loss, backward, AdamW) of ``model`` at this image side and token
    drop."""
    import torch
    from pixelformer.config import compose
    from pixelformer.data import DataInfo
    from pixelformer.task import get_task

    cuda = DEVICE == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    cfg = compose([*common(), f"model={model}", "data.root=/nonexistent"])
    torch.manual_seed(0)
    module = get_task("cls").build_module(cfg, DataInfo("fashion_mnist", 10, 1, SIDE, (0.286,), (0.353,))).train()
    module.backbone.set_train_size(side)
    module.backbone.set_token_drop(drop)
    module.to(DEVICE)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    images = torch.randn(BATCH, 1, side, side, device=DEVICE)
    labels = torch.randint(0, 10, (BATCH,), device=DEVICE)
    times = []
    for i in range(steps + (3 if cuda else 1)):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=cuda):
            loss = module((images, labels))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= (3 if cuda else 1):
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_flops(model_name: str, side: int, drop: float) -> int:
    """Training FLOPs of one image (3 x the forward, counted in training mode: dropped tokens are not counted)."""
    import torch
    from pixelformer.models import create_backbone
    from pixelformer.models.backbone import count_flops

    model = create_backbone(model_name, img_size=SIDE, in_chans=1, num_classes=10).train()
    model.set_train_size(side)
    model.set_token_drop(drop)
    torch.manual_seed(0)
    return 3 * count_flops(model, side, 1)


def calibration(keys: set[tuple[str, int, float]]) -> dict[str, dict]:
    """Seconds per step of every (model, side, drop) in ``keys``, from the committed ``calibration.json``; the missing
    ones are timed here, back to back, and added.

    Keys added to a table that already holds the plain recipe's step are timed beside it again in the same process
    and scaled by committed / measured (the mean of a timing before and one after them), so that every clock stays on
    the first calibration's machine (sessions draw CPUs up to 3x apart); the entry records the measured seconds and
    the scale."""
    path = OUT / "calibration.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    missing = sorted(k for k in keys if calib_key(*k) not in table)
    if not missing:
        return table
    reference = calib_key(MODEL, SIDE, 0.0)
    anchored = reference in table and table[reference].get("scale", 1.0) == 1.0
    before = step_seconds(MODEL, SIDE, 0.0) if anchored else None
    measured = {key: step_seconds(*key) for key in missing}
    scale, anchor = 1.0, None
    if anchored:  # timed before and after the new keys: a load that changes meanwhile shows in both
        after = step_seconds(MODEL, SIDE, 0.0)
        anchor = (before + after) / 2
        scale = table[reference]["step_s"] / anchor
        print(f"reference {reference}: {before:.3f} / {after:.3f} s here, {table[reference]['step_s']:.3f} s "
              f"committed: new entries scaled by {scale:.3f}", flush=True)
    for (model, side, drop), seconds in measured.items():
        entry = dict(step_s=seconds * scale, train_flops_per_image=train_flops(model, side, drop), machine=machine())
        if anchor is not None:
            entry.update(measured_step_s=seconds, scale=scale, reference=reference, reference_measured_s=anchor,
                         reference_measured_before_after_s=[before, after])
        table[calib_key(model, side, drop)] = entry
        print(f"calibrated {calib_key(model, side, drop)}: {entry}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def clock(variant: str, steps: int, table: dict) -> tuple[list[float], float]:
    """Calibrated seconds after each step (index = steps done), and the training FLOPs of the whole run."""
    seconds, flops = [0.0], 0.0
    for count, side, drop in phases(variant, steps):
        entry = table[calib_key(model_of(variant), side, drop)]
        for _ in range(count):
            seconds.append(seconds[-1] + entry["step_s"])
        flops += count * BATCH * entry["train_flops_per_image"]
    return seconds, flops


def machine(threads: int = 1) -> dict:
    """The device, and on a CPU the threads a timing used: one for the calibration, ``--threads`` for a run."""
    if DEVICE == "cuda":
        import torch
        return dict(cpu=torch.cuda.get_device_name(0), device="cuda", precision="bf16-mixed", cores=os.cpu_count())
    from pixelformer.runtime import cpu_name

    return dict(cpu=cpu_name(), threads=threads, cores=os.cpu_count())


def effective(recipe: dict) -> dict:
    """The keys of a recipe that change its training: not its name, nor low_res_frac without low_res_scale."""
    out = {k: v for k, v in recipe.items() if k != "name"}
    if out.get("low_res_scale") is None:
        out.pop("low_res_frac", None)
    if not out.get("token_drop"):
        out.pop("token_drop_schedule", None)
    return out


def same_point(old: dict, variant: str, args: argparse.Namespace) -> bool:
    """Whether a committed point is the one these arguments would run: the same model, recipe, epochs, evaluation,
    batch and learning rate (a variant redefined in VARIANTS runs again)."""
    return (old.get("model", MODEL) == model_of(variant) and effective(old["recipe"]) == effective(recipe_of(variant))
            and old["epochs"] == args.epochs.get(variant, VARIANTS[variant][1])
            and old["eval_every"] == args.eval_every and old["eval_images"] == args.eval_images
            and old.get("batch", BATCH) == BATCH and f"optim.lr={LR}" in old.get("args", [f"optim.lr={LR}"]))


def run_point(variant: str, seed: int, args: argparse.Namespace, table: dict) -> dict:
    steps = steps_of(args.epochs.get(variant, VARIANTS[variant][1]))
    run_dir = RUNS / f"{variant}-s{seed}"
    train_args = [*arguments(variant), f"run.seed={seed}", f"run.dir={run_dir}", f"trainer.max_steps={steps}",
                  *([f"data.limit_train={TRAIN_IMAGES}"] if TRAIN_IMAGES < 60_000 else []),
                  f"trainer.eval_every_steps={args.eval_every}", f"data.limit_test={args.eval_images}",
                  "resume=auto"]
    threads = str(args.threads)  # the run's own speed only: its clock is the one-thread calibration
    env = {**os.environ, **({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} if DEVICE == "cpu" else {})}
    kept = OUT / "inflight" / f"{variant}-s{seed}"
    set_aside_if_redefined(run_dir, train_args)
    if restore(kept, run_dir):
        print(f"{variant} seed {seed}: continuing from the committed state in {kept}", flush=True)
    started = time.time()
    # Its own session: a signal to this process group (Ctrl-C, kill -- -PGID, timeout) reaches this process only,
    # which forwards one SIGTERM; a second one would make the trainer stop at once, without saving its step.
    train = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train.py"), *train_args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stderr = _wait_persisting(train, run_dir, kept, args.persist_min * 60, args.commit, f"{variant} seed {seed}")
    finally:  # never leave a trainer running (and holding its run directory) behind this process
        if train.poll() is None:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # one stop at a time: let this one finish
                signal.signal(signum, signal.SIG_IGN)
            train.terminate()  # SIGTERM: the trainer saves the step it is on before it exits
            train.wait()
        if train.returncode != 0 and args.persist_min > 0 and persist(run_dir, kept) and args.commit:
            git_commit([kept], f"results: time to accuracy, {variant} seed {seed} stopped (step "
                               f"{_ckpt_step(kept) or '?'}: its state, to resume on another machine)")
    if train.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed:\n{stderr[-3000:]}")
    full = run_dir / "full_test.json"
    last = run_dir / "checkpoints" / "last.ckpt"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), f"ckpt={last}",
                           f"out={full}", f"data.limit_test={args.final_images or 'null'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} seed {seed}: full-test evaluation failed:\n{done.stderr[-3000:]}")
    seconds, flops = clock(variant, steps, table)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve, measured, logged_step = [], 0.0, 0
    for r in records:  # measured training seconds: each log window's steps at its throughput (evaluation excluded)
        if "train/images_per_sec" in r:
            measured += (r["step"] - logged_step) * BATCH / r["train/images_per_sec"]
            logged_step = r["step"]
        if "test/acc1" in r:
            curve.append(dict(step=r["step"], images=r["step"] * BATCH, calibrated_s=seconds[r["step"]],
                              measured_s=measured, acc1=r["test/acc1"]))
    return dict(variant=variant, seed=seed, model=model_of(variant), recipe=recipe_of(variant), steps=steps,
                batch=BATCH, train_images=TRAIN_IMAGES, epochs=args.epochs.get(variant, VARIANTS[variant][1]),
                eval_every=args.eval_every, eval_images=args.eval_images,
                curve=curve, train_s_calibrated=seconds[-1], train_flops=flops,
                final_acc1=json.loads(full.read_text())["metrics"]["test/acc1"], total_s=time.time() - started,
                args=train_args, machine=machine(args.threads), run_threads=args.threads)


# ------------------------------------------------------------------ a run longer than a session, through git
# A plain-recipe point takes hours on one CPU thread, longer than a session, and only what is committed outlives one:
# so the run's resumable state (config, metrics, last checkpoint: ~2.5 MB for pit_mini) is copied into OUT/inflight/ and
# committed every --persist-min minutes, restored into an empty run directory on the next start, and removed in the
# commit of the finished point.
# The checkpoint first: metrics newer than the kept checkpoint are trimmed on resume, older ones would lose records.
# Not best.ckpt: the race reads last.ckpt only, a resume does without it, and it would double each commit's size.
RESUMABLE = ("checkpoints/last.ckpt", "metrics.jsonl", "config.yaml")


def _ckpt_step(run_dir: Path) -> int | None:
    """The step of ``run_dir``'s last checkpoint (None: none, or unreadable)."""
    from pixelformer.checkpoint import read_checkpoint

    path = run_dir / "checkpoints" / "last.ckpt"
    try:
        return int(read_checkpoint(path)["progress"]["step"]) if path.is_file() else None
    except Exception:  # a checkpoint that does not load is as good as none here
        return None


def persist(run_dir: Path, kept: Path) -> bool:
    """Copy ``run_dir``'s resumable files into ``kept`` (each replaced whole); False while there is no checkpoint, or
    when ``kept`` holds a later step (a run started over must not overwrite the state it should have resumed)."""
    step, kept_step = _ckpt_step(run_dir), _ckpt_step(kept)
    if step is None or (kept_step is not None and kept_step > step):
        return False
    for name in RESUMABLE:
        source, target = run_dir / name, kept / name
        if source.is_file():  # the run replaces its checkpoints by rename: an open file is always a whole one
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target.with_suffix(target.suffix + ".tmp"))
            os.replace(target.with_suffix(target.suffix + ".tmp"), target)
        elif target.is_file():  # kept from an earlier run of this point: never mix two runs' files
            target.unlink()
    return True


def set_aside_if_redefined(run_dir: Path, train_args: list[str]) -> None:
    """Move a run directory whose saved run has another length, recipe, model, evaluation or learning rate than
    ``train_args`` out of the way (to ``<run_dir>.stale-<time>``), so the point starts over instead of resuming (or
    returning) another run."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    from omegaconf import OmegaConf
    from pixelformer.config import compose

    old = OmegaConf.load(saved)
    new = compose([*train_args, "data.root=/nonexistent"])
    same_schedule = all(OmegaConf.select(old, key) == OmegaConf.select(new, key) for key in (
        "trainer.max_steps", "model.name", "trainer.eval_every_steps", "data.limit_test", "optim.lr"))
    if same_schedule and effective(OmegaConf.to_container(old.recipe)) == effective(OmegaConf.to_container(new.recipe)):
        return
    stale = run_dir.with_name(f"{run_dir.name}.stale-{int(time.time())}")
    run_dir.rename(stale)
    print(f"{run_dir} was a run of another length or recipe: moved to {stale}, starting over", flush=True)


def restore(kept: Path, run_dir: Path) -> bool:
    """Put a committed state back where a run directory was lost (a new machine) or holds an earlier step (the old
    one is moved to ``<run_dir>.older-<time>``); never over a run as far along or further."""
    kept_step, step = _ckpt_step(kept), _ckpt_step(run_dir)
    if kept_step is None or (step is not None and step >= kept_step):
        return False
    if run_dir.exists():
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.older-{int(time.time())}"))
    for name in RESUMABLE:
        if (kept / name).is_file():
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kept / name, run_dir / name)
    return True


def git_commit(paths: list[Path], message: str) -> None:
    from pixelformer.cli.gitcommit import commit_paths

    commit_paths(paths, message, ROOT)


def finish_point(path: Path, variant: str, seed: int, with_calibration: bool = True) -> None:
    """Commit a finished point (with the calibration), and the removal of its in-flight state (the point holds what
    matters now); nothing happens when all of that is committed already."""
    kept = OUT / "inflight" / f"{variant}-s{seed}"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(kept)], cwd=ROOT,
                             capture_output=True).returncode == 0
    shutil.rmtree(kept, ignore_errors=True)
    git_commit([path, *([OUT / "calibration.json"] if with_calibration else []), *([kept] if tracked else [])],
               f"results: time to accuracy, {variant} seed {seed} (Fashion-MNIST 28x28, {model_of(variant)})")


def _wait_persisting(train: subprocess.Popen, run_dir: Path, kept: Path, every_s: float, commit: bool,
                     name: str) -> str:
    """Wait for the training process, keeping its state every ``every_s`` seconds (0: never); its stderr."""
    import threading

    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(train.stderr.read()), daemon=True)
    reader.start()
    while True:
        try:
            train.wait(timeout=every_s if every_s > 0 else None)
            break
        except subprocess.TimeoutExpired:
            if persist(run_dir, kept) and commit:
                git_commit([kept], f"results: time to accuracy, {name} in flight (step {_ckpt_step(kept) or '?'}: its "
                                   "state, to resume on another machine)")
    reader.join()
    return "".join(err)


def crossing(curve: list[dict], target: float) -> dict | None:
    """When ``curve`` first reaches ``target``: its clocks interpolated linearly between the evaluation before and
    the first one at or above it (else a recipe with dearer steps between evaluations would pay up to a whole interval
    more); None if it never does."""
    for i, c in enumerate(curve):
        if c["acc1"] >= target:
            if i == 0 or curve[i - 1]["acc1"] >= c["acc1"]:
                return dict(c)
            before = curve[i - 1]
            f = (target - before["acc1"]) / (c["acc1"] - before["acc1"])
            return {**c, **{k: before[k] + f * (c[k] - before[k]) for k in ("step", "calibrated_s", "measured_s")
                             if k in c and k in before},
                    "acc1": target}
    return None


def _mean_if_all(values: list[float | None]) -> float | None:
    """The mean, when every value is there (a seed that never reached the target leaves the recipe without one)."""
    return statistics.mean(values) if values and None not in values else None


def report(target: float) -> dict:
    """summary.json, time_to_accuracy.png and section.md from the committed points; the target is ``target`` or the
    plain recipe's mean top-1 after one hour of its clock, whichever is higher."""
    from matplotlib.figure import Figure

    points = [json.loads(p.read_text()) for p in sorted((OUT / "points").glob("*.json"))]
    for p in points:
        if p["variant"] not in VARIANTS:
            print(f"left out: a point of {p['variant']!r}, no longer a variant", flush=True)
    points = [p for p in points if p["variant"] in VARIANTS]
    calib = {k: v for k, v in json.loads((OUT / "calibration.json").read_text()).items()
             if k.startswith(f"{DEVICE}/")}
    # The target: what plain reaches after an hour of its clock (mean over its seeds), at least ``target``.
    at_1h = {p["seed"]: acc_at(p["curve"], 3600) for p in points if p["variant"] == "plain"}
    at_1h = {seed: a for seed, a in at_1h.items() if a is not None}
    floor, target = target, max(target, round(statistics.mean(at_1h.values()), 1)) if at_1h else target
    rows: dict[str, dict] = {}
    for variant in VARIANTS:
        mine = [p for p in points if p["variant"] == variant]
        if not mine:
            continue
        hits = [crossing(p["curve"], target) for p in mine]
        times = [h["calibrated_s"] if h else None for h in hits]
        measured = [h["measured_s"] if h else None for h in hits]
        rows[variant] = dict(
            seeds=[p["seed"] for p in mine], seconds_to_target=times, mean_seconds_to_target=_mean_if_all(times),
            measured_seconds_to_target=measured, mean_measured_seconds_to_target=_mean_if_all(measured),
            run_threads=[p.get("run_threads", 1) for p in mine],
            final_acc1=[p["final_acc1"] for p in mine], final_acc1_mean=statistics.mean(p["final_acc1"] for p in mine),
            train_flops=[p["train_flops"] for p in mine], train_s_calibrated=[p["train_s_calibrated"] for p in mine],
            epochs=mine[0]["epochs"], recipe=mine[0]["recipe"], model=mine[0].get("model", MODEL))
    plain, budget = rows.get("plain", {}), rows.get("budget", {})

    def budget_over_plain(key: str) -> float | None:
        return budget[key] / plain[key] if plain.get(key) and budget.get(key) else None
    ratio = budget_over_plain("mean_seconds_to_target")
    # The same ratio on the runs' own clocks (their measured training seconds), where both ran with the same threads:
    # a check on the calibration, which times the model's step alone (no clipping, scheduler or loader).
    threads = {t for r in (plain, budget) for t in r.get("run_threads", [])}
    measured_ratio = budget_over_plain("mean_measured_seconds_to_target") if len(threads) == 1 else None
    summary = dict(target_acc1=target, target_floor=floor, plain_acc1_at_1h=list(at_1h.values()),
                   plain_seeds_at_1h=list(at_1h), ratio=ratio, measured_ratio=measured_ratio,
                   measured_threads=next(iter(threads)) if len(threads) == 1 else None,
                   seeds=sorted({s for r in rows.values() for s in r["seeds"]}),
                   plain=plain, budget=budget, variants=rows, model=MODEL,
                   batch=points[0]["batch"] if points else BATCH, data="fashion_mnist 28x28",
                   train_images=points[0].get("train_images", TRAIN_IMAGES) if points else TRAIN_IMAGES,
                   machine=calib.get(calib_key(MODEL, SIDE, 0.0), next(iter(calib.values())))["machine"]
                   if calib else None,
                   calibration=calib)
    # Two panels on a log clock (the budget curves end where plain's begin to matter): the race, every seed, and
    # the ablation (each lever's seed-0 point).
    fig = Figure(figsize=(10, 4))
    panels = fig.subplots(1, 2, sharey=True)
    for ax, title, shown in ((panels[0], "the race (every seed)", {"plain", "budget"}),
                             (panels[1], "the ablation (seed 0)", set(VARIANTS) - {"plain", "budget"})):
        for p in (p for p in points if p["variant"] in shown):
            first = p["seed"] == min(q["seed"] for q in points if q["variant"] == p["variant"])
            ax.plot([c["calibrated_s"] / 60 for c in p["curve"]], [c["acc1"] for c in p["curve"]],
                    color=f"C{list(VARIANTS).index(p['variant'])}", alpha=0.8, label=p["variant"] if first else None)
        ax.axhline(target, color="gray", ls="--", lw=1)
        ax.set(xscale="log", ylim=(50, 90), title=title, xlabel=f"training minutes (calibrated, {DEVICE}, log)")
        if ax.lines[1:]:  # a panel with curves (the target line is always there)
            ax.legend(fontsize=8, loc="lower right")
    panels[0].set_ylabel("test top-1 (%, eval subset)")
    fig.suptitle(f"Fashion-MNIST 28x28, 784 pixel tokens: time to {target:g} %")
    fig.tight_layout()
    fig.savefig(OUT / "time_to_accuracy.png", dpi=110)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (OUT / "section.md").write_text(section(summary))
    print(section(summary))
    return summary


def describe(recipe: dict) -> str:
    """A recipe in a few words: what its steps see."""
    parts = []
    if recipe.get("low_res_scale") is not None:
        side = round(recipe["low_res_scale"] * SIDE)  # the race's backbones are all patch 1
        parts.append(f"{side}x{side} images for {recipe['low_res_frac']:.0%} of the steps")
    if recipe.get("token_drop"):
        how = " (linear to 0)" if recipe.get("token_drop_schedule") == "linear" else ""
        parts.append(f"{recipe['token_drop']:.0%} dropped{how}")
    if parts and recipe.get("full_frac"):
        parts.append(f"every token in the last {recipe['full_frac']:.0%}")
    return "; ".join(parts) or "every token, every step"


def acc_at(curve: list[dict], seconds: float) -> float | None:
    """Top-1 of the last evaluation at or before ``seconds`` of the clock (None: none yet, or the run ended sooner)."""
    done = [c for c in curve if c["calibrated_s"] <= seconds]
    return done[-1]["acc1"] if done and curve[-1]["calibrated_s"] >= seconds else None


def section(summary: dict) -> str:
    target, rows = summary["target_acc1"], summary["variants"]
    where = summary["machine"] or {}
    how = f"one {where.get('cpu')} GPU, bf16-mixed" if where.get("device") == "cuda" else \
        f"each run on {summary.get('measured_threads') or 'its own count of'} CPU thread(s), clocked by a one-thread " \
        f"calibration"
    lines = ["## Time to accuracy at 784 pixel tokens: the token-budget recipe against the plain recipe", "",
             f"Fashion-MNIST 28x28 (784 pixel tokens), `{MODEL}` unless the table names another backbone, "
             f"{summary['train_images']:,} training images, "
             f"batch {summary['batch']}, "
             f"{how}. Time is training time, from each phase's step time timed back to back once "
             f"(`calibration.json`, {summary['machine']['cpu'] if summary['machine'] else '?'}: the model's forward, "
             f"backward and AdamW step, not the trainer's clipping, scheduler and loader, which weigh more on a cheap "
             f"step; the ratio on the runs' own clocks below is the check); evaluation is left out alike for every "
             f"recipe. Target: {target:g} % top-1 on the evaluation subset; final: the full "
             f"10,000-image test set. Commands: `python benchmarks/time_to_accuracy.py --variants plain,budget --seeds "
             f"0,1,2`, the ablation `--variants {','.join(v for v in VARIANTS if v not in ('plain', 'budget'))} "
             f"--seeds 0`, then `--report`.", ""]
    if summary.get("plain_acc1_at_1h"):
        lines += [f"The plain recipe's top-1 after one hour of its clock: "
                  f"{', '.join(f'{a:.1f}' for a in summary['plain_acc1_at_1h'])} % (seeds "
                  f"{', '.join(map(str, summary['plain_seeds_at_1h']))}); the target is the larger of their mean "
                  f"(to 0.1) and {summary.get('target_floor', 85.0):g} %.", ""]
    lines += ["| recipe | what it trains on | model | epochs | seeds | calibrated minutes to target (per seed) | mean | "
              "training minutes | final top-1 (full test) | training PFLOP |",
              "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        per = ", ".join("not reached" if t is None else f"{t / 60:.1f}" for t in r["seconds_to_target"])
        mean = "-" if r["mean_seconds_to_target"] is None else f"{r['mean_seconds_to_target'] / 60:.1f}"
        lines.append(f"| {name} | {describe(r['recipe'])} | `{r['model']}` | {r['epochs']:g} | {len(r['seeds'])} | "
                     f"{per} | {mean} | "
                     f"{statistics.mean(r['train_s_calibrated']) / 60:.1f} | "
                     f"{r['final_acc1_mean']:.2f} | {statistics.mean(r['train_flops']) / 1e15:.2f} |")
    pending = [v for v in VARIANTS if v not in rows]
    if pending:
        lines += ["", f"Not run yet: {', '.join(f'`{v}`' for v in pending)} (the ablation command above runs "
                      f"{'it' if len(pending) == 1 else 'them'})."]
    plain, budget = rows.get("plain"), rows.get("budget")
    if plain and budget:
        gap = plain["final_acc1_mean"] - budget["final_acc1_mean"]
        lines += ["", f"The target is timed on the evaluation subset. On the full test set the budget recipe ends at "
                      f"{budget['final_acc1_mean']:.2f} % ({'above' if budget['final_acc1_mean'] >= target else 'below'}"
                      f" the {target:g} % target), {abs(gap):.2f} points {'below' if gap > 0 else 'above'} the plain "
                      f"recipe's {plain['final_acc1_mean']:.2f} % (which trains "
                      f"{statistics.mean(plain['train_s_calibrated']) / statistics.mean(budget['train_s_calibrated']):.1f}"
                      f"x as many minutes)."]
    ratio, measured = summary["ratio"], summary.get("measured_ratio")
    lines += ["", f"Ratio (budget mean time / plain mean time): "
                  f"{'not measured yet' if ratio is None else f'{ratio:.2f}'} (target <= 0.2)."
                  + ("" if measured is None else
                     f" On the runs' own clocks (measured training seconds, {summary['measured_threads']} thread(s), "
                     f"on the CPUs of the sessions that ran them): {measured:.2f}."), "",
              "![time_to_accuracy.png](time_to_accuracy/time_to_accuracy.png)", ""]
    return "\n".join(lines)


class Stopped(KeyboardInterrupt):
    pass


def _stop(signum: int, frame: Any) -> None:
    raise Stopped(signal.Signals(signum).name)


def main() -> None:
    global OUT, RUNS, TRAIN_IMAGES, DEVICE, BATCH, DATA_ROOT, LR
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="plain,budget")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--target", type=float, default=85.0, help="top-1 (%%) on the evaluation subset")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--eval-images", type=int, default=1000, help="test images of each evaluation")
    parser.add_argument("--epochs", default="", help="override a variant's epochs: plain=2,budget=0.5")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished point (and the state of a "
                        "running one, with --persist-min)")
    parser.add_argument("--persist-min", type=float, default=0, help="keep a running point's resumable state in "
                        "OUT/inflight/ every this many minutes (0: never), so a later session continues it")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT, help="where points, calibration and summary go")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the run directories go")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU, bf16-mixed")
    parser.add_argument("--batch", type=int, default=BATCH, help="images per step (the CPU race: 64)")
    parser.add_argument("--lr", default=LR, help="peak AdamW learning rate (the CPU race: 1e-3 at batch 64)")
    parser.add_argument("--data-root", default=None, help="folder of the four Fashion-MNIST files")
    parser.add_argument("--final-images", type=int, default=None, help="test images of the final evaluation "
                        "(default: all 10,000; fewer only for a quick check of the script)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of each training run (its "
                        "speed only: every clock is the committed one-thread calibration)")
    parser.add_argument("--train-images", type=int, default=TRAIN_IMAGES, help="the first N training images (a "
                        "quick check of the script; the race uses all 60,000)")
    args = parser.parse_args()
    for signum in (signal.SIGTERM, signal.SIGHUP):  # stop like Ctrl-C: the running trainer saves, then this exits
        if signal.getsignal(signum) is not signal.SIG_IGN:  # under nohup a hang-up stays ignored
            signal.signal(signum, _stop)
    OUT, RUNS, TRAIN_IMAGES = args.out, args.runs, args.train_images
    DEVICE, BATCH, DATA_ROOT, LR = args.device, args.batch, args.data_root, args.lr
    sys.path.insert(0, str(ROOT))
    if args.report:
        report(args.target)
        return
    args.epochs = {k: float(v) for k, v in (item.split("=") for item in args.epochs.split(",") if item)}
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    # every variant's phases, not only those asked for: all clocks come from one back-to-back calibration
    keys = {(model_of(v), side, drop) for v in VARIANTS
            for _, side, drop in phases(v, steps_of(args.epochs.get(v, VARIANTS[v][1])))}
    table = calibration(keys)
    (OUT / "points").mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for variant in variants:
            path = OUT / "points" / f"{variant}-s{seed}.json"
            if path.exists():
                if same_point(json.loads(path.read_text()), variant, args):
                    print(f"skip {path.relative_to(ROOT)} (done)", flush=True)
                    if args.commit:  # a stop between writing the point and committing it: commit it now
                        finish_point(path, variant, seed, with_calibration=False)
                    continue
                print(f"{path.relative_to(ROOT)} was run with another definition of {variant}: running it again",
                      flush=True)
            point = run_point(variant, seed, args, table)
            path.write_text(json.dumps(point, indent=1) + "\n")
            hit = crossing(point["curve"], args.target)
            reached = "not reached" if hit is None else f"{hit['calibrated_s'] / 60:.1f} min"
            print(f"{variant} seed {seed}: final {point['final_acc1']:.2f} %, {reached} to {args.target:g} %",
                  flush=True)
            if args.commit:
                finish_point(path, variant, seed)
            else:
                shutil.rmtree(OUT / "inflight" / f"{variant}-s{seed}", ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as stop:
        raise SystemExit(f"stopped ({stop or 'SIGINT'}): the running point saved its step in its run directory "
                         f"(and in inflight/ with --persist-min); the same command resumes it") from None
