"""VOC07 image classification with linear SVMs on frozen features (Goyal et al. 2019, VISSL's
protocol): `--task voc07_svm` (per-class SVMs on trainval, cost by 3-fold cross-validation, mAP on
test) and `--task voc07_lowshot` (k positives per class, 5 independent samples, mAP per k).
`python -m pretrain.svm --checkpoint CKPT --data ROOT --task voc07_svm|voc07_lowshot`, or
`--random-init --arch A --stem S --seed S`. Needs scikit-learn (LinearSVC, cross_val_score).

The protocol, as VISSL's SVMTrainer / SVMLowShotTrainer and create_voc07_low_shot_samples:
- features: the backbone's global-average-pooled res5 output (what pretrain.linear probes; VISSL's
  ResNet-50 tables also report pooled res5) of the image resized to image_size x image_size,
  L2-normalised (x / (|x| + 1e-5)); the backbone frozen, BN in eval;
- labels per class: 1 (an object that is not difficult), -1 (only difficult objects), 0 (none);
- voc07_svm: LinearSVC(C, class_weight {1: 2, -1: 1}, squared hinge, l2, dual, tol 1e-4,
  max_iter 2000) on targets 1 vs the rest; C per class = the cost with the best mean 3-fold
  cross-validated AP (sklearn's average_precision) on trainval; test AP (VOC all-points, the
  difficult-only images ignored) with that C; mAP over classes;
- voc07_lowshot: per sample and k, each class's SVM sees k images with label 1 and (C-1)·k with
  label 0 drawn from trainval (difficult-only never); per k the reported cost is the one whose mean
  test mAP over the samples is best (VISSL's aggregate_stats: the choice is on test, as published).
  Sample i, k draws with numpy's default_rng((seed, i, k)). The table gives mean ± sample std
  (ddof=1) over the samples at that cost (VISSL prints ddof=0).
The fits run in --jobs processes (joblib: classes for voc07_svm, draws for voc07_lowshot)."""
import argparse
import math
import os
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from pretrain.data import MEAN, STD
from pretrain.knn import extract_features
from pretrain.linear import (_parse_classes, add_source_args, average_precision, source_backbone, source_name,
                             source_output_dir, voc07_sets)
from pretrain.model import STEMS
from pretrain.utils import UserError, run_command
from suite import contract, provenance

# VISSL's benchmark configs (svm/voc07 and low_shot_transfer/voc07)
COSTS = (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)
K_VALUES = (1, 2, 4, 8, 16, 32, 64, 96)
SAMPLES = 5
FOLDS = 3


def _sklearn():
    try:
        from sklearn.model_selection import cross_val_score
        from sklearn.svm import LinearSVC
    except ImportError:
        raise UserError("the SVM tasks need scikit-learn: pip install scikit-learn "
                        "(make setup installs it)") from None
    return LinearSVC, cross_val_score


# ---------------------------------------------------------------- the math (numpy in, numbers out)
def svm_labels(present, difficult_only):
    """VISSL's VOC label matrix [N, C]: 1 present (not only difficult), -1 difficult only, 0 absent."""
    labels = np.asarray(present, dtype=np.int64).copy()
    labels[np.asarray(difficult_only, dtype=bool)] = -1
    return labels


def l2_normalize(features):
    """x / (|x| + 1e-5) per row, in float64 (VISSL's _normalize_features)."""
    features = np.asarray(features, dtype=np.float64)
    return features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-5)


def make_svm(cost, max_iter=2000):
    LinearSVC, _ = _sklearn()
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
                     loss="squared_hinge", tol=1e-4, dual=True, max_iter=max_iter)


def _fit(clf, x, y):
    with warnings.catch_warnings():  # max_iter reached on separable toy data: the protocol's cap
        warnings.simplefilter("ignore")
        return clf.fit(x, y)


def test_ap(scores, labels):
    """VOC all-points AP (pretrain.linear.average_precision) of one class, label -1 rows ignored."""
    labels = np.asarray(labels)
    return average_precision(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels == 1),
                             torch.as_tensor(labels == -1))


def crossval_ap(x, y, costs, folds=FOLDS):
    """Mean `folds`-fold cross-validated AP of each cost for one class (y in {-1, 1})."""
    _, cross_val_score = _sklearn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [float(cross_val_score(make_svm(c), x, y, cv=folds, scoring="average_precision").mean())
                for c in costs]


def mean_ap(aps):
    """mAP in percent over the classes with an AP (nan: no test positive, or left out)."""
    valid = [a for a in aps if not math.isnan(a)]
    return 100.0 * sum(valid) / max(len(valid), 1)


