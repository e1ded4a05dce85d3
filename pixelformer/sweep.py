"""Experiment grids: ``configs/experiment/<name>.yaml`` expanded into points, each trained resumably and summarised.

An experiment file holds one finding at up to four scales (``small``, ``medium``, ``large``, ``paper``)::

    finding: 1                         # its place in the report
    title: Pixels vs patches at a fixed input size
    paper: the paper's claim, quoted in the report
    metric: test/acc1                  # the number the report compares (mode max; test/fid is min)
    x: tokens                          # what the report plots it against
    scales:
      small:
        args: [task=cls, data=digits, model=vit_mini]        # training arguments shared by every point
        seeds: [0, 1, 2]
        grid: {model.patch_size: [4, 2, 1]}                   # every combination of these values ...
        arms:                                                 # ... with every named arm (optional)
          scratch: [trainer.max_epochs=40]
          mae_finetune:                                       # an arm of several stages, run in order
            pretrain: [task=mae, trainer.max_epochs=20]
            finetune: [init_from={pretrain}/checkpoints/last.ckpt, trainer.max_epochs=20]
        shared:                                               # whole runs made once per scale, before the
          classifier: [task=cls, data=digits]                 # points; referred to as {shared.classifier}

A point is one (arm, grid values, seed); it trains in ``<runs>/<experiment>/<scale>/<point>/<stage>`` with
``resume=auto``, so an interrupted point continues where it stopped, and leaves a small JSON summary in
``<out>/<experiment>/<scale>/<point>.json`` (its arguments, final and best metrics, the evaluation curve, wall time,
images/s, tokens, parameters, training FLOPs). A point whose summary records the same arguments is finished and
skipped; the summaries alone rebuild the report.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from .checkpoint import fsync_and_replace
from .config import CONFIG_DIR
from .errors import UserError, did_you_mean
from .runtime import cpu_name

__all__ = ["SCALES", "Experiment", "Point", "Stage", "find_same_training", "list_experiments", "load_experiment",
           "module_fingerprint", "plan", "reuse_summary", "run_point", "same_training", "summary_is_current",
           "write_json_atomic"]

SCALES = ("small", "medium", "large", "paper")
EXPERIMENT_DIR = CONFIG_DIR / "experiment"


@dataclass
class Stage:
    """One training run of a point: its name and its ``tools/train.py`` arguments (references resolved)."""
    name: str
    args: list[str]
    run_dir: str
    tracking: list[str] = field(default_factory=list)  # logger arguments, not part of the point's identity


@dataclass
class Point:
    experiment: str
    scale: str
    name: str  # e.g. "patch_size4-s0"
    arm: Optional[str]
    seed: Optional[int]  # None for shared runs
    values: dict[str, Any]  # the grid values of this point
    stages: list[Stage]
    summary_path: str
    about: dict[str, str] = field(default_factory=dict)  # the experiment's title, paper claim, metric, mode, x
    command: str = ""  # the sweep command that ran it, recorded in the summary

    @property
    def args(self) -> dict[str, list[str]]:
        return {stage.name: stage.args for stage in self.stages}


@dataclass
class Experiment:
    name: str
    title: str
    paper: str
    metric: str
    mode: str  # "max" or "min"
    x: str
    scales: dict[str, DictConfig] = field(default_factory=dict)
    finding: int = 0  # its place in the report


def list_experiments(config_dir: Path = EXPERIMENT_DIR) -> list[str]:
    return sorted(p.stem for p in config_dir.glob("*.yaml"))


def load_experiment(name: str, config_dir: Path = EXPERIMENT_DIR) -> Experiment:
    """``configs/experiment/<name>.yaml``, or a YAML file's path; checked so that a wrong key is named early."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else config_dir / f"{name}.yaml"
    if not path.is_file():
        valid = list_experiments(config_dir)
        hint = did_you_mean(name, valid)
        raise UserError(f"experiment={name}: no such experiment.{hint} Choices: {', '.join(valid)} (or a .yaml path)")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise UserError(f"cannot parse {path}: {e}") from None
    known = {"finding", "title", "paper", "metric", "mode", "x", "scales"}
    unknown = sorted(set(raw) - known)
    if unknown or "scales" not in raw or "metric" not in raw:
        raise UserError(f"{path}: an experiment needs 'metric' and 'scales' (and may set {', '.join(sorted(known))}); "
                        f"found {', '.join(map(str, raw)) or 'nothing'}")
    scales = {}
    for scale, spec in raw.scales.items():
        if scale not in SCALES:
            raise UserError(f"{path}: unknown scale {scale!r}; scales are {', '.join(SCALES)}")
        extra = sorted(set(spec) - {"args", "seeds", "grid", "arms", "shared", "note"})
        if extra:
            raise UserError(f"{path}: scales.{scale} has unknown key(s) {', '.join(extra)}; a scale sets args, seeds, "
                            f"grid, arms, shared and note")
        scales[scale] = spec
    metric = str(raw.metric)
    mode = str(raw.get("mode", "min" if metric.endswith(("fid", "loss")) else "max"))
    return Experiment(path.stem, str(raw.get("title", path.stem)), str(raw.get("paper", "")), metric, mode,
                      str(raw.get("x", "tokens")), scales, int(raw.get("finding", 0)))


