"""The throughput benchmark's core runs on a tiny model and counts FLOPs as documented (no timing thresholds)."""
import importlib.util
import math
import sys
from pathlib import Path

import torch

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
