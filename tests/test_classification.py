"""Classification transfer: VOC07 SVM and low-shot SVM (pretrain.svm), semi-supervised fine-tuning on
a subset list (pretrain.semisup), the corpus's subset lists, and those tasks end to end as pipeline
stages into the results table."""
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from pretrain import semisup, svm
from pretrain.utils import UserError
from slurm import pipeline
from suite import contract, provenance, results



# ---------------------------------------------------------------- the SVM protocol's pieces
def test_svm_labels_mark_difficult_only_images_minus_one():
    present = np.array([[1, 0, 1], [0, 1, 1]])
    difficult_only = np.array([[0, 0, 1], [0, 0, 0]], dtype=bool)
    assert svm.svm_labels(present, difficult_only).tolist() == [[1, 0, -1], [0, 1, 1]]


def test_low_shot_sample_draws_k_positives_and_c_minus_1_k_negatives():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(200, 4))
    labels[:10, 0] = -1                                     # difficult-only: never drawn
    sample = svm.low_shot_sample(labels, 3, np.random.default_rng((0, 1, 3)))
    for c in range(4):
        used = sample[:, c] != -1
        assert (sample[:, c] == 1).sum() == 3 and (sample[:, c] == 0).sum() == 3 * 3
        assert (sample[used, c] == labels[used, c]).all()  # a drawn image keeps its true label
    assert (sample[:10, 0] == -1).all()
    again = svm.low_shot_sample(labels, 3, np.random.default_rng((0, 1, 3)))
    other = svm.low_shot_sample(labels, 3, np.random.default_rng((0, 2, 3)))
    assert (again == sample).all() and (other != sample).any()
    with pytest.raises(UserError, match="k=60: class a has 80 trainval images without it, 180 needed"):
        svm.low_shot_sample(labels, 60, rng, classes=["a", "b", "c", "d"])


def _toy_voc(n, classes, informative, seed):
    """Features whose first `classes` dims carry each class's presence (or nothing), labels in {0, 1}."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, classes)) < 0.4).astype(np.int64)
    x = rng.normal(size=(n, 16))
    if informative:
        x[:, :classes] += 6.0 * labels
    return x, labels


def test_voc07_svm_separates_informative_features_and_not_noise():
    x, y = _toy_voc(90, 3, True, 0)
    tx, ty = _toy_voc(60, 3, True, 1)
    ty[0] = -1                                              # an ignored test row
    good = svm.voc07_svm(x, y, tx, ty, costs=(0.1, 1.0), log=lambda _: None)
    assert good["mAP"] > 95.0 and all(c in (0.1, 1.0) for c in good["costs"])
    assert len(good["crossval_ap"]) == 3 and all(len(row) == 2 for row in good["crossval_ap"])
    # the classes fitted in 2 processes (joblib) give the same numbers
    assert svm.voc07_svm(x, y, tx, ty, costs=(0.1, 1.0), jobs=2, log=lambda _: None) == good
    nx, ny = _toy_voc(90, 3, False, 0)
    noise = svm.voc07_svm(nx, ny, _toy_voc(60, 3, False, 1)[0], ty, costs=(0.1, 1.0), log=lambda _: None)
    assert noise["mAP"] < 75.0


def test_voc07_lowshot_reports_each_sample_at_the_best_mean_cost():
    x, y = _toy_voc(120, 2, True, 0)
    tx, ty = _toy_voc(60, 2, True, 1)
    out = svm.voc07_lowshot(x, y, tx, ty, k_values=(1, 4), samples=3, costs=(1e-4, 1.0), log=lambda _: None)
    assert list(out) == ["k=1", "k=4"]
    for cell in out.values():
        assert len(cell["mAP"]) == 3 and cell["cost"] in (1e-4, 1.0)
        assert cell["mean"] == pytest.approx(np.mean(cell["mAP"]))
        assert cell["std"] == pytest.approx(np.std(cell["mAP"], ddof=1))
    # the best cost's mean is at least the other cost's: recompute both for k=4
    xs, txs = svm.l2_normalize(x), svm.l2_normalize(tx)
    per = np.array([svm.low_shot_map(xs, svm.low_shot_sample(y, 4, np.random.default_rng((0, i, 4))), txs, ty,
                                     (1e-4, 1.0)) for i in range(3)])
    assert out["k=4"]["mean"] == pytest.approx(per.mean(axis=0).max())


# ---------------------------------------------------------------- semi-supervised pieces
def test_read_subset_finds_names_in_train_and_refuses_unknown_or_ambiguous(tmp_path):
    samples = [("/d/train/a/x1.JPEG", 0), ("/d/train/a/x2.JPEG", 0), ("/d/train/b/y1.JPEG", 1),
               ("/d/train/b/x2.JPEG", 1)]
    lst = tmp_path / "1percent.txt"
    lst.write_text("y1.JPEG\nx1.JPEG\n\nx1.JPEG\na/x2.JPEG\n")
    assert semisup.read_subset(lst, samples) == [2, 0, 1]
    lst.write_text("x2.JPEG\n")
    with pytest.raises(UserError, match="'x2.JPEG' matches 2 train images"):
        semisup.read_subset(lst, samples)
    lst.write_text("zz.JPEG\n")
    with pytest.raises(UserError, match=r"1percent.txt: 'zz.JPEG' matches no train images"):
        semisup.read_subset(lst, samples)


def test_topk_accuracy_hand_case():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    acc = semisup.topk_accuracy(logits, torch.tensor([1, 2, 0]), ks=(1, 2, 5))
    assert acc[1] == pytest.approx(100 / 3) and acc[2] == pytest.approx(200 / 3) and acc[5] == 100.0


def test_fine_tune_trains_every_layer():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(32, 4) + 2, torch.randn(32, 4) - 2])
    y = torch.cat([torch.zeros(32), torch.ones(32)]).long()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    first = model[0].weight.detach().clone()
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=16, shuffle=True)
    before = semisup.evaluate(model, loader, torch.device("cpu"))[1]
    semisup.fine_tune(model, loader, 10, 0.1, torch.device("cpu"))
    assert semisup.evaluate(model, loader, torch.device("cpu"))[1] == 100.0 > before
    assert not torch.equal(first, model[0].weight)


class Killed(Exception):
    """A job killed right after an epoch's record was logged, before its state was saved."""


