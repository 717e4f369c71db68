"""The pretraining trainer: queue, EMA, shuffle-BN, MoCo v2 exactness, a 2-epoch run with
its metrics, bit-exact resume, corrupted JPEGs, and the clear errors of bad input."""
import json
import math
import random
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from pretrain.__main__ import main as cli_main
from pretrain.config import METHODS, load_config, switches
from pretrain.engine import train
from pretrain.model import MoCo, build_backbone, load_backbone_state
from pretrain.utils import UserError

CLASSES = ("circle", "square", "cross")
TINY = [  # resnet18, 32-px crops, batch 8, queue 64: a step takes well under a second
    "model.arch=resnet18", "model.dim=16", "model.queue=64", "model.m=0.9",
    "data.crop=32", "data.batch_size=8", "data.num_workers=0", "mm.crops=[16]", "mm.kappa=2.0",
    "slr.tau_prime=0.8", "slr.mu_start=0.0", "slr.mu_end=1.0", "optim.lr=2.0",
    "log.every_iters=1", "log.progress=false", "log.tensorboard=true", "deterministic=true",
    "device=cpu",
    "checkpoint.save_every_epochs=1", "epochs=2",
]


def draw(path, cls, rng, size=40):
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    d, col = ImageDraw.Draw(img), tuple(rng.randrange(256) for _ in range(3))
    a, b = rng.randrange(2, size // 3), rng.randrange(2 * size // 3, size - 2)
    if cls == "circle":
        d.ellipse([a, a, b, b], fill=col)
    elif cls == "square":
        d.rectangle([a, a, b, b], fill=col)
    else:
        d.line([a, a, b, b], fill=col, width=5)
        d.line([a, b, b, a], fill=col, width=5)
    img.save(path, quality=90)


@pytest.fixture(scope="module")
def data_root(module_tmp):
    """3 classes x 8 train images (one of them a truncated JPEG) and 3 x 4 val images."""
    root = module_tmp("imagefolder")
    rng = random.Random(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                draw(root / split / c / f"{i}.jpg", c, rng)
    bad = root / "train" / "square" / "7.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # header only: decoding fails
    return root


def tiny_cfg(data_root, out, *extra):
    return load_config("configs/pretrain/demo.yaml",
                       TINY + [f"data.root={data_root}", f"output_dir={out}", *extra])


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def last_epoch_loss(out):
    recs = [r for r in read_metrics(out) if r["type"] == "train" and r["epoch"] == 1]
    return sum(r["loss"] for r in recs) / len(recs)



@pytest.fixture(scope="module")
def trained(data_root, module_tmp):
    """An uninterrupted deterministic 2-epoch run (3 it/epoch) with kNN every epoch, and the
    same run with lr 0."""
    out = module_tmp("run_full")
    cfg = tiny_cfg(data_root, out, "knn.every_epochs=1", "knn.k=5")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
        # the control: the same run without learning. Early on the loss *rises* while the
        # queue's random unit vectors are replaced by (similar) real keys, so learning shows
        # as a lower loss than this run's, not as a falling curve.
        frozen = module_tmp("run_lr0")
        train(tiny_cfg(data_root, frozen, "knn.every_epochs=0", "optim.lr=0.0"))
    return {"out": out, "cfg": cfg, "warnings": [str(w.message) for w in caught],
            "loss": last_epoch_loss(out), "loss_no_learning": last_epoch_loss(frozen)}


def test_two_epochs_lower_loss_and_log_metrics(trained):
    out = trained["out"]
    assert trained["loss"] < trained["loss_no_learning"] - 0.2, trained
    recs = read_metrics(out)
    train_recs = [r for r in recs if r["type"] == "train"]
    assert [r["iter"] for r in train_recs] == list(range(1, 7))
    assert all(r["loss"] > 0 and r["img_per_s"] > 0 for r in train_recs)
    quality = [r for r in recs if r["type"] == "label_quality"]
    assert len(quality) == 6
    for r in quality:
        assert 0 < r["slr_same_class_mass"] <= 1 and r["onehot_same_class_mass"] == pytest.approx(1.0)
        assert r["slr_label_error"] >= 0 and r["onehot_label_error"] >= 0
    # μ ramps 0 → 1, so refined labels move mass off the own key after the first step
    assert quality[-1]["slr_same_class_mass"] < 1.0
    knn = [r for r in recs if r["type"] == "knn"]
    assert [r["epoch"] for r in knn] == [1, 2] and all(0 <= r["knn_top1"] <= 100 for r in knn)
    done = json.loads((out / "done.json").read_text())
    assert done == {"method": "sane", "switches": {"slr.enabled": True, "slr.p": True, "slr.q": True,
                                                   "mm.enabled": True, "model.in_batch_negatives": True},
                    "numerics": "fast", "arch": "resnet18", "stem": "imagenet", "epochs": 2, "iters": 6,
                    "knn_top1": knn[-1]["knn_top1"], "checkpoint": "checkpoint.pth"}
    assert all(0 <= r["inst_top1"] <= 100 for r in train_recs)
    assert load_config(out / "config.yaml").to_dict() == trained["cfg"].to_dict()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out)).Reload()
    assert {"train/loss", "train/inst_top1", "knn/knn_top1"} <= set(events.Tags()["scalars"])
    assert (out / "checkpoint_0001.pth").is_file() and (out / "checkpoint_0002.pth").is_file()
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["iter"] == 6 and ckpt["epoch"] == 2
    assert "encoder_q.fc.0.weight" in ckpt["model"] and "encoder_q.conv1.weight" in ckpt["model"]


