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
from pathlib import Path

import detectron2.utils.comm as comm
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, LVISEvaluator, PascalVOCDetectionEvaluator, verify_results

from suite import contract
from suite.tasks import EVALUATOR_METRIC
from transfer import datasets, roi_heads  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
from transfer.checkpoint import SafeCheckpointer, WeightsError, quiet_load
from transfer.evaluator_compat import CityscapesEvaluator, patch_lvis_eval

logger = logging.getLogger("transfer")


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
    """TRANSFER.BACKBONE_NAME: the name results are filed under (default: backbone_name)."""
    cfg.TRANSFER = CN()
    cfg.TRANSFER.BACKBONE_NAME = ""


def load_config(args):
    """The resolved config: defaults + TRANSFER node + config file + trailing `KEY value` opts."""
    cfg = get_cfg()
    add_transfer_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE == "cpu":
        cfg.SOLVER.AMP.ENABLED = False  # Detectron2's AMPTrainer needs CUDA
    return cfg


def setup(args):
    datasets.register_shapes()  # here, not at import: spawned workers run main() only
    cfg = load_config(args)
    cfg.freeze()
    default_setup(cfg, args)  # logger, config.yaml in OUTPUT_DIR, seed_all_rng(SEED + rank)
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
    if args.eval_only:
        model = Trainer.build_model(cfg)
        ckpt = SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        results, iteration = Trainer.test(cfg, model), ckpt.get("iteration", -1) + 1
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        results, iteration = getattr(trainer, "_last_eval_results", None), trainer.iter
    if comm.is_main_process() and results:
        verify_results(cfg, results)  # checks TEST.EXPECTED_RESULTS when set
        write_final_metrics(cfg, args, results, iteration)
    return results


def check_inputs(args):
    """Errors worth one line, found before any process or model is started."""
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file {args.config_file}: no such file")
    datasets.register_shapes()
    try:
        cfg = load_config(args)
    except (KeyError, ValueError, AssertionError) as e:  # yacs: unknown key, bad type or value
        raise ValueError(f"{args.config_file} with opts {args.opts}: {e}; fix the key or "
                         "value (see detectron2/config/defaults.py)") from None
    datasets.check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    if cfg.MODEL.WEIGHTS and "://" not in cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise FileNotFoundError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: no such file (convert a "
                                "checkpoint with tools/convert_checkpoint.py)")
    check_writable(cfg.OUTPUT_DIR)
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