def _label(key: str, value: Any) -> str:
    return f"{key.rsplit('.', 1)[-1]}{value}"


def _resolve(args: list[str], refs: dict[str, str], where: str) -> list[str]:
    """Replace ``{stage}`` / ``{shared.name}`` by run directories; ``${...}`` (OmegaConf interpolation) is kept."""
    import re

    def substitute(match: "re.Match[str]") -> str:
        if match.group(1) == "$":
            return match.group(0)
        key = match.group(2)
        if key not in refs:
            raise UserError(f"{where}: {{{key}}} names no earlier stage or shared run; known: "
                            f"{', '.join(sorted(refs)) or 'none'}")
        return refs[key]

    return [re.sub(r"(\$?)\{([A-Za-z0-9_.]+)\}", substitute, arg) for arg in args]


def _stage_args(spec: Any) -> dict[str, list[str]]:
    """An arm is a list of arguments (one stage, ``train``) or a mapping stage -> arguments (run in order)."""
    if isinstance(spec, (ListConfig, list)):
        return {"train": [str(a) for a in spec]}
    return {str(k): [str(a) for a in v] for k, v in spec.items()}


def plan(exp: Experiment, scale: str, runs_root: Path, out_root: Path,
         seeds: Optional[list[int]] = None, tracking: list[str] = ()) -> tuple[list[Point], list[Point]]:
    """The shared runs and the points of ``exp`` at ``scale``, with run directories and summary paths.

    ``tracking``: ``logger`` arguments added to every run; they are not part of a point's recorded arguments.
    """
    if scale not in exp.scales:
        raise UserError(f"scale={scale}: experiment {exp.name} defines {', '.join(exp.scales)}; pick one of them")
    spec = exp.scales[scale]
    base = [str(a) for a in spec.get("args", [])]
    runs, out = runs_root / exp.name / scale, out_root / exp.name / scale
    common = ["resume=auto", "trainer.progress_bar=false", f"logger.wandb.tags=[{exp.name},{scale}]"]
    tracking = list(tracking)
    about = {"title": exp.title, "paper": exp.paper, "metric": exp.metric, "mode": exp.mode, "x": exp.x}
    shared_points, refs = [], {}
    for name, stage_spec in (spec.get("shared") or {}).items():
        run_dir = runs / f"shared-{name}"
        # Shared runs are whole commands of their own: the scale's args are meant for the points.
        args = [str(a) for a in stage_spec] + [f"run.dir={run_dir}", *common]
        shared_points.append(Point(exp.name, scale, f"shared-{name}", None, None, {},
                                   [Stage(str(name), args, str(run_dir), tracking)], str(out / f"shared-{name}.json"),
                                   about))
        refs[f"shared.{name}"] = str(run_dir)
    arms = spec.get("arms") or {None: []}
    grid = spec.get("grid") or {}
    keys = list(grid)
    seeds = list(seeds if seeds is not None else spec.get("seeds", [0]))
    points = []
    for arm, arm_spec in arms.items():
        for combo in itertools.product(*(list(grid[k]) for k in keys)):
            values = dict(zip(keys, combo))
            label = "_".join([*([str(arm)] if arm is not None else []), *(_label(k, v) for k, v in values.items())])
            grid_args = [f"{k}={'null' if v is None else v}" for k, v in values.items()]  # YAML's null back
            for seed in seeds:
                name = f"{label or 'run'}-s{seed}"
                stages, local = [], dict(refs)
                for stage, stage_args in _stage_args(arm_spec).items():
                    run_dir = runs / name / stage
                    args = _resolve(base + grid_args + stage_args, local, f"{exp.name}.{scale}.{arm}.{stage}")
                    args += [f"run.seed={seed}", f"run.dir={run_dir}", *common]
                    stages.append(Stage(stage, args, str(run_dir), tracking))
                    local[stage] = str(run_dir)
                values_all = dict(values, **({"arm": arm} if arm is not None else {}))
                points.append(Point(exp.name, scale, name, None if arm is None else str(arm), seed, values_all,
                                    stages, str(out / f"{name}.json"), about))
    return shared_points, points


