"""Results table: mean ± sample std over seeds of every pretraining and detection run, grouped by
(backbone, task), beside the reported rows of suite/reported_results.csv; incomplete runs are listed.
Runs are found by their files and folders as suite.contract names them. Each section also pairs
every backbone with a baseline over the seeds both ran (suite/stats.py), a footnote names the suite
commit(s) of the runs' provenance records (suite/provenance.py), and `--out` writes results.jsonl
(one record per run) beside the table. Command: tools/results_table.py."""
import argparse
import csv
import io
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from suite import contract, provenance, stats, tasks

PRETRAIN_COLUMNS = ("kNN top-1", "linear top-1", "VOC07 cls mAP")
# SLR's label quality at the end of a run (docs/label_quality.md): the % of the mass SLR moves off
# the own positive that lands on keys of the right class, and that class's % of the other keys
# (what class-blind features give); shown only in sections with an SLR run
SLR_COLUMNS = ("SLR on-class %", "on-class chance %")
VOC_COLUMNS = ("AP50", "AP", "AP75")
COCO_COLUMNS = ("AP (bbox)", "AP (segm)")
# classification transfer (pretrain.svm, pretrain.semisup): one section per task; a low-shot run is
# one row per independent sample, so its cells are mean ± std over the samples (n = samples)
SVM_COLUMNS = ("mAP",)
LOWSHOT_COLUMNS = tuple(f"k={k}" for k in (1, 2, 4, 8, 16, 32, 64, 96))
SEMI_COLUMNS = ("top-1", "top-5")
REPORTED_FILE = Path(__file__).resolve().with_name("reported_results.csv")
# published numbers are for real VOC/COCO/ImageNet/CIFAR: not shown beside the synthetic corpus
SYNTHETIC = re.compile(r"shapes|objects|synthetic|demo|bench", re.I)
LOG_LINE = re.compile(r"\[\d\d/\d\d \d\d:\d\d:\d\d")  # timestamped lines of both loggers
STD_NOTE = ("Mean ± sample std (ddof=1) over seeds, n = number of seeds; n=1 shows the value "
            "alone. Rows marked 'reported' are published numbers, not runs of this suite.")


@dataclass
class Run:
    """One pretraining or detection output directory, as read from its files."""
    path: Path
    kind: str                      # "pretrain", "detection" or "classification"
    backbone: str
    task: str
    seed: "int | None" = None
    metrics: dict = field(default_factory=dict)   # table column -> value
    records: list = field(default_factory=list)   # metrics.jsonl of a pretraining run
    problem: str = ""              # "" when complete, else "unfinished: ..." / "failed: ..."
    method: str = ""               # pretraining: the method and its resolved switches (a note)
    method_name: str = ""          # pretraining: the resolved method alone (mocov2, sane, ...)
    provenance: list = field(default_factory=list)  # provenance.json records (+ "path"): run, probes
    metric: str = ""               # detection: suite.tasks.METRICS key recorded by train_net ("" before)


# ---------------------------------------------------------------- readers (shared with plots)
def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_yaml(path):
    with open(path) as f:
        cfg = yaml.safe_load(f)
    return cfg if isinstance(cfg, dict) else {}