def _parallel(calls, jobs):
    """[f(*args) for f, args in calls], over `jobs` processes (joblib; in this process for 1)."""
    if jobs == 1:
        return [f(*args) for f, args in calls]
    from joblib import Parallel, delayed   # scikit-learn's own dependency
    return Parallel(n_jobs=jobs)(delayed(f)(*args) for f, args in calls)


def svm_class(train_x, labels, test_x, test_labels, costs, folds):
    """One class of voc07_svm: (test AP, chosen cost, cross-validated AP per cost), or
    (nan, None, None) with fewer than `folds` positives or negatives."""
    y = np.where(labels == 1, 1, -1)  # difficult-only trains as negative (VISSL)
    if min((y == 1).sum(), (y == -1).sum()) < folds:
        return float("nan"), None, None
    cv = crossval_ap(train_x, y, costs, folds)
    best = costs[int(np.argmax(cv))]
    clf = _fit(make_svm(best), train_x, y)
    return test_ap(clf.decision_function(test_x), test_labels), best, cv


def voc07_svm(train_x, train_labels, test_x, test_labels, costs=COSTS, folds=FOLDS, jobs=1, log=print):
    """The full VOC07 SVM task: {"mAP", "aps", "costs", "crossval_ap"} (per class); a class with
    fewer than `folds` trainval positives (or negatives) is left out of the mAP (AP nan)."""
    train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
    per_class = _parallel([(svm_class, (train_x, train_labels[:, c], test_x, test_labels[:, c], costs, folds))
                           for c in range(train_labels.shape[1])], jobs)
    for c, (ap, cost, cv) in enumerate(per_class):
        log(f"class {c}: " + (f"cost {cost} (cross-val AP {max(cv):.4f}), test AP {ap:.4f}" if cv else
                              f"fewer than {folds} positives or negatives in trainval, left out"))
    aps, chosen, crossval = (list(col) for col in zip(*per_class))
    return {"mAP": mean_ap(aps), "aps": [None if math.isnan(a) else a for a in aps], "costs": chosen,
            "crossval_ap": crossval}


def low_shot_sample(labels, k, rng, classes=None):
    """One low-shot draw (create_voc07_low_shot_samples): [N, C] of -1 (unused) except, per class,
    k images labelled 1 and (C-1)·k labelled 0. A class short of images is a UserError."""
    n_classes = labels.shape[1]
    out = np.full(labels.shape, -1, dtype=np.int64)
    for c in range(n_classes):
        for value, n in ((1, k), (0, (n_classes - 1) * k)):
            pool = np.flatnonzero(labels[:, c] == value)
            if len(pool) < n:
                name = classes[c] if classes else c
                raise UserError(f"low-shot k={k}: class {name} has {len(pool)} trainval images "
                                f"{'with' if value else 'without'} it, {n} needed; pass smaller --k-values")
            out[rng.choice(pool, n, replace=False), c] = value
    return out


def low_shot_map(train_x, sample, test_x, test_labels, costs):
    """Test mAP (percent) of each cost for one low-shot draw (rows of label -1 unused per class)."""
    maps = []
    for cost in costs:
        aps = []
        for c in range(sample.shape[1]):
            use = sample[:, c] != -1
            clf = _fit(make_svm(cost), train_x[use], np.where(sample[use, c] == 1, 1, -1))
            aps.append(test_ap(clf.decision_function(test_x), test_labels[:, c]))
        maps.append(mean_ap(aps))
    return maps


def voc07_lowshot(train_x, train_labels, test_x, test_labels, k_values=K_VALUES, samples=SAMPLES,
                  costs=COSTS, seed=0, classes=None, jobs=1, log=print):
    """{"k=<k>": {"cost", "mAP": [one per sample at that cost], "mean", "std"}} (std: ddof=1)."""
    train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
    draws = [(k, low_shot_sample(train_labels, k, np.random.default_rng((seed, i, k)), classes))
             for k in k_values for i in range(samples)]   # all drawn first: a short class fails at once
    maps = _parallel([(low_shot_map, (train_x, sample, test_x, test_labels, costs)) for _, sample in draws], jobs)
    out = {}
    for j, k in enumerate(k_values):
        per_sample = np.array(maps[j * samples:(j + 1) * samples])               # [samples, costs]
        best = int(np.argmax(per_sample.mean(axis=0)))
        chosen = [float(v) for v in per_sample[:, best]]
        out[f"k={k}"] = {"cost": costs[best], "mAP": chosen, "mean": float(np.mean(chosen)),
                         "std": float(np.std(chosen, ddof=1)) if samples > 1 else None}
        log(f"k={k}: cost {costs[best]}, mAP {np.mean(chosen):.2f} over {samples} samples")
    return out


