"""Training throughput and model FLOP utilisation (MFU) of pixelformer's PiT backbone against timm's ViT.

Run from the repository root (``benchmarks/gpu_check.sh`` runs it on the GPU machine)::

    python benchmarks/gpu_mfu.py                                  # CUDA: pit_tiny + pit_small at 784/1,024/4,096 tokens
    python benchmarks/gpu_mfu.py --device cpu --tokens 64 --steps 2 --batch 2    # seconds, anywhere

For each backbone and token count (image side = sqrt(tokens), patch size 1, 3 channels, 100 classes) it builds
pixelformer's model (``create_backbone``) and timm's ``VisionTransformer`` of the same shape holding the same weights
(``benchmarks/throughput.py``'s ``build_models``), and times a training step (forward + cross-entropy under bf16
autocast, backward, fused AdamW) of each at the same batch, steps interleaved ABBA, after warm-up, with the device
synchronised around every timed step. img/s = batch / median step time.

FLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of a 2-image batch of the
model itself ("counted": matmuls, convolutions and the SDPA attention kernels, forward and backward as executed; not
the recomputation inside flash attention's backward). Alongside, the analytic count of ``throughput.py``: 3 x forward
matmul FLOPs = 6 x (matmul parameters) x tokens + 12 x depth x tokens^2 x width for attention. The CPU SDPA kernel is
not registered with the counter, so where the count saw no attention op (CPU) the analytic figure is used; the
``flops_source`` column says which. MFU = img/s x FLOPs per image / peak, the peak being the datasheet's dense bf16
figure for known GPUs (H200/H100 SXM: 989 TFLOP/s), else ``--peak-tflops``, else the bf16 matmul throughput measured
at the start of the run (``peak_source`` in the JSON). ``frac_matmul_peak`` is against that measured matmul peak.

Writes ``--out`` (JSON: ``meta`` and one row per model and token count, rewritten after every row so a killed run
keeps what it measured). Exit status 1 if any row failed (its ``error`` says why), 3 if torch, timm or pixelformer
do not import, 0 otherwise.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # pixelformer and benchmarks/ from a checkout, installed or not

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.throughput import (
        IN_CHANS, NUM_CLASSES, BenchConfig, TrainStep, build_models, forward_flops, matmul_peak, time_interleaved,
    )
except ImportError as _missing:  # say what is missing in one line (gpu_check.sh reports it), exit 3
    print(f"error: gpu_mfu.py needs torch, timm and this checkout's pixelformer/ and benchmarks/: {_missing!r}",
          file=sys.stderr)
    sys.exit(3)

PRECISION = "bf16-mixed"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check" / "mfu.json"
# Dense bf16 tensor-core peaks from the datasheets (no sparsity), matched against torch.cuda.get_device_name in
# order (most specific first).
DATASHEET_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200 NVL", 835.0), ("H200", 989.4), ("GH200", 989.4), ("H100 NVL", 835.0), ("H100 PCIE", 756.0),
    ("H100", 989.4), ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0),
]
# Training FLOPs per step the automatic batch aims at (power of two at most this), and its clamp.
STEP_FLOP_TARGET = {"cuda": 32e12, "cpu": 4e9}
BATCH_RANGE = {"cuda": (4, 1024), "cpu": (1, 64)}
ROW_KEYS = ("model", "impl", "backbone", "tokens", "img", "batch", "depth", "embed_dim", "num_heads", "params",
            "img_s", "step_ms", "train_gflop_per_img", "train_gflop_per_img_counted",
            "train_gflop_per_img_analytic", "flops_source", "tflop_s", "mfu", "mfu_analytic", "frac_matmul_peak",
            "ratio_vs_timm", "error")


def datasheet_peak(device_name: str) -> Optional[float]:
    """Dense bf16 FLOP/s of a known GPU, or None."""
    upper = device_name.upper()
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in upper:
            return tflops * 1e12
    return None


def counted_train_flops(model: nn.Module, img: int, device: torch.device, batch: int = 2) -> tuple[float, bool]:
    """(FLOPs per image of one bf16-autocast forward + cross-entropy + backward, whether any attention op was seen)."""
    x = torch.randn(batch, IN_CHANS, img, img, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    ops = counter.get_flop_counts().get("Global", {})
    attention_seen = any("attention" in str(op) for op in ops)
    return counter.get_total_flops() / batch, attention_seen


def pick_batch(train_flops_per_image: float, device: torch.device) -> int:
    """Largest power of two whose step costs at most the device's FLOP target, clamped to its range."""
    low, high = BATCH_RANGE[device.type]
    batch = 2 ** max(0, int(math.floor(math.log2(max(STEP_FLOP_TARGET[device.type] / train_flops_per_image, 1)))))
    return max(low, min(high, batch))


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_pair(backbone: str, tokens: int, device: torch.device, args: argparse.Namespace,
                 peak: float, matmul_bf16: float) -> list[dict[str, Any]]:
    """The two rows (pixelformer, timm) of one backbone at one token count."""
    img = math.isqrt(tokens)
    if img * img != tokens:
        raise ValueError(f"--tokens {tokens} is not a square number of pixels")
    cfg = BenchConfig(backbone, img=img, patch=1, precision=PRECISION, depth=args.depth, embed_dim=args.embed_dim,
                      num_heads=args.heads)
    ours, ref, shared = build_models(cfg, device)
    models = {"pixelformer": ours, "timm": ref}
    depth, width = len(ours.blocks), ours.embed_dim
    mlp_ratio = ours.blocks[0].mlp.fc1.out_features / width
    analytic = 3 * forward_flops(img, 1, IN_CHANS, width, depth, NUM_CLASSES, mlp_ratio=mlp_ratio, class_token=True)
    counted: dict[str, tuple[float, bool]] = {name: counted_train_flops(m, img, device) for name, m in models.items()}

    batch = args.batch or pick_batch(analytic, device)
    while True:  # halve the batch (both models) until a step of each fits in memory
        try:
            steps = {name: TrainStep(m, batch, img, PRECISION, device) for name, m in models.items()}
            times = time_interleaved(steps, max(args.warmup, 1), args.steps, device)
            break
        except RuntimeError as e:
            if not is_oom(e) or batch <= 1:
                raise
            steps = {}
            free_memory(device)
            print(f"#   out of memory at batch {batch}; retrying at {batch // 2}", flush=True)
            batch //= 2

    rows: list[dict[str, Any]] = []
    for name, model in models.items():
        step_s = statistics.median(times[name])
        img_s = batch / step_s
        flops_counted, attention_seen = counted[name]
        flops = flops_counted if attention_seen else float(analytic)
        rows.append({
            "model": f"{name}:{backbone}" if name == "pixelformer" else f"timm:VisionTransformer({backbone} shape)",
            "impl": name, "backbone": backbone, "tokens": tokens, "img": img, "batch": batch, "depth": depth,
            "embed_dim": width, "num_heads": ours.blocks[0].attn.num_heads,
            "params": sum(p.numel() for p in model.parameters()),
            "img_s": img_s, "step_ms": 1e3 * step_s, "step_ms_all": [1e3 * t for t in times[name]],
            "train_gflop_per_img": flops / 1e9, "train_gflop_per_img_counted": flops_counted / 1e9,
            "train_gflop_per_img_analytic": analytic / 1e9,
            "flops_source": "FlopCounterMode" if attention_seen else "analytic (counter saw no attention op)",
            "tflop_s": img_s * flops / 1e12, "mfu": img_s * flops / peak, "mfu_analytic": img_s * analytic / peak,
            "frac_matmul_peak": img_s * flops / matmul_bf16, "weights_shared": shared, "error": None,
        })
    for row in rows:
        row["ratio_vs_timm"] = row["img_s"] / rows[1]["img_s"]
    del steps, models, ours, ref
    free_memory(device)
    return rows


