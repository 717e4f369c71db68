"""The transfer tasks of suite/tasks.py: the corpus's COCO keypoint, LVIS v1 and Cityscapes layouts
read back by the real loaders, each FPN task fine-tuned from a converted backbone through train_net
and evaluated by its community's evaluator, the table's columns with n and mean ± std, the
reference configs against Detectron2's own, and `submit.py pipeline --tasks`."""
import json
from pathlib import Path

import numpy as np
import pytest

from suite import contract, results, tasks
from suite.corpus import LAYOUTS, TASK_LAYOUTS, make_corpus

pytestmark = pytest.mark.detectron2
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task_corpus(module_tmp):
    """12 + 6 images of 128 px with the task layouts; SHAPES_ROOT points at it in this module."""
    out = make_corpus(module_tmp("tasks") / "shapes", seed=0, num_train=12, num_test=6,
                      size=128, layouts=LAYOUTS + TASK_LAYOUTS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHAPES_ROOT", str(out))
        from transfer import datasets

        datasets.register_shapes(out)
        yield contract.Corpus(out)


def test_keypoints_are_visible_extreme_vertices_with_a_flip_map(task_corpus):
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import create_keypoint_hflip_indices
    from pycocotools import mask as mask_util
    from scipy.ndimage import binary_dilation

    dicts = DatasetCatalog.get("shapes_kp_train")
    assert list(create_keypoint_hflip_indices(["shapes_kp_train"])) == [0, 3, 2, 1]  # left <-> right
    on_mask, visible, hidden = [], 0, 0
    for d in dicts:
        for ann in d["annotations"]:
            kps = np.array(ann["keypoints"]).reshape(4, 3)
            mask = binary_dilation(mask_util.decode(ann["segmentation"]).astype(bool), iterations=2)
            for x, y, v in kps:  # Detectron2 added 0.5: continuous image coordinates
                if v == 2:
                    on_mask.append(mask[int(y), int(x)])
                visible, hidden = visible + (v == 2), hidden + (v == 1)
            ys = [y if v > 0 else np.nan for _, y, v in kps]  # v=0: outside the image, (0, 0)
            assert np.nanargmin(ys) in (0, *np.flatnonzero(np.array(ys) == np.nanmin(ys)))  # top highest
            assert np.nanargmax(ys) in (2, *np.flatnonzero(np.array(ys) == np.nanmax(ys)))  # bottom lowest
    # a visible vertex is on its shape's visible mask (the raster drops a crescent's thinnest horn tips)
    assert visible > 50 and hidden > 0 and np.mean(on_mask) > 0.9


def test_lvis_file_is_federated_with_rare_common_frequent(task_corpus):
    from lvis import LVIS

    for split in ("train", "val"):
        api = LVIS(str(task_corpus.lvis_annotations(split)))
        assert sorted({c["frequency"] for c in api.dataset["categories"]}) == ["c", "f", "r"]
        not_exhaustive = 0
        for img in api.dataset["images"]:
            annotated = {a["category_id"] for a in api.img_ann_map[img["id"]]}
            assert annotated.isdisjoint(img["neg_category_ids"]) and img["neg_category_ids"]
            assert set(img["not_exhaustive_category_ids"]) <= annotated
            not_exhaustive += len(img["not_exhaustive_category_ids"])
        assert not_exhaustive > 0  # a class with an instance left unannotated, as LVIS marks it


def test_cityscapes_polygons_and_pngs_agree(task_corpus):
    from detectron2.data.datasets.cityscapes import load_cityscapes_instances

    args = (str(task_corpus.cityscapes_images("val")), str(task_corpus.cityscapes_gt("val")))
    from_json = load_cityscapes_instances(*args, from_json=True, to_polygons=True)
    from_png = load_cityscapes_instances(*args, from_json=False, to_polygons=False)
    assert len(from_json) == 6 and {d["file_name"].split("/")[-2] for d in from_json} == {"frankfurt", "lindau"}
    classes = lambda d: sorted(x["category_id"] for x in d["annotations"])  # noqa: E731
    by_file = lambda ds: sorted(ds, key=lambda d: d["file_name"])  # noqa: E731
    for a, b in zip(by_file(from_json), by_file(from_png)):
        assert classes(a) == classes(b) and classes(a)


METRIC_KEYS = {"coco_kp": ("keypoints", {"AP", "AP50", "AP75"}),
               "lvis": ("segm", {"AP", "APr", "APc", "APf"}),
               "cityscapes": ("segm", {"AP", "AP50"})}


def test_each_task_fine_tunes_and_the_table_shows_its_metric(task_corpus, weights, tmp_path, monkeypatch):
    """Two seeds of each FPN task, 2 iterations from the converted backbone: final_metrics.json
    holds the metric of the task's evaluator; the table shows its columns, n=2 and a std; nothing
    is written into the working directory (cityscapesscripts' matches.json)."""
    from transfer import train_net as tn

    monkeypatch.chdir((tmp_path / "cwd").mkdir() or tmp_path / "cwd")
    for name, (section, keys) in METRIC_KEYS.items():
        config = str(ROOT / tasks.task_config(name, "synthetic"))
        for seed in (0, 1):
            out = contract.fine_tune_dir(tmp_path, "demo_r18", contract.task_name(config), seed)
            tn.main(tn.argument_parser().parse_args(
                ["--config-file", config, "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(weights),
                 "SOLVER.MAX_ITER", "2", "TEST.PRECISE_BN.NUM_ITER", "1", "SEED", str(seed)]))
            record = json.loads((out / contract.FINE_TUNE_DONE).read_text())
            assert record["metric"] == tasks.TASKS[name].metric and record["backbone"] == "demo_r18"
            assert keys <= set(record["results"][section])
            assert all(0 <= record["results"][section][k] <= 100 for k in keys)
    assert not any((tmp_path / "cwd").iterdir())
    sections, incomplete, _ = results.collect([tmp_path], "none")
    assert not incomplete
    by_task = {task: (columns, rows) for kind, task, columns, rows in sections}
    for name in METRIC_KEYS:
        columns, rows = by_task[contract.task_name(tasks.task_config(name, "synthetic"))]
        assert columns == tasks.columns(tasks.TASKS[name].metric)
        (label, source, cells), = rows
        assert label == "demo_r18" and all(cells[c][2] == 2 and cells[c][1] is not None for c in columns)
    text = results.render_markdown(sections, incomplete)
    assert "| APr | APc | APf |" in text and "AP (kp)" in text and "(n=2)" in text


def _cfg(path):
    from transfer import train_net as tn

    # as written (the reference's 8 GPUs), not scaled to this machine's one process
    return tn.load_config(tn.argument_parser().parse_args(["--config-file", str(ROOT / path), "MODEL.DEVICE", "cpu"]),
                          scale=False)


def test_reference_configs_follow_detectron2_and_the_moco_protocol():
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    def zoo(name):
        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(name))
        return cfg

    same = {"lvis": ("LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
                     ["SOLVER.STEPS", "SOLVER.MAX_ITER", "SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR",
                      "DATALOADER.SAMPLER_TRAIN", "DATALOADER.REPEAT_THRESHOLD", "TEST.DETECTIONS_PER_IMAGE",
                      "MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "DATASETS.TRAIN",
                      "DATASETS.TEST", "INPUT.MIN_SIZE_TRAIN"]),
            "cityscapes": ("Cityscapes/mask_rcnn_R_50_FPN.yaml",
                           ["SOLVER.STEPS", "SOLVER.MAX_ITER", "SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR",
                            "INPUT.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TRAIN", "INPUT.MIN_SIZE_TEST",
                            "DATASETS.TRAIN", "DATASETS.TEST", "MODEL.ROI_HEADS.NUM_CLASSES"]),
            "coco_kp": ("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml",
                        ["MODEL.KEYPOINT_ON", "MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA",
                         "MODEL.RPN.POST_NMS_TOPK_TRAIN", "DATASETS.TRAIN", "DATASETS.TEST"])}
    get = lambda cfg, key: eval("cfg." + key)  # noqa: E731
    for name, (reference, keys) in same.items():
        ours, theirs = _cfg(tasks.TASKS[name].config), zoo(reference)
        for key in keys:
            assert get(ours, key) == get(theirs, key), (name, key)
        # MoCo: synchronised BN in backbone, FPN and heads; fine-tuned from the stem
        assert ours.MODEL.RESNETS.NORM == ours.MODEL.FPN.NORM == ours.MODEL.ROI_BOX_HEAD.NORM == "naiveSyncBN"
        assert ours.MODEL.ROI_BOX_HEAD.NUM_CONV == 4 and ours.MODEL.BACKBONE.FREEZE_AT == 0
        assert ours.MODEL.ROI_MASK_HEAD.NORM == "naiveSyncBN" or not ours.MODEL.MASK_ON
    kp = _cfg(tasks.TASKS["coco_kp"].config)
    assert (kp.SOLVER.STEPS, kp.SOLVER.MAX_ITER) == ((120000, 160000), 180000)  # MoCo's 2x
    voc = _cfg(tasks.TASKS["voc07"].config)
    assert voc.DATASETS.TRAIN == ("voc_2007_trainval",) and voc.DATASETS.TEST == ("voc_2007_test",)
    assert voc.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and voc.MODEL.RESNETS.NORM == "naiveSyncBN"
    for task in tasks.TASKS.values():  # the synthetic twin keeps the task's head and evaluator
        syn = _cfg(task.synthetic)
        assert syn.MODEL.KEYPOINT_ON == _cfg(task.config).MODEL.KEYPOINT_ON
        assert syn.MODEL.MASK_ON == _cfg(task.config).MODEL.MASK_ON


