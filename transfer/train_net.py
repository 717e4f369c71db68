"""Fine-tune a converted backbone with Detectron2 (MoCo detection protocol), as Detectron2's
tools/train_net.py; writes OUTPUT_DIR/final_metrics.json (docs/formats.md) after the last evaluation,
OUTPUT_DIR/failed.json when it fails. Weights are loaded safely (transfer/checkpoint.py); bad input
(config, datasets, weights that are unsafe, damaged or do not fit, OUTPUT_DIR) is one line, exit 2.

    python transfer/train_net.py --config-file configs/detection/voc_R_50_C4_24k.yaml \
        --num-gpus 8 MODEL.WEIGHTS backbone.pkl OUTPUT_DIR out/voc SEED 0
"""
import logging
import math
import os
import sys
import time
from pathlib import Path

import yaml

import detectron2.utils.comm as comm
import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, LVISEvaluator, PascalVOCDetectionEvaluator, verify_results

from suite import contract, provenance
from suite.tasks import EVALUATOR_METRIC
from transfer import datasets, roi_heads  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
from transfer.checkpoint import SafeCheckpointer, WeightsError, quiet_load
from transfer.evaluator_compat import CityscapesEvaluator, patch_lvis_eval

logger = logging.getLogger("detectron2.transfer")  # into log.txt: default_setup configures "detectron2"


class ScalingError(ValueError):
    """A batch that cannot be split over the processes used (scale_to_world)."""


class Trainer(DefaultTrainer):
    """DefaultTrainer with the evaluator picked by the dataset's registered evaluator_type, and
    the safe checkpointer (transfer/checkpoint.py) for MODEL.WEIGHTS, --resume and its snapshots."""

    def build_hooks(self):
        # DefaultTrainer.__init__ makes a DetectionCheckpointer, then calls this; swap it here so
        # that resume_or_load and the PeriodicCheckpointer hook both use the safe one
        old = self.checkpointer
        self.checkpointer = SafeCheckpointer(old.model, old.save_dir, save_to_disk=old.save_to_disk,
                                             **old.checkpointables)
        return super().build_hooks()

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        kind = MetadataCatalog.get(dataset_name).get("evaluator_type")
        if kind == "pascal_voc":  # VOC07 11-point AP50 + COCO-style AP/AP75 over IoU 0.5:0.95
            return PascalVOCDetectionEvaluator(dataset_name)
        folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        if kind == "coco":  # box, mask and keypoint AP (OKS with TEST.KEYPOINT_OKS_SIGMAS, default COCO's)
            tasks = ("bbox",) + (("segm",) if cfg.MODEL.MASK_ON else ()) + \
                (("keypoints",) if cfg.MODEL.KEYPOINT_ON else ())
            return COCOEvaluator(dataset_name, tasks=tasks, output_dir=folder,
                                 kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS)
        if kind == "lvis":  # the LVIS API's federated AP, with APr / APc / APf
            patch_lvis_eval()
            tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
            return LVISEvaluator(dataset_name, tasks=tasks, output_dir=folder,
                                 max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
        if kind == "cityscapes_instance":  # cityscapesscripts' mask AP and AP50 over the gtFine pngs
            return CityscapesEvaluator(dataset_name)
        raise ValueError(f"no evaluator for dataset '{dataset_name}' (evaluator_type {kind!r})")

    def __init__(self, cfg):
        """DefaultTrainer.__init__ (Detectron2 0.6-0.7) but for one argument: DDP over CPU processes
        too (several machines of a CPU cluster), as its create_ddp_model passes device_ids=[local
        rank], which DistributedDataParallel refuses for a CPU module."""
        import weakref

        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.engine import AMPTrainer, SimpleTrainer, create_ddp_model

        super(DefaultTrainer, self).__init__()  # TrainerBase (setup() already set up the loggers)
        # a no-op after setup()'s scale_to_world (REFERENCE_WORLD_SIZE is then the world size)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        cpu = {"device_ids": None} if cfg.MODEL.DEVICE == "cpu" else {}
        model = create_ddp_model(model, broadcast_buffers=False, **cpu)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())


def add_transfer_config(cfg):
    """TRANSFER.BACKBONE_NAME: the name results are filed under (default: backbone_name).
    TRANSFER.NUMERICS: the numerics preset (NUMERICS).
    Written by the run (what it did, in OUTPUT_DIR/config.yaml): TRANSFER.WORLD_SIZE, the processes
    (GPUs) that trained; TRANSFER.SCALED_FROM, the SOLVER.REFERENCE_WORLD_SIZE the solver values
    were scaled from (0: used as written)."""
    cfg.TRANSFER = CN()
    cfg.TRANSFER.BACKBONE_NAME = ""
    cfg.TRANSFER.NUMERICS = "fast"  # NUMERICS: fast | reference
    cfg.TRANSFER.WORLD_SIZE = 0
    cfg.TRANSFER.SCALED_FROM = 0


