"""transfer/: the detection configs build, converted R18 demo weights fine-tune Faster and Mask R-CNN
on the synthetic corpus and report AP, an interrupted fine-tune resumes, bad datasets are named."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from suite.corpus import CLASSES

pytestmark = pytest.mark.detectron2

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "detection"
# Tiny runs on CPU: 64-px images, 2 per batch, few ROIs, res5 on 2x2 ROI features.
TINY = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", 64, "SOLVER.IMS_PER_BATCH", 2,
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 4, "MODEL.RPN.POST_NMS_TOPK_TEST", 16,
        "TEST.PRECISE_BN.NUM_ITER", 2, "SEED", 0]


@pytest.fixture(scope="module")
def shapes(corpus):
    """SHAPES_ROOT points at the session corpus while this module runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHAPES_ROOT", str(corpus))
        yield corpus


def train_net(config, out, *opts, resume=False, eval_only=False):
    from transfer import train_net as tn

    argv = ["--config-file", str(CONFIGS / config)] + (["--resume"] if resume else [])
    argv += ["--eval-only"] if eval_only else []
    tn.main(tn.argument_parser().parse_args(argv + ["OUTPUT_DIR", str(out), *map(str, TINY + list(opts))]))
    return json.loads((out / "final_metrics.json").read_text())


def assert_ap(results, tasks):
    assert set(results) == set(tasks)
    for task in tasks:
        for key in ("AP", "AP50", "AP75"):
            assert 0.0 <= results[task][key] <= 100.0, (task, key)


def test_faster_rcnn_voc_resumes_after_interruption_and_reports_ap(shapes, weights, tmp_path,
                                                                   monkeypatch):
    from detectron2.engine import HookBase

    from transfer.train_net import Trainer

    class Preempted(HookBase):  # a job killed mid-run, after its iteration-10 checkpoint
        def after_step(self):
            if self.trainer.iter == 12:
                raise KeyboardInterrupt("preempted")

    build_hooks = Trainer.build_hooks
    monkeypatch.setattr(Trainer, "build_hooks", lambda self: build_hooks(self) + [Preempted()])
    out = tmp_path / "demo_r18" / "voc" / "seed0"
    opts = ["MODEL.WEIGHTS", weights, "SOLVER.MAX_ITER", 20, "SOLVER.CHECKPOINT_PERIOD", 5]
    with pytest.raises(KeyboardInterrupt):
        train_net("demo_shapes_voc_R_18_C4.yaml", out, *opts)
    assert (out / "last_checkpoint").read_text().strip() == "model_0000009.pth"
    assert not (out / "final_metrics.json").exists()

    monkeypatch.setattr(Trainer, "build_hooks", build_hooks)
    metrics = train_net("demo_shapes_voc_R_18_C4.yaml", out, *opts, resume=True)
    assert "Starting training from iteration 10" in (out / "log.txt").read_text()
    assert (out / "model_final.pth").is_file()
    assert metrics["iter"] == 20 and metrics["seed"] == 0
    assert metrics["task"] == "demo_shapes_voc_R_18_C4"
    # no TRANSFER.BACKBONE_NAME: filed under the weights file's name, as submit.py transfer files it
    assert metrics["backbone"] == "demo_r18" and metrics["weights"] == str(weights)
    assert_ap(metrics["results"], ["bbox"])

    # --eval-only on the final model reproduces the numbers of the training run's evaluation
    again = train_net("demo_shapes_voc_R_18_C4.yaml", tmp_path / "eval", "MODEL.WEIGHTS",
                      out / "model_final.pth", eval_only=True)
    assert again["results"] == metrics["results"] and again["iter"] == 20


def test_mask_rcnn_coco_fine_tune_reports_bbox_and_segm(shapes, weights, tmp_path):
    out = tmp_path / "coco"
    metrics = train_net("demo_shapes_coco_R_18_C4.yaml", out, "MODEL.WEIGHTS", weights,
                        "SOLVER.MAX_ITER", 20, "TRANSFER.BACKBONE_NAME", "sane_r18")
    assert metrics["backbone"] == "sane_r18" and metrics["iter"] == 20
    assert_ap(metrics["results"], ["bbox", "segm"])
    assert "AP-" + CLASSES[0] in metrics["results"]["segm"]  # per-class AP under the corpus names
    log = (out / "log.txt").read_text()
    assert "Some model parameters or buffers are not found in the checkpoint" in log
    # only the new layers are reported missing: no backbone tensor is left random
    missing = log.split("Some model parameters or buffers are not found in the checkpoint")[1]
    missing = missing.split("\n[")[0]
    assert "backbone." not in missing and "roi_heads.res5.0" not in missing
    assert "roi_heads.res5.norm" in missing