def summary_is_current(point: Point) -> bool:
    """Whether the point's summary exists and records exactly the arguments planned now; a reused summary
    (:func:`reuse_summary`) also needs its original to exist still with the same results."""
    path = Path(point.summary_path)
    if not path.is_file():
        return False
    try:
        recorded = json.loads(path.read_text())
    except ValueError:
        return False
    if {name: stage.get("args") for name, stage in recorded.get("stages", {}).items()} != point.args:
        return False
    source = recorded.get("reused_from")
    if not source:
        return True
    try:  # <out>/<experiment>/<scale>/<point>.json: the original, three levels up from this summary
        original = json.loads(path.parent.parent.parent.joinpath(f"{source}.json").read_text())
    except (ValueError, OSError):
        return False
    return original.get("metrics") == recorded.get("metrics") and original.get("total") == recorded.get("total")


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    fsync_and_replace(tmp, path)


# ------------------------------------------------------------------------------- the same training, run once
# Keys that say where a run lives and how it is shown, not what it trains: two runs that differ only here are the
# same training.
_PLACE_KEYS = ("run.dir", "resume", "trainer.progress_bar")


@functools.lru_cache(maxsize=512)  # a sweep compares each point with every summary of its scale: compose each once
def _settings(args: tuple[str, ...]) -> Optional[dict[str, Any]]:
    """The resolved settings of a training run's arguments, without where it lives and how it is logged; None when
    the arguments do not compose (that run is not reused, its own start reports why). Cached: do not modify."""
    from .config import compose, to_plain
    from .run import flatten

    try:
        flat = flatten(to_plain(compose(list(args))))
    except Exception:  # noqa: BLE001 - UserError, omegaconf errors: no reuse, the run itself says what is wrong
        return None
    return {k: v for k, v in flat.items() if k not in _PLACE_KEYS and not k.startswith("logger.")}


@functools.lru_cache(maxsize=64)
def module_fingerprint(args: tuple[str, ...]) -> Optional[str]:
    """A digest of the task module these training arguments build, initialised from seed 0 on the CPU: every
    submodule's type and plain attributes (drop rates, kernels, attention backends: what a forward reads) and every
    parameter and buffer, by name, shape and value. Two configs with the same digest train the same network from the
    same initial weights (under any seed), however they name it: ``vit_mini model.patch_size=1`` is ``pit_mini``.
    None when it cannot be known without the data (an image folder's classes) or the module does not build."""
    import hashlib

    import torch

    from .config import compose
    from .data import DATASETS, DataInfo
    from .task import get_task

    try:
        cfg = compose(list(args))
        spec = DATASETS[cfg.data.name]
        size = cfg.data.img_size or spec.native_size
        if spec.num_classes is None or size is None:
            return None
        info = DataInfo(cfg.data.name, spec.num_classes, spec.in_chans, size, (0.5,) * spec.in_chans,
                        (0.5,) * spec.in_chans, [str(i) for i in range(spec.num_classes)])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = get_task(cfg.task.name).build_module(cfg, info)
    except Exception:  # noqa: BLE001 - whatever stops the build stops its reuse; the run itself reports it
        return None
    digest = hashlib.sha256()
    for name, sub in module.named_modules():
        digest.update(f"{name}:{type(sub).__qualname__}".encode())
        for key, value in sorted(vars(sub).items()):  # parameters, buffers, children and hooks live under _*
            if not key.startswith("_") and isinstance(value, (bool, int, float, str, tuple, list, torch.dtype,
                                                                type(None))):
                digest.update(f"{key}={value!r}".encode())
    # every parameter and buffer, the non-persistent ones too (sin-cos tables are not in the state dict)
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def same_training(args: list[str], other: list[str]) -> bool:
    """Whether two runs' arguments train the same network on the same data the same way: every resolved setting
    equal but the model's name and the model keys one of them leaves unset (the entrypoint's default), and the same
    built module (:func:`module_fingerprint`)."""
    key_a, key_b = tuple(args), tuple(other)
    mine, theirs = _settings(key_a), _settings(key_b)
    if mine is None or theirs is None or set(mine) != set(theirs):
        return False
    for key in mine:
        if mine[key] != theirs[key] and not (key == "model.name" or (
                key.startswith("model.") and (mine[key] is None or theirs[key] is None))):
            return False
    if mine == theirs:
        return True
    digest = module_fingerprint(key_a)
    return digest is not None and digest == module_fingerprint(key_b)