def traceback_in_log(path, tail_bytes=8192):
    """Last line of a log.txt whose tail holds a Python traceback, else None."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - tail_bytes))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    if "Traceback (most recent call last)" not in tail:
        return None
    after = [ln for ln in tail.rsplit("Traceback (most recent call last)", 1)[1].splitlines()[1:]
             if ln.strip()]
    if any(LOG_LINE.match(ln) for ln in after):  # logging went on after it (e.g. resumed)
        return None
    return after[-1].strip() if after else "traceback"


def age(path):
    """'3.2 h ago' since `path` was last written: tells a dead run from a running one."""
    try:
        return f"{(time.time() - os.path.getmtime(path)) / 3600:.1f} h ago"
    except OSError:
        return "never"


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pretrain_task(cfg):
    """'pretrain:<dataset>' from the config's data section (dataset name, cifar10 / cifar100 for
    those formats, else data.root)."""
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    name = data.get("dataset") or data.get("name")
    if not name and data.get("format") in ("cifar10", "cifar100"):
        name = data["format"]
    if not name and data.get("root"):
        root = Path(str(data["root"]).rstrip("/"))
        # an ImageFolder root is often <dataset>/imagefolder (a synthetic corpus) or <dataset>/train
        name = root.parent.name if root.name in (contract.CORPUS_IMAGEFOLDER, "train") else root.name
    return f"pretrain:{str(name).lower()}" if name else "pretrain"


PRETRAIN_FILES = {contract.METRICS, contract.PRETRAIN_DONE, contract.CHECKPOINT, contract.PREVIOUS_CHECKPOINT}


def is_pretrain_dir(d, files):
    """A pretraining output dir, finished or not (a crash before the first log step leaves only
    config.yaml, log.txt and maybe a checkpoint): its files, else its lower-case config keys
    (Detectron2's config.yaml has MODEL, SOLVER, ...)."""
    if files & PRETRAIN_FILES:
        return True
    cfg = read_yaml(d / contract.CONFIG)
    return "MODEL" not in cfg and isinstance(cfg.get("model"), dict) and isinstance(cfg.get("data"), dict)


SWITCHES = ("slr.enabled", "slr.p", "slr.q", "mm.enabled", "model.in_batch_negatives")


def method_label(method, switches):
    """'sane: SLR p+q, MM, in-batch negatives' from a method and its resolved switches."""
    on = lambda key: bool(switches.get(key))  # noqa: E731
    parts = [f"SLR {'+'.join(x for x in 'pq' if on(f'slr.{x}'))}"] if on("slr.enabled") else []
    parts += ["MM"] if on("mm.enabled") else []
    parts.append("in-batch negatives" if on("model.in_batch_negatives") else "queue-only negatives")
    return f"{method or '?'}: {', '.join(parts)}"


def config_switches(cfg):
    """The switches of a resolved config.yaml (older runs: whatever keys it has)."""
    out = {}
    for key in SWITCHES:
        section, name = key.split(".")
        value = (cfg.get(section) or {}).get(name) if isinstance(cfg.get(section), dict) else None
        if value is not None:
            out[key] = value
    return out


def read_pretrain_run(d):
    cfg = read_yaml(d / contract.CONFIG)
    where = contract.pretrain_run(d)
    seed = cfg.get("seed", where.seed)
    run = Run(d, "pretrain", where.backbone, pretrain_task(cfg), seed)
    run.method = method_label(cfg.get("method"), config_switches(cfg))
    run.method_name = str(cfg.get("method") or "")
    _put_provenance(run, d)
    # a run that died before its first log step has no metrics.jsonl yet
    metrics = d / contract.METRICS
    run.records = contract.read_jsonl(metrics) if metrics.exists() else []
    knn = [r["knn_top1"] for r in run.records if r.get("type") == "knn" and _finite(r.get("knn_top1"))]
    crash = traceback_in_log(d / contract.LOG)
    if not (d / contract.PRETRAIN_DONE).exists():
        last = run.records[-1] if run.records else {}
        newest = metrics if run.records else d / contract.LOG
        run.problem = (f"failed: log.txt ends in a traceback ({crash})" if crash else
                       f"unfinished: no done.json (last logged epoch {last.get('epoch', '?')}, "
                       f"iter {last.get('iter', '?')}, written {age(newest)})")
        return run
    done = read_json(d / contract.PRETRAIN_DONE)
    if isinstance(done.get("switches"), dict):  # what the run recorded it ran
        run.method = method_label(done.get("method"), done["switches"])
        run.method_name = str(done.get("method") or run.method_name)
    top1 = done.get("knn_top1")
    top1 = top1 if _finite(top1) else (knn[-1] if knn else None)
    if top1 is not None:
        run.metrics["kNN top-1"] = float(top1)
    quality = [r for r in run.records if r.get("type") == "label_quality"
               and _finite(r.get("slr_on_class_share")) and _finite(r.get("other_same_class_key_share"))]
    if quality:
        run.metrics.update(zip(SLR_COLUMNS, (100 * quality[-1]["slr_on_class_share"],
                                             100 * quality[-1]["other_same_class_key_share"])))
    return run


def detection_metrics(results, metric=""):
    """Table columns from final_metrics.json 'results' (Detectron2's AP in percent): those of its
    recorded metric (suite.tasks.METRICS), else (runs from before it was recorded) VOC's and COCO's."""
    if metric in tasks.METRICS:
        return tasks.metric_values(metric, results)
    bbox, segm = results.get("bbox") or {}, results.get("segm") or {}
    out = {k: bbox[k] for k in VOC_COLUMNS if k in bbox}
    if "AP" in bbox:
        out["AP (bbox)"] = bbox["AP"]
    if "AP" in segm:
        out["AP (segm)"] = segm["AP"]
    return out


def _seed(recorded, from_dir):
    """Detectron2's SEED -1 means 'random': the seed<k> folder name then says more."""
    return recorded if isinstance(recorded, int) and recorded >= 0 else from_dir


def columns_for(kind, task, with_slr=True, metric=""):
    if kind == "pretrain":
        return PRETRAIN_COLUMNS + (SLR_COLUMNS if with_slr else ())
    if kind == "classification":
        return dict(zip(contract.SVM_TASKS, (SVM_COLUMNS, LOWSHOT_COLUMNS))).get(task, SEMI_COLUMNS)
    if metric in tasks.METRICS:
        return tasks.columns(metric)
    return COCO_COLUMNS if "coco" in task.lower() else VOC_COLUMNS


def read_detection_run(d):
    layout_backbone, layout_task, seed = contract.fine_tune_run(d)
    if (d / contract.FINE_TUNE_DONE).exists():
        fm = read_json(d / contract.FINE_TUNE_DONE)
        run = Run(d, "detection", str(fm.get("backbone") or layout_backbone),
                  str(fm.get("task") or layout_task), _seed(fm.get("seed"), seed))
        results = fm.get("results")
        run.metric = str(fm.get("metric") or "")
        run.metrics = detection_metrics(results, run.metric) if isinstance(results, dict) else {}
        _put_provenance(run, d)
        # train_net writes NaN as null; either in a shown column (or none shown) = failed
        shown = [run.metrics[c] for c in columns_for("detection", run.task, metric=run.metric)
                 if c in run.metrics]
        if not shown or not all(_finite(v) for v in shown):
            run.problem = f"failed: final_metrics.json results are empty or NaN ({results!r:.80})"
        return run
    cfg = read_yaml(d / contract.CONFIG) if (d / contract.CONFIG).exists() else {}
    name = (cfg.get("TRANSFER") or {}).get("BACKBONE_NAME") if isinstance(cfg.get("TRANSFER"), dict) else None
    run = Run(d, "detection", name or layout_backbone, layout_task, _seed(cfg.get("SEED"), seed))
    crash = traceback_in_log(d / contract.LOG)
    if (d / contract.FAILED).exists():  # train_net's marker: the run raised (docs/formats.md)
        try:
            error = read_json(d / contract.FAILED).get("error", "?")
        except (OSError, ValueError, AttributeError):
            error = "failed.json unreadable"
        run.problem = f"failed: {str(error)[:160]}"
    elif crash:
        run.problem = f"failed: log.txt ends in a traceback ({crash})"
    else:
        it, newest = "?", d / contract.LOG
        if (d / contract.D2_METRICS).exists():  # Detectron2's JSONWriter: one record per line
            its = [r["iteration"] for r in contract.read_jsonl(d / contract.D2_METRICS) if "iteration" in r]
            it, newest = (its[-1] if its else "?"), d / contract.D2_METRICS
        run.problem = f"unfinished: no final_metrics.json (last iter {it}, written {age(newest)})"
    return run


def read_classification_runs(d, done):
    """The runs of a pretrain.svm (svm_metrics.json) or pretrain.semisup (semisup_metrics.json) folder:
    one, or for voc07_lowshot one per independent sample (the table's n; with pretraining seeds,
    samples x seeds). Backbone and task as the file records them, else from the folder
    (ROOT/<b>/<task>/seed<k>)."""
    rec = read_json(d / done)
    layout_backbone, layout_task, seed = contract.fine_tune_run(d)
    backbone, task = str(rec.get("backbone") or layout_backbone), str(rec.get("task") or layout_task)
    make = lambda metrics, s=seed: Run(d, "classification", backbone, task, s, metrics)  # noqa: E731
    if isinstance(rec.get("low_shot"), dict):
        per_k = {k: v.get("mAP") for k, v in rec["low_shot"].items() if isinstance(v, dict)}
        samples = max((len(v) for v in per_k.values() if isinstance(v, list)), default=0)
        runs = [make({k: v[i] for k, v in per_k.items() if isinstance(v, list) and i < len(v)}) for i in range(samples)]
    elif done == contract.SEMI_METRICS:
        runs = [make({"top-1": rec.get("top1"), "top-5": rec.get("top5")}, _seed(rec.get("seed"), seed))]
    else:
        runs = [make({"mAP": rec.get("mAP")})]
    runs = runs or [make({})]
    for run in runs:
        _put_provenance(run, d)
        if not any(_finite(v) for v in run.metrics.values()):
            run.problem = f"failed: {done} holds no finite metric"
    return runs


def random_init_run(lin_dir, lm, pretrain_runs, random_runs):
    """The row of an untrained backbone (`pretrain.linear --random-init`): one Run per folder
    holding linear_<preset>/ (its name is the row's; a seed<k> folder is seed k of its parent's
    row), in the section of the pretraining runs beside it (the same pipeline), else of the data
    it probed."""
    owner = contract.probe_owner(lin_dir)
    if owner not in random_runs:
        where = contract.pretrain_run(owner)
        row, home = where.backbone, where.home
        siblings = sorted(r.task for r in pretrain_runs if home.resolve() in r.path.resolve().parents)
        data = {"root": lm.get("data"), "format": lm.get("data_format")} if lm.get("preset") != "voc07" else {}
        task = max(set(siblings), key=siblings.count) if siblings else pretrain_task({"data": data})
        random_runs[owner] = Run(owner, "pretrain", row, task, lm.get("seed"),
                                 method=f"untrained {lm.get('arch', '?')} ({lm.get('stem', 'imagenet')} stem)")
    return random_runs[owner]


def attach_linear(lin_dir, pretrain_runs, problems, random_runs=None):
    """Put a linear_metrics.json on the pretraining run whose checkpoint it probed (or, failing
    that, the pretraining run that holds the probe directory); a random-init probe makes (or
    joins) its own row. The probe's kNN top-1 (the monitor's protocol on the same frozen features)
    replaces the monitor's, so every row of the column, random init included, is the same code."""
    lm = read_json(lin_dir / contract.PROBE_METRICS)
    if lm.get(contract.PROBE_RANDOM_INIT) and random_runs is not None:
        run = random_init_run(lin_dir, lm, pretrain_runs, random_runs)
        return _put_probe(run, lm, lin_dir, problems)
    ckpt = Path(str(lm.get("checkpoint", "")))
    candidates = [ckpt] if ckpt.is_absolute() else [lin_dir / ckpt, Path.cwd() / ckpt]
    owners = {r.path.resolve(): r for r in pretrain_runs}
    run = next((owners[c.resolve().parent] for c in candidates
                if str(ckpt) and c.resolve().parent in owners), None)
    if run is None:
        run = next((owners[p] for p in lin_dir.resolve().parents if p in owners), None)
    if run is None:
        problems.append((str(lin_dir), f"orphan linear probe: checkpoint {ckpt} is in no pretraining run found"))
        return
    _put_probe(run, lm, lin_dir, problems)


def _put_provenance(run, d):
    record = provenance.read(d)
    if record is not None:
        run.provenance.append({**record, "path": str(d)})


def _put_probe(run, lm, lin_dir, problems):
    _put_provenance(run, lin_dir)
    if _finite(lm.get("knn_top1")):
        run.metrics["kNN top-1"] = float(lm["knn_top1"])
    if lm.get("preset") == "voc07" or "mAP" in lm:
        column, value = "VOC07 cls mAP", lm.get("mAP")
    else:
        column, value = "linear top-1", lm.get("top1")
    if _finite(value):
        run.metrics[column] = float(value)
    else:
        problems.append((str(lin_dir), f"failed: linear_metrics.json has no finite {column}"))


def find_runs(paths):
    """Every run under `paths` (run dirs or roots searched recursively).

    Returns (runs, problems): runs include incomplete ones (run.problem set); problems are
    (path, reason) pairs for unreadable files, empty seed directories and orphan probes.
    """
    runs, problems, linear_dirs, seen = [], [], [], set()
    for root in paths:
        for dirpath, dirnames, filenames in os.walk(root):
            # snapshots' evaluations are curves over epochs (suite/checkpoint_evals.py), not rows
            dirnames[:] = sorted(n for n in dirnames if n != contract.CHECKPOINT_EVALS)
            d, files = Path(dirpath), set(filenames)
            if d.resolve() in seen:  # overlapping arguments (ROOT and ROOT/transfer): count once
                continue
            seen.add(d.resolve())
            try:
                if contract.PROBE_METRICS in files:
                    linear_dirs.append(d)
                elif files & {contract.SVM_METRICS, contract.SEMI_METRICS}:
                    done = contract.SVM_METRICS if contract.SVM_METRICS in files else contract.SEMI_METRICS
                    runs += read_classification_runs(d, done)
                elif contract.FINE_TUNE_DONE in files:
                    runs.append(read_detection_run(d))
                elif contract.CONFIG in files and is_pretrain_dir(d, files):
                    runs.append(read_pretrain_run(d))
                elif contract.CONFIG in files and files & {contract.D2_LAST_CHECKPOINT, contract.D2_METRICS,
                                                           contract.LOG}:
                    runs.append(read_detection_run(d))
                elif contract.folder_seed(d.name) is not None and not dirnames:
                    problems.append((str(d), "missing: seed directory holds no run files"))
            except (OSError, ValueError, yaml.YAMLError, AttributeError, TypeError) as e:
                problems.append((str(d), f"failed: unreadable run files ({type(e).__name__}: {e})"))
    pretrain_runs, random_runs = [r for r in runs if r.kind == "pretrain"], {}
    for d in linear_dirs:
        try:
            attach_linear(d, pretrain_runs, problems, random_runs)
        except (OSError, ValueError) as e:
            problems.append((str(d), f"failed: unreadable linear_metrics.json ({e})"))
    return runs + list(random_runs.values()), problems


def missing_seeds(runs):
    """(path, reason) for each seed that other backbones of the same task have and this one lacks."""
    by_task = {}
    for r in runs:
        if r.seed is not None:
            by_task.setdefault((r.kind, r.task), {}).setdefault(r.backbone, []).append(r)
    out = []
    for (kind, task), groups in sorted(by_task.items()):
        every = {r.seed for rs in groups.values() for r in rs}
        for backbone, rs in sorted(groups.items()):
            have = {r.seed for r in rs}
            for seed in sorted(every - have, key=str):
                sibling = contract.seed_sibling(rs[0].path, seed)
                where = str(sibling) if sibling else f"{backbone}/{task} seed {seed}"
                out.append((where, f"missing: seed {seed} of {backbone} on {task} "
                                   f"(other backbones have it)"))
    return out


# ---------------------------------------------------------------- aggregation
def summarize(values):
    """(mean, sample std or None for n=1, n)."""
    n = len(values)
    return statistics.fmean(values), (statistics.stdev(values) if n > 1 else None), n


def section_metrics(runs):
    """{(kind, task): the metric its complete runs recorded} (tasks with none: not in it)."""
    return {(r.kind, r.task): r.metric for r in runs if r.metric and not r.problem}


def aggregate(runs):
    """{(kind, task): {backbone: {column: (mean, std, n)}}} over complete runs only; a backbone
    whose runs are all incomplete keeps an empty row, so the table shows the gap."""
    table, metrics = {}, section_metrics(runs)
    for r in runs:
        cells = table.setdefault((r.kind, r.task), {}).setdefault(r.backbone, {})
        if r.problem:
            continue
        for column in columns_for(r.kind, r.task, metric=metrics.get((r.kind, r.task), "")):
            if _finite(r.metrics.get(column)):
                cells.setdefault(column, []).append(float(r.metrics[column]))
    return {key: {b: {c: summarize(v) for c, v in cols.items()} for b, cols in groups.items()}
            for key, groups in table.items()}


# ---------------------------------------------------------------- paired comparisons
MOCOV2 = "mocov2"
MOCOV2_NAME = re.compile(r"moco_?v2", re.I)


def seed_values(runs):
    """{(kind, task): {backbone: {column: {seed: value}}}} of the complete measured runs with a seed
    (reported rows are no runs: they are never paired)."""
    out = {}
    for r in runs:
        if r.problem or r.seed is None:
            continue
        cols = out.setdefault((r.kind, r.task), {}).setdefault(r.backbone, {})
        for column in columns_for(r.kind, r.task):
            if _finite(r.metrics.get(column)):
                cols.setdefault(column, {})[r.seed] = float(r.metrics[column])
    return out


def default_baseline(runs):
    """The MoCo v2 row: the backbone whose pretraining resolved to method mocov2 (the first by name
    if several), else one named like mocov2 / moco_v2 (a table over fine-tunes alone), else None."""
    named = sorted({r.backbone for r in runs if r.kind == "pretrain" and r.method_name == MOCOV2})
    named = named or sorted({r.backbone for r in runs if MOCOV2_NAME.search(r.backbone)})
    return named[0] if named else None


def paired_comparisons(runs, baselines):
    """{(kind, task): [(baseline, [(backbone, {column: stats.Paired})])]}: every other backbone of a
    section against each baseline that section has, over the seeds both ran."""
    out = {}
    for key, groups in seed_values(runs).items():
        for base in baselines:
            if base not in groups:
                continue
            rows = []
            for backbone, cols in sorted(groups.items()):
                if backbone == base:
                    continue
                cells = {c: stats.paired_difference(v, groups[base].get(c, {})) for c, v in cols.items()}
                cells = {c: p for c, p in cells.items() if p is not None}
                if cells:
                    rows.append((backbone, cells))
            if rows:
                out.setdefault(key, []).append((base, rows))
    return out


# ---------------------------------------------------------------- provenance
def provenance_footnote(runs):
    """One line: the suite commit(s) of the complete runs' records (their probes' included), and how
    many complete runs have none."""
    done = [r for r in runs if not r.problem]
    commits, missing = {}, 0
    for r in done:
        if not r.provenance:
            missing += 1
        for p in r.provenance:  # the run's own and its probes
            label = provenance.short(p.get("suite_commit")) + (" (dirty)" if p.get("suite_dirty") else "")
            commits[label] = commits.get(label, 0) + 1
    parts = [f"suite commit {c} ({n} record{'s' * (n != 1)})" for c, n in sorted(commits.items())]
    text = "Provenance: " + ("; ".join(parts) if parts else "no provenance records")
    return text + (f"; {missing} complete run{'s' * (missing != 1)} without a record" if missing else "")


PROVENANCE_COLUMNS = ("Run", "Kind", "Seed", "Commit", "torch / torchvision / Detectron2", "GPUs",
                      "Batch", "LR", "Schedule", "Numerics", "Weights SHA-256", "Pretrain config SHA-256",
                      "Wall (s)")


def _schedule_text(s):
    if not isinstance(s, dict):
        return "—"
    if "max_iter" in s:
        return f"{s.get('name')} steps {s.get('steps')} max_iter {s.get('max_iter')} warmup {s.get('warmup_iters')}"
    return f"{s.get('name')} {s.get('epochs')} ep" + (f" warmup {s['warmup_epochs']} ep" if s.get("warmup_epochs") else "")


def provenance_rows(runs):
    """(cells of PROVENANCE_COLUMNS) for every record of every run, in path order."""
    rows = []
    for p in sorted((p for r in runs for p in r.provenance), key=lambda p: p["path"]):
        v = p.get("versions") or {}
        commit = provenance.short(p.get("suite_commit")) + ("+dirty" if p.get("suite_dirty") else "")
        rows.append((p["path"], str(p.get("kind")), str(p.get("seed")), commit,
                     " / ".join(str(v.get(k) or "—") for k in ("torch", "torchvision", "detectron2")),
                     f"{p.get('gpu_count', 0)} x {p['gpu_model']}" if p.get("gpu_count") else "CPU",
                     str(p.get("batch_size")), f"{p['lr']:g}" if _finite(p.get("lr")) else "—",
                     _schedule_text(p.get("schedule")), str(p.get("numerics")),
                     provenance.short(p.get("weights_sha256")), provenance.short(p.get("pretrain_config_sha256")),
                     f"{p['wall_time_s']:.0f}" if _finite(p.get("wall_time_s")) else "—"))
    return rows


def run_records(runs):
    """results.jsonl: one record per run (and its probes' provenance), what each row is built from."""
    return [{"kind": r.kind, "task": r.task, "backbone": r.backbone, "seed": r.seed, "path": str(r.path),
             "metrics": r.metrics, "problem": r.problem, "method": r.method_name or None,
             "provenance": r.provenance} for r in sorted(runs, key=lambda r: str(r.path))]


def read_reported(path=REPORTED_FILE):
    """{task keyword: [(method, source, {column: value})]} in file order."""
    rows = {}
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            group = rows.setdefault(rec["task"], {}).setdefault((rec["method"], rec["source"]), {})
            group[rec["metric"]] = float(rec["value"])
    return {task: [(m, s, cols) for (m, s), cols in groups.items()] for task, groups in rows.items()}


def build_sections(runs, reported, mode="match"):
    """Sections of the table: (kind, task, columns, rows); a row is (label, source, {column: cell})
    with cell = (mean, std, n) for measured rows and (value, None, None) for reported ones."""
    sections, used, metrics = [], set(), section_metrics(runs)
    # pretraining sections first, then detection, then classification transfer, each by task name
    order = {"pretrain": 0, "detection": 1}
    for (kind, task), groups in sorted(aggregate(runs).items(), key=lambda kv: (order.get(kv[0][0], 2), kv[0])):
        columns = columns_for(kind, task, with_slr=any(SLR_COLUMNS[0] in cells for cells in groups.values()),
                              metric=metrics.get((kind, task), ""))
        if kind == "classification":  # a low-shot sweep may stop short of k=96
            columns = tuple(c for c in columns if any(c in cells for cells in groups.values())) or columns
        rows = [(b, "measured", cells) for b, cells in sorted(groups.items())]
        # the published VOC07+12 / COCO rows are not those of the suite.tasks tasks (VOC07 alone, ...)
        for keyword, entries in ({} if task in tasks.TASK_FOLDERS else reported).items():
            if mode == "match" and keyword in task.lower() and not SYNTHETIC.search(task) \
                    or mode == "all" and keyword in task.lower():
                used.add(keyword)
                rows += [(m, f"reported: {s}", {c: (v, None, None) for c, v in cols.items()})
                         for m, s, cols in entries if set(cols) & set(columns)]
        sections.append((kind, task, columns, rows))
    if mode == "all":
        for keyword, entries in reported.items():
            if keyword in used:
                continue
            kind = "detection" if keyword in ("voc", "coco") else "pretrain"
            columns = columns_for(kind, keyword, with_slr=False)
            rows = [(m, f"reported: {s}", {c: (v, None, None) for c, v in cols.items()})
                    for m, s, cols in entries]
            sections.append((kind, f"{keyword}: reported only", columns, rows))
    return sections


def method_notes(runs):
    """{(kind, task): [(backbone, 'method: switches')]} for the pretraining sections."""
    notes = {}
    for r in sorted(runs, key=lambda r: (r.backbone, str(r.path))):
        if r.kind == "pretrain" and r.method:
            labels = notes.setdefault(("pretrain", r.task), {}).setdefault(r.backbone, [])
            if r.method not in labels:
                labels.append(r.method)
    return {k: [(b, " / ".join(v)) for b, v in groups.items()] for k, groups in notes.items()}


def _note_line(notes, kind, task):
    entries = (notes or {}).get((kind, task))
    return "Methods: " + "; ".join(f"{b} = {label}" for b, label in entries) if entries else None


# ---------------------------------------------------------------- rendering
def format_cell(cell, pm="±", empty="—"):
    if cell is None:
        return empty
    mean, std, n = cell
    if n is None:
        return f"{mean:.1f}"
    return f"{mean:.1f} {pm} {std:.1f} (n={n})" if std is not None else f"{mean:.1f} (n={n})"


def _paired_blocks(paired, kind, task):
    return (paired or {}).get((kind, task), [])


def render_markdown(sections, incomplete, notes=None, paired=None, footnote=None, provenance_table=None):
    out = [f"_{STD_NOTE}_", ""] + ([f"_{stats.NOTE}_", ""] if paired else [])
    for kind, task, columns, rows in sections:
        out += [f"### {task} ({kind})", "", "| Backbone | " + " | ".join(columns) + " | Source |",
                "|---" * (len(columns) + 2) + "|"]
        out += ["| " + " | ".join([label] + [format_cell(cells.get(c)) for c in columns] + [source]) + " |"
                for label, source, cells in rows]
        note = _note_line(notes, kind, task)
        out += ["", note] if note else []
        for base, prows in _paired_blocks(paired, kind, task):
            out += ["", f"Paired difference vs {base} (mean [95% t-interval], seed-matched):", "",
                    "| Backbone | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
            out += ["| " + " | ".join([b] + [stats.format_paired(cells.get(c)) for c in columns]) + " |"
                    for b, cells in prows]
        out.append("")
    out.append("Incomplete runs:" if incomplete else "Incomplete runs: none")
    out += [f"- {path} — {reason}" for path, reason in incomplete]
    if footnote:
        out += ["", footnote]
    if provenance_table is not None:
        out += ["", "### Provenance", "", "| " + " | ".join(PROVENANCE_COLUMNS) + " |",
                "|---" * len(PROVENANCE_COLUMNS) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in provenance_table]
    return "\n".join(out) + "\n"


def _tex(s):
    return re.sub(r"([_&%#$])", r"\\\1", str(s))


def render_latex(sections, incomplete, notes=None, paired=None, footnote=None, provenance_table=None):
    out = [f"% {STD_NOTE}"] + ([f"% {stats.NOTE}"] if paired else [])
    for kind, task, columns, rows in sections:
        out += [r"\begin{tabular}{l" + "c" * len(columns) + "l}", r"\toprule",
                rf"\multicolumn{{{len(columns) + 2}}}{{l}}{{{_tex(task)} ({kind})}} \\", r"\midrule",
                " & ".join(["Backbone"] + [_tex(c) for c in columns] + ["Source"]) + r" \\", r"\midrule"]
        out += [" & ".join([_tex(label)] + [format_cell(cells.get(c), r"$\pm$", "--") for c in columns]
                           + [_tex(source)]) + r" \\" for label, source, cells in rows]
        for base, prows in _paired_blocks(paired, kind, task):
            out += [r"\midrule", rf"\multicolumn{{{len(columns) + 2}}}{{l}}{{paired vs {_tex(base)}: "
                                  r"mean [95\% $t$-interval]}} \\"]
            out += [" & ".join([_tex(b)] + [stats.format_paired(cells.get(c), empty="--") for c in columns]
                               + [""]) + r" \\" for b, cells in prows]
        note = _note_line(notes, kind, task)
        out += [r"\bottomrule", r"\end{tabular}"] + ([f"% {note}"] if note else []) + [""]
    out.append("% Incomplete runs:" if incomplete else "% Incomplete runs: none")
    out += [f"% {path} — {reason}" for path, reason in incomplete]
    if footnote:  # printed under the tables, not a comment: the commit travels with the numbers
        out += ["", r"\noindent{\footnotesize " + _tex(footnote) + "}"]
    if provenance_table is not None:
        out += [f"% provenance: {' | '.join(row)}" for row in provenance_table]
    return "\n".join(out) + "\n"


def render_csv(sections, incomplete, notes=None, paired=None, footnote=None, provenance_table=None):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "task", "backbone", "source", "metric", "mean", "std", "n", "note"])
    for (kind, task), entries in sorted((notes or {}).items()):  # the resolved switches
        for backbone, label in entries:
            w.writerow([kind, task, backbone, "config", "method", "", "", "", label])
    for kind, task, columns, rows in sections:
        for label, source, cells in rows:
            for c in columns:
                if c in cells:
                    mean, std, n = cells[c]
                    w.writerow([kind, task, label, source, c, repr(mean),
                                "" if std is None else repr(std), "" if n is None else n, ""])
        for base, prows in _paired_blocks(paired, kind, task):
            for b, cells in prows:
                for c in columns:
                    if c in cells:
                        p = cells[c]
                        note = "" if p.low is None else (f"95% t-interval [{p.low!r}, {p.high!r}]"
                                                         + ("; excludes 0" if p.excludes_zero else ""))
                        w.writerow([kind, task, b, f"paired vs {base}", c, repr(p.mean),
                                    "" if p.std is None else repr(p.std), p.n, note])
    for path, reason in incomplete:
        w.writerow(["", "", "", "incomplete", "", "", "", "", f"{path} — {reason}"])
    for row in provenance_table or ():
        w.writerow(["", "", "", "provenance", "", "", "", "", " | ".join(row)])
    if footnote:
        w.writerow(["", "", "", "footnote", "", "", "", "", footnote])
    return buf.getvalue()


