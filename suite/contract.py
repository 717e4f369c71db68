"""The file contract of docs/formats.md in code: where each stage writes (the run layout, and the
parsers that read a path back), the names the stages share (backbones, tasks, seeds, probe presets,
random init), the file that marks each stage complete, and the one atomic writer.

Standard library only, so that every part imports it: pretrain/ on a bare torch stack, the Slurm
launcher and the results table without torch. A new record file is a name below (plus a row of
DONE if it marks a stage complete); a layout change is an edit of the one function that builds
the path, with its parser beside it. Nothing else in the suite spells a path pattern or a name."""
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------- names
RANDOM_INIT = "random_init"  # the backbone of the fine-tunes and probes from no pretrained weights
PROBE_PRESETS = ("imagenet", "cifar", "voc07")  # pretrain.linear's presets (the probe stages' names)
# classification transfer on frozen features (pretrain/svm.py) and semi-supervised fine-tuning
# (pretrain/semisup.py): the pipeline's task names, and the subset list each semi task reads (the
# file names SimCLR's lists have)
SVM_TASKS = ("voc07_svm", "voc07_lowshot")
SEMI_SUBSETS = {"semi_1pct": "1percent.txt", "semi_10pct": "10percent.txt"}
CLASSIFICATION_TASKS = (*SVM_TASKS, *SEMI_SUBSETS)
SEED_FOLDER = re.compile(r"seed[_-]?(\d+)$")  # seed<k> (seed_<k>, seed-<k> by hand), with .match


def backbone_name(pretrain_config):
    """A pipeline's backbone is named after its pretraining config file (sane_r50_200ep.yaml ->
    sane_r50_200ep)."""
    return Path(pretrain_config).stem


def task_name(detection_config):
    """A detection task is named after its config file (voc_R_50_C4_24k.yaml -> voc_R_50_C4_24k)."""
    return Path(detection_config).stem


def seed_folder(seed):
    """The folder of seed k: `seed<k>` (fine-tunes, and pretraining seeds)."""
    return f"seed{seed}"


def folder_seed(name):
    """k for a `seed<k>` folder name, else None."""
    m = SEED_FOLDER.match(str(name))
    return int(m.group(1)) if m else None


def unit(backbone, seed=None):
    """One pretraining: `<b>`, or `<b>/seed<k>` for pretraining seed k. Its folder under pretrain/,
    its weights under weights/ and its stages' names all carry it."""
    return backbone if seed is None else f"{backbone}/{seed_folder(seed)}"


# ---------------------------------------------------------------- the files of a run
CONFIG = "config.yaml"               # the resolved config (pretraining; Detectron2's own)
LOG = "log.txt"                      # the human log (pretraining; Detectron2's own)
METRICS = "metrics.jsonl"            # pretraining and probe records, one JSON object a line
CHECKPOINT = "checkpoint.pth"        # the latest pretraining state (what resume, probe, converter read)
PREVIOUS_CHECKPOINT = "checkpoint.prev.pth"
SNAPSHOT = re.compile(r"^checkpoint_(\d+)\.pth$")
PRETRAIN_DONE = "done.json"
PROBE_METRICS = "linear_metrics.json"
PROBE_RANDOM_INIT = RANDOM_INIT      # its key that is true for a probe of an untrained network
PROBE_CONFIG = "linear_config.json"
FINE_TUNE_DONE = "final_metrics.json"
SVM_METRICS = "svm_metrics.json"     # pretrain.svm: VOC07 SVM / low-shot SVM (its done marker)
SEMI_METRICS = "semisup_metrics.json"  # pretrain.semisup: a semi-supervised fine-tune (its done marker)
TRAIN_STATE = "train_state.pth"      # probe / semi-supervised fine-tune: resume state, gone when done
FAILED = "failed.json"               # a fine-tune that raised (removed by the next attempt)
D2_METRICS = "metrics.json"          # Detectron2's JSONWriter
D2_LAST_CHECKPOINT = "last_checkpoint"
D2_SNAPSHOT = re.compile(r"^model_(\d+|final)\.pth$")
RESULTS = "results.md"
RESULTS_RECORDS = "results.jsonl"    # beside the table: one record per run, its provenance included
PROVENANCE = "provenance.json"       # every run (pretraining, probe, fine-tune): suite/provenance.py
CORPUS_RECORD = "corpus.json"        # the synthetic corpus: generator arguments and class list
JOBS = "jobs.json"                   # slurm/submit.py: the job of each stage
CHECKPOINT_EVALS = "checkpoint_evals"  # evaluations of pretraining snapshots (not in the table)
EPOCH_FOLDER = re.compile(r"^epoch(\d+)$")
CORPUS_IMAGEFOLDER = "imagefolder"   # a corpus's ImageFolder root (pretraining's data.root)

