"""What a pixel token costs: time per image and peak memory of the global, local and hourglass pixel transformers of
the same width and depth, at 784, 4,096 and 16,384 tokens (28, 64 and 128 pixels square).

Run from the repository root::

    nice -n 10 python benchmarks/token_cost.py --out docs/results/token_cost          # CPU, one thread: ~15 min
    python benchmarks/token_cost.py --size tiny --tokens 784,4096 --precision fp32     # a bigger model, fewer points
    python benchmarks/token_cost.py --device cuda --size tiny --out DIR                # a GPU

Each point (model, tokens, precision) runs in a fresh process, so its peak memory is its own: the process's peak
resident memory on CPU (Python and torch included; ``baseline_mib`` is the same process before the model is built),
``torch.cuda.max_memory_allocated`` on a GPU. Times are medians over ``--repeats`` after one warm-up: ``forward`` in
eval mode without gradients, ``train`` a whole step (forward, cross-entropy, backward, AdamW). bf16 is autocast.
FLOPs are the forward's, counted on the meta device (``describe_backbone(flops=True)``).

Printed as a table and written to ``DIR/token_cost.json``: a list of rows with ``model``, ``tokens``,
``precision``, ``train_ms_per_image``, ``forward_ms_per_image``, ``peak_mem_mib``, ``gflops``, ``batch``, plus the
machine. A point whose single warm-up step exceeds ``--max-step-s`` is timed on that one step (``repeats: 1``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = {784: 28, 1024: 32, 4096: 64, 16384: 128}


def measure(model_name: str, tokens: int, precision: str, batch: int, repeats: int, max_step_s: float,
            device: str) -> dict:
    """One point, in this process."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from pixelformer.models import create_backbone, describe_backbone

    side = SIDES[tokens]
    dev = torch.device(device)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    model = create_backbone(model_name, img_size=side, in_chans=1, num_classes=10).to(dev)
    info = describe_backbone(model_name, img_size=side, in_chans=1, num_classes=10, flops=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 1, side, side, device=dev)
    labels = torch.randint(0, 10, (batch,), device=dev)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step() -> None:
        with torch.autocast(dev.type, dtype=dtype, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward() -> None:
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=precision == "bf16"):
            model(images)

    def timed(fn, train: bool) -> tuple[float, int]:
        model.train(train)
        start = time.perf_counter()
        fn()  # warm-up (a compiled kernel compiles here)
        sync()
        first = time.perf_counter() - start
        if first > max_step_s:
            return first * 1e3, 1
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3, repeats

    train_ms, train_reps = timed(train_step, True)
    forward_ms, _ = timed(forward, False)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(model=model_name, tokens=tokens, precision=precision, batch=batch,
                train_ms_per_image=train_ms / batch, forward_ms_per_image=forward_ms / batch, repeats=train_reps,
                peak_mem_mib=round(peak, 1), baseline_mib=round(baseline, 1), gflops=round(info["gflops"], 3),
                params=info["num_params"], levels=info["levels"])


