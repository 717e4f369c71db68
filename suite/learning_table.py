"""The learning run's table (tools/device_run.sh): kNN and linear-probe top-1 of each pretrained
backbone against the same network at random init, with the label-quality record of its last
logged step. Reads <dir>/<method>/ (pretraining runs) and <dir>/probe_<name>/ (probes); standard
library only, so it runs on a pretraining-only stack.
    python -m suite.learning_table gpu_out/learn
"""
import json
import sys
from pathlib import Path

from suite import contract

QUALITY = ("slr_moved_mass", "slr_on_class_share", "other_same_class_key_share")


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def last_records(metrics_file):
    """{record type: the last record of that type} of a metrics.jsonl ({} without one)."""
    try:
        return {rec.get("type"): rec for rec in contract.read_jsonl(metrics_file)}
    except OSError:
        return {}


def row(root, name):
    probe = read_json(root / f"probe_{name}" / contract.PROBE_METRICS) or {}
    records = last_records(root / name / contract.METRICS)
    train, quality = records.get("train", {}), records.get("label_quality", {})
    return {"backbone": name, "epochs": train.get("epoch", -1) + 1 if train else 0,
            "iters": train.get("iter"), "loss": train.get("loss"), "inst_top1": train.get("inst_top1"),
            "monitor_knn": records.get("knn", {}).get("knn_top1"),
            "probe_knn": probe.get("knn_top1"), "linear_top1": probe.get("top1"),
            **{k: quality.get(k) for k in QUALITY}}


def fmt(v, digits=1):
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(root, names=(contract.RANDOM_INIT, "mocov2", "sane")):
    root = Path(root)
    rows = [row(root, n) for n in names]
    base = rows[0]["probe_knn"]
    head = ["backbone", "epochs", "loss", "inst top-1 %", "kNN top-1 % (probe)", "gain", "linear top-1 %",
            "SLR moved mass", "SLR on-class share", "on-class chance"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gain = None if base is None or r["probe_knn"] is None or r is rows[0] else r["probe_knn"] - base
        cells = [r["backbone"], fmt(r["epochs"]), fmt(r["loss"], 3), fmt(r["inst_top1"]), fmt(r["probe_knn"]),
                 "" if gain is None else f"{gain:+.1f}", fmt(r["linear_top1"]),
                 *(fmt(r[k], 3) for k in QUALITY)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m suite.learning_table <learn dir of tools/device_run.sh>", file=sys.stderr)
        return 2
    print(table(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