PROTOCOL = {"voc_R_50_C4_24k.yaml": ((18000, 22000), 24000),
            "coco_R_50_C4_1x.yaml": ((60000, 80000), 90000),
            "coco_R_50_C4_2x.yaml": ((120000, 160000), 180000),
            "coco_R_50_FPN_1x.yaml": ((60000, 80000), 90000)}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_parses_and_builds_a_model(name):
    from detectron2.layers import NaiveSyncBatchNorm
    from detectron2.modeling import build_model

    from transfer import train_net as tn

    cfg = tn.load_config(tn.argument_parser().parse_args(  # 8 GPUs: the protocol's values as written
        ["--config-file", str(CONFIGS / name), "--num-gpus", "8" if name in PROTOCOL else "1",
         "MODEL.DEVICE", "cpu"]))
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.280, 103.530]
    assert cfg.MODEL.PIXEL_STD == [58.395, 57.120, 57.375]
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.TRANSFER.BACKBONE_NAME == ""
    assert not cfg.SOLVER.AMP.ENABLED  # switched off on CPU
    assert cfg.TRANSFER.NUMERICS == "fast"  # each says so (but the bench's, frozen while it is measured)
    assert name.startswith("bench_") or "Numerics" in (CONFIGS / name).read_text()
    if name in PROTOCOL:
        assert (cfg.SOLVER.STEPS, cfg.SOLVER.MAX_ITER) == PROTOCOL[name]
        assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR) == (16, 0.02)
        assert cfg.MODEL.MASK_ON == name.startswith("coco") and cfg.TEST.PRECISE_BN.ENABLED
    model = build_model(cfg)
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(isinstance(m, NaiveSyncBatchNorm) for m in norms)  # fine-tuned, synced
    if "C4" in name:
        assert type(model.roi_heads).__name__ == "Res5ROIHeadsExtraNorm"
        assert isinstance(model.roi_heads.res5.norm, NaiveSyncBatchNorm)
    if "FPN" in name:
        assert isinstance(model.backbone.fpn_lateral2.norm, NaiveSyncBatchNorm)


# The values Base-RCNN-C4-BN.yaml documents for voc_R_50_C4_24k.yaml on k GPUs (8: as written):
# (IMS_PER_BATCH, BASE_LR, MAX_ITER, STEPS, WARMUP_ITERS, CHECKPOINT_PERIOD)
SCALED = {1: (2, 0.0025, 192000, (144000, 176000), 800, 40000),
          2: (4, 0.005, 96000, (72000, 88000), 400, 20000),
          4: (8, 0.01, 48000, (36000, 44000), 200, 10000),
          8: (16, 0.02, 24000, (18000, 22000), 100, 5000)}


def test_gpu_scaling_rule_gives_the_documented_values_and_config_yaml_records_them(tmp_path):
    import yaml

    from transfer import train_net as tn

    def solver(gpus, *opts, machines=1):
        args = tn.argument_parser().parse_args(["--config-file", str(CONFIGS / "voc_R_50_C4_24k.yaml"),
                                                "--num-gpus", str(gpus), "--num-machines", str(machines),
                                                "MODEL.DEVICE", "cpu", *map(str, opts)])
        return args, tn.load_config(args)

    doc = (CONFIGS / "Base-RCNN-C4-BN.yaml").read_text()
    for k, want in SCALED.items():
        cfg = solver(k)[1]
        s = cfg.SOLVER
        assert (s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, s.STEPS, s.WARMUP_ITERS, s.CHECKPOINT_PERIOD) == want
        assert (cfg.TRANSFER.WORLD_SIZE, cfg.TRANSFER.SCALED_FROM) == (k, 0 if k == 8 else 8)
        if k < 8:  # the config's comment states the same numbers
            assert f"k={k}: batch {want[0]}, lr {want[1]}" in doc and f"MAX_ITER {want[2]}" in doc
    assert solver(2, machines=2)[1].SOLVER.IMS_PER_BATCH == 8  # GPUs of every machine count
    assert solver(1, "SOLVER.REFERENCE_WORLD_SIZE", 0)[1].SOLVER.MAX_ITER == 24000  # told not to

    # what ends up in OUTPUT_DIR/config.yaml (read by provenance) is the scaled config, and the log says so
    args, _ = solver(2, "OUTPUT_DIR", tmp_path)
    tn.setup(args)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (saved["SOLVER"]["IMS_PER_BATCH"], saved["SOLVER"]["BASE_LR"], saved["SOLVER"]["MAX_ITER"]) == (4, 0.005, 96000)
    assert saved["TRANSFER"] == {**saved["TRANSFER"], "WORLD_SIZE": 2, "SCALED_FROM": 8}
    assert "GPU scaling (linear rule) from the config's 8 GPUs to 2: SOLVER.IMS_PER_BATCH 16 -> 4" in \
        (tmp_path / "log.txt").read_text()