def find_same_training(point: Point, out_root: Path) -> Optional[Path]:
    """A committed summary of another experiment at the same scale whose every stage is the same training as this
    point's (:func:`same_training`), or None. Summaries that were themselves reused are skipped: the original is
    found directly. A shared run is never reused: the points of its own experiment read its run directory."""
    if point.seed is None:
        return None
    for path in sorted(out_root.glob(f"*/{point.scale}/*.json")):
        if path.parent.parent.name == point.experiment:
            continue
        try:
            summary = json.loads(path.read_text())
            recorded = {name: stage["args"] for name, stage in summary["stages"].items()}
        except (ValueError, OSError, KeyError, TypeError, AttributeError):
            continue
        if summary.get("seed") != point.seed or summary.get("reused_from") or list(recorded) != list(point.args):
            continue
        if all(same_training(point.args[name], recorded[name]) for name in recorded):
            return path
    return None


def reuse_summary(point: Point, source: Path) -> dict[str, Any]:
    """Write ``point``'s summary from ``source``'s (the same training, run by another experiment): its results,
    cost and machine, under this point's name, values and arguments, with ``reused_from`` naming the original. The
    original's pictures are copied beside it. Returns the summary."""
    import shutil

    summary = json.loads(source.read_text())
    target = Path(point.summary_path)
    pictures = []
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for name in summary.get("pictures", []):
            picture = source.with_name(name)
            if picture.is_file():
                renamed = f"{target.stem}{name[len(source.stem):]}"
                shutil.copyfile(picture, target.with_name(renamed))
                pictures.append(renamed)
    except OSError as e:
        raise UserError(f"cannot write the reused summary of {point.name} into {target.parent} ({e.strerror}): make "
                        f"out= a writable folder, or pass reuse=false") from None
    summary.update(experiment=point.experiment, about=point.about, command=point.command, scale=point.scale,
                   point=point.name, arm=point.arm, seed=point.seed, values=point.values, pictures=pictures,
                   reused_from=f"{source.parent.parent.name}/{source.parent.name}/{source.stem}")
    for stage in point.stages:
        summary["stages"][stage.name]["args"] = stage.args
    write_json_atomic(target, summary)
    return summary


# ------------------------------------------------------------------------------------------------- a point's job
def run_point(point: Point, threads: Optional[int] = None) -> dict[str, Any]:
    """Train the point's stages in order (each resumes where it stopped) and write its summary; returns it.

    This is what a launcher runs, in its own process: a local subprocess or a SLURM task.
    """
    import torch

    from .engine import TrainingInterrupted, fit
    from .run import compose_for_resume

    if threads:
        torch.set_num_threads(threads)
    stages = {}
    for stage in point.stages:
        run_dir = Path(stage.run_dir)
        cfg = compose_for_resume(stage.args + stage.tracking)
        _start_attempt(run_dir)
        started = time.perf_counter()
        try:
            fit(cfg)
        except TrainingInterrupted:
            _add_wall(run_dir, time.perf_counter() - started)
            raise
        _add_wall(run_dir, time.perf_counter() - started)
        stages[stage.name] = summarise_run(run_dir, stage.args)
    last = stages[point.stages[-1].name]
    summary = {
        "experiment": point.experiment, "about": point.about, "command": point.command, "scale": point.scale, "point": point.name, "arm": point.arm,
        "seed": point.seed, "values": point.values,
        "metrics": last["metrics"], "best": last["best"], "tokens": last["tokens"], "params": last["params"],
        "total": {"wall_s": sum(s["wall_s"] for s in stages.values()),
                  "train_flops": sum(s["train_flops"] for s in stages.values()),
                  "train_images": sum(s["train_images"] for s in stages.values())},
        "stages": stages,
        "machine": {"host_cpus": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name()},
    }
    summary["pictures"] = _copy_pictures(Path(point.stages[-1].run_dir), Path(point.summary_path))
    write_json_atomic(Path(point.summary_path), summary)
    return summary