def batch_for(tokens: int) -> int:
    """Images per step: enough to amortise per-call overheads at 784 tokens, one image at 16,384."""
    return max(1, 8 * 784 // tokens)


def section(rows: list[dict], machine: dict, args) -> str:
    """The results report's section (``DIR/section.md``; ``tools/report.py`` includes it when DIR is under
    docs/results)."""
    where = machine.get("cpu_model") or machine.get("device")
    lines = ["## What a pixel token costs: global, local and hourglass attention", "",
             f"Random images at 28, 64 and 128 pixels square (784, 4,096 and 16,384 pixel tokens), one "
             f"{args.device} process per point, {args.threads} thread(s) ({where}). Train = one whole step (forward, "
             "cross-entropy, backward, AdamW), median of the repeats; peak = the process's peak resident memory.", "",
             f"Command: `python benchmarks/token_cost.py --size {args.size} --out docs/results/token_cost`.", "",
             "| model | tokens | precision | batch | train ms / image | forward ms / image | peak MiB | GFLOPs |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tokens']:,} | {r['precision']} | | failed: {r['error'][:80]} | | | |")
        else:
            lines.append(f"| {r['model']} | {r['tokens']:,} | {r['precision']} | {r['batch']} | "
                         f"{r['train_ms_per_image']:.1f} | {r['forward_ms_per_image']:.1f} | {r['peak_mem_mib']:.0f} | "
                         f"{r['gflops']:.2f} |")
    lines += ["", "Growth of the training time per image from the fewest to the most tokens:", ""]
    for precision in sorted({r["precision"] for r in rows}):
        for name in sorted({r["model"] for r in rows}):
            mine = {r["tokens"]: r for r in rows if r["model"] == name and r["precision"] == precision
                    and "error" not in r}
            if len(mine) >= 2:
                lo, hi = min(mine), max(mine)
                lines.append(f"- {name}, {precision}: {hi:,} vs {lo:,} tokens: "
                             f"{mine[hi]['train_ms_per_image'] / mine[lo]['train_ms_per_image']:.1f}x")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="mini", help="registered size of the three families (mini, tiny, ...)")
    parser.add_argument("--models", default=None, help="comma-separated backbones (default: pit, pit_local, "
                                                        "pit_hourglass at --size)")
    parser.add_argument("--tokens", default="784,4096,16384", help=f"comma-separated, from {sorted(SIDES)}")
    parser.add_argument("--precision", default="fp32,bf16", help="fp32, bf16 or both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-step-s", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="folder for token_cost.json")
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)  # model,tokens,precision,batch (child)
    args = parser.parse_args()
    if args.point:
        import torch

        torch.set_num_threads(args.threads)
        name, tokens, precision, batch = args.point.split(",")
        print(json.dumps(measure(name, int(tokens), precision, int(batch), args.repeats, args.max_step_s,
                                 args.device)))
        return
    models = (args.models.split(",") if args.models else
              [f"pit_{args.size}", f"pit_local_{args.size}", f"pit_hourglass_{args.size}"])
    tokens = [int(t) for t in args.tokens.split(",")]
    bad = [t for t in tokens if t not in SIDES]
    if bad:
        parser.error(f"--tokens {bad}: choose from {sorted(SIDES)}")
    precisions = args.precision.split(",")
    out = Path(args.out) if args.out else None
    # points measured before in DIR stay unless measured again now (re-run one model or precision into the same DIR)
    again = {(m, t, p) for m in models for t in tokens for p in precisions}
    rows = [] if out is None or not (out / "token_cost.json").exists() else [
        r for r in json.loads((out / "token_cost.json").read_text())
        if (r["model"], r["tokens"], r["precision"]) not in again]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"{'model':<22}{'tokens':>7}{'prec':>6}{'batch':>6}{'train ms/img':>14}{'fwd ms/img':>12}"
          f"{'peak MiB':>10}{'GFLOPs':>9}", flush=True)
    for precision in precisions:
        for t in tokens:
            for name in models:
                point = f"{name},{t},{precision},{batch_for(t)}"
                done = subprocess.run([sys.executable, __file__, "--point", point, "--repeats", str(args.repeats),
                                       "--max-step-s", str(args.max_step_s), "--threads", str(args.threads),
                                       "--device", args.device], capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    row = dict(model=name, tokens=t, precision=precision, error=done.stderr.strip().splitlines()[-1])
                    print(f"{name:<22}{t:>7}{precision:>6}  failed: {row['error']}", flush=True)
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    print(f"{name:<22}{t:>7}{precision:>6}{row['batch']:>6}{row['train_ms_per_image']:>14.1f}"
                          f"{row['forward_ms_per_image']:>12.1f}{row['peak_mem_mib']:>10.0f}{row['gflops']:>9.2f}",
                          flush=True)
                rows.append(row)
                if out is not None:  # after every point: a long run keeps what it measured
                    out.mkdir(parents=True, exist_ok=True)
                    (out / "token_cost.json").write_text(json.dumps(rows, indent=1) + "\n")
    # growth from the fewest to the most tokens, per model and precision
    print("\ntime per training image, most tokens / fewest tokens:")
    for precision in sorted({r["precision"] for r in rows}):
        for name in sorted({r["model"] for r in rows}):
            mine = {r["tokens"]: r for r in rows if r["model"] == name and r["precision"] == precision
                    and "error" not in r}
            if len(mine) >= 2:
                lo, hi = min(mine), max(mine)
                print(f"  {name:<22}{precision:>6}: {hi} vs {lo} tokens: "
                      f"{mine[hi]['train_ms_per_image'] / mine[lo]['train_ms_per_image']:.1f}x")
    if out is not None:
        machine = dict(cpu=platform.processor() or platform.machine(), threads=args.threads, device=args.device,
                       python=platform.python_version())
        try:
            import torch

            machine["torch"] = torch.__version__
            if args.device == "cpu":
                from pixelformer.runtime import cpu_name

                machine["cpu_model"] = cpu_name()
        except (ImportError, OSError):
            pass
        (out / "machine.json").write_text(json.dumps(machine, indent=1) + "\n")
        rows.sort(key=lambda r: (r["precision"] != "fp32", r["precision"], r["tokens"], r["model"]))
        (out / "token_cost.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "section.md").write_text(section(rows, machine, args))
        print(f"wrote {out / 'token_cost.json'}")


if __name__ == "__main__":
    main()