# The file each stage writes last: its output is complete once the file exists (the pipeline skips
# such a stage, the table reads it). A conversion's is the weights file itself.
DONE = {"pretrain": PRETRAIN_DONE, "probe": PROBE_METRICS, "transfer": FINE_TUNE_DONE, "results": RESULTS,
        "svm": SVM_METRICS, "semisup": SEMI_METRICS}


def snapshot(epoch):
    """The pretraining snapshot of an epoch: checkpoint_0020.pth."""
    return f"checkpoint_{epoch:04d}.pth"


def done_file(kind, output):
    """The done marker of a stage of `kind` (DONE) whose output folder is `output`."""
    return Path(output) / DONE[kind]


# ---------------------------------------------------------------- the run layout
@dataclass(frozen=True)
class Layout:
    """Where a pipeline rooted at OUT writes (docs/formats.md):
    OUT/pretrain/<unit>/                      pretraining; <unit> is <b> or <b>/seed<k>
    OUT/pretrain/<unit>/linear_<preset>/      its probes (random init: OUT/pretrain/random_init/)
    OUT/weights/<unit>.pkl                    its Detectron2 weights
    OUT/transfer/<b>/<task>/seed<k>/          fine-tunes
    OUT/checkpoint_evals/<unit>/epoch<NNNN>/  evaluations of the snapshot of epoch NNNN: probes
                                              linear_<preset>/, weights backbone.pkl, fine-tunes
                                              transfer/<b>/<task>/seed<k>/ (plotted, not tabled)
    OUT/results.md                            the table
    OUT/submitit/                             Submitit's job folders and jobs.json"""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def pretrain_root(self):
        return self.root / "pretrain"

    def pretrain_dir(self, backbone, seed=None):
        return self.pretrain_root / unit(backbone, seed)

    def probe_dir(self, backbone, preset, seed=None):
        return probe_dir(self.pretrain_dir(backbone, seed), preset)

    def weights(self, backbone, seed=None):
        return self.root / "weights" / f"{unit(backbone, seed)}.pkl"

    @property
    def transfer_root(self):
        return self.root / "transfer"

    def transfer_dir(self, backbone, task, seed):
        return fine_tune_dir(self.transfer_root, backbone, task, seed)

    def eval_dir(self, backbone, epoch, seed=None):
        """The evaluations of pretraining snapshot `epoch` of a unit (checkpoint_eval parses it back)."""
        return self.root / CHECKPOINT_EVALS / unit(backbone, seed) / f"epoch{epoch:04d}"

    @property
    def results(self):
        return self.root / RESULTS

    def corpus(self, name):
        """A corpus generated for this run (the demo's, the bench's): OUT/<name>/; its folder name
        is the pretraining task's name in the table."""
        return self.root / name


def probe_dir(run_dir, preset):
    """A probe's folder beside the checkpoint it reads: <run>/linear_<preset>/."""
    return Path(run_dir) / f"linear_{preset}"


def fine_tune_dir(root, backbone, task, seed):
    """ROOT/<backbone>/<task>/seed<k>/: the pipeline's OUT/transfer, or submit.py transfer's
    --output-root."""
    return Path(root) / backbone / task / seed_folder(seed)


def job_dir(output):
    """Submitit's folder of a launch writing to `output` (%j: the job id)."""
    return Path(output) / "submitit" / "%j"


def jobs_file(output):
    return Path(output) / "submitit" / JOBS


