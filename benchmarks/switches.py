#!/usr/bin/env python
"""What each trainer switch does to a training step of our model: speed and peak memory, one fresh process each.

Run from the repository root::

    python benchmarks/switches.py            # PiT-Mini on digits-sized input + PiT-Tiny at 256 / 1,024 tokens
    python benchmarks/switches.py --quick    # PiT-Mini 8 px and PiT-Tiny 16 px, one process per switch (~2 min on 2 idle cores)

Switches (the trainer config key in brackets), each against the baseline = the trainer's CPU defaults (fp32,
eager, fused AdamW, tuned CPU allocator):

* ``allocator=system``     glibc malloc left at its defaults  [``trainer.cpu_allocator=system``]
* ``adamw=for-loop``       torch's default AdamW on CPU        [``optim.fused=false``]
* ``adamw=foreach``        torch's default AdamW on CUDA
* ``compile``              ``torch.compile`` of the model      [``trainer.compile=true``]
* ``grad-checkpointing``   recompute each block in backward    [``trainer.grad_checkpointing=true``]
* ``bf16-mixed``           autocast to bfloat16                [``trainer.precision=bf16-mixed``]
* ``bf16-mixed+compile``

Every variant runs in its own Python process, because two of them are process-wide (the malloc settings, and
``torch.compile``'s caches), and processes alternate round-robin over ``--repeats`` rounds so that drift in machine
load is shared. ``first step s`` includes compilation; ``img/s`` is batch / median step after warm-up; ``vs base``
is the ratio of the variant's img/s to the baseline's; memory is the tensor high-water mark of one step (parameters,
AdamW moments and batch included), measured as in ``throughput.py``. Results go to ``--out`` as JSON and CSV.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Switches:
    """One variant of the training step."""

    name: str
    precision: str = "fp32"
    adamw: str = "fused"
    compile: bool = False
    grad_checkpointing: bool = False
    allocator: str = "tuned"


VARIANTS: tuple[Switches, ...] = (
    Switches("baseline"),
    Switches("allocator=system", allocator="system"),
    Switches("adamw=for-loop", adamw="for-loop"),
    Switches("adamw=foreach", adamw="foreach"),
    Switches("compile", compile=True),
    Switches("grad-checkpointing", grad_checkpointing=True),
    Switches("bf16-mixed", precision="bf16-mixed"),
    Switches("bf16-mixed+compile", precision="bf16-mixed", compile=True),
)


@dataclass(frozen=True)
class Shape:
    """A model and input: ``pit_mini`` at 8 px with 1 channel and 10 classes is what ``make train`` runs."""

    model: str
    img: int
    batch: int
    in_chans: int = 3
    num_classes: int = 100


SHAPES = {
    "cpu": (Shape("pit_mini", 8, 64, 1, 10), Shape("pit_tiny", 16, 8), Shape("pit_tiny", 32, 2)),
    "cpu-quick": (Shape("pit_mini", 8, 64, 1, 10), Shape("pit_tiny", 16, 8)),
    "cuda": (Shape("pit_tiny", 32, 256), Shape("pit_small", 32, 128)),
}


# ---------------------------------------------------------------------------------------------------- worker
def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one (shape, switches) in this process; called in a fresh child by :func:`measure`."""
    switches, shape = Switches(**spec["switches"]), Shape(**spec["shape"])
    if switches.allocator == "system":
        os.environ["PIXELFORMER_CPU_ALLOCATOR"] = "system"
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.throughput import TrainStep, synchronize, transient_peak_bytes
    from pixelformer import create_backbone
    from pixelformer.runtime import tune_cpu_allocator

    device = torch.device(spec["device"])
    tuned = device.type == "cpu" and tune_cpu_allocator()
    torch.manual_seed(0)
    model = create_backbone(shape.model, img_size=shape.img, in_chans=shape.in_chans,
                            num_classes=shape.num_classes).to(device).train()
    model.set_grad_checkpointing(switches.grad_checkpointing)
    net = torch.compile(model) if switches.compile else model
    step = TrainStep(net, shape.batch, shape.img, switches.precision, device, adamw=switches.adamw,
                     in_chans=shape.in_chans, num_classes=shape.num_classes)

    def timed() -> float:
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        return time.perf_counter() - start

    first = timed()
    for _ in range(max(spec["warmup"] - 2, 0)):
        step()
    peak = step.static_bytes() + transient_peak_bytes(step, device) if spec["memory"] else float("nan")
    times = [timed() for _ in range(spec["iters"])]
    return {"first_step_s": first, "step_times": times, "peak_bytes": peak, "allocator_tuned": tuned}


