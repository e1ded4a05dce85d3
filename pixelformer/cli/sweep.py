"""Run an experiment's grid: ``python tools/sweep.py experiment=NAME scale=small|medium|large|paper [key=value ...]``.

Examples::

    python tools/sweep.py experiment=patch_size scale=small          # every point, 3 seeds, here, one after another
    python tools/sweep.py experiment=patch_size scale=small          # again: finished points are skipped,
                                                                     # interrupted ones resume (resume=auto)
    python tools/sweep.py experiment=pos_embed scale=medium launcher.parallel=2 launcher.threads=1
    python tools/sweep.py experiment=patch_size scale=paper launcher=slurm launcher.partition=gpu \\
        launcher.gpus_per_node=1 launcher.timeout_min=1440
    python tools/sweep.py experiment=all scale=small                 # every experiment that defines the scale
    python tools/sweep.py experiment=patch_size scale=small dry_run=true   # list the points and their commands

Keys: experiment (a name in configs/experiment/, a .yaml path, or all), scale, seeds (e.g. [0]: overrides the
file's), runs (run directories' root, default runs/sweeps), out (summaries' root, default docs/results),
dry_run, commit (true: git-commit each finished point's summary at once, so a sweep longer than a working session
keeps what it finished), reuse (default true: a point whose every stage is the same training as a summary another
experiment committed at the same scale -- the same resolved settings and the same built network, e.g. ``vit_mini
model.patch_size=1`` and ``pit_mini`` -- takes that summary, marked ``reused_from``, instead of training again), logger=... / logger.* / data.root / data.num_workers (passed to every run, not part of a point's
identity: they do not change results), launcher (local | slurm | debug) and launcher.* (parallel, threads, timeout_min, partition, gpus_per_node,
cpus_per_task, mem_gb, slurm_additional_parameters). Points run through submitit's executors: ``local`` starts each
point as a subprocess on this machine (launcher.parallel at a time), ``slurm`` submits them as a job array,
``debug`` runs them in this process. Each finished point writes out/<experiment>/<scale>/<point>.json.
"""
from __future__ import annotations

import os
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from . import prog, usage

ROOT = Path(__file__).resolve().parent.parent.parent  # the folder holding the pixelformer package


@dataclass
class LauncherCfg:
    name: str = "local"
    parallel: int = 1  # points running at once (local: subprocesses; slurm: the array's parallelism)
    threads: Optional[int] = None  # torch threads per point; None: local = CPU cores / parallel, slurm = torch's
    timeout_min: int = 24 * 60
    partition: Optional[str] = None
    gpus_per_node: int = 0
    cpus_per_task: int = 8
    mem_gb: Optional[int] = None
    slurm_additional_parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepCfg:
    experiment: str = "???"
    scale: str = "small"
    seeds: Optional[list[int]] = None
    runs: str = "runs/sweeps"
    out: str = "docs/results"
    dry_run: bool = False
    commit: bool = False  # git-commit each finished point's summary and pictures at once (long sweeps, sessions)
    reuse: bool = True  # a point that another experiment's committed summary already trained is not run again
    tracking: list[str] = field(default_factory=list)  # filled from the pass-through arguments
    argv: list[str] = field(default_factory=list)  # the command line, recorded in the summaries
    launcher: LauncherCfg = field(default_factory=LauncherCfg)


LAUNCHERS = ("local", "slurm", "debug")
PASS_THROUGH = ("logger", "data.root", "data.num_workers")


def parse(argv: list[str]) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for arg in argv:
        if "=" not in arg:
            raise UserError(f"cannot parse argument {arg!r}: use key=value (e.g. experiment=patch_size scale=small)")
    launcher = [a for a in argv if a.startswith("launcher=")]
    # Tracking, where the data lies and how it is loaded pass through to every run; they do not change results, so a
    # point's identity ignores them.
    tracking = [a for a in argv if a.split("=", 1)[0] in PASS_THROUGH or a.startswith("logger.")]
    rest = [a for a in argv if not a.startswith("launcher=") and a not in tracking]
    try:
        cfg = OmegaConf.structured(SweepCfg)
        if launcher:
            name = launcher[-1].split("=", 1)[1]
            if name not in LAUNCHERS:
                raise UserError(f"launcher={name}: choose one of {', '.join(LAUNCHERS)}")
            cfg.launcher.name = name
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        if key == "seeds":
            raise UserError("seeds must be a list of integers, e.g. seeds=[0,1,2] (or leave it out for the "
                            "experiment's own)") from None
        raise UserError(f"{str(e).splitlines()[0]}{f' (key: {key})' if key else ''}; see --help") from None
    if OmegaConf.is_missing(cfg, "experiment"):
        from ..sweep import list_experiments
        raise UserError(f"experiment is not set: pass experiment=NAME (one of {', '.join(list_experiments())}, or "
                        f"all)")
    cfg.tracking = tracking
    cfg.argv = list(argv)
    from ..sweep import SCALES
    if cfg.scale not in SCALES:
        raise UserError(f"scale={cfg.scale}: choose one of {', '.join(SCALES)}")
    if cfg.launcher.parallel < 1:
        raise UserError(f"launcher.parallel must be >= 1, got {cfg.launcher.parallel}")
    return cfg


