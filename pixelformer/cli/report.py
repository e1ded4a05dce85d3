"""Build the results report from committed sweep summaries: ``python tools/report.py [experiment=all] [scale=all]``.

Reads ``<out>/<experiment>/<scale>/*.json`` (written by ``tools/sweep.py``; nothing is re-run) and writes
``<out>/README.md`` with one table per experiment and scale (mean and spread over seeds) and PNG plots beside the
summaries: the metric against tokens per image (or the experiment's x), against training FLOPs and wall-clock time,
and the training curves. Keys: experiment (a name or all), scale (small, medium, paper or all), out (default
docs/results).
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from . import parse_kv, usage

PLOTS = ("metric.png", "cost.png", "curves.png")  # drawn per experiment and scale, beside its summaries
PAPER_NOTE = ("Numbers marked *paper* are the paper's reported values (`../shared/reference/paper-facts.md`), not "
              "measured here.")


def load_summaries(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(points, shared runs) recorded in one experiment/scale folder."""
    points, shared = [], []
    for path in sorted(folder.glob("*.json")):
        try:
            summary = json.loads(path.read_text())
        except ValueError as e:
            raise UserError(f"{path} is not a sweep summary ({e}): delete it and re-run the sweep's command") from None
        if not isinstance(summary, dict) or "metrics" not in summary or "point" not in summary:
            raise UserError(f"{path} is not a sweep summary (no 'point' and 'metrics'): remove it from {folder}")
        (shared if summary["point"].startswith("shared-") else points).append(summary)
    return points, shared


def setting_of(summary: dict[str, Any]) -> str:
    """The point's name without its seed: the points of one setting differ only in ``run.seed``."""
    return summary["point"].rsplit("-s", 1)[0]


# name, native side, training and test images of the built-in datasets (what a scale's heading names)
DATASETS = {"digits": ("scikit-learn digits", 8, 1437, 360), "fashion_mnist": ("Fashion-MNIST", 28, 60000, 10000),
            "mnist": ("MNIST", 28, 60000, 10000), "cifar10": ("CIFAR-10", 32, 50000, 10000),
            "cifar100": ("CIFAR-100", 32, 50000, 10000)}


def scale_setting(points: list[dict[str, Any]]) -> str:
    """What a scale trains on, read off its points' arguments: dataset, image size, tokens, training images, epochs
    per stage (and the recipe, unless plain) and the test images."""
    def arg(args: list[str], key: str, default: Any = None) -> Any:
        values = [a.split("=", 1)[1] for a in args if a.startswith(key + "=")]
        return values[-1] if values and values[-1] != "null" else default

    def args_of(point: dict[str, Any]) -> list[str]:
        return next(iter(point.get("stages", {}).values()), {}).get("args", [])

    first = args_of(points[0])
    data = arg(first, "data", "digits")
    name, native, train, test = DATASETS.get(data, (data, None, None, None))
    sides = sorted({int(arg(args_of(p), "data.img_size", native or 0)) for p in points} - {0})
    side = "/".join(f"{x}x{x}" for x in sides)
    subset, limit = arg(first, "data.train_subset"), arg(first, "data.limit_train")
    images = (f"{int(subset):,} training images (a stratified subset)" if subset else
              f"the first {int(limit):,} training images" if limit else
              f"all {train:,} training images" if train else "its training split")
    limit_test = arg(first, "data.limit_test")
    tests = f"the first {int(limit_test):,} test images" if limit_test else \
        f"the full test split ({test:,} images)" if test else "its test split"
    tokens = sorted({p["tokens"] for p in points if p.get("tokens")})
    token_text = (f"{tokens[0]:,} tokens" if len(tokens) == 1 else
                  f"{', '.join(f'{t:,}' for t in tokens)} tokens") if tokens else "tokens as configured"
    epochs = {}
    for p in points:
        for stage, info in p.get("stages", {}).items():
            epochs.setdefault(stage, set()).add(info.get("epochs"))
    # a token-budget recipe changes what an epoch trains on: named when every point uses it (else the arms say it)
    recipes = {arg(info.get("args", []), "recipe", "plain") for p in points for info in p.get("stages", {}).values()}
    recipe = recipes.pop() if len(recipes) == 1 else "plain"
    epoch_text = ", ".join(f"{stage} {'/'.join(str(e) for e in sorted(v, key=str))} epoch(s)"
                           for stage, v in epochs.items()) + (f" of recipe={recipe}" if recipe != "plain" else "")
    return (f"{name} at {side} ({token_text}), {images}, {epoch_text}; evaluated on {tests}"
            if side else f"{name} ({token_text}), {images}, {epoch_text}; evaluated on {tests}")


