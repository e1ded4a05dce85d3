"""What a trained model learned about pixel positions:
``python tools/analyze.py ckpt=PATH [analysis.key=value ...] [key=value ...]``.

    python tools/analyze.py ckpt=runs/<run>/checkpoints/best.ckpt
    python tools/analyze.py ckpt=runs/<run>/checkpoints/best.ckpt analysis.images=256 analysis.permute_seed=1

Writes into ``<run>/analysis/`` (or ``analysis.out=``): ``analysis.json`` (mean attention distance per block and
head in input pixels, the position embedding's similarity summary, accuracy on plain and pixel-permuted test
images), ``attention_distance.png`` (distance vs depth, one dot per head), ``attention_maps_<i>.png`` (a few query
pixels' attention per block, and the rollout, drawn over test image i) and ``pos_embed_similarity.png`` (learned
position embeddings only). cls checkpoints get everything; mae checkpoints are analysed on their encoder (no
accuracy: no classifier); pixel-space dit checkpoints on their denoiser (EMA weights, test images noised at
``analysis.timestep``, null label; no accuracy). W&B gets the same when the run's logger is online or offline
(add ``logger.wandb.mode=disabled`` to skip it).

Runs side by side (after analysing each): ``python tools/analyze.py compare=<run>,<run>[,...] out=<png>
[labels=PiT,ViT/2]`` draws their mean attention distance vs depth in one figure.

Options: analysis.images=64 (test images the distance averages over), analysis.map_images=3, analysis.queries=4
(query pixels per map, at most 8), analysis.rollout=true, analysis.permute_seed=0, analysis.batch_size=256,
analysis.timestep (dit; default the middle of the schedule), analysis.weights=model|ema, analysis.device=cpu|cuda,
analysis.out=PATH. Other ``key=value`` arguments change the run's saved config (e.g. ``data.root=...``,
``data.limit_test=1000``: the test images of the accuracies).
"""
from __future__ import annotations

from ..errors import UserError
from . import parse_kv, usage


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(usage(__doc__, "analyze"))
        return 0
    own, rest = parse_kv(argv, {"ckpt": "checkpoint path", "compare": "runs to compare", "out": "figure path",
                                "labels": "one label per compared run"})
    if "compare" in own:
        from ..analysis import compare_distances

        if "out" not in own or rest:
            raise UserError("compare=<run>,<run> takes out=<png> and optionally labels=<a>,<b> (one per run), "
                            "nothing else: e.g. compare=runs/pit,runs/vit out=pit_vs_vit.png")
        labels = own["labels"].split(",") if "labels" in own else None
        print(f"wrote {compare_distances(own['compare'].split(','), own['out'], labels)}")
        return 0
    if "out" in own or "labels" in own:
        raise UserError("out= and labels= belong to compare=<run>,<run>; for one run use analysis.out=<folder>")
    if "ckpt" not in own:
        raise UserError(usage("tools/analyze.py needs ckpt=PATH (e.g. ckpt=runs/<run>/checkpoints/best.ckpt)",
                              "analyze"))
    from ..analysis import analyze, parse_options

    options = [a for a in rest if a.startswith("analysis.")]
    opts = parse_options(options)
    analyze(own["ckpt"], [a for a in rest if not a.startswith("analysis.")], opts)
    return 0
