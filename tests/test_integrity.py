"""Run integrity (issue 14): no bad state replaces good, no run takes over another's output dir,
damaged checkpoints fall back, crashed runs are filed right. test_harm* are the five harms of the
issue (harm 1, weights files that run code, is the hostile cases of test_bad_inputs.py)."""
import json
import os
import pickle
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw

from pretrain.__main__ import main as pretrain_cli
from pretrain.config import load_config
from pretrain.engine import train
from pretrain.utils import UserError

ROOT = Path(__file__).resolve().parents[1]
DEMO_DET = "configs/detection/demo_shapes_voc_R_18_C4.yaml"
# ResNet-18 at 32 px, batch 4 of 24 images: 6 iterations an epoch, a step well under a second
TINY = ["model.arch=resnet18", "model.dim=16", "model.queue=16", "model.m=0.9", "data.crop=32",
        "data.batch_size=4", "data.num_workers=0", "mm.crops=[16]", "mm.kappa=2.0", "log.every_iters=1",
        "log.progress=false", "log.tensorboard=false", "deterministic=true", "device=cpu",
        "knn.every_epochs=0", "checkpoint.save_every_epochs=0", "epochs=1"]


@pytest.fixture(scope="module")
def images(module_tmp):
    """3 classes x 8 images of 40 px, ImageFolder layout."""
    root = module_tmp("images")
    rng = random.Random(0)
    for c in range(3):
        (root / "train" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            img = Image.new("RGB", (40, 40), tuple(rng.randrange(256) for _ in range(3)))
            ImageDraw.Draw(img).rectangle([5 + c, 5, 30, 20 + 5 * c], fill=(255, 255, 255))
            img.save(root / "train" / f"c{c}" / f"{i}.jpg")
    return root


def cfg_for(images, out, *extra):
    return load_config("configs/pretrain/demo.yaml", TINY + [f"data.root={images}", f"output_dir={out}", *extra])


def cli_args(images, out, *extra):
    return ["--config", "configs/pretrain/demo.yaml", *TINY, f"data.root={images}", f"output_dir={out}", *extra]


def iters_logged(out):
    return [r["iter"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"]


def finite_checkpoint(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt, all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


# ---------------------------------------------------------------- harm 2: another run's output dir
def test_harm2_a_run_with_another_config_is_refused_in_a_finished_runs_dir(images, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain_cli(cli_args(images, out)) == 0
    saved = {f: (out / f).read_bytes() for f in ("config.yaml", "done.json", "checkpoint.pth")}
    capsys.readouterr()
    # MoCo v2 (another method) and another batch size, in the finished SANE run's directory
    mocov2 = ["method=mocov2", "slr.enabled=false", "mm.enabled=false", "model.in_batch_negatives=false",
              "data.batch_size=8"]
    assert pretrain_cli(cli_args(images, out, *mocov2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out / "config.yaml") in err[0], err
    for key in ("method (saved 'sane', now 'mocov2')", "data.batch_size (saved 4, now 8)", "slr.enabled",
                "new output_dir"):
        assert key in err[0], (key, err[0])
    assert {f: (out / f).read_bytes() for f in saved} == saved  # nothing rewritten or relabelled

    # extending epochs changes the result too: refused unless asked for explicitly
    assert pretrain_cli(cli_args(images, out, "epochs=2")) == 2
    assert "resume_allow=[epochs]" in capsys.readouterr().err
    assert pretrain_cli(cli_args(images, out, "epochs=2", "resume_allow=[epochs]")) == 0
    assert json.loads((out / "done.json").read_text())["iters"] == 12
    assert iters_logged(out) == list(range(1, 13))
    # keys that do not change the weights may differ freely
    assert pretrain_cli(cli_args(images, out, "epochs=2", "data.num_workers=1", "log.every_iters=5",
                                 "max_iters_this_run=3")) == 0


# ---------------------------------------------------------------- harm 3: NaN never replaces good
@pytest.mark.parametrize("save", ["max_iters_this_run", "periodic"])
def test_harm3_nan_state_is_never_saved_over_the_good_checkpoint(images, tmp_path, monkeypatch, save):
    from pretrain.model import MoCo

    out = tmp_path / "run"
    # no log step before the save (the loss check runs on log steps only)
    extra = ["log.every_iters=100", "max_iters_this_run=2"]
    extra += ["checkpoint.every_iters=3"] if save == "periodic" else []
    train(cfg_for(images, out, *extra))
    good = torch.load(out / "checkpoint.pth", weights_only=True)
    assert good["iter"] == 2

    forward = MoCo.forward

    def diverging(self, *args, **kw):  # the fault: the loss (then every weight) becomes NaN
        loss, stats = forward(self, *args, **kw)
        return loss * float("nan"), stats

    monkeypatch.setattr(MoCo, "forward", diverging)
    with pytest.raises(UserError) as e:
        train(cfg_for(images, out, *extra))
    msg = str(e.value)
    bad_iter = 3 if save == "periodic" else 4
    assert f"at iteration {bad_iter}" in msg and "NaN" in msg and "\n" not in msg
    assert f"{out / 'checkpoint.pth'} (iteration 2) is kept" in msg
    ckpt, finite = finite_checkpoint(out / "checkpoint.pth")
    assert ckpt["iter"] == 2 and finite
    monkeypatch.setattr(MoCo, "forward", forward)
    train(cfg_for(images, out, "log.every_iters=100"))  # the rerun resumes from the good state
    ckpt, finite = finite_checkpoint(out / "checkpoint.pth")
    assert ckpt["iter"] == 6 and finite


def test_nan_loss_at_a_log_step_stops_with_one_line(images, tmp_path, monkeypatch, capsys):
    from pretrain.model import MoCo

    forward = MoCo.forward
    monkeypatch.setattr(MoCo, "forward", lambda self, *a, **k: (lambda ls: (ls[0] * float("inf"), ls[1]))(
        forward(self, *a, **k)))
    assert pretrain_cli(cli_args(images, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # step 1's update makes every weight Inf/NaN; step 2 logs a NaN loss
    assert len(err) == 1 and "non-finite loss" in err[0] and "iteration 2" in err[0]
    assert "no checkpoint was written yet" in err[0]
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


# ---------------------------------------------------------------- harm 4: the converter and NaN
def test_harm4_converter_refuses_non_finite_weights(tmp_path, capsys):
    from pretrain import convert as cc

    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd["layer3.0.bn1.running_var"][5] = float("inf")
    sd["layer4.1.conv2.weight"][0, 0, 0, 0] = float("nan")
    torch.save({"model": {f"encoder_q.{k}": v for k, v in sd.items()}}, tmp_path / "ckpt.pth")
    assert cc.main([str(tmp_path / "ckpt.pth"), str(tmp_path / "out.pkl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 of" in err[0] and "NaN/Inf" in err[0] and "layer3.0.bn1.running_var" in err[0]
    assert not (tmp_path / "out.pkl").exists()


# ---------------------------------------------------------------- harm 5: a backbone that does not fit
@pytest.mark.detectron2
def test_harm5_weights_that_do_not_fit_the_backbone_fail_before_training(tmp_path, corpus):
    from pretrain import convert as cc

    sd = torchvision.models.resnet50(weights=None).state_dict()
    with open(tmp_path / "r50.pkl", "wb") as f:
        pickle.dump(cc.to_detectron2({k: v for k, v in sd.items() if not k.startswith("fc.")}), f)
    out = tmp_path / "det"
    env = dict(os.environ, PYTHONPATH=str(ROOT), SHAPES_ROOT=str(corpus), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "transfer/train_net.py", "--config-file", DEMO_DET,
                        "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(tmp_path / "r50.pkl"), "SOLVER.MAX_ITER", "1",
                        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr[-3000:]
    assert "r50.pkl" in err[0] and "23 backbone tensors" in err[0] and "backbone.res2.0.conv1.weight" in err[0]
    assert not out.exists()  # before training: nothing started, nothing written


@pytest.mark.detectron2
def test_backbone_check_only_lets_heads_and_the_protocols_new_norm_be_missing():
    from transfer.checkpoint import is_backbone_key

    for key in ("backbone.stem.conv1.weight", "backbone.res4.5.conv3.norm.running_var",
                "roi_heads.res5.2.conv1.weight", "backbone.bottom_up.res2.0.shortcut.weight"):
        assert is_backbone_key(key), key
    for key in ("roi_heads.res5.norm.weight", "roi_heads.box_predictor.cls_score.weight",
                "backbone.fpn_lateral2.weight", "proposal_generator.rpn_head.conv.weight", "pixel_mean",
                "backbone.res2.0.conv1.norm.num_batches_tracked"):
        assert not is_backbone_key(key), key


# ---------------------------------------------------------------- pretraining: fallback, rewind, temp
def test_damaged_checkpoint_falls_back_to_the_previous_good_one(images, tmp_path, caplog):
    from pretrain.checkpoint import read_checkpoint

    out = tmp_path / "run"
    train(cfg_for(images, out, "checkpoint.every_iters=2", "max_iters_this_run=4"))
    assert torch.load(out / "checkpoint.prev.pth", weights_only=True)["iter"] == 2
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iter"] == 4
    assert iters_logged(out) == [1, 2, 3, 4]
    data = (out / "checkpoint.pth").read_bytes()
    (out / "checkpoint.pth").write_bytes(data[: len(data) // 3])  # e.g. a copy cut short
    (out / ".checkpoint.pth.tmp4242").write_bytes(b"x" * 100)  # a write killed midway
    train(cfg_for(images, out))
    log = (out / "log.txt").read_text()
    assert f"resuming from {out / 'checkpoint.prev.pth'} (iteration 2) instead" in log
    assert "truncated" in log and "resumed from" in log
    assert iters_logged(out) == [1, 2, 3, 4, 5, 6]  # rewound to the checkpoint: no iteration twice
    assert not (out / ".checkpoint.pth.tmp4242").exists()
    assert json.loads((out / "done.json").read_text())["iters"] == 6
    # the damaged file was not rotated into checkpoint.prev.pth
    assert read_checkpoint(out / "checkpoint.prev.pth")["iter"] in (2, 4, 5, 6)


def test_failed_checkpoint_write_leaves_no_temp_file_and_the_old_checkpoint(tmp_path, monkeypatch):
    from pretrain import checkpoint

    target = tmp_path / "checkpoint.pth"
    ckpts = checkpoint.RunCheckpoints(tmp_path)
    ckpts.save({"iter": 1}, target, 1)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError):
        ckpts.save({"iter": 2}, target, 2)  # would have kept the first as checkpoint.prev.pth
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"iter": 1}


def test_skipped_images_are_distinct_files_and_survive_a_resume(images, tmp_path):
    import shutil

    from pretrain.data import SkippedImages

    root = tmp_path / "images"
    shutil.copytree(images, root)
    bad = root / "train" / "c1" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train(cfg_for(root, out, "epochs=2", "max_iters_this_run=6"))  # epoch 1 meets the bad file
        assert torch.load(out / "checkpoint.pth", weights_only=True)["skipped_images"]["files"] == [11]
        train(cfg_for(root, out, "epochs=2"))
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert recs[5]["skipped_images"] == 1 and recs[6]["skipped_images"] == 1  # restored, not reset
    assert recs[-1]["skipped_images"] == 1  # met again in epoch 2: still one file
    s = SkippedImages()
    s.add([3, 3, 5])
    s.add(2)  # the GPU path: a count
    assert s.total() == 4 and SkippedImages.from_state(s.state()).total() == 4


def test_config_guard_decisions():
    from pretrain.config import RESUME_ALLOWED, check_resumable

    saved = load_config("configs/pretrain/demo.yaml").to_dict()
    free = load_config("configs/pretrain/demo.yaml", ["log.every_iters=7", "data.num_workers=3",
                                                      "knn.every_epochs=5", "cpu_threads=1", "output_dir=x",
                                                      "checkpoint.every_iters=9", "max_iters_this_run=2"])
    assert check_resumable(saved, free) == []
    older = {k: v for k, v in saved.items() if k != "deterministic"}  # an older config.yaml: default
    assert check_resumable(older, load_config("configs/pretrain/demo.yaml")) == []
    with pytest.raises(UserError, match="deterministic"):
        check_resumable(older, load_config("configs/pretrain/demo.yaml", ["deterministic=true"]))
    moved = load_config("configs/pretrain/demo.yaml", ["data.root=/elsewhere", "resume_allow=[data.root]"])
    assert check_resumable(saved, moved) == [("data.root", "", "/elsewhere")]
    assert "epochs" in RESUME_ALLOWED and "model.queue" not in RESUME_ALLOWED


def test_epochs_below_the_checkpoint_are_refused(images, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(images, out, "epochs=2", "max_iters_this_run=7"))
    with pytest.raises(UserError, match="past epochs=1"):
        train(cfg_for(images, out, "epochs=1", "resume_allow=[epochs]"))


# ---------------------------------------------------------------- detectron2: snapshots, failure marker
TINY_DET = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2",
            "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4", "MODEL.RPN.POST_NMS_TOPK_TEST", "16",
            "TEST.PRECISE_BN.NUM_ITER", "2", "SEED", "0", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"]


def train_net(out, *opts, resume=False):
    from transfer import train_net as tn

    argv = ["--config-file", DEMO_DET] + (["--resume"] if resume else []) + TINY_DET + ["OUTPUT_DIR", str(out)]
    return tn.main(tn.argument_parser().parse_args(argv + [str(o) for o in opts]))


@pytest.fixture(scope="module")
def r18_weights(module_tmp):
    from pretrain import convert as cc

    d = module_tmp("w")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), d / "r18.pth")
    cc.convert(d / "r18.pth", d / "r18.pkl", log=lambda s: None)
    return d / "r18.pkl"


@pytest.mark.detectron2
def test_detectron2_snapshots_failure_marker_and_fallback(corpus, r18_weights, tmp_path, monkeypatch):
    from suite.results import find_runs
    from transfer.train_net import Trainer

    monkeypatch.setenv("SHAPES_ROOT", str(corpus))
    out = tmp_path / "sane" / "demo" / "seed0"
    old = os.umask(0o022)
    try:
        with monkeypatch.context() as m:  # a run that raises after its snapshots: marked failed
            m.setattr(Trainer, "after_train", lambda self: (_ for _ in ()).throw(RuntimeError("eval blew up")))
            with pytest.raises(RuntimeError):
                train_net(out, "MODEL.WEIGHTS", r18_weights)
        assert json.loads((out / "failed.json").read_text())["error"] == "RuntimeError: eval blew up"
        (run,), _ = find_runs([tmp_path])
        assert run.kind == "detection" and run.problem == "failed: RuntimeError: eval blew up"
        # atomic snapshots: no temp file; last_checkpoint names the last one
        assert (out / "last_checkpoint").read_text() == "model_final.pth"
        assert not [f for f in os.listdir(out) if ".tmp" in f]
        # the last snapshot is damaged and last_checkpoint emptied: resume falls back to model_0000003.pth
        data = (out / "model_final.pth").read_bytes()
        (out / "model_final.pth").write_bytes(data[:4096])
        (out / "last_checkpoint").write_text("")
        train_net(out, "MODEL.WEIGHTS", r18_weights, resume=True)
    finally:
        os.umask(old)
    log = (out / "log.txt").read_text()
    assert "last_checkpoint is empty; resuming from" in log and "model_0000003.pth instead" in log
    assert "Starting training from iteration 4" in log
    assert not (out / "failed.json").exists()  # the new attempt cleared it, and succeeded
    assert (os.stat(out / "final_metrics.json").st_mode & 0o777) == 0o644  # not mkstemp's 0600
    (run,), _ = find_runs([tmp_path])
    assert run.problem == ""


# ---------------------------------------------------------------- results table, file modes, processes
def test_results_table_files_a_crashed_pretraining_dir_as_pretraining(tmp_path, images):
    from suite.results import find_runs

    out = tmp_path / "pretrain" / "sane"
    out.mkdir(parents=True)  # died before its first log step: config, log, a checkpoint
    cfg = cfg_for(images, out)
    from pretrain.config import save_config

    save_config(cfg, out / "config.yaml")
    (out / "log.txt").write_text("[01/01 00:00:00] sane: resnet18\n")
    torch.save({"iter": 0}, out / "checkpoint.pth")
    (run,), problems = find_runs([tmp_path])
    assert run.kind == "pretrain" and run.problem.startswith("unfinished: no done.json") and not problems
    (out / "checkpoint.pth").unlink()  # config and log only: still a pretraining run
    (run,), _ = find_runs([tmp_path])
    assert run.kind == "pretrain"


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_converted_weights_get_the_mode_open_would_give(tmp_path, umask, mode):
    from pretrain import convert as cc

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    old = os.umask(umask)
    try:
        cc.convert(tmp_path / "r18.pth", tmp_path / "r18.pkl", log=lambda s: None)
        cc.convert(tmp_path / "r18.pth", tmp_path / "r18_tv.pth", fmt="torchvision", log=lambda s: None)
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "r18.pkl").st_mode & 0o777) == mode
    assert (os.stat(tmp_path / "r18_tv.pth").st_mode & 0o777) == mode


def test_restricted_unpickler_reads_what_weights_files_hold(tmp_path):
    from pretrain.safe_load import WeightsFileError, load_pickle

    from collections import OrderedDict

    obj = {"model": OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3), n=np.int64(7)),
           "__author__": "x", "matching_heuristics": True, "meta": [1, 2.5, None, "s", b"b", (True,)]}
    for protocol in range(6):
        (tmp_path / "w.pkl").write_bytes(pickle.dumps(obj, protocol=protocol))
        got = load_pickle(tmp_path / "w.pkl")
        assert np.array_equal(got["model"]["w"], obj["model"]["w"]) and got["meta"] == obj["meta"], protocol
    (tmp_path / "o.pkl").write_bytes(pickle.dumps({"model": np.array([1, "x"], dtype=object)}))
    with pytest.raises(WeightsFileError, match="array of Python objects"):
        load_pickle(tmp_path / "o.pkl")


def test_multiproc_kills_a_hung_process_tree_and_reports_its_output(tmp_path):
    from multiproc import ProcessesFailed, run_processes

    pidfile = tmp_path / "grandchild"
    hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(600)']); open({str(pidfile)!r}, 'w').write(str(p.pid)); print('rank 0 waiting', "
            "flush=True); time.sleep(600)")
    with pytest.raises(ProcessesFailed) as e:
        run_processes([[sys.executable, "-c", hang], [sys.executable, "-c", "print('rank 1 done')"]], timeout=3)
    assert "timed out after 3 s" in str(e.value) and "rank 0 waiting" in str(e.value)
    assert "rank 1 done" in str(e.value)
    pid = int(pidfile.read_text())
    # the grandchild went with it: SIGKILL to its group is sent, but on a loaded machine it may be
    # scheduled a moment later (seen once: alive right after the call)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def alive(pid):
    """Running (a zombie left to a container's init does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