def test_killed_fine_tune_resumes_to_the_numbers_of_an_unbroken_run(tmp_path):
    from pretrain.resume import EpochState

    x = torch.cat([torch.randn(32, 4, generator=torch.Generator().manual_seed(1)) + 2,
                   torch.randn(32, 4, generator=torch.Generator().manual_seed(2)) - 2])
    y = torch.cat([torch.zeros(32), torch.ones(32)]).long()

    def attempt(out, kill_after=None, init_seed=0):
        torch.manual_seed(init_seed)  # a resumed attempt builds its model anew (another init here)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 2))
        loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=16, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
        rows, msgs = [], []

        def log(row):
            rows.append(row)
            if row["epoch"] == kill_after:
                raise Killed

        state = EpochState(out, {"lr": 0.1}, log=msgs.append)
        semisup.fine_tune(model, loader, 5, 0.1, torch.device("cpu"), log, state)
        return model, rows, msgs

    unbroken, rows, _ = attempt(tmp_path / "a")
    with pytest.raises(Killed):
        attempt(tmp_path / "b", kill_after=3)  # the state of epoch 2 is on disk, epoch 3's is not
    resumed, rest, msgs = attempt(tmp_path / "b", init_seed=7)
    assert msgs == [f"resuming from {tmp_path / 'b' / contract.TRAIN_STATE}: epoch 2, iteration 8"]
    assert [r["epoch"] for r in rest] == [3, 4, 5] and rest == rows[2:]  # shuffling, dropout, lr: as unbroken
    for a, b in zip(unbroken.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_epoch_state_of_other_settings_or_damaged_starts_over_and_a_foreign_file_stops(tmp_path):
    from pretrain.resume import EpochState

    lin = nn.Linear(3, 2)
    msgs = []
    metrics = tmp_path / contract.METRICS
    metrics.write_text('{"type": "linear", "epoch": 1, "iter": 4}\n{"type": "linear", "epoch": 2, "iter": 8}\n')
    EpochState(tmp_path, {"lr": 0.1}).save({"m": lin}, 1, 4)
    assert EpochState(tmp_path, {"lr": 0.1}, msgs.append).restore({"m": nn.Linear(3, 2)}) == (1, 4)
    assert [r["epoch"] for r in contract.read_jsonl(metrics)] == [1]  # logged after the state: dropped
    assert EpochState(tmp_path, {"lr": 0.2}, msgs.append).restore({"m": lin}) == (0, 0)
    assert "the state of a run with other settings; starting over" in msgs[-1]
    assert contract.read_jsonl(metrics) == []  # starting over: the records go too
    path = tmp_path / contract.TRAIN_STATE
    path.write_bytes(path.read_bytes()[:100])  # cut by a full disk
    assert EpochState(tmp_path, {"lr": 0.1}, msgs.append).restore({"m": lin}) == (0, 0)
    assert "cannot be read as a torch checkpoint" in msgs[-1] and "starting over" in msgs[-1]
    torch.save({"settings": Killed}, path)  # an object: safe loading refuses it, and so does the run
    with pytest.raises(UserError, match="refused"):
        EpochState(tmp_path, {"lr": 0.1}, msgs.append).restore({"m": lin})


def test_corpus_writes_per_class_subset_lists(corpus):
    train = {p.name: p.parent.name for p in (contract.Corpus(corpus).imagefolder / "train").rglob("*.jpg")}
    for task, name in contract.SEMI_SUBSETS.items():
        lines = (contract.Corpus(corpus).subsets / name).read_text().split()
        assert len(set(lines)) == len(lines) and set(lines) <= set(train)
        assert {train[n] for n in lines} == set(train.values())   # every class labelled at least once
    assert len((contract.Corpus(corpus).subsets / "1percent.txt").read_text().split()) == 8


# ---------------------------------------------------------------- end to end: stages -> table
def test_classification_tasks_run_as_pipeline_stages_into_the_table(corpus, tmp_path):
    """build_stages' classification stages for a pretrained backbone and random init, run by their own
    command lines (one by pipeline.run_stage, the others in-process: the module's main with the
    stage's argv), then the table."""
    out = tmp_path / "runs"
    layout = contract.Layout(out)
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    ckpt = layout.pretrain_dir("demo") / contract.CHECKPOINT
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": {"encoder_q." + k: v for k, v in net.state_dict().items() if not k.startswith("fc.")},
                "config": {"model": {"arch": "resnet18"}}}, ckpt)
    common = ("--image-size", "32", "--num-workers", "0", "--device", "cpu")
    svm_common = (*common, "--jobs", "1")
    stages = pipeline.build_stages(
        pipeline.named_configs(["configs/pretrain/demo.yaml"]), corpus / "imagefolder", out, seeds=2,
        random_init=True, classification_tasks=contract.CLASSIFICATION_TASKS[:3], probe_voc_root=corpus,
        semi_subsets=contract.Corpus(corpus).subsets,
        svm_opts=(*svm_common, "--classes", "synthetic", "--k-values", "1", "2", "--samples", "3", "--costs", "0.1", "1"),
        semi_opts=(*common, "--epochs", "1", "--batch-size", "8"))
    classify = [s for s in stages if s.name.startswith("classify/")]
    assert sorted(s.name for s in classify) == sorted(
        f"classify/{b}/{t}" for b in ("demo", "random_init")
        for t in ("voc07_svm/seed0", "voc07_lowshot/seed0", "semi_1pct/seed0", "semi_1pct/seed1"))
    assert all(s.kind == "probe" and s.after == (("pretrain/demo",) if "/demo/" in s.name else ())
               for s in classify)
    assert set(s.name for s in classify) <= set(stages[-1].after)          # the table waits for them
    # one stage as the pipeline runs it (a subprocess of its command line), the rest in this process
    pipeline.run_stage(classify[-1], log=lambda _: None)
    for stage in classify[:-1]:
        argv = stage.command()
        assert argv[1] == "-m"
        importlib.import_module(argv[2]).main(argv[3:])
        assert stage.done()
    svm_run = json.loads((layout.transfer_dir("demo", "voc07_svm", 0) / contract.SVM_METRICS).read_text())
    assert 0 < svm_run["mAP"] <= 100 and svm_run["backbone"] == "demo" and len(svm_run["aps"]) == 8
    semi = json.loads((layout.transfer_dir("random_init", "semi_1pct", 1) / contract.SEMI_METRICS).read_text())
    assert semi["num_labelled"] == 8 and semi["random_init"] and 0 <= semi["top1"] <= semi["top5"] <= 100

    for stage in classify:  # each run's provenance record (issue 17), beside its metrics
        rec = json.loads((Path(stage.done_file).parent / contract.PROVENANCE).read_text())
        assert set(provenance.FIELDS) <= set(rec), stage.name
        assert rec["kind"] == ("semisup" if "/semi_" in stage.name else "svm")
        assert rec["weights_sha256"] == (provenance.sha256(ckpt) if "/demo/" in stage.name else None)
        assert rec["seed"] == (1 if stage.name.endswith("seed1") else 0)

    sections, incomplete, runs = results.collect([out], "none")
    assert all(r.provenance for r in runs if r.kind == "classification")
    assert not [p for p in incomplete if "classify" in p or "transfer" in p]
    table = {(kind, task): (columns, {label: cells for label, _, cells in rows})
             for kind, task, columns, rows in sections}
    columns, rows = table[("classification", "voc07_lowshot")]
    assert columns == ("k=1", "k=2") and set(rows) == {"demo", "random_init"}
    mean, std, n = rows["demo"]["k=2"]
    low = json.loads((layout.transfer_dir("demo", "voc07_lowshot", 0) / contract.SVM_METRICS).read_text())
    assert n == 3 and mean == pytest.approx(low["low_shot"]["k=2"]["mean"])
    assert std == pytest.approx(low["low_shot"]["k=2"]["std"])
    assert table[("classification", "voc07_svm")][1]["demo"]["mAP"] == (pytest.approx(svm_run["mAP"]), None, 1)
    columns, rows = table[("classification", "semi_1pct")]
    assert columns == ("top-1", "top-5") and rows["random_init"]["top-1"][2] == 2
    text = results.render_markdown(sections, incomplete)
    assert "### voc07_lowshot (classification)" in text and "(n=3)" in text