def measure(shape: Shape, switches: Switches, device: str, warmup: int, iters: int, memory: bool) -> dict[str, Any]:
    spec = {"shape": asdict(shape), "switches": asdict(switches), "device": device, "warmup": warmup,
            "iters": iters, "memory": memory}
    env = {k: v for k, v in os.environ.items() if k != "PIXELFORMER_CPU_ALLOCATOR"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------ main
def summarise(shape: Shape, switches: Switches, runs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": shape.model, "img": shape.img, "tokens": shape.img ** 2, "batch": shape.batch,
                           "switch": switches.name, **{k: v for k, v in asdict(switches).items() if k != "name"}}
    good = [r for r in runs if "error" not in r]
    if not good:
        return {**row, "img_s": float("nan"), "first_step_s": float("nan"), "peak_mib": float("nan"),
                "spread": float("nan"), "error": runs[0]["error"]}
    medians = [statistics.median(r["step_times"]) for r in good]
    every = [t for r in good for t in r["step_times"]]
    return {**row, "img_s": shape.batch / statistics.median(medians),
            "first_step_s": statistics.median(r["first_step_s"] for r in good),
            "peak_mib": statistics.median(r["peak_bytes"] for r in good) / 2 ** 20,
            "spread": max(every) / min(every), "error": "", "step_times": every}


COLUMNS = [("model", "model", "{}"), ("tokens", "tokens", "{}"), ("batch", "batch", "{}"),
           ("switch", "switch", "{}"), ("img_s", "img/s", "{:.2f}"), ("vs_base", "vs base", "{:.3f}"),
           ("first_step_s", "first step s", "{:.1f}"), ("peak_mib", "peak MiB", "{:.0f}"),
           ("spread", "spread", "{:.2f}"), ("error", "error", "{}")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two shapes, one round, 5 timed steps")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=int, default=None, help="rounds of processes per variant (default 2, quick 1)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps, the first includes compilation")
    p.add_argument("--iters", type=int, default=None, help="timed steps per process (default 8, quick 5)")
    p.add_argument("--switches", nargs="*", default=None, help="only these variants (baseline is always run)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    import torch

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    shapes = SHAPES["cpu-quick" if args.quick and device == "cpu" else device]
    variants = [v for v in VARIANTS if v.name == "baseline" or args.switches is None or v.name in args.switches]
    if device == "cuda":
        variants = [v for v in variants if v.allocator == "tuned"]  # malloc settings only matter for CPU tensors
    repeats = args.repeats or (1 if args.quick else 2)
    iters = args.iters or (5 if args.quick else 8)
    started = time.perf_counter()
    print(f"# {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {len(shapes)} shapes x {len(variants)} variants x "
          f"{repeats} rounds, {iters} timed steps each", flush=True)
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
        for round_ in range(repeats):
            order = variants if round_ % 2 == 0 else variants[::-1]
            for switches in order:
                result = measure(shape, switches, device, args.warmup, iters, not args.no_memory)
                runs[switches.name].append(result)
                took = ("error: " + result["error"]) if "error" in result else \
                    f"{shape.batch / statistics.median(result['step_times']):.2f} img/s"
                print(f"# {shape.model} {shape.img}px batch {shape.batch} {switches.name}: {took}", flush=True)
        shape_rows = [summarise(shape, v, runs[v.name]) for v in variants]
        base = shape_rows[0]["img_s"]
        for row in shape_rows:
            row["vs_base"] = row["img_s"] / base
        rows += shape_rows

    sys.path.insert(0, str(ROOT))
    from benchmarks.throughput import format_table, write_csv

    print()
    print(format_table(rows, COLUMNS))
    print(f"\n# {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "switches_quick" if args.quick else "switches"
    meta = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats,
            "iters": iters, "warmup": args.warmup, "seconds": time.perf_counter() - started}
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    write_csv(args.out / f"{stem}.csv", rows)
    print(f"# wrote {args.out / stem}.json / .csv")
    return rows


if __name__ == "__main__":
    _args = parse_args(None)
    if _args.worker:
        print(json.dumps(run_worker(json.loads(_args.worker))))
    else:
        main()