def error_rows(backbone: str, tokens: int, error: BaseException) -> list[dict[str, Any]]:
    message = f"{type(error).__name__}: {error}".strip()[-600:]
    return [{**{k: None for k in ROW_KEYS}, "model": f"{impl}:{backbone}", "impl": impl, "backbone": backbone,
             "tokens": tokens, "error": message} for impl in ("pixelformer", "timm")]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width table: model, tokens, batch, img/s, TFLOP/s, MFU (counted and analytic), ours/timm."""
    header = ["model", "tokens", "batch", "img/s", "TFLOP/s", "MFU", "MFU(analytic)", "vs timm", "FLOPs from"]
    cells = [header]
    for r in rows:
        if r["error"]:
            cells.append([r["model"], str(r["tokens"]), "-", "ERROR", "-", "-", "-", "-", r["error"][:60]])
            continue
        cells.append([r["model"], str(r["tokens"]), str(r["batch"]), f"{r['img_s']:.1f}", f"{r['tflop_s']:.2f}",
                      f"{100 * r['mfu']:.1f}%", f"{100 * r['mfu_analytic']:.1f}%", f"{r['ratio_vs_timm']:.3f}",
                      "counter" if r["flops_source"] == "FlopCounterMode" else "analytic"])
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    import timm

    meta: dict[str, Any] = {"device": device.type, "torch": torch.__version__, "timm": timm.__version__,
                            "python": platform.python_version(), "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(device_name=props.name, device_count=torch.cuda.device_count(),
                    device_memory_gib=props.total_memory / 2 ** 30, capability=f"{props.major}.{props.minor}")
    else:
        meta.update(device_name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return meta


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--models", nargs="+", default=["pit_tiny", "pit_small"], help="registered backbone names")
    p.add_argument("--tokens", nargs="+", type=int, default=[784, 1024, 4096],
                   help="pixel tokens per image (square numbers: 784 = 28x28)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per model and row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before timing")
    p.add_argument("--batch", type=int, default=None,
                   help="one batch for every row (default: the largest power of two whose step costs <= 32 TFLOP "
                        "on CUDA, 4 GFLOP on CPU; halved on out-of-memory)")
    p.add_argument("--depth", type=int, default=None, help="override the backbone's depth (tests)")
    p.add_argument("--embed-dim", type=int, default=None, help="override the backbone's width (tests)")
    p.add_argument("--heads", type=int, default=None, help="override the backbone's heads (tests)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak for MFU (default: datasheet for known GPUs, else the measured matmul peak)")
    p.add_argument("--matmul-size", type=int, default=None, help="side of the bf16 matmul timed for the measured "
                   "peak (default 8192 on CUDA, 2048 on CPU)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file (default {DEFAULT_OUT})")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    started = time.perf_counter()
    meta = environment(device)
    matmul_bf16 = matmul_peak(torch.bfloat16, device, size=args.matmul_size)
    peak, source = args.peak_tflops and args.peak_tflops * 1e12, "--peak-tflops"
    if not peak and device.type == "cuda":
        peak, source = datasheet_peak(meta["device_name"]), f"datasheet dense bf16 ({meta['device_name']})"
    if not peak:
        peak, source = matmul_bf16, "measured bf16 matmul (no datasheet figure for this device)"
    meta.update(precision=PRECISION, peak_tflops=peak / 1e12, peak_source=source,
                matmul_bf16_tflops=matmul_bf16 / 1e12, warmup=args.warmup, steps=args.steps,
                adamw="fused", optimizer_in_step=True, batch_rule="--batch" if args.batch else "FLOP target")
    print(f"# {meta['device_name']} ({device.type}), torch {meta['torch']} (CUDA {meta['cuda']}), timm {meta['timm']}")
    print(f"# MFU peak {peak / 1e12:.4g} TFLOP/s: {source}; measured bf16 matmul {matmul_bf16 / 1e12:.4g} TFLOP/s",
          flush=True)

    rows: list[dict[str, Any]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for backbone in args.models:
        for tokens in args.tokens:
            t0 = time.perf_counter()
            try:
                pair = measure_pair(backbone, tokens, device, args, peak, matmul_bf16)
                print(f"# {backbone} {tokens} tokens batch {pair[0]['batch']}: pixelformer {pair[0]['img_s']:.1f} "
                      f"img/s, timm {pair[1]['img_s']:.1f} img/s, MFU {100 * pair[0]['mfu']:.1f}% "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            except Exception as e:  # one failing row must not lose the others
                traceback.print_exc()
                pair = error_rows(backbone, tokens, e)
                print(f"# {backbone} {tokens} tokens: FAILED: {pair[0]['error'][:300]}", flush=True)
                free_memory(device)
            rows += pair
            meta["seconds"] = time.perf_counter() - started
            args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    print()
    print(format_table(rows))
    print(f"# {meta['seconds']:.0f} s; wrote {args.out}")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
