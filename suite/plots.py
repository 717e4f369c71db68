"""PNG figures of the suite's results: pretraining curves (loss, kNN top-1, SLR label quality) per
backbone, detection AP bars with sample-std error bars (runs read by suite.results), and the
evaluations of pretraining snapshots against epochs (suite.checkpoint_evals).
Command: tools/plot_results.py."""
import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from suite import checkpoint_evals, contract  # noqa: E402
from suite.results import aggregate, columns_for, find_runs, not_a_directory, section_metrics  # noqa: E402

# (axis title, record type, key, one-hot reference: a key, a constant, or None). The label-quality
# panels draw SLR's ȳ solid and the one-hot y dashed in the same colour (docs/label_quality.md):
# one-hot puts no mass on same-class keys other than the own positive, so that reference is 0.
CURVES = (("train loss", "train", "loss", None),
          ("kNN top-1 (%)", "knn", "knn_top1", None),
          ("label mass on other same-class keys", "label_quality", "slr_other_same_class_mass", 0.0),
          ("share of SLR's moved mass on the class", "label_quality", "slr_on_class_share",
           "other_same_class_key_share"),
          (r"label error $\|y - y^*\|_1$", "label_quality", "slr_label_error",
           "onehot_label_error"))
# the dashed reference line of each label-quality panel
REFERENCE_LABEL = {"slr_other_same_class_mass": "one-hot $y$", "slr_label_error": "one-hot $y$",
                   "slr_on_class_share": "chance (class share of keys)"}


def mean_curve(runs, rtype, key):
    """(iters, values): the metric averaged over the seeds that logged each iteration."""
    points = {}
    for run in runs:
        for r in run.records:
            v = r.get(key)
            if r.get("type") == rtype and isinstance(v, (int, float)) and math.isfinite(v):
                points.setdefault(r.get("iter", r.get("epoch", 0)), []).append(v)
    xs = sorted(points)
    return xs, [sum(points[x]) / len(points[x]) for x in xs]


def backbone_colors(runs):
    """One colour per backbone name, the same in every subplot and figure."""
    return {b: f"C{i % 10}" for i, b in enumerate(sorted({r.backbone for r in runs}))}


