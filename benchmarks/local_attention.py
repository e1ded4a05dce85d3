"""Neighbourhood attention at pixel-token lengths: full SDPA, masked SDPA and FlexAttention, raster vs tiled order.

Run from the repository root::

    nice -n 10 python benchmarks/local_attention.py                 # CPU, one thread: ~3 min
    python benchmarks/local_attention.py --device cuda --out DIR    # a GPU; JSON into DIR/local_attention.json

One image (batch 1), 3 heads x 64, 7 x 7 NAT neighbourhood (``pixelformer.layers.local_attention``), fp32. Times are
the attention op alone (q, k, v -> output), median ms over the timed repeats after a warm-up (compiled flex's compile
is in the warm-up). "fwd+bwd" is forward plus backward to q, k, v; FlexAttention has no CPU backward in torch 2.14,
so on CPU flex rows give forward only. Skipped (and said so) rather than run: anything needing an N x N tensor past
``--dense-max`` tokens (the dense mask is 268 MB at 16,384 tokens and its scores 3 GB per image), which is masked
SDPA and eager flex (eager flex materialises the full scores).

Block sparsity is the share of 128 x 128 (query, key) blocks FlexAttention skips (``BlockMask.sparsity()``), for
raster order and for the 8 x 16 tile order, prefix-free; "build" is the time to make the BlockMask from the window
geometry (ours) and, for comparison, with ``create_block_mask`` (evaluates all N^2 pairs; ``--no-create-block-mask``
skips it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pixelformer.layers.local_attention import _Layout, block_sparsity, tile_order  # noqa: E402

HEADS, HEAD_DIM, KERNEL, TILE = 3, 64, 7, (8, 16)


def timed(fn: Callable[[], None], device: torch.device, min_s: float, max_reps: int) -> float:
    """Median ms of ``fn`` after one warm-up call (which also compiles)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 2 or time.perf_counter() - start < min_s):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run_case(attn: Callable, q, k, v, device, backward: bool, min_s: float, max_reps: int) -> float:
    if backward:
        def step():
            q.grad = k.grad = v.grad = None
            attn(q, k, v).sum().backward()
    else:
        q, k, v = q.detach(), k.detach(), v.detach()  # CPU flex refuses inputs that require grad, even under no_grad

        def step():
            with torch.no_grad():
                attn(q, k, v)
    return timed(step, device, min_s, max_reps)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU (default 1)")
    p.add_argument("--grids", default="28,64,128", help="grid sides: 28,64,128 = 784 / 4,096 / 16,384 tokens")
    p.add_argument("--dense-max", type=int, default=None,
                   help="largest token count for N x N paths (default 4,096 on CPU, 16,384 on CUDA)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--min-s", type=float, default=1.0, help="time each case for at least this long (2+ repeats)")
    p.add_argument("--max-reps", type=int, default=10)
    p.add_argument("--no-create-block-mask", action="store_true")
    p.add_argument("--out", default=None, help="directory for local_attention.json")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dense_max = args.dense_max or (16384 if device.type == "cuda" else 4096)
    flex_backward = device.type != "cpu"
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    rows = []
    for side in (int(s) for s in args.grids.split(",")):
        n = side * side
        row: dict = {"tokens": n, "grid": side}
        row["sparsity_raster"] = block_sparsity(side, side, KERNEL)
        perm, inv = tile_order(side, side, TILE)
        row["sparsity_tiled"] = block_sparsity(side, side, KERNEL, order=perm)
        torch.manual_seed(0)
        qkv = [torch.randn(1, HEADS, n, HEAD_DIM, device=device, dtype=dtype) for _ in range(3)]
        q, k, v = (t.requires_grad_(True) for t in qkv)

        t = time.perf_counter()
        raster_bm = _Layout(side, side, KERNEL, device=device).block_mask()
        tiled_layout = _Layout(side, side, KERNEL, order=perm, device=device)
        tiled_bm = tiled_layout.block_mask()
        row["build_ms_ours"] = (time.perf_counter() - t) * 1e3 / 2
        if not args.no_create_block_mask:
            from torch.nn.attention.flex_attention import create_block_mask
            t = time.perf_counter()
            create_block_mask(tiled_layout.mask_mod(), None, None, n, n, device=device)
            row["build_ms_create_block_mask"] = (time.perf_counter() - t) * 1e3

        mask = _Layout(side, side, KERNEL, device=device).dense() if n <= dense_max else None
        cases = {
            "full_sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), True, None),
            "masked_sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), True,
                            None if mask is not None else f"skipped: needs a {n:,} x {n:,} mask"),
            "flex_eager": (lambda q, k, v: flex_attention(q, k, v, block_mask=raster_bm), flex_backward,
                           None if n <= dense_max else "skipped: eager flex materialises the N x N scores"),
            "flex_compiled_raster": (lambda q, k, v: compiled(q, k, v, block_mask=raster_bm), flex_backward, None),
            # tiled: q, k, v in tile order (a backbone would keep that order; the layer gathers once per call)
            "flex_compiled_tiled": (lambda q, k, v: compiled(q, k, v, block_mask=tiled_bm), flex_backward, None),
        }
        for name, (fn, backward_ok, skip) in cases.items():
            for mode in ("fwd", "fwd_bwd"):
                key = f"{name}_{mode}_ms"
                if skip:
                    row[key] = skip
                elif mode == "fwd_bwd" and not backward_ok:
                    row[key] = "n/a: no FlexAttention backward on CPU"
                else:
                    try:
                        row[key] = run_case(fn, q, k, v, device, mode == "fwd_bwd", args.min_s, args.max_reps)
                    except Exception as e:  # a backend that fails here is a result, not a crash
                        row[key] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                print(f"  {n:>6} {key}: {row[key] if isinstance(row[key], str) else round(row[key], 2)}",
                      file=sys.stderr, flush=True)
        if mask is not None:  # correctness at this size: compiled flex (tiled, un-permuted) vs masked SDPA
            with torch.no_grad():
                ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                tq, tk, tv = (t.index_select(2, perm.to(device)) for t in (q, k, v))
                out = compiled(tq, tk, tv, block_mask=tiled_bm).index_select(2, inv.to(device))
            row["max_abs_diff_flex_tiled_vs_masked_sdpa"] = (out - ref).abs().max().item()
        rows.append(row)

    def cell(x) -> str:
        if isinstance(x, float):
            return f"{x:,.1f}"
        return "skip" if x.startswith("skipped") else ("fail" if x.startswith("failed") else "n/a")

    names = ["full_sdpa", "masked_sdpa", "flex_eager", "flex_compiled_raster", "flex_compiled_tiled"]
    print(f"\ndevice {device} ({torch.get_num_threads()} thread(s) on CPU), torch {torch.__version__}, {args.dtype}, "
          f"batch 1, {HEADS} heads x {HEAD_DIM}, {KERNEL}x{KERNEL} neighbourhood; ms per image, fwd / fwd+bwd")
    header = ["tokens", "sparsity raster", f"sparsity tiled {TILE[0]}x{TILE[1]}", "BlockMask build ours / create"]
    print("| " + " | ".join(header + names) + " |")
    print("|" + " --- |" * (len(header) + len(names)))
    for r in rows:
        build = f"{r['build_ms_ours']:,.0f} / " + (f"{r['build_ms_create_block_mask']:,.0f}"
                                                      if "build_ms_create_block_mask" in r else "-") + " ms"
        cells = [f"{r['tokens']:,}", f"{r['sparsity_raster']:.1f} %", f"{r['sparsity_tiled']:.1f} %", build]
        cells += [f"{cell(r[f'{n}_fwd_ms'])} / {cell(r[f'{n}_fwd_bwd_ms'])}" for n in names]
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        if "max_abs_diff_flex_tiled_vs_masked_sdpa" in r:
            print(f"{r['tokens']:,} tokens: compiled flex (tiled) vs masked SDPA max |diff| "
                  f"{r['max_abs_diff_flex_tiled_vs_masked_sdpa']:.2e}")
    skipped = {r[k] for r in rows for k in r if isinstance(r[k], str)}
    for s in sorted(skipped):
        print(f"  {s}")
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "dtype": args.dtype, "heads": HEADS, "head_dim": HEAD_DIM, "kernel": KERNEL,
              "tile": TILE, "rows": rows}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = Path(args.out) / "local_attention.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