def _copy_pictures(run_dir: Path, summary_path: Path) -> list[str]:
    """The final run's pictures (DiT samples, MAE reconstructions: a few KB each at these sizes) beside the summary,
    as ``<point>-<name>.png``, so the report shows them without the run directory."""
    import shutil

    copied = []
    summary_path.parent.mkdir(parents=True, exist_ok=True)  # the summary itself is written after its pictures
    for picture in sorted(run_dir.glob("*.png")):
        target = summary_path.with_name(f"{summary_path.stem}-{picture.name}")
        shutil.copyfile(picture, target)
        copied.append(target.name)
    return copied


def _read_wall(path: Path) -> dict[str, Any]:
    try:
        recorded = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, OSError):
        recorded = {}
    if not isinstance(recorded, dict) or not isinstance(recorded.get("seconds", 0.0), (int, float)):
        recorded = {}
    return recorded


def _last_sign_of_life(run_dir: Path, since: float) -> float:
    """When an attempt that began at ``since`` (epoch seconds) last wrote to its run directory: its metrics, its
    checkpoints, its pictures. An attempt killed without a word (SIGKILL, an out-of-memory kill, a node lost) worked
    at least until then."""
    latest = since
    for path in [run_dir / "metrics.jsonl", *run_dir.glob("checkpoints/*.ckpt*"), *run_dir.glob("*.png")]:
        try:
            latest = max(latest, path.stat().st_mtime)
        except OSError:
            continue
    return latest


def _start_attempt(run_dir: Path) -> None:
    """Record that an attempt of the run starts now. An earlier attempt that recorded a start but never its end
    was killed: its time, up to its last write to the run directory, is added to the run's wall time first."""
    path = run_dir / "wall_time.json"
    recorded = _read_wall(path)
    seconds = float(recorded.get("seconds", 0.0))
    began = recorded.get("attempt_started")
    if isinstance(began, (int, float)):
        seconds += max(0.0, _last_sign_of_life(run_dir, began) - began)
    try:  # the run directory may not exist yet: the first attempt's start is recorded too
        write_json_atomic(path, {"seconds": seconds, "attempt_started": time.time()})
    except OSError:
        pass  # an unwritable run.dir: training says so, naming it


def _add_wall(run_dir: Path, seconds: float) -> None:
    """Wall time over the attempts of a run (kept in the run directory, so a resumed run adds to it); this
    attempt ended, so its start is cleared (:func:`_start_attempt` counts attempts that were killed)."""
    path = run_dir / "wall_time.json"
    total = float(_read_wall(path).get("seconds", 0.0))
    if run_dir.is_dir():
        write_json_atomic(path, {"seconds": total + seconds})