def make_executor(cfg: Any, folder: Path) -> Any:
    """A submitit executor for ``cfg.launcher``: the same job function runs here or on a SLURM cluster."""
    import submitit

    launcher = cfg.launcher
    if launcher.name == "debug":
        return submitit.DebugExecutor(folder=str(folder))
    if launcher.name == "local":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=launcher.timeout_min)
        return executor
    import shutil
    if shutil.which("srun") is None:
        raise UserError("launcher=slurm needs SLURM's commands (srun, sbatch), and this machine has none: run the "
                        "sweep on the cluster's login node, or use launcher=local")
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    extra = {"slurm_partition": launcher.partition} if launcher.partition else {}
    if launcher.mem_gb:
        extra["mem_gb"] = launcher.mem_gb
    executor.update_parameters(
        timeout_min=launcher.timeout_min, gpus_per_node=launcher.gpus_per_node, cpus_per_task=launcher.cpus_per_task,
        tasks_per_node=1, nodes=1, slurm_array_parallelism=launcher.parallel,
        slurm_additional_parameters=dict(launcher.slurm_additional_parameters), **extra)
    return executor


def run_grid(cfg: Any, experiment: str) -> int:
    """Run every unfinished point of one experiment at ``cfg.scale``; returns the number of failed points."""
    from ..sweep import find_same_training, load_experiment, plan, reuse_summary, run_point, summary_is_current

    exp = load_experiment(experiment)
    if cfg.scale not in exp.scales:
        if cfg.experiment == "all":
            print(f"[{exp.name}] defines no {cfg.scale} scale: skipped")
            return 0
    shared, points = plan(exp, cfg.scale, Path(cfg.runs), Path(cfg.out),
                          list(cfg.seeds) if cfg.seeds is not None else None, tracking=cfg.tracking)
    if cfg.dry_run:
        train = "python tools/train.py" if prog("sweep").startswith("python ") else "pixelformer-train"
        for point in shared + points:
            done = summary_is_current(point)
            source = find_same_training(point, Path(cfg.out)) if cfg.reuse and not done else None
            state = "done" if done else f"reuse {source}" if source else "todo"
            for stage in point.stages:
                print(f"[{exp.name}/{cfg.scale}] {state} {point.name}/{stage.name}: {train} "
                      f"{' '.join(shlex.quote(a) for a in stage.args + list(stage.tracking))}")
        return 0
    command = f"{prog('sweep')} " + " ".join(shlex.quote(a) for a in cfg.argv)
    for point in shared + points:
        point.command = command
    threads = cfg.launcher.threads
    if threads is None and cfg.launcher.name == "local":
        threads = max(1, (os.cpu_count() or 1) // cfg.launcher.parallel)
    folder = Path(cfg.runs) / exp.name / cfg.scale / ".submitit"
    executor = make_executor(cfg, folder)
    failed = 0
    for group in (shared, points):  # shared runs (e.g. the classifier that scores samples) come first
        todo = []
        for point in group:
            if summary_is_current(point):
                print(f"[{exp.name}/{cfg.scale}] {point.name}: finished, skipped ({point.summary_path})")
                continue
            source = find_same_training(point, Path(cfg.out)) if cfg.reuse else None
            if source is None:
                todo.append(point)
                continue
            summary = reuse_summary(point, source)
            print(f"[{exp.name}/{cfg.scale}] {point.name}: the same training as {source}, its summary reused "
                  f"(reuse=false trains it again)", flush=True)
            if cfg.commit:
                _commit_summary(point, summary, f"[{exp.name}/{cfg.scale}]", f"reused: {summary['reused_from']}")
        failed += _launch(executor, todo, run_point, threads, cfg, exp.name)
        if failed and group is shared:
            print(f"[{exp.name}/{cfg.scale}] a shared run failed: the points that need it are not started")
            return failed + len(points)
    return failed


def _launch(executor: Any, todo: list, job: Any, threads: Optional[int], cfg: Any, name: str) -> int:
    """Submit ``todo``, at most ``launcher.parallel`` running at once here (a SLURM array limits itself)."""
    if not todo:
        return 0
    tag = f"[{name}/{cfg.scale}]"
    if cfg.launcher.name == "slurm":
        with executor.batch():
            jobs = [(point, executor.submit(job, point, threads)) for point in todo]
        print(f"{tag} submitted {len(jobs)} points as SLURM array {jobs[0][1].job_id.split('_')[0]}; logs in "
              f"{executor.folder}")
        return sum(_wait(point, j, tag, cfg.commit) for point, j in jobs)
    running, queue = [], list(todo)
    try:
        return _run_queue(executor, queue, running, job, threads, cfg, tag)
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: each running point gets SIGINT, saves a checkpoint and stops; the same command resumes.
        for point, j in running:
            j.cancel(check=False)
        deadline = time.time() + 120
        while any(not j.done() for _, j in running) and time.time() < deadline:
            time.sleep(0.5)
        print(f"{tag} interrupted: {', '.join(p.name for p, _ in running) or 'no point'} stopped with a checkpoint; "
              f"run the same command to resume", flush=True)
        raise


def _run_queue(executor: Any, queue: list, running: list, job: Any, threads: Optional[int], cfg: Any,
               tag: str) -> int:
    failed = 0
    while queue or running:
        while queue and len(running) < cfg.launcher.parallel:
            point = queue.pop(0)
            where = Path(point.stages[0].run_dir)
            where = where if point.seed is None else where.parent  # a point's stages share its folder
            print(f"{tag} {point.name}: started ({len(point.stages)} stage(s), run dir {where})", flush=True)
            running.append((point, executor.submit(job, point, threads)))
        done = [(p, j) for p, j in running if j.done()]
        if not done:
            time.sleep(1.0)
            continue
        for point, j in done:
            running.remove((point, j))
            failed += _wait(point, j, tag, cfg.commit)
    return failed


def _wait(point: Any, job: Any, tag: str, commit: bool = False) -> int:
    try:
        summary = job.result()
    except Exception as e:  # noqa: BLE001 - a point's failure is reported and the grid goes on
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines
                      else type(e).__name__)
        reason = reason.strip().replace("pixelformer.errors.UserError: ", "error: ")
        print(f"{tag} {point.name}: FAILED ({reason[:300]}); log: {getattr(job, 'paths', None) and job.paths.stderr}",
              flush=True)
        return 1
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in summary["metrics"].items() if k.startswith("test/"))
    print(f"{tag} {point.name}: {metrics} ({summary['total']['wall_s']:.0f} s) -> {point.summary_path}", flush=True)
    if commit:
        _commit_summary(point, summary, tag, metrics)
    return 0