@pytest.mark.parametrize("config,kwargs,needle", [
    ("demo.yaml", dict(classification_tasks=("semi_5pct",)), "unknown classification task semi_5pct"),
    ("demo.yaml", dict(classification_tasks=("voc07_lowshot",)), "read VOC2007/ from probe_voc_root"),
    ("demo.yaml", dict(classification_tasks=("semi_1pct",)), "subset lists (1percent.txt, 10percent.txt)"),
    ("sane_r50_cifar.yaml", dict(classification_tasks=("semi_1pct",), semi_subsets="s"),
     "data_root is cifar10 (sane_r50_cifar): set semi_data_root"),
])
def test_pipeline_refuses_classification_tasks_it_cannot_run(config, kwargs, needle, tmp_path):
    with pytest.raises(pipeline.PipelineError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        pipeline.build_stages(pipeline.named_configs([f"configs/pretrain/{config}"]), tmp_path, tmp_path / "o",
                              **kwargs)


def test_table_reads_hand_written_classification_files(tmp_path):
    """A low-shot file is one run per sample; a file with no finite metric is a failed run."""
    low = tmp_path / "transfer" / "b" / "voc07_lowshot" / "seed0"
    low.mkdir(parents=True)
    contract.write_json(low / contract.SVM_METRICS, {"task": "voc07_lowshot", "backbone": "b", "low_shot": {
        "k=1": {"cost": 1.0, "mAP": [10.0, 20.0, 30.0]}, "k=2": {"cost": 1.0, "mAP": [40.0, 50.0, float("nan")]}}})
    semi = tmp_path / "transfer" / "b" / "semi_10pct" / "seed3"
    semi.mkdir(parents=True)
    contract.write_json(semi / contract.SEMI_METRICS, {"top1": None, "top5": None})
    sections, incomplete, runs = results.collect([tmp_path], "none")
    assert len([r for r in runs if r.task == "voc07_lowshot"]) == 3
    rows = {task: {label: cells for label, _, cells in r} for _, task, _, r in sections}
    assert rows["voc07_lowshot"]["b"]["k=1"] == (20.0, 10.0, 3) and rows["voc07_lowshot"]["b"]["k=2"][2] == 2
    assert incomplete == [(str(semi), "failed: semisup_metrics.json holds no finite metric")]
    bad = [r for r in runs if r.task == "semi_10pct"]
    assert bad[0].backbone == "b" and bad[0].seed == 3


@pytest.mark.parametrize("module,argv,needle", [
    (svm, ["--task", "voc07_lowshot", "--k-values", "40"], "pass smaller --k-values"),
    (semisup, ["--subset", "missing.txt"], "missing.txt cannot be read"),
])
def test_bad_inputs_exit_2_with_one_line(module, argv, needle, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = corpus if module is svm else corpus / "imagefolder"
    with pytest.raises(SystemExit) as exc:
        module.main(["--random-init", "--arch", "resnet18", "--data", str(data), "--output-dir", str(tmp_path / "o"),
                     *(["--jobs", "1"] if module is svm else []),
                     "--image-size", "32", "--num-workers", "0", "--device", "cpu", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