# ---------------------------------------------------------------- reading a path back
@dataclass(frozen=True)
class PretrainRun:
    backbone: str
    seed: "int | None"
    home: Path          # the folder holding the backbone folders (OUT/pretrain)


def pretrain_run(run_dir):
    """Backbone and pretraining seed of OUT/pretrain/<b>/ or OUT/pretrain/<b>/seed<k>/ (a folder
    elsewhere: its own name, or its parent's for a seed<k> folder)."""
    d = Path(run_dir)
    seed = folder_seed(d.name)
    if seed is None:
        return PretrainRun(d.name, None, d.parent)
    return PretrainRun(d.parent.name, seed, d.parent.parent)


def fine_tune_run(run_dir):
    """(backbone, task, seed) of ROOT/<b>/<task>/seed<k>/; any other folder gives (its parent's
    name, its name, None)."""
    d = Path(run_dir)
    seed = folder_seed(d.name)
    if seed is not None:
        return d.parent.parent.name, d.parent.name, seed
    return d.parent.name, d.name, None


def checkpoint_eval(path):
    """(backbone, pretraining seed or None, epoch) of a path inside OUT/checkpoint_evals/<unit>/epoch<NNNN>/,
    else None."""
    parts = Path(path).parts
    if CHECKPOINT_EVALS not in parts:
        return None
    rest = parts[len(parts) - 1 - parts[::-1].index(CHECKPOINT_EVALS) + 1:]
    at = next((i for i, part in enumerate(rest) if EPOCH_FOLDER.match(part)), None)
    if at is None or at == 0:
        return None
    where = pretrain_run(Path(*rest[:at]))
    return where.backbone, where.seed, int(EPOCH_FOLDER.match(rest[at]).group(1))


def probe_owner(probe_folder):
    """The run folder a probe folder (<run>/linear_<preset>/) belongs to."""
    return Path(probe_folder).parent


def seed_sibling(run_dir, seed):
    """The folder of seed k beside a seed<j> folder, or None when `run_dir` is not one."""
    d = Path(run_dir)
    return d.parent / seed_folder(seed) if folder_seed(d.name) is not None else None


def backbone_of_weights(weights):
    """The backbone a weights file is filed under when no name is given: `random_init` for none,
    <b> for OUT/weights/<b>/seed<k>.pkl, else the file's name without suffix (OUT/weights/<b>.pkl,
    or any hand-named file: moco_v2_800ep.pkl -> moco_v2_800ep)."""
    if not str(weights):
        return RANDOM_INIT
    p = Path(weights)
    return p.parent.name if folder_seed(p.stem) is not None else p.stem


def pretrain_config_of_weights(weights):
    """The config.yaml of the pretraining run a weights file came from, or None: a pretraining
    checkpoint's own folder (<run>/checkpoint.pth, what a probe reads), or through the layout, OUT/weights/<unit>.pkl
    -> OUT/pretrain/<unit>/config.yaml (what a fine-tune reads); None for weights from elsewhere."""
    if not str(weights or ""):
        return None
    p = Path(weights).resolve()
    if p.name in (CHECKPOINT, PREVIOUS_CHECKPOINT) or SNAPSHOT.match(p.name):  # <run>/checkpoint.pth
        found = p.parent / CONFIG
    elif p.suffix != ".pkl":                                      # any other file: not a run's
        return None
    elif p.parent.name == "weights":                              # OUT/weights/<b>.pkl
        found = p.parent.parent / "pretrain" / p.stem / CONFIG
    elif p.parent.parent.name == "weights":                       # OUT/weights/<b>/seed<k>.pkl
        found = p.parent.parent.parent / "pretrain" / p.parent.name / p.stem / CONFIG
    else:
        return None
    return found if found.is_file() else None