# Numerics presets. fast: AMP as SOLVER.AMP.ENABLED says (on in the protocol configs; Detectron2's
# fp16 AMPTrainer, CUDA only), PyTorch's TF32 defaults. reference: MoCo's released detection configs,
# fp32: AMP forced off and TF32 off for matmuls and convolutions (they ran on V100s, without TF32).
NUMERICS = ("fast", "reference")


def apply_numerics(cfg):
    """The preset's AMP switch in cfg (TF32 is per process: set_tf32)."""
    if cfg.TRANSFER.NUMERICS not in NUMERICS:
        raise ValueError(f"TRANSFER.NUMERICS {cfg.TRANSFER.NUMERICS!r}: use fast (AMP) or reference "
                         "(fp32, TF32 off: MoCo's released configs)")
    if cfg.TRANSFER.NUMERICS == "reference":
        cfg.SOLVER.AMP.ENABLED = False


def set_tf32(cfg):
    """TF32 off in this process for the reference preset; fast keeps PyTorch's defaults."""
    if cfg.TRANSFER.NUMERICS == "reference":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return (f"numerics {cfg.TRANSFER.NUMERICS}: AMP {'on' if cfg.SOLVER.AMP.ENABLED else 'off'}, TF32 "
            f"matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}")


def world_size(args):
    """Processes that train: --num-gpus per machine (CPU processes with MODEL.DEVICE cpu) times
    --num-machines, as launch() starts them."""
    return getattr(args, "num_gpus", 1) * getattr(args, "num_machines", 1)


def scale_to_world(cfg, world):
    """The config for `world` processes by the linear scaling rule (Goyal et al.; MoCo's detection
    README): Detectron2's DefaultTrainer.auto_scale_workers, which keeps the images per GPU of
    SOLVER.REFERENCE_WORLD_SIZE (8 in the MoCo-protocol configs; 0 = use the values as written),
    scales IMS_PER_BATCH and BASE_LR by world/reference and divides STEPS, MAX_ITER, WARMUP_ITERS,
    CHECKPOINT_PERIOD and TEST.EVAL_PERIOD by it. Records TRANSFER.WORLD_SIZE and SCALED_FROM.
    A batch that cannot be split evenly over the processes is a ScalingError (one line)."""
    cfg = cfg.clone()
    cfg.defrost()
    ref, batch = cfg.SOLVER.REFERENCE_WORLD_SIZE, cfg.SOLVER.IMS_PER_BATCH
    if ref < 0 or (ref and batch % ref):
        raise ScalingError(f"SOLVER.IMS_PER_BATCH {batch} over SOLVER.REFERENCE_WORLD_SIZE {ref} GPUs is not a "
                           f"whole number of images per GPU: give a multiple of {ref} (read at {ref} GPUs and "
                           "scaled to those used), or SOLVER.REFERENCE_WORLD_SIZE 0 to use the batch as written")
    cfg = DefaultTrainer.auto_scale_workers(cfg, world)
    cfg.defrost()
    batch = cfg.SOLVER.IMS_PER_BATCH
    if batch < world or batch % world:
        raise ScalingError(f"SOLVER.IMS_PER_BATCH {batch} cannot be split evenly over {world} processes "
                           f"(--num-gpus x --num-machines): give a multiple of {world} images, or fewer GPUs")
    cfg.TRANSFER.WORLD_SIZE = world
    cfg.TRANSFER.SCALED_FROM = ref if ref != world else 0
    return cfg


def check_resume_world(cfg, resume):
    """A resumed fine-tune keeps its schedule. Resuming an OUTPUT_DIR that holds a checkpoint
    (fvcore's `last_checkpoint`) on another number of processes than its config.yaml records, with
    the solver scaled to the processes (SOLVER.REFERENCE_WORLD_SIZE > 0), would change MAX_ITER,
    STEPS and BASE_LR mid-run: a ScalingError that names the folder and the fix. (A Slurm requeue
    asks for the same GPUs: it always passes.)"""
    out = Path(cfg.OUTPUT_DIR)
    if not (resume and cfg.SOLVER.REFERENCE_WORLD_SIZE and (out / contract.D2_LAST_CHECKPOINT).is_file()):
        return
    saved = out / contract.CONFIG  # what default_setup wrote for the first attempt
    try:
        before = yaml.safe_load(saved.read_text()) or {}
        was = int((before.get("TRANSFER") or {}).get("WORLD_SIZE") or 0)
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return  # no readable record of the first attempt: nothing to compare
    if was and was != cfg.TRANSFER.WORLD_SIZE:
        raise ScalingError(
            f"OUTPUT_DIR {out} was trained by {was} process(es) ({saved}: TRANSFER.WORLD_SIZE "
            f"{was}); resuming it on {cfg.TRANSFER.WORLD_SIZE} would re-scale its schedule mid-run "
            f"(SOLVER.REFERENCE_WORLD_SIZE {cfg.SOLVER.REFERENCE_WORLD_SIZE}): resume with {was} GPUs "
            "(--num-gpus x --num-machines), or fine-tune into a new OUTPUT_DIR")