RENDERERS = {"md": render_markdown, "csv": render_csv, "latex": render_latex}


def collect(paths, reported_mode="match", reported_file=REPORTED_FILE):
    """Everything the renderers need: (sections, incomplete [(path, reason)])."""
    runs, problems = find_runs(paths)
    incomplete = [(str(r.path), r.problem) for r in runs if r.problem] + problems
    seen = {p for p, _ in incomplete}
    incomplete += [(p, why) for p, why in missing_seeds(runs) if p not in seen]
    reported = read_reported(reported_file) if reported_mode != "none" else {}
    return build_sections(runs, reported, reported_mode), sorted(incomplete), runs


def not_a_directory(paths, prog):
    """Print one error line for the first path that is not a directory; True if there is one."""
    for p in paths:
        if not os.path.isdir(p):
            print(f"{prog}: {p} is not a directory; pass run directories or a root that holds them",
                  file=sys.stderr)
            return True
    return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories or roots searched recursively")
    parser.add_argument("--format", choices=sorted(RENDERERS), default="md")
    parser.add_argument("--out", help="write here (atomically) instead of stdout")
    parser.add_argument("--reported", choices=("match", "all", "none"), default="match",
                        help="reported rows: only beside matching tasks (default), all, or none")
    parser.add_argument("--baseline", nargs="+", metavar="NAME",
                        help="backbones every other one is paired against (seed-matched difference, "
                             "95%% t-interval); default: the MoCo v2 row (method mocov2) when present")
    parser.add_argument("--provenance", action="store_true",
                        help="print every run's provenance record (commit, versions, GPUs, batch, lr, "
                             "schedule, numerics, hashes, wall time) beside the table")
    args = parser.parse_args(argv)
    if not_a_directory(args.run_dirs, "results_table"):
        return 2
    sections, incomplete, runs = collect(args.run_dirs, args.reported)
    if not runs and not incomplete:
        print(f"results_table: no pretraining or detection runs found under {' '.join(args.run_dirs)}; "
              f"see docs/formats.md for the files a run writes", file=sys.stderr)
        return 2
    baselines = args.baseline or [b for b in [default_baseline(runs)] if b]
    measured = {r.backbone for r in runs}
    for name in set(baselines) - measured:
        print(f"results_table: --baseline {name}: no measured row of that name (rows: "
              f"{', '.join(sorted(measured))}); not paired", file=sys.stderr)
    text = RENDERERS[args.format](sections, incomplete, method_notes(runs),
                                  paired=paired_comparisons(runs, baselines), footnote=provenance_footnote(runs),
                                  provenance_table=provenance_rows(runs) if args.provenance else None)
    if args.out:
        try:
            contract.write_text(args.out, text)  # a reader never sees half a table
            # what the table is built from, one record per run with its provenance, beside it
            records = Path(args.out).with_name(contract.RESULTS_RECORDS)
            contract.write_text(records, "".join(json.dumps(r) + "\n" for r in run_records(runs)))
        except OSError as e:
            print(f"results_table: --out {args.out} cannot be written ({e.strerror or e}); pass a "
                  "path in a writable folder", file=sys.stderr)
            return 2
        complete = sum(not r.problem for r in runs)
        print(f"wrote {args.out} ({complete} complete runs, {len(incomplete)} incomplete)",
              file=sys.stderr)
        for path, reason in incomplete:  # also in the file; said here so a pipeline log shows it
            print(f"incomplete: {path} — {reason}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