# ---------------------------------------------------------------- the command
def voc_features(backbone, dataset, device, batch_size, num_workers):
    """(features [N, D] float64 numpy, VISSL labels [N, C]) of a VOC07Classification set."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats, index = extract_features(backbone, loader, device, normalize=False)
    index = index.cpu()
    labels = svm_labels(dataset.targets[index].numpy(), dataset.ignore[index].numpy())
    return feats.double().cpu().numpy(), labels


def run(args):
    started = time.time()
    backbone, info, device = source_backbone(args)
    backbone.to(device)
    tf = transforms.Compose([transforms.Resize((args.image_size, args.image_size)), transforms.ToTensor(),
                             transforms.Normalize(MEAN, STD)])
    train_set, test_set = voc07_sets(args.data, tf, tf, _parse_classes(args.classes, args.data))
    out_dir = source_output_dir(args, lambda run: run / args.task)
    train_x, train_y = voc_features(backbone, train_set, device, args.batch_size, args.num_workers)
    test_x, test_y = voc_features(backbone, test_set, device, args.batch_size, args.num_workers)
    log = lambda line: print(f"[{args.task}] {line}", flush=True)  # noqa: E731
    costs = tuple(args.costs)
    if args.task == "voc07_svm":
        result = voc07_svm(train_x, train_y, test_x, test_y, costs, args.folds, args.jobs, log)
    else:
        result = {"low_shot": voc07_lowshot(train_x, train_y, test_x, test_y, tuple(args.k_values), args.samples,
                                            costs, args.seed, train_set.classes, args.jobs, log)}
    result = {"task": args.task, "backbone": source_name(args), **result, "classes": train_set.classes,
              "checkpoint": None if args.random_init else str(args.checkpoint),
              contract.RANDOM_INIT: bool(args.random_init), "arch": info["arch"], "stem": info["stem"],
              "data": str(args.data), "image_size": args.image_size, "cost_list": list(costs), "seed": args.seed,
              "feature_dim": int(train_x.shape[1]), "num_train": int(train_x.shape[0]),
              "num_test": int(test_x.shape[0])}
    schedule = {"name": "LinearSVC", "task": args.task, "costs": list(costs), "folds": args.folds}
    provenance.write_frozen_run(  # suite/provenance.py; then the done marker (no training batch or lr)
        out_dir, "svm", (None, None, schedule, provenance.DEFAULT_NUMERICS, None, args.seed),
        device=device, weights=None if args.random_init else args.checkpoint, started=started)
    contract.write_json(contract.done_file("svm", out_dir), result)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pretrain.svm", description=__doc__.split("\n\n")[0])
    add_source_args(p)
    p.add_argument("--data", required=True, help="the folder holding VOC2007/ (synthetic corpus: DIR)")
    p.add_argument("--task", choices=contract.SVM_TASKS, default="voc07_svm")
    p.add_argument("--costs", type=float, nargs="+", default=COSTS, help="SVM costs C swept")
    p.add_argument("--folds", type=int, default=FOLDS, help="cross-validation folds (voc07_svm)")
    p.add_argument("--k-values", type=int, nargs="+", default=K_VALUES, help="positives per class (voc07_lowshot)")
    p.add_argument("--samples", type=int, default=SAMPLES, help="independent low-shot draws per k")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count(), help="processes fitting SVMs (default: the CPUs this process may use)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--arch", help="torchvision ResNet name (default: the checkpoint's, else resnet50)")
    p.add_argument("--stem", choices=STEMS, help="default: the checkpoint's")
    p.add_argument("--classes", help='"synthetic" (the corpus\'s list) or comma-separated names (default: the '
                                     "sorted names in the annotations)")
    p.add_argument("--backbone", help="the name in the results table (default: the checkpoint's run folder)")
    p.add_argument("--output-dir", help="default: <checkpoint folder>/<task> (required with --random-init)")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="the low-shot draws; --random-init's weights")
    args = p.parse_args(argv)
    if args.folds < 2 or args.samples < 1 or min(args.k_values) < 1 or min(args.costs) <= 0 or args.jobs < 1:
        p.error("--folds >= 2, --samples >= 1, --k-values >= 1, --costs > 0 and --jobs >= 1")
    return args


def main(argv=None):
    return run_command("pretrain.svm", run, parse_args(argv), ("task", "backbone", "mAP", "low_shot"))


def cli(argv=None):
    """The command (sane-svm): main's exit code, not its result."""
    main(argv)
    return 0


if __name__ == "__main__":
    main()