def _commit_summary(point: Any, summary: dict[str, Any], tag: str, what: str) -> None:
    """Commit the point's summary and its pictures at once (a sweep longer than a working session keeps them), with
    the report rebuilt to include it: every commit of a sweep is then a consistent state of the results."""
    from .gitcommit import commit_paths
    from .report import PLOTS, write_report

    path = Path(point.summary_path).resolve()
    folder = path.parent  # <out>/<experiment>/<scale>
    paths = [path, *(path.with_name(name) for name in summary.get("pictures", []))]
    try:
        paths += [write_report(folder.parents[1], {(folder.parent.name, folder.name)}),
                  *(folder / name for name in PLOTS if (folder / name).is_file())]
    except (UserError, OSError, ValueError) as e:  # the summary still lands; tools/report.py rebuilds the rest
        print(f"{tag} warning: the report was not rebuilt ({e}); run python tools/report.py", flush=True)
    commit_paths(paths, f"results: {tag.strip('[]')} {point.name} ({what})", folder)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        from ..sweep import list_experiments
        print(usage(__doc__, "sweep") + f"\nexperiments: {', '.join(list_experiments())}")
        return 0
    cfg = parse(argv)
    from ..sweep import list_experiments, load_experiment

    names = list_experiments() if cfg.experiment == "all" else [cfg.experiment]
    if cfg.experiment != "all":
        load_experiment(cfg.experiment)  # a wrong name is refused before anything starts
    if (ROOT / "setup.cfg").is_file():  # a checkout, maybe not installed: jobs import pixelformer from it too
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # SIGTERM (e.g. a scheduler's) stops like Ctrl-C: running points get SIGINT from submitit and save a checkpoint.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    failed = 0
    for name in names:
        failed += run_grid(cfg, name)
    if failed:
        print(f"{failed} point(s) failed; fix the cause and run the same command again (finished points are skipped)")
        return 1
    return 0