def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(points: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per setting: the metric's mean and standard deviation over seeds, and the cost of one run."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for summary in points:
        groups[setting_of(summary)].append(summary)
    rows = []
    for setting, runs in groups.items():
        values = [r["metrics"][metric] for r in runs if metric in r["metrics"]]
        if not values:
            continue
        mean, std = _stats(values)
        first = runs[0]
        rows.append({
            "setting": setting, "values": first.get("values", {}), "arm": first.get("arm"), "seeds": len(values),
            "per_seed": values, "mean": mean, "std": std, "tokens": first.get("tokens"), "params": first.get("params"),
            "train_flops": statistics.fmean(r["total"]["train_flops"] for r in runs),
            "wall_s": statistics.fmean(r["total"]["wall_s"] or 0.0 for r in runs),
            "images_per_sec": first["stages"][list(first["stages"])[-1]].get("images_per_sec"),
            "runs": runs,
        })
    return rows


def x_value(row: dict[str, Any], x: str) -> Any:
    if x == "tokens":
        return row["tokens"]
    if x == "arm":
        return row["arm"]
    if x in row["values"]:
        return row["values"][x]
    return row["setting"]


def _label(row: dict[str, Any]) -> str:
    return row["setting"].replace("_", " ")


def plot(rows: list[dict[str, Any]], exp: dict[str, Any], folder: Path) -> list[str]:
    """PNG plots for one experiment and scale; returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, draw in (("metric.png", _plot_metric), ("cost.png", _plot_cost), ("curves.png", _plot_curves)):
        fig = draw(plt, rows, exp)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _plot_metric(plt: Any, rows: list[dict[str, Any]], exp: dict[str, Any]) -> Any:
    """The metric against the experiment's x (tokens: a log axis), mean and standard deviation over seeds."""
    metric, x, title = exp["metric"], exp["x"], exp["title"]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    numeric = all(isinstance(x_value(r, x), (int, float)) for r in rows)
    arms = sorted({r["arm"] for r in rows if r["arm"] is not None}) or [None]
    if numeric:
        for arm in arms:
            sel = sorted((r for r in rows if r["arm"] == arm), key=lambda r: x_value(r, x))
            ax.errorbar([x_value(r, x) for r in sel], [r["mean"] for r in sel], yerr=[r["std"] for r in sel],
                        marker="o", capsize=3, label=arm or "mean ± sd over seeds")
            for r in sel:
                ax.scatter([x_value(r, x)] * len(r["per_seed"]), r["per_seed"], s=8, alpha=0.4, color="grey")
                ax.annotate(_label(r), (x_value(r, x), r["mean"]), textcoords="offset points", xytext=(5, 5),
                            fontsize=7)
        if x == "tokens":
            ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per image" if x == "tokens" else x)
    else:
        labels = [_label(r) for r in rows]
        ax.bar(range(len(rows)), [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=3,
               color="tab:blue", alpha=0.7)
        for i, r in enumerate(rows):
            ax.scatter([i] * len(r["per_seed"]), r["per_seed"], s=8, color="black", zorder=3)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        low = min(min(r["per_seed"]) for r in rows)
        high = max(max(r["per_seed"]) for r in rows)
        ax.set_ylim(low - 0.15 * (high - low + 1), high + 0.15 * (high - low + 1))
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    if len(arms) > 1 and numeric:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _plot_cost(plt: Any, rows: list[dict[str, Any]], exp: dict[str, Any]) -> Any:
    """The cost side: the metric against training FLOPs and against wall-clock seconds."""
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for ax, key, label in ((axes[0], "train_flops", "training FLOPs (forward + backward, counted)"),
                           (axes[1], "wall_s", "wall-clock seconds per run")):
        for r in rows:
            ax.errorbar([r[key]], [r["mean"]], yerr=[r["std"]], marker="o", capsize=3, label=_label(r))
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(exp["metric"])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{exp['title']}: cost", fontsize=9)
    return fig


def _plot_curves(plt: Any, rows: list[dict[str, Any]], exp: dict[str, Any]) -> Any:
    """Training curves: the last stage's training loss (seed 0 of each setting) and the evaluations."""
    metric = exp["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for r in rows:
        run = min(r["runs"], key=lambda s: s.get("seed") or 0)
        stage = run["stages"][list(run["stages"])[-1]]
        loss = stage.get("train_loss") or []
        if loss:
            axes[0].plot([p[0] for p in loss], [p[1] for p in loss], label=_label(r), lw=1)
        curve = [c for c in stage.get("curve", []) if metric in c]
        if curve:
            axes[1].plot([c["step"] for c in curve], [c[metric] for c in curve], marker="o", label=_label(r))
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss (last stage, seed 0)")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(f"{metric} at each evaluation")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    return fig


def _md(value: Any) -> str:
    """Text from a summary as literal Markdown text on one line: Markdown's punctuation backslash-escaped and HTML's
    characters as entities, so a title or name cannot add headings, links, images or HTML to the report."""
    import re

    text = " ".join(str(value).split())
    # newlines are gone, so line-start syntax (headings, lists) cannot start; what is left works inside a line
    # (an underscore inside a word, as in patch_size2, is no emphasis in GitHub's Markdown and stays as it is)
    text = text.replace("&", "&amp;").replace("<", "&lt;")  # no tag or entity can start ('>' alone is text)
    text = re.sub(r"([\\`*\[\]|~])", r"\\\1", text)
    return re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)


def _code(value: Any) -> str:
    """Text from a summary as one Markdown code span (literal, HTML included), fenced by more backticks than it
    holds in a row."""
    import re

    text = " ".join(str(value).split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if fence != "`" or text.startswith("`") else f"`{text}`"


def _target(*parts: Any) -> str:
    """A link or image target from path parts (a summary's picture names): URL-quoted, so a ')' or a space cannot
    end it early."""
    from urllib.parse import quote

    return "/".join(quote(str(part)) for part in parts)


def _fmt_flops(value: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


def _command(points: list[dict[str, Any]], name: str, scale: str) -> str:
    """The sweep command recorded in the summaries (the most common one), else the plain one."""
    from collections import Counter

    recorded = Counter(p.get("command") for p in points if p.get("command"))
    return recorded.most_common(1)[0][0] if recorded else f"python tools/sweep.py experiment={name} scale={scale}"


def _others(row: dict[str, Any], metric: str) -> str:
    keys = sorted({k for run in row["runs"] for k in run["metrics"] if k.startswith("test/") and k != metric})
    return ", ".join(f"{k[5:]} {statistics.fmean(run['metrics'][k] for run in row['runs'] if k in run['metrics']):.3g}"
                     for k in keys)


def table(rows: list[dict[str, Any]], exp: dict[str, Any]) -> list[str]:
    metric = exp["metric"]
    lines = [f"| setting | tokens | params | {_md(metric)} mean ± sd (seeds) | per seed | other test metrics (mean) | "
             f"training FLOPs | wall s | img/s |",
             "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    best = (max if exp["mode"] == "max" else min)(r["mean"] for r in rows)
    for r in sorted(rows, key=lambda r: (str(r["arm"]), -(r["tokens"] or 0))):
        mark = "**" if r["mean"] == best else ""
        speed = f"{r['images_per_sec']:.0f}" if r["images_per_sec"] else "-"
        lines.append(f"| {_md(r['setting'])} | {r['tokens']} | {r['params']:,} | "
                     f"{mark}{r['mean']:.2f} ± {r['std']:.2f}{mark} "
                     f"({r['seeds']}) | {', '.join(f'{v:.2f}' for v in r['per_seed'])} | {_md(_others(r, metric))} | "
                     f"{_fmt_flops(r['train_flops'])} | "
                     f"{r['wall_s']:.0f} | {speed} |")
    return lines


def earlier_stages(rows: list[dict[str, Any]]) -> list[str]:
    """For points of several stages (e.g. MAE pre-training before fine-tuning): the earlier stages' test metrics,
    averaged over seeds, and their share of the point's training FLOPs."""
    lines = []
    for r in rows:
        names = list(r["runs"][0]["stages"])
        for stage in names[:-1]:
            runs = [run["stages"][stage] for run in r["runs"] if stage in run["stages"]]
            metrics = sorted({k for run in runs for k in run["metrics"] if k.startswith("test/")})
            values = ", ".join(f"{k} {statistics.fmean(run['metrics'][k] for run in runs if k in run['metrics']):.4g}"
                               for k in metrics)
            share = statistics.fmean(run["train_flops"] for run in runs) / max(r["train_flops"], 1.0)
            lines.append(f"\n{_code(r['setting'])}, stage {_code(stage)} (mean of {len(runs)} seeds): {_md(values)}; "
                         f"{100 * share:.0f} % of the point's training FLOPs.")
    return lines


def experiment_info(name: str, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Title, paper claim, metric, mode and x: recorded in the summaries (else from configs/experiment/)."""
    recorded = next((s["about"] for s in summaries if s.get("about")), None)
    if recorded is None:
        from ..sweep import load_experiment
        exp = load_experiment(name)
        recorded = {"title": exp.title, "paper": exp.paper, "metric": exp.metric, "mode": exp.mode, "x": exp.x}
    return {"name": name, **recorded}


def build(out: Path, experiments: list[str], scales: list[str], replot: Optional[set[tuple[str, str]]] = None) -> Path:
    """Write ``out/README.md`` from the summaries under ``out`` and the plots of the (experiment, scale) pairs in
    ``replot`` (None: all; the others are drawn only when missing), then every ``out/<benchmark>/section.md`` (a
    benchmark's own section, e.g. ``benchmarks/equal_time.py --report``); returns the README's path."""
    sections = ["# Results: the paper's findings, measured with pixelformer", "",
                "Built by `python tools/report.py` from the per-point summaries in this folder (each written by "
                "`python tools/sweep.py experiment=<name> scale=<scale>`); rebuilding it re-runs nothing. Means and "
                "sample standard deviations are over seeds (`run.seed`; data subsets are fixed). FLOPs are counted "
                "with `torch.utils.flop_counter` on a training step of each of the run's step plans (one plan but "
                "under a token-budget recipe) and multiplied by the images seen; wall times "
                "are per run on the machine named in each summary, while other runs shared its cores.", "",
                PAPER_NOTE, ""]
    found_any, headings = False, []  # headings: as written, before escaping (GitHub's anchors are of the text)
    for name in experiments:
        for scale in scales:
            folder = out / name / scale
            if not folder.is_dir():
                continue
            points, shared = load_summaries(folder)
            if not points:
                continue
            exp = experiment_info(name, points)
            rows = aggregate(points, exp["metric"])
            if not rows:
                continue
            found_any = True
            plotted = list(PLOTS)
            if replot is None or (name, scale) in replot or not all((folder / p).is_file() for p in plotted):
                plotted = plot(rows, exp, folder)
            pictures = plotted
            trained = [p for p in points + shared if not p.get("reused_from")]  # reused: paid for elsewhere
            reused = [p for p in points if p.get("reused_from")]
            wall = sum(p["total"]["wall_s"] or 0 for p in trained)
            flops = sum(p["total"]["train_flops"] for p in trained)
            machines = sorted({f"{m.get('threads')} thread(s) each on {m.get('device') or 'this machine'}"
                               for m in (p.get("machine", {}) for p in trained or points)})
            headings.append(f"{exp['title']} ({scale})")
            sections += [f"## {_md(exp['title'])} ({scale})", "",
                         f"*setting*: {_md(scale_setting(points))}", "",
                         f"*paper*: {_md(exp['paper'])}", "",
                         f"Command: {_code(_command(points, name, scale))} then "
                         f"`python tools/report.py experiment={name} scale={scale}`. Cost: {len(points)} points"
                         f"{f' and {len(shared)} shared run(s)' if shared else ''} "
                         f"({sum(len(p['stages']) for p in trained)} training runs), {wall / 60:.1f} min of "
                         f"run time summed over the runs ({_md('; '.join(machines))}), {_fmt_flops(flops)}FLOP of "
                         f"training."
                         + (f" {len(reused)} point(s) are the same training (settings and built network) as a point "
                            f"of another experiment and reuse its summary, not counted here: "
                            f"{_md(', '.join(p['point'] + ' = ' + p['reused_from'] for p in reused))}."
                            if reused else ""), ""]
            sections += table(rows, exp)
            sections += earlier_stages(rows)
            for s in shared:
                metrics = ", ".join(f"{k} {v:.4g}" for k, v in s["metrics"].items() if k.startswith("test/"))
                model = s["stages"][list(s["stages"])[0]]["model"]
                sections.append(f"\nShared run {_code(s['point'])} ({_md(model)}): {_md(metrics)}.")
            sections.append("")
            sections += [f"![{_md(p)}]({_target(name, scale, p)})" for p in pictures]
            samples = [(p["point"], pic) for p in sorted(points, key=lambda p: p["point"])
                       for pic in p.get("pictures", []) if p.get("seed") in (0, None)]
            if samples:
                sections += ["", "Pictures from the last evaluation (seed 0): " + ", ".join(
                    f"[{_md(point)}]({_target(name, scale, pic)})" for point, pic in samples), ""]
                sections += [f"![{_md(point)}]({_target(name, scale, pic)})" for point, pic in samples[:4]]
            sections.append("")
    for section in sorted(out.glob("*/section.md")):  # a benchmark's own section (its --report writes it)
        text = section.read_text().strip()
        title = text.splitlines()[0].lstrip("#").strip() if text.startswith("## ") else None
        if title is None:
            raise UserError(f"{section} must start with a '## ' heading: it becomes a section of the report")
        headings.append(title)
        sections += [text, ""]
    index = sections.index(PAPER_NOTE) + 2
    sections[index:index] = [f"- [{_md(title)}](#{_anchor(title)})" for title in headings] + [""]
    if not found_any:
        raise UserError(f"no sweep summaries under {out} for experiment(s) {', '.join(experiments)} at scale(s) "
                        f"{', '.join(scales)}: run python tools/sweep.py experiment=... scale=... first")
    readme = out / "README.md"
    readme.write_text("\n".join(sections).rstrip() + "\n")
    return readme


def _anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    import re
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _finding(name: str) -> tuple[int, str]:
    """Experiments in the order of the paper's findings (their files' ``finding``), others after them by name."""
    from ..sweep import EXPERIMENT_DIR, load_experiment

    if (EXPERIMENT_DIR / f"{name}.yaml").is_file():
        return load_experiment(name).finding or 99, name
    return 99, name


def experiments_on_disk(out: Path) -> list[str]:
    """The experiments with a folder under ``out``, in the order of the paper's findings."""
    return sorted((p.name for p in out.iterdir() if p.is_dir()), key=_finding) if out.is_dir() else []


def write_report(out: Path, replot: Optional[set[tuple[str, str]]] = None) -> Path:
    """Rebuild ``out/README.md`` over every experiment and scale on disk (so it never depends on which part was asked
    for), redrawing the plots of the (experiment, scale) pairs in ``replot`` (None: all); returns its path."""
    from ..sweep import SCALES

    return build(out, experiments_on_disk(out), list(SCALES), replot)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(usage(__doc__, "report"))
        return 0
    from ..sweep import SCALES

    own, rest = parse_kv(argv, {"experiment": "", "scale": "", "out": ""})
    if rest:
        raise UserError(f"unknown argument(s) {', '.join(rest)}: report.py takes experiment=, scale= and out=")
    out = Path(own.get("out", "docs/results"))
    on_disk = experiments_on_disk(out)
    experiment, scale = own.get("experiment", "all"), own.get("scale", "all")
    experiments = on_disk if experiment == "all" else [experiment]
    for name in experiments:
        if name not in on_disk:
            raise UserError(f"experiment={name}: no summaries under {out}/{name}; experiments with summaries: "
                            f"{', '.join(on_disk) or 'none'} (run python tools/sweep.py experiment={name} ... first)")
    if scale != "all" and scale not in SCALES:
        raise UserError(f"scale={scale}: choose one of {', '.join(SCALES)} or all")
    scales = list(SCALES) if scale == "all" else [scale]
    readme = write_report(out, {(e, s) for e in experiments for s in scales})
    print(f"wrote {readme}")
    return 0