def test_a_batch_that_cannot_be_split_over_the_gpus_is_refused_in_one_line(capsys, corpus, tmp_path, monkeypatch):
    from transfer import train_net as tn

    voc = str(CONFIGS / "voc_R_50_C4_24k.yaml")
    for argv in (["--num-gpus", "4", "SOLVER.REFERENCE_WORLD_SIZE", "0", "SOLVER.IMS_PER_BATCH", "2"],  # < GPUs
                 ["--num-gpus", "3", "SOLVER.REFERENCE_WORLD_SIZE", "0"],   # 16 over 3
                 ["--num-gpus", "2", "SOLVER.IMS_PER_BATCH", "4"]):        # half an image per GPU at 8
        assert tn.cli(["--config-file", voc, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {voc}: SOLVER.IMS_PER_BATCH"), err
    # the GPUs it is told to use must be there (the solver is scaled to them)
    monkeypatch.setenv("SHAPES_ROOT", str(corpus))
    shapes = str(CONFIGS / "demo_shapes_voc_R_18_C4.yaml")
    gpus = torch.cuda.device_count()
    assert tn.cli(["--config-file", shapes, "--num-gpus", str(gpus + 1), "MODEL.DEVICE", "cuda",
                   "OUTPUT_DIR", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--num-gpus {gpus + 1}: {gpus} CUDA device(s) visible here" in err[0], err


def test_resuming_on_another_gpu_count_is_refused_when_the_solver_is_scaled(tmp_path, capsys):
    from transfer import train_net as tn

    voc = str(CONFIGS / "voc_R_50_C4_24k.yaml")

    def argv(gpus, *opts):
        return ["--config-file", voc, "--num-gpus", str(gpus), "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path),
                *map(str, opts)]

    def resumed(gpus, *opts):
        return tn.load_config(tn.argument_parser().parse_args(argv(gpus, *opts)))

    # the first attempt's config.yaml, as default_setup writes it (not setup() itself: its logger
    # would keep this test's captured stderr for the tests after it)
    (tmp_path / "config.yaml").write_text(resumed(2).dump())
    (tmp_path / "last_checkpoint").write_text("model_0000999.pth")
    tn.check_resume_world(resumed(2), resume=True)  # a requeue on the same GPUs
    tn.check_resume_world(resumed(4), resume=False)  # a new run over the folder: not a resume
    tn.check_resume_world(resumed(4, "SOLVER.REFERENCE_WORLD_SIZE", 0), resume=True)  # values as written
    with pytest.raises(tn.ScalingError, match="was trained by 2 process"):
        tn.check_resume_world(resumed(4), resume=True)
    assert tn.cli(["--resume", *argv(4)]) == 2  # 96000 iterations at 2 GPUs would become 48000 mid-run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resuming it on 4 would re-scale its schedule" in err[0] \
        and "resume with 2 GPUs" in err[0] and str(tmp_path / "config.yaml") in err[0], err


def test_reference_numerics_preset_runs_fp32_without_tf32_and_is_saved(tmp_path, capsys):
    import yaml

    from transfer import train_net as tn

    voc = str(CONFIGS / "voc_R_50_C4_24k.yaml")
    parse = lambda *opts: tn.argument_parser().parse_args(["--config-file", voc, "--num-gpus", "8", *opts])  # noqa: E731
    assert tn.load_config(parse()).SOLVER.AMP.ENABLED  # fast, on CUDA: AMP, as the config says
    args = parse("TRANSFER.NUMERICS", "reference", "OUTPUT_DIR", str(tmp_path))
    assert not tn.load_config(args).SOLVER.AMP.ENABLED  # reference: fp32 on CUDA too
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        cfg = tn.setup(args)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())  # provenance reads the preset here
    assert saved["TRANSFER"]["NUMERICS"] == "reference" and saved["SOLVER"]["AMP"]["ENABLED"] is False
    assert cfg.TRANSFER.NUMERICS == "reference"
    assert "numerics reference: AMP off, TF32 matmul False, cudnn False" in (tmp_path / "log.txt").read_text()
    capsys.readouterr()  # what setup() printed (its environment report: "No CUDA runtime is found ...")
    assert tn.cli(["--config-file", voc, "TRANSFER.NUMERICS", "exact"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TRANSFER.NUMERICS 'exact': use fast (AMP) or reference" in err[0]


def test_shapes_registered_with_corpus_classes(corpus):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from transfer import datasets

    datasets.register_shapes(corpus)
    for name, n in [("shapes_voc_trainval", 48), ("shapes_voc_test", 24),
                    ("shapes_coco_train", 48), ("shapes_coco_val", 24)]:
        assert len(DatasetCatalog.get(name)) == n
        assert MetadataCatalog.get(name).thing_classes == list(CLASSES)
    assert MetadataCatalog.get("shapes_voc_test").evaluator_type == "pascal_voc"
    assert MetadataCatalog.get("shapes_coco_val").evaluator_type == "coco"


def test_missing_dataset_folder_is_one_clear_error(tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "nowhere"),
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "transfer/train_net.py", "--config-file",
                        "configs/detection/voc_R_50_C4_24k.yaml"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr
    assert str(tmp_path / "nowhere" / "VOC2007") in err[0] and "DETECTRON2_DATASETS" in err[0]