def test_pipeline_and_submit_accept_a_task_list(tmp_path):
    from slurm import pipeline, submit

    (tmp_path / "data" / "train").mkdir(parents=True)
    args = submit.parse_args(["pipeline", "--out", str(tmp_path / "out"), "--pretrain-config",
                              str(ROOT / "configs/pretrain/demo.yaml"), "--data-root", str(tmp_path / "data"),
                              "--voc-config", "--coco-config", "--tasks", "voc07,coco_kp", "lvis", "cityscapes",
                              "--seeds", "2", "--coco-seeds", "1", "--cluster", "local"])
    assert args.tasks == ["voc07", "coco_kp", "lvis", "cityscapes"]
    submit.check_inputs(args)  # every task config exists and parses
    fine_tunes = [s.name for s in submit.stages_for(args) if s.kind == "transfer"]
    per_task = {contract.task_name(tasks.TASKS[t].config): sum(contract.task_name(tasks.TASKS[t].config) in n
                                                               for n in fine_tunes) for t in tasks.TASKS}
    assert per_task == {"voc07_R_50_C4": 2, "cityscapes_R_50_FPN": 2, "coco_kp_R_50_FPN_2x": 1,
                        "lvis_v1_R_50_FPN_1x": 1}
    stages = pipeline.build_stages({"demo": (str(ROOT / "configs/pretrain/demo.yaml"), ())}, tmp_path / "data", tmp_path,
                                   tasks=["lvis"], task_configs="synthetic")
    (ft,) = [s for s in stages if s.kind == "transfer"]
    assert ft.argv[3].endswith(tasks.TASKS["lvis"].synthetic)
    # one list for every kind of task: the classification transfer tasks too
    (tmp_path / "voc" / "VOC2007").mkdir(parents=True)
    (tmp_path / "subsets").mkdir()
    (tmp_path / "subsets" / "1percent.txt").write_text("x\n")
    mixed = submit.parse_args(["pipeline", "--out", str(tmp_path / "out2"), "--pretrain-config",
                               str(ROOT / "configs/pretrain/demo.yaml"), "--data-root", str(tmp_path / "data"),
                               "--voc-config", "--coco-config", "--tasks", "cityscapes,voc07_svm", "semi_1pct",
                               "--probe-voc-root", str(tmp_path / "voc"), "--semi-subsets", str(tmp_path / "subsets"),
                               "--seeds", "2", "--cluster", "local"])
    submit.check_inputs(mixed)
    names = [s.name for s in submit.stages_for(mixed)]
    assert sum("/cityscapes_R_50_FPN/" in n for n in names) == 2
    assert sum("/voc07_svm/" in n for n in names) == 1 and sum("/semi_1pct/" in n for n in names) == 2
    with pytest.raises(pipeline.PipelineError, match="unknown task 'semi'"):
        pipeline.build_stages({}, tmp_path, tmp_path, tasks=["semi"])
    with pytest.raises(SystemExit):
        submit.parse_args(["pipeline", "--out", "o", "--pretrain-config", "c", "--data-root", "d",
                           "--tasks", "voc07,nope"])