def test_corrupted_jpeg_is_skipped_with_warning_and_counted(trained):
    assert any("skipping corrupted image" in w and "7.jpg" in w for w in trained["warnings"])
    last = [r for r in read_metrics(trained["out"]) if r["type"] == "train"][-1]
    assert last["skipped_images"] == 1  # one file, met in both epochs: counted once


def test_resume_is_bit_identical(trained, data_root, tmp_path):
    """Stop mid-epoch 2 (after 4 of 6 steps), rerun: same weights, optimizer, queue, RNG use."""
    cfg = tiny_cfg(data_root, tmp_path, "knn.every_epochs=0", "max_iters_this_run=4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg)
        assert not (tmp_path / "done.json").exists()
        assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["iter"] == 4
        train(tiny_cfg(data_root, tmp_path, "knn.every_epochs=0"))
    a = torch.load(trained["out"] / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert a["iter"] == b["iter"] == 6
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in ("queue", "queue_ptr", "queue_labels"):
        assert torch.equal(a["queue"][k], b["queue"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def small_moco(**kw):
    torch.manual_seed(0)
    return MoCo("resnet18", dim=4, K=5, **kw)


def test_queue_fifo_and_wraparound():
    m = small_moco()
    keys = F.normalize(torch.randn(3, 4), dim=1)
    m._dequeue_and_enqueue(keys, torch.tensor([0, 1, 2]))
    assert torch.equal(m.queue[:, :3], keys.T) and m.queue_ptr.item() == 3
    keys2 = F.normalize(torch.randn(3, 4), dim=1)
    m._dequeue_and_enqueue(keys2, torch.tensor([3, 4, 5]))
    # slots 3, 4 then wrap to 0; slots 1, 2 still hold the first batch
    assert torch.equal(m.queue[:, 3], keys2[0]) and torch.equal(m.queue[:, 4], keys2[1])
    assert torch.equal(m.queue[:, 0], keys2[2]) and torch.equal(m.queue[:, 1:3], keys.T[:, 1:])
    assert m.queue_labels.tolist() == [5, 1, 2, 3, 4] and m.queue_ptr.item() == 1


def test_initial_queue_is_random_unit_vectors_of_unknown_class():
    m = small_moco()
    torch.testing.assert_close(m.queue.norm(dim=0), torch.ones(5))
    assert torch.all(m.queue_labels == -1)


def test_ema_update():
    m = small_moco(m=0.9)
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.encoder_k.parameters()]
    m._momentum_update_key_encoder()
    for pk, pk0, pq in zip(m.encoder_k.parameters(), before, m.encoder_q.parameters()):
        torch.testing.assert_close(pk, 0.9 * pk0 + 0.1 * pq)
        assert not pk.requires_grad


def test_shuffle_bn_single_process():
    m = small_moco(shuffle_splits=2)
    x = torch.randn(8, 3, 32, 32)
    m.eval()  # running statistics: the shuffle must be undone exactly
    torch.testing.assert_close(m._encode_keys(x), m.encoder_k(x), rtol=1e-4, atol=1e-5)
    m.train()  # batch statistics over 2 sub-batches differ from the full batch's
    assert not torch.allclose(m._encode_keys(x), m.encoder_k(x), atol=1e-4)


def test_mocov2_matches_reference_logits():
    m = small_moco(in_batch=False, slr=None, mm=None, shuffle_bn=False, m=0.999)
    m.eval()
    x_q, x_k = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    queue = m.queue.clone()
    with torch.no_grad():
        q = F.normalize(m.encoder_q(x_q), dim=1)
        k = F.normalize(m.encoder_k(x_k), dim=1)
        ref = F.cross_entropy(torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / 0.2,
                              torch.zeros(4, dtype=torch.long))
    loss, _ = m(x_q, x_k)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert m.queue_ptr.item() == 4


def test_sane_step_label_mixing_and_gradients():
    m = small_moco(slr={"p": True, "q": True, "tau_prime": 0.8, "vanilla": "auto"},
                   mm={"kappa": 2.0, "lam": 0.5}, shuffle_bn=False)
    m.K = 5
    x = torch.randn(4, 3, 32, 32)
    loss, stats = m(x, x, [torch.randn(4, 3, 16, 16)], torch.tensor([0, 1, 0, 1]), mu=1.0)
    assert torch.isclose(loss, 0.5 * stats["loss_vanilla"] + 0.5 * stats["loss_mm"])
    loss.backward()
    assert m.encoder_q.conv1.weight.grad is not None and m.encoder_k.conv1.weight.grad is None


def test_backbone_helpers(trained):
    net = build_backbone("resnet18")
    state = load_backbone_state(trained["out"] / "checkpoint.pth")
    assert not any(k.startswith("fc.") for k in state)
    net.load_state_dict(state)  # strict: every torchvision key present
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_shipped_configs():
    moco = load_config("configs/pretrain/mocov2_r50_200ep.yaml")
    assert not moco.model.in_batch_negatives and not moco.slr.enabled and not moco.mm.enabled
    multi = load_config("configs/pretrain/sane_multi_r50_200ep.yaml")
    assert multi.mm.crops == [224, 192, 160, 128, 96]
    cifar = load_config("configs/pretrain/sane_r50_cifar.yaml")
    assert (cifar.model.queue, cifar.slr.tau_prime, cifar.mm.kappa) == (4096, 0.8, 2.0)
    assert (cifar.slr.mu_start, cifar.slr.mu_end) == (0.0, 1.0)
    assert (cifar.method, cifar.model.stem, cifar.data.format, cifar.data.crop) == ("sane", "cifar", "cifar10", 32)
    for name in ("sane_r50_200ep", "sane_multi_r50_200ep", "sane_r50_cifar"):
        assert switches(load_config(f"configs/pretrain/{name}.yaml")) == METHODS["sane"]


def test_named_methods_set_and_check_the_switches(tmp_path, capsys):
    grid = {  # (SLR p, SLR q, MM, in-batch negatives): the paper's ablation grid and MoCo v2
        "mocov2": (0, 0, 0, 0), "mocov2_inbatch": (0, 0, 0, 1), "slr_p": (1, 0, 0, 1), "slr_q": (0, 1, 0, 1),
        "slr": (1, 1, 0, 1), "mm": (0, 0, 1, 1), "slr_p_mm": (1, 0, 1, 1), "slr_q_mm": (0, 1, 1, 1),
        "sane": (1, 1, 1, 1)}
    assert set(grid) == set(METHODS)
    for name, (p, q, mm, in_batch) in grid.items():
        cfg = load_config(None, [f"method={name}"])
        assert switches(cfg) == {"slr.enabled": bool(p or q), "slr.p": bool(p), "slr.q": bool(q),
                                 "mm.enabled": bool(mm), "model.in_batch_negatives": bool(in_batch)}, name
        model = MoCo("resnet18", dim=4, K=8, in_batch=cfg.model.in_batch_negatives,
                     slr=dict(cfg.slr) if cfg.slr.enabled else None, mm=dict(cfg.mm) if cfg.mm.enabled else None)
        assert (model.in_batch, bool(model.slr), bool(model.mm)) == (bool(in_batch), bool(p or q), bool(mm))
    # a method on the command line replaces the file's; agreeing switches are accepted
    assert switches(load_config("configs/pretrain/sane_r50_200ep.yaml", ["method=mocov2"])) == METHODS["mocov2"]
    load_config("configs/pretrain/sane_r50_200ep.yaml", ["method=mocov2", "slr.enabled=false",
                                                         "mm.enabled=false", "model.in_batch_negatives=false"])
    # a contradiction: one line naming the key, the method and the method the switches make
    assert cli_main(["--config", "configs/pretrain/sane_r50_200ep.yaml", "slr.enabled=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "slr.enabled=false contradicts method sane" in err and "method=mm" in err
    with pytest.raises(UserError, match=r"unknown method 'simclr'; known methods: mocov2, mocov2_inbatch"):
        load_config(None, ["method=simclr"])
    conflicting = tmp_path / "c.yaml"
    conflicting.write_text("method: mocov2\nmodel: {in_batch_negatives: true}\n")
    with pytest.raises(UserError, match=f"{conflicting}: model.in_batch_negatives=true contradicts method "
                                        "mocov2.*method=mocov2_inbatch"):
        load_config(conflicting)
    with pytest.raises(UserError, match=r"slr.q=false contradicts method sane \(the default"):
        load_config(None, ["slr.q=false"])
    assert load_config("configs/pretrain/demo.yaml").model.arch == "resnet18"


def test_numerics_presets_set_amp_and_tf32_are_saved_and_guard_resume(tmp_path, monkeypatch):
    import contextlib

    import yaml

    from pretrain import engine
    from pretrain.config import check_resumable, save_config

    for name in ("mocov2_r50_200ep", "sane_r50_200ep", "sane_multi_r50_200ep", "sane_r50_cifar", "demo"):
        path = Path(f"configs/pretrain/{name}.yaml")  # each config says which preset it is
        assert yaml.safe_load(path.read_text())["numerics"] == "fast", name
        cfg = load_config(path)
        assert (cfg.amp, cfg.tf32) == ("bf16", True)
    ref = load_config("configs/pretrain/mocov2_r50_200ep.yaml", ["numerics=reference"])
    assert (ref.numerics, ref.amp, ref.tf32) == ("reference", "none", False)
    assert isinstance(engine.autocast_ctx(ref, torch.device("cuda")), contextlib.nullcontext)  # fp32
    save_config(ref, tmp_path / "config.yaml")  # provenance reads the preset's name from here
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["numerics"] == "reference"
    # TF32 follows the preset on CUDA (flags only: set here as on a GPU machine, then restored)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        for cfg, tf32 in ((ref, False), (load_config(None), True)):
            engine.configure_determinism(cfg)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = flags
    # the preset sets its keys: a contradiction is one line naming the preset that would fit
    with pytest.raises(UserError, match=r"amp=none contradicts numerics fast \(the default\).*numerics=reference"):
        load_config(None, ["amp=none"])
    with pytest.raises(UserError, match="tf32=true contradicts numerics reference"):
        load_config(None, ["numerics=reference", "tf32=true"])
    with pytest.raises(UserError, match="unknown numerics 'exact'"):
        load_config(None, ["numerics=exact"])
    # a run is reference only as a whole: the preset cannot change on resume
    with pytest.raises(UserError, match="numerics"):
        check_resumable(load_config("configs/pretrain/mocov2_r50_200ep.yaml").to_dict(), ref)


def test_unknown_config_key_is_one_clear_error(capsys):
    with pytest.raises(UserError, match="model.queue"):
        load_config("configs/pretrain/demo.yaml", ["model.queu=16"])
    assert cli_main(["--config", "configs/pretrain/demo.yaml", "slr.tau_prim=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'slr.tau_prim'" in err and "slr.tau_prime" in err
    with pytest.raises(UserError, match="expects int"):
        load_config(None, ["epochs=many"])


def test_missing_or_empty_data_folder_is_one_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    args = ["--config", "configs/pretrain/demo.yaml", f"output_dir={tmp_path / 'o1'}", "log.progress=false"]
    assert cli_main(args + [f"data.root={missing}"]) == 2
    assert f"{missing / 'train'} not found" in capsys.readouterr().err
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    assert cli_main(args + [f"data.root={tmp_path / 'empty'}"]) == 2
    assert "no images found" in capsys.readouterr().err


def test_ddp_two_processes_gloo(data_root, tmp_path):
    """torchrun, 2 CPU processes (gloo): shuffle-BN across processes, gathered enqueue."""
    import os
    import sys

    from multiproc import run_processes

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pretrain", "--config", "configs/pretrain/demo.yaml", *TINY, "epochs=1",
           "deterministic=false", "knn.every_epochs=0", f"data.root={data_root}",
           f"output_dir={tmp_path}"]
    run_processes([cmd], timeout=240, cwd=root, env=env)  # bounded; torchrun's workers die with it
    assert json.loads((tmp_path / "done.json").read_text())["iters"] == 3
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    # 3 steps x global batch 8 keys gathered from both processes
    assert ckpt["queue"]["queue_ptr"].item() == 24
    assert (ckpt["queue"]["queue_labels"] >= 0).sum().item() == 24


def test_non_finite_loss_stops_at_the_next_log(tmp_path):
    from pretrain.engine import log_step
    from pretrain.utils import MetricLogger, Throughput

    sums = {"loss": torch.tensor(float("nan")), "_n": 2}
    with pytest.raises(FloatingPointError, match="iteration 7"):
        log_step(MetricLogger(tmp_path, tensorboard=False), None, None, sums, 0, 7, 0.1, 0.0,
                 Throughput(), 0)


def gpu_pipeline_losses(data_root, out, *extra):
    cfg = tiny_cfg(data_root, out, "data.pipeline=gpu", "knn.every_epochs=0",
                   "max_iters_this_run=2", *extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # the truncated JPEG: skipped
        train(cfg)
    return [r["loss"] for r in read_metrics(out) if r["type"] == "train"]


def test_gpu_pipeline_trains_with_the_cpu_paths_loss(trained, data_root, tmp_path):
    """data.pipeline=gpu through the engine (gpu_batches, GPUMultiCrop on CPU tensors): finite
    losses of the CPU path's magnitude at the same steps (the views differ, the task does not)."""
    gpu = gpu_pipeline_losses(data_root, tmp_path)
    cpu = [r["loss"] for r in read_metrics(trained["out"]) if r["type"] == "train"][:2]
    assert len(gpu) == 2 and all(math.isfinite(v) for v in gpu)
    for g, c in zip(gpu, cpu):
        assert abs(g - c) < 0.25 * c, (gpu, cpu)


@pytest.mark.gpu
def test_gpu_pipeline_on_cuda_gives_finite_losses(data_root, tmp_path):
    """Issue 7: NaN from step 1 on CUDA (nvJPEG overwriting blocks the step still read)."""
    losses = gpu_pipeline_losses(data_root, tmp_path, "device=cuda", "deterministic=false",
                                 "max_iters_this_run=3", "epochs=3")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