def scaling_note(written, cfg):
    """The log line saying what scale_to_world did to the config as `written`."""
    keys = ("SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR", "SOLVER.MAX_ITER", "SOLVER.STEPS",
            "SOLVER.WARMUP_ITERS", "SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD")
    get = lambda c, k: c[k.split(".")[0]][k.split(".")[1]]  # noqa: E731
    if not cfg.TRANSFER.SCALED_FROM:
        why = ("SOLVER.REFERENCE_WORLD_SIZE 0: the config's values as written" if not written.SOLVER.REFERENCE_WORLD_SIZE
               else "the config's reference world size")
        return f"GPU scaling: none on {cfg.TRANSFER.WORLD_SIZE} process(es) ({why})"
    changes = ", ".join(f"{k} {get(written, k)} -> {get(cfg, k)}" for k in keys if get(written, k) != get(cfg, k))
    return (f"GPU scaling (linear rule) from the config's {cfg.TRANSFER.SCALED_FROM} GPUs to "
            f"{cfg.TRANSFER.WORLD_SIZE}: {changes} (SOLVER.REFERENCE_WORLD_SIZE 0 keeps the written values)")


def load_config(args, scale=True):
    """The resolved config: defaults + TRANSFER node + config file + trailing `KEY value` opts, scaled
    to the processes of `args` (scale_to_world) unless `scale` is false."""
    cfg = get_cfg()
    add_transfer_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    apply_numerics(cfg)
    if cfg.MODEL.DEVICE == "cpu":
        cfg.SOLVER.AMP.ENABLED = False  # Detectron2's AMPTrainer needs CUDA
    return scale_to_world(cfg, world_size(args)) if scale else cfg


def setup(args):
    datasets.register_shapes()  # here, not at import: spawned workers run main() only
    written = load_config(args, scale=False)
    cfg = scale_to_world(written, world_size(args))  # before default_setup saves config.yaml
    cfg.freeze()
    default_setup(cfg, args)  # logger, config.yaml in OUTPUT_DIR, seed_all_rng(SEED + rank)
    logger.info(scaling_note(written, cfg))
    logger.info(set_tf32(cfg))
    if cfg.MODEL.DEVICE == "cpu":
        logger.info("MODEL.DEVICE cpu: AMP off")
    if comm.get_world_size() == 1:
        logger.info("1 process: naiveSyncBN layers normalise with per-batch statistics (plain BN)")
    return cfg


def backbone_name(cfg):
    """docs/formats.md: TRANSFER.BACKBONE_NAME, else the name of MODEL.WEIGHTS as the layout files it
    (suite.contract.backbone_of_weights: random_init for none)."""
    return cfg.TRANSFER.BACKBONE_NAME or contract.backbone_of_weights(cfg.MODEL.WEIGHTS)