def plot_pretrain_curves(runs):
    """One subplot per curve, one line per backbone (mean over its seeds); finished or not,
    since the curves are how a running job is watched. Returns the Figure."""
    by_backbone = {}
    for r in runs:
        if r.kind == "pretrain" and r.records:
            by_backbone.setdefault(r.backbone, []).append(r)
    fig = Figure(figsize=(4 * len(CURVES), 4), dpi=100)
    axes = fig.subplots(1, len(CURVES))
    colors = backbone_colors(runs)
    for backbone, group in sorted(by_backbone.items()):
        color = colors[backbone]
        for ax, (title, rtype, key, ref) in zip(axes, CURVES):
            xs, ys = mean_curve(group, rtype, key)
            if not xs:
                continue
            marker = "o" if len(xs) < 30 else None  # kNN runs every few epochs: maybe one point
            label = backbone if ref is None else backbone + r" SLR $\bar y$"
            ax.plot(xs, ys, color=color, label=label, marker=marker)
            if isinstance(ref, str):
                xs, ys = mean_curve(group, rtype, ref)
            elif ref is not None:
                ys = [ref] * len(xs)
            if ref is not None and xs:
                ax.plot(xs, ys, color=color, linestyle="--", label=f"{backbone} {REFERENCE_LABEL[key]}")
    for ax, (title, *_) in zip(axes, CURVES):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_bars(runs, kind):
    """One subplot per task of `kind` ("pretrain": kNN / linear / SLR columns; "detection": AP):
    groups of bars per column, one bar per backbone, error bars = sample std over seeds (none
    for n=1). Returns the Figure."""
    table = {task: groups for (k, task), groups in sorted(aggregate(runs).items()) if k == kind}
    metrics = section_metrics(runs)  # a transfer task's columns (suite/tasks.py)
    fig = Figure(figsize=(5 * max(1, len(table)), 4), dpi=100)
    axes = fig.subplots(1, max(1, len(table)), squeeze=False)[0]
    colors = backbone_colors(runs)
    for ax, (task, groups) in zip(axes, table.items()):
        backbones = sorted(groups)
        columns = [c for c in columns_for(kind, task, metric=metrics.get((kind, task), ""))
                   if any(c in groups[b] for b in backbones)]
        width = 0.8 / len(backbones)
        for j, backbone in enumerate(backbones):
            cells = [groups[backbone].get(c) for c in columns]
            means = [c[0] if c else math.nan for c in cells]
            stds = [c[1] if c and c[1] is not None else math.nan for c in cells]  # n=1: no bar
            xs = [k - 0.4 + width * (j + 0.5) for k in range(len(columns))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, color=colors[backbone],
                   label=f"{backbone} (n={max((c[2] for c in cells if c), default=0)})")
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels(columns, fontsize="small")
        ax.set_title(task)
        ax.set_ylabel("AP (%)" if kind == "detection" else "%")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_checkpoint_evals(points):
    """One subplot per metric (kNN top-1, linear top-1, a task's AP50, ...), one line per backbone:
    the metric of each evaluated snapshot against its epoch (mean over pretraining seeds). Returns
    the Figure."""
    metrics = sorted({p.metric for p in points})
    fig = Figure(figsize=(4 * len(metrics), 4), dpi=100)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colors = {b: f"C{i % 10}" for i, b in enumerate(sorted({p.backbone for p in points}))}
    for ax, metric in zip(axes, metrics):
        for backbone, color in colors.items():
            by_epoch = {}
            for p in points:
                if p.metric == metric and p.backbone == backbone:
                    by_epoch.setdefault(p.epoch, []).append(p.value)
            if by_epoch:
                xs = sorted(by_epoch)
                ax.plot(xs, [sum(by_epoch[x]) / len(by_epoch[x]) for x in xs], color=color, marker="o",
                        label=backbone)
        ax.set_title(metric)
        ax.set_xlabel("pretraining epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def save_png(fig, path):
    """savefig atomically: readers never see half a PNG."""
    contract.write_atomic(path, lambda f: fig.savefig(f, format="png"))


def write_figures(runs, out, evals=()):
    """{file name: Figure} of the figures there is data for, saved as PNGs under `out`; `evals`:
    suite.checkpoint_evals points."""
    figures = {}
    if evals:
        figures["checkpoint_evals.png"] = plot_checkpoint_evals(evals)
    if any(r.kind == "pretrain" and r.records for r in runs):
        figures["pretrain_curves.png"] = plot_pretrain_curves(runs)
    if any(r.kind == "pretrain" and r.metrics and not r.problem for r in runs):
        figures["pretrain_metrics.png"] = plot_bars(runs, "pretrain")
    if any(r.kind == "detection" and not r.problem for r in runs):
        figures["detection_ap.png"] = plot_bars(runs, "detection")
    if figures:
        out.mkdir(parents=True, exist_ok=True)
    for name, fig in figures.items():
        save_png(fig, out / name)
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories or roots searched recursively")
    parser.add_argument("--out", required=True, help="output directory for the PNG files")
    args = parser.parse_args(argv)
    if not_a_directory(args.run_dirs, "plot_results"):
        return 2
    runs, _ = find_runs(args.run_dirs)
    try:
        wrote = write_figures(runs, Path(args.out), checkpoint_evals.collect(args.run_dirs))
    except OSError as e:
        print(f"plot_results: --out {args.out} cannot be written ({e.strerror or e}: {e.filename}); "
              "pass a writable folder", file=sys.stderr)
        return 2
    if not wrote:
        print(f"plot_results: no pretraining curves, finished detection runs or checkpoint evaluations under "
              f"{' '.join(args.run_dirs)}; see docs/formats.md", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(Path(args.out) / w) for w in wrote)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