def summarise_run(run_dir: Path, args: list[str]) -> dict[str, Any]:
    """A finished run's facts for the report, from its ``config.yaml``, ``eval.json`` and ``metrics.jsonl``."""
    config_file = run_dir / "config.yaml"
    try:
        if config_file.exists():
            cfg = OmegaConf.load(config_file)
        else:  # deleted (see below): the config the run saved in its checkpoint, taken literally
            from .config import compose_saved
            from .run import peek_checkpoint
            cfg = compose_saved(peek_checkpoint(run_dir / "checkpoints" / "last.ckpt").get("config"), [])
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - YAML errors, unsafe tags, bad bytes: named with the file
        raise UserError(f"cannot read {config_file} ({' '.join(str(e).split())[:200]}): the run writes plain YAML "
                        f"there; delete the file and run the sweep again (the run's config is then read from its "
                        f"checkpoint)") from None
    try:
        report = json.loads((run_dir / "eval.json").read_text(errors="replace"))
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {run_dir / 'eval.json'} ({e}): delete it and run the sweep again (the point's "
                        f"final evaluation runs again)") from None
    if not isinstance(report, dict) or "metrics" not in report or "step" not in report:
        raise UserError(f"{run_dir / 'eval.json'} is not a run report (no 'metrics' and 'step'): delete it and run the "
                        f"sweep again (the point's final evaluation runs again)")
    curve, speeds, train_curve = [], [], []
    for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "train/images_per_sec" in record:
            speeds.append(record["train/images_per_sec"])
        if "train/loss" in record:
            train_curve.append([record.get("step"), record["train/loss"]])
        elif any(k.startswith("test/") for k in record):
            curve.append({k: v for k, v in record.items() if k == "step" or k.startswith("test/")})
    trainer = cfg.trainer
    flops, params, tokens, step_flops = training_cost(run_dir, report["step"])
    images = report["step"] * cfg.data.batch_size * trainer.accumulate_grad_batches * trainer.devices * \
        trainer.num_nodes
    wall = run_dir / "wall_time.json"
    return {
        "args": args, "run_dir": str(run_dir), "task": cfg.task.name, "model": cfg.model.name,
        "metrics": report["metrics"], "best": report.get("best", {}), "steps": report["step"],
        "epochs": report["epoch"], "train_images": images,
        "final_train_loss": train_curve[-1][1] if train_curve else None,
        # at most ~100 (step, loss) pairs: enough for a curve, small enough to commit
        "train_loss": train_curve[:: max(1, len(train_curve) // 100)],
        "images_per_sec": sum(speeds) / len(speeds) if speeds else None,
        "wall_s": float(_read_wall(wall)["seconds"]) if "seconds" in _read_wall(wall) else None,
        "tokens": tokens, "params": params, "flops_per_image": flops, "train_flops": step_flops * images,
        "precision": cfg.trainer.precision, "curve": curve,
    }


def training_cost(run_dir: Path, steps: int = 0) -> tuple[float, int, int, float]:
    """(training FLOPs per image of a full step, trainable parameters, tokens per image, training FLOPs per image
    averaged over the run's ``steps`` under its recipe) of the run's task module.

    FLOPs are counted by ``torch.utils.flop_counter`` over one forward and backward pass of two random images (so
    MAE's masking and DiT's conditioning count as they run); evaluation is not included. Under a token-budget recipe
    each distinct plan of its steps (token drop, rounded to 0.02 on a linear schedule; image side) is counted once and
    weighted by its number of steps: the plain step's figure alone would count a budget run's dropped tokens.
    """
    from collections import Counter

    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from .recipe import TokenBudget, levers_in_use, token_drop_target
    from .saved import load_run
    from .trainer import describe_module

    cfg, info, _, module = load_run(run_dir)
    module.train()  # training FLOPs: dropout, drop path and label dropout as in training
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    tokens = describe_module(module).get("patches", 0)  # 0: no transformer (the vae task)
    batch = (torch.randn(2, info.in_chans, info.img_size, info.img_size),
             torch.randint(0, max(info.num_classes, 1), (2,)))

    def per_image(images: torch.Tensor) -> float:
        counter = FlopCounterMode(display=False)
        with counter:
            loss = module((images, batch[1]))["loss"]
            loss.backward()
        module.zero_grad(set_to_none=True)
        return counter.get_total_flops() / 2

    full = per_image(batch[0])
    if steps <= 0 or not levers_in_use(cfg.recipe):
        return full, params, tokens, full
    budget = TokenBudget(cfg.recipe, steps, info.img_size, module.backbone.patch_embed.patch_size)
    linear = cfg.recipe.token_drop_schedule == "linear"  # a rate per step: counted in buckets of 0.02
    plans = Counter((round(p.token_drop / 0.02) * 0.02 if linear else p.token_drop, p.img_size)
                    for p in map(budget.plan, range(steps)))
    total = 0.0
    for (drop, side), count in plans.items():
        if cfg.recipe.token_drop > 0:
            token_drop_target(module).set_token_drop(drop)
        if budget.low_img_size is not None:
            module.backbone.set_train_size(side)
        images = batch[0] if side is None else F.interpolate(batch[0], size=(side, side), mode="bilinear")
        total += count * per_image(images)
    return full, params, tokens, total / steps