def read_jsonl(path):
    """The records (dicts) of a JSON-lines file such as metrics.jsonl; an unparsable line (a run
    killed mid-write) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


# ---------------------------------------------------------------- the synthetic corpus
@dataclass(frozen=True)
class Corpus:
    """The folders of a synthetic corpus (suite/corpus.py): the same images in three layouts.
    DIR/imagefolder/{train,val}/<class>/<id>.jpg, DIR/VOC2007/ (Pascal VOC), DIR/coco/ (COCO JSON),
    DIR/corpus.json; with --layouts naming them also COCO keypoints, LVIS and Cityscapes (below)."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def imagefolder(self):
        return self.root / CORPUS_IMAGEFOLDER

    @property
    def voc(self):
        return self.root / "VOC2007"

    def coco_annotations(self, split):
        return self.root / "coco" / "annotations" / f"instances_{split}.json"

    def coco_images(self, split):
        return self.root / "coco" / split

    @property
    def record(self):
        return self.root / CORPUS_RECORD

    @property
    def subsets(self):
        """The semi-supervised subset lists (SEMI_SUBSETS' files: one train image name a line)."""
        return self.root / "subsets"

    # the transfer tasks' layouts (make_synthetic_data.py --layouts ...,keypoints,lvis,cityscapes; suite/corpus_tasks.py)
    def coco_keypoints(self, split):
        """COCO person-keypoints format, images in coco/<split>/ (COCO's file name)."""
        return self.root / "coco" / "annotations" / f"person_keypoints_{split}.json"

    def lvis_annotations(self, split):
        """LVIS v1 format; its images' coco_url names coco/<split>/<file> (Detectron2's LVIS loader)."""
        return self.root / "lvis" / f"lvis_v1_{split}.json"

    @property
    def lvis_image_root(self):
        return self.root / "coco"

    def cityscapes_images(self, split):
        """cityscapes/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png"""
        return self.root / "cityscapes" / "leftImg8bit" / split

    def cityscapes_gt(self, split):
        """cityscapes/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_{polygons.json,labelIds.png,
        instanceIds.png}"""
        return self.root / "cityscapes" / "gtFine" / split


def corpus_classes(root):
    """The class names a corpus was generated with, from its corpus.json. Raises OSError (no such
    file) or ValueError (not a corpus record) with a message naming the file."""
    path = Corpus(root).record
    try:
        classes = json.loads(path.read_text()).get("classes")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a corpus record ({e})") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or not classes:
        raise ValueError(f"{path}: holds no class list (key 'classes'); generate the corpus again")
    return tuple(classes)


# ---------------------------------------------------------------- the one atomic writer
TEMP = re.compile(r"^\..+\.tmp\d*$")  # write_atomic's temp files (and the `.NAME.tmp<pid>` of old)


def _temp_path(path):
    # pid + random: unique across processes and hosts sharing a folder, and across pid reuse
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_atomic(path, write, *, fsync=False, keep_previous=None, mkdir=False):
    """Write `path` in one step for every reader: `write(f)` fills a temp file beside it (opened
    binary), which is then renamed over `path`; on any failure (disk full, Ctrl-C) the temp file is
    removed and `path` is left as it was (a SIGKILL's leftover goes with remove_stale_temp).

    The file gets the mode open() gives a new file, 0666 less the umask (0644 usually: readable by
    the group on a shared cluster), not mkstemp's 0600. fsync: on disk before the rename
    (checkpoints). keep_previous: rename the current `path` there once the new file is complete.
    mkdir: create the folder first. Returns `path`."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path, text, **kwargs):
    """write_atomic of a str (UTF-8)."""
    data = text.encode("utf-8")
    return write_atomic(path, lambda f: f.write(data), **kwargs)


def write_json(path, obj, *, indent=1, sort_keys=False, **kwargs):
    """write_atomic of one JSON document (and a newline)."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n", **kwargs)


def remove_stale_temp(folder):
    """Delete the temp files of writes killed midway in `folder` (SIGKILL leaves no chance to clean
    up); returns their names. Call it where one process owns the folder (a run's start)."""
    removed = []
    for p in Path(folder).iterdir():
        if TEMP.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def replace_dir(path, fill):
    """Build a folder in one step: `fill(tmp)` writes into a new sibling folder, which then replaces
    `path` (an existing one is removed first); on any failure it is removed and `path` is left as it
    was. The folder gets the mode mkdir() gives (0777 less the umask), not mkdtemp's 0700."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    os.mkdir(tmp, 0o777)
    try:
        fill(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