def _finite(x):
    """NaN/inf (e.g. AP of a class absent from a tiny test set) -> null: strict JSON for any reader."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return x if not isinstance(x, float) or math.isfinite(x) else None


def metric_of(cfg):
    """The table's metric of this run (suite.tasks.METRICS): from the test dataset's evaluator,
    "keypoints" for a keypoint model."""
    kind = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("evaluator_type") if cfg.DATASETS.TEST else None
    metric = EVALUATOR_METRIC.get(kind, "")
    return "keypoints" if metric == "coco" and cfg.MODEL.KEYPOINT_ON else metric


def write_final_metrics(cfg, args, results, iteration):
    """OUTPUT_DIR/final_metrics.json, atomically, on the main process."""
    record = {
        "config_file": args.config_file,
        "task": contract.task_name(args.config_file),
        "backbone": backbone_name(cfg),
        "weights": cfg.MODEL.WEIGHTS,
        "seed": cfg.SEED,
        "iter": iteration,
        "metric": metric_of(cfg),
        "results": _finite({k: dict(v) for k, v in results.items()}),
    }
    contract.write_json(contract.done_file("transfer", cfg.OUTPUT_DIR), record)
    return record


def write_failure(cfg, error):
    """OUTPUT_DIR/failed.json: the results table then lists the run as failed, not unfinished."""
    record = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:500]}
    contract.write_json(Path(cfg.OUTPUT_DIR, contract.FAILED), record)


def main(args):
    cfg = setup(args)
    if comm.is_main_process():  # a new attempt: the last one's failure and temp files go
        contract.remove_stale_temp(cfg.OUTPUT_DIR)
        Path(cfg.OUTPUT_DIR, contract.FAILED).unlink(missing_ok=True)
    try:
        return run(cfg, args)
    except Exception as e:  # (not KeyboardInterrupt / SystemExit: killed or requeued = unfinished)
        if comm.is_main_process():
            write_failure(cfg, e)
        raise


def run(cfg, args):
    started, used, resumed = time.time(), cfg, False
    if args.eval_only:
        model = Trainer.build_model(cfg)
        ckpt = SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        results, iteration = Trainer.test(cfg, model), ckpt.get("iteration", -1) + 1
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        resumed = trainer.start_iter > 0
        trainer.train()
        # the config it trained with: what auto_scale_workers (or any scaling) made of cfg
        results, iteration, used = getattr(trainer, "_last_eval_results", None), trainer.iter, trainer.cfg
    if comm.is_main_process() and results:
        verify_results(cfg, results)  # checks TEST.EXPECTED_RESULTS when set
        write_provenance(used, time.time() - started, resumed)
        write_final_metrics(cfg, args, results, iteration)
    return results


def write_provenance(cfg, wall_time_s, resumed):
    """OUTPUT_DIR/provenance.json (suite/provenance.py) from the config the run used; the weights
    it read are MODEL.WEIGHTS, the pretraining config the one the run layout gives them."""
    on_cuda = str(cfg.MODEL.DEVICE).startswith("cuda")
    weights = cfg.MODEL.WEIGHTS or None  # a URL is recorded, not hashed (no file)
    provenance.write(cfg.OUTPUT_DIR, provenance.build(
        "fine-tune", provenance.detection_schedule(yaml.safe_load(cfg.dump())),
        gpu_count=comm.get_world_size() if on_cuda else 0, weights=weights,
        pretrain_config=None if "://" in str(weights) else contract.pretrain_config_of_weights(weights),
        wall_time_s=wall_time_s,
        resumed=resumed))


def check_inputs(args):
    """Errors worth one line, found before any process or model is started."""
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file {args.config_file}: no such file")
    datasets.register_shapes()
    try:
        cfg = load_config(args)
        check_resume_world(cfg, args.resume)
    except ScalingError as e:
        raise ValueError(f"{args.config_file}: {e}") from None
    except (KeyError, ValueError, AssertionError) as e:  # yacs: unknown key, bad type or value
        raise ValueError(f"{args.config_file} with opts {args.opts}: {e}; fix the key or "
                         "value (see detectron2/config/defaults.py)") from None
    datasets.check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    if cfg.MODEL.WEIGHTS and "://" not in cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise FileNotFoundError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: no such file (convert a "
                                "checkpoint with tools/convert_checkpoint.py)")
    check_writable(cfg.OUTPUT_DIR)
    visible = torch.cuda.device_count()
    if cfg.MODEL.DEVICE.startswith("cuda") and visible < args.num_gpus:  # the solver is scaled to --num-gpus
        raise ValueError(f"--num-gpus {args.num_gpus}: {visible} CUDA device(s) visible here; pass "
                         + (f"--num-gpus {visible} (the solver is scaled to it)" if visible else "MODEL.DEVICE cpu"))
    if cfg.MODEL.WEIGHTS or args.resume:  # safe, finite, and the whole backbone fits
        quiet_load(cfg, args.resume)


def check_writable(folder):
    """OUTPUT_DIR must be (or become) a folder this process can write: found before launch."""
    p = os.path.abspath(folder)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p) or not os.access(p, os.W_OK):
        raise PermissionError(f"OUTPUT_DIR {folder}: cannot be written ({p} is not a writable "
                              "folder); pass a writable OUTPUT_DIR")


def argument_parser():
    return default_argument_parser(epilog=__doc__)


def cli(argv=None):
    """The command line: bad input (config, datasets, weights, OUTPUT_DIR) is one line, exit 2."""
    args = argument_parser().parse_args(argv)
    try:
        check_inputs(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except WeightsError as e:  # a snapshot that changed after check_inputs (one process)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
