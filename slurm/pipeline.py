"""The suite as a list of stages (pretrain -> linear probes, convert -> transfer over seeds ->
results table), each a command line with the file that marks it complete; run in order or as
Slurm jobs. Where each stage writes, and what marks it done: suite.contract."""
import contextlib
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from suite import contract, tasks as task_registry
from suite.contract import PROBE_PRESETS, RANDOM_INIT  # noqa: F401  (names of this module's API)

REPO = Path(__file__).resolve().parents[1]  # the stages run from here (their commands' paths)


class PipelineError(RuntimeError):
    """A stage failed or finished without writing its done file: the message names both."""


class StageKilled(PipelineError):
    """The stage's process died from a signal (kill -9, the OOM killer): running it again resumes it."""


@dataclass(frozen=True)
class Stage:
    """One command of the suite, complete once `done_file` exists (docs/formats.md)."""
    name: str                 # "pretrain/<b>", "probe/<b>/<preset>", "convert/<b>",
                              # "transfer/<b>/<task>/seed<k>", "results"
    argv: tuple               # the command up to its trailing overrides (run from the repo root)
    done_file: str
    kind: str = "cpu"         # "pretrain": one process per GPU; "transfer": one per node;
                              # "probe": one process, one GPU; "cpu"
    opts: tuple = ()          # trailing overrides; launcher flags must go before them
    resume_args: tuple = ()   # flags that resume a partial run (Detectron2's --resume)
    after: tuple = ()         # names of the stages whose outputs this one reads
    refresh: bool = False     # rerun whenever a stage in `after` runs, even if complete (the table)
    needs: str = ""           # a file it reads that no stage in `after` writes: a pretraining snapshot,
                              # written while that pretraining still runs (checkpoint evaluations)

    def done(self):
        return Path(self.done_file).is_file()

    def started(self):
        """A previous attempt left the output folder: resume instead of starting over."""
        return Path(self.done_file).parent.is_dir()

    def command(self, extra=(), resume=False):
        resume = self.resume_args if (resume or self.started()) else ()
        return [*self.argv, *extra, *resume, *self.opts]


def pretrain_stage(config, output_dir, data_root=None, epochs=None, opts=(), name=None,
                   python=sys.executable):
    """`python -m pretrain`: resumes by itself from output_dir/checkpoint.pth."""
    overrides = [f"output_dir={output_dir}"]
    overrides += [f"data.root={data_root}"] if data_root else []
    overrides += [f"epochs={epochs}"] if epochs else []
    return Stage(f"pretrain/{name or contract.backbone_name(config)}",
                 (python, "-m", "pretrain", "--config", str(config)),
                 str(contract.done_file("pretrain", output_dir)), kind="pretrain", opts=(*overrides, *opts))


def probe_stage(name, data, preset, output_dir, checkpoint=None, random_init=None, data_format=None,
                opts=(), after=(), python=sys.executable, seed=0):
    """`python -m pretrain.linear`: the linear probe of `preset` and the kNN top-1 of the same frozen
    features, on the backbone in `checkpoint`, or with random_init=(arch, stem) on an untrained
    one (initialised with `seed`). `opts` are its trailing flags (e.g. --epochs 5). A rerun (requeue) with the
    same flags resumes after the last finished epoch (pretrain/resume.py)."""
    if random_init is not None:
        arch, stem = random_init
        source = ("--random-init", "--arch", arch, "--stem", stem, "--seed", str(seed))
    else:
        source = ("--checkpoint", str(checkpoint))
    fmt = ("--data-format", data_format) if data_format and preset != "voc07" else ()
    return Stage(f"probe/{name}/{preset}", (python, "-m", "pretrain.linear", *source, "--data", str(data),
                                           "--preset", preset, *fmt, "--output-dir", str(output_dir)),
                 str(contract.done_file("probe", output_dir)), kind="probe", opts=tuple(opts),
                 after=tuple(after))


def _source(checkpoint, random_init):
    if random_init is not None:
        arch, stem = random_init
        return ("--random-init", "--arch", arch, "--stem", stem)
    return ("--checkpoint", str(checkpoint))


def svm_stage(backbone, voc_root, task, output_dir, checkpoint=None, random_init=None, seed=0, opts=(),
              after=(), python=sys.executable):
    """`python -m pretrain.svm`: task voc07_svm (VOC07 SVM) or voc07_lowshot (low-shot SVM) on the frozen
    backbone in `checkpoint`, or random_init=(arch, stem) (weights from `seed`); `voc_root` holds
    VOC2007/. One process, one GPU for the features; no resume (a rerun starts over)."""
    return Stage(f"classify/{backbone}/{task}/{contract.seed_folder(seed)}",
                 (python, "-m", "pretrain.svm", *_source(checkpoint, random_init), "--data", str(voc_root),
                  "--task", task, "--backbone", backbone, "--seed", str(seed), "--output-dir", str(output_dir)),
                 str(contract.done_file("svm", output_dir)), kind="probe", opts=tuple(opts), after=tuple(after))


def semisup_stage(backbone, data, subset, task, output_dir, seed, checkpoint=None, random_init=None, opts=(),
                  after=(), python=sys.executable):
    """`python -m pretrain.semisup`: fine-tune the whole network + a linear head on the images of the
    ImageFolder `data` that `subset` lists, top-1/top-5 on its val/, with `seed`. One process, one
    GPU; a rerun (requeue) resumes after the last finished epoch (pretrain/resume.py)."""
    return Stage(f"classify/{backbone}/{task}/{contract.seed_folder(seed)}",
                 (python, "-m", "pretrain.semisup", *_source(checkpoint, random_init), "--data", str(data),
                  "--subset", str(subset), "--task", task, "--backbone", backbone, "--seed", str(seed),
                  "--output-dir", str(output_dir)),
                 str(contract.done_file("semisup", output_dir)), kind="probe", opts=tuple(opts), after=tuple(after))


def classification_stages(tasks, backbone, output_dir, svm_seed, seeds, voc_root=None, semi_data=None,
                          subsets=None, svm_opts=(), semi_opts=(), python=sys.executable, **source):
    """The stages of the classification transfer `tasks` (suite.contract.CLASSIFICATION_TASKS) of one
    backbone: each SVM task once, with `svm_seed` (the low-shot draws), each semi-supervised task once
    per seed of `seeds`; output_dir(task, seed) gives each folder. source: checkpoint=..., after=...,
    or random_init=(arch, stem) (its weights from the seed)."""
    stages = []
    for task in tasks:
        if task in contract.SVM_TASKS:
            stages.append(svm_stage(backbone, voc_root, task, output_dir(task, svm_seed), seed=svm_seed,
                                    opts=svm_opts, python=python, **source))
        else:
            stages += [semisup_stage(backbone, semi_data, Path(subsets) / contract.SEMI_SUBSETS[task], task,
                                     output_dir(task, k), k, opts=semi_opts, python=python, **source) for k in seeds]
    return stages


def convert_stage(name, pretrain_dir, weights, python=sys.executable, checkpoint=contract.CHECKPOINT):
    """`tools/convert_checkpoint.py`: the pretraining's checkpoint (or another file of its folder, a
    snapshot) to Detectron2 weights (the weights file is its own done marker)."""
    ckpt = str(Path(pretrain_dir) / checkpoint)
    return Stage(f"convert/{name}", (python, "tools/convert_checkpoint.py", ckpt, str(weights)),
                 str(weights), after=(f"pretrain/{name}",))


def transfer_stage(config, weights, backbone, output_dir, seed, num_gpus=1, opts=(), after=(),
                   python=sys.executable):
    """`transfer/train_net.py` for one seed; Detectron2's --resume continues a partial run."""
    return Stage(f"transfer/{backbone}/{contract.task_name(config)}/{contract.seed_folder(seed)}",
                 (python, "transfer/train_net.py", "--config-file", str(config), "--num-gpus", str(num_gpus)),
                 str(contract.done_file("transfer", output_dir)), kind="transfer",
                 opts=("OUTPUT_DIR", str(output_dir), "MODEL.WEIGHTS", str(weights), "SEED", str(seed),
                       "TRANSFER.BACKBONE_NAME", backbone, *opts),
                 resume_args=("--resume",), after=tuple(after))


def results_stage(root, after=(), python=sys.executable):
    """The table over every run under root: rebuilt whenever a run it reads is (re)run. It reads root
    itself: root/transfer/ is missing when a failure cancelled every fine-tune, and the table must
    still list that failure."""
    layout = contract.Layout(root)
    return Stage("results", (python, "tools/results_table.py", str(layout.root), "--out", str(layout.results)),
                 str(contract.done_file("results", layout.root)), after=tuple(after), refresh=True)


def watcher_of(stage):
    """The name of the job that submits a checkpoint evaluation (eval/<unit>/epoch<e>/...) once its
    snapshot exists: watch/<unit> (slurm/evaluate.py), one per pretraining."""
    return "watch/" + stage.name[len("eval/"):].rsplit("/epoch", 1)[0]


def pending(stages, settled=Stage.done):
    """The stages to run, in order: those not `settled` (default: complete), and a `refresh` stage
    whose inputs run."""
    todo, names = [], set()
    for s in stages:
        if not settled(s) or (s.refresh and names.intersection(s.after)):
            todo.append(s)
            names.add(s.name)
    return todo


def named_configs(pretrain_configs, opts=()):
    """{backbone name: (config, overrides)}, each backbone named after its config's file."""
    names = [contract.backbone_name(c) for c in pretrain_configs]
    if len(set(names)) != len(names):
        raise PipelineError(f"pretraining configs {list(pretrain_configs)} share a file name; the "
                            "backbone is named after it, so give each config its own name")
    return {name: (config, tuple(opts)) for name, config in zip(names, pretrain_configs)}


def resolve_backbone(config, opts, data_root):
    """(arch, stem, data format, epochs) of a pretraining config with its overrides, as the run will
    see them; a bad config is a PipelineError naming it (caught before anything is submitted)."""
    from pretrain.config import load_config   # torch-free for the caller until here
    from pretrain.utils import UserError

    try:
        cfg = load_config(config, [*opts, f"data.root={data_root}"])
    except UserError as e:
        raise PipelineError(f"pretraining config {config}: {e}") from None
    return cfg.model.arch, cfg.model.stem, cfg.data.format, cfg.epochs


def checkpoint_eval_stages(layout, backbone, k, epochs, every, fmt, data_root, *, probe_presets=(), probe_opts=(),
                           probe_voc_root=None, detection=(), transfer_opts=(), num_gpus=1, python=sys.executable):
    """The evaluations of every `every`-th pretraining snapshot of a unit (VISSL's benchmark scheduler):
    for epoch e in every, 2*every, ... <= epochs, each probe (kNN + linear) of checkpoint_<e>.pth and,
    per `detection` config, its conversion and one short fine-tune (seed 0, `transfer_opts`). Each
    stage `needs` the snapshot alone, never the pretraining's completion; in OUT/checkpoint_evals/."""
    unit, stages = contract.unit(backbone, k), []
    pre_dir = layout.pretrain_dir(backbone, k)
    for e in range(every, epochs + 1, every):
        snap, where, tag = pre_dir / contract.snapshot(e), layout.eval_dir(backbone, e, k), f"{unit}/epoch{e:04d}"
        for preset in probe_presets:
            data = probe_voc_root if preset == "voc07" else data_root
            probe = probe_stage(tag, data, preset, contract.probe_dir(where, preset), checkpoint=snap,
                                data_format=fmt, opts=probe_opts, python=python)
            stages.append(dataclasses.replace(probe, name=f"eval/{tag}/{preset}", needs=str(snap)))
        if detection:
            weights = where / "backbone.pkl"
            convert = convert_stage(unit, pre_dir, weights, python, checkpoint=contract.snapshot(e))
            stages.append(dataclasses.replace(convert, name=f"eval/{tag}/convert", after=(), needs=str(snap)))
        for config in detection:
            task = contract.task_name(config)
            fine_tune = transfer_stage(config, weights, backbone, contract.fine_tune_dir(where / "transfer", backbone,
                                                                                          task, 0),
                                       0, num_gpus, transfer_opts, (f"eval/{tag}/convert",), python)
            stages.append(dataclasses.replace(fine_tune, name=f"eval/{tag}/{task}", needs=str(snap)))
    return stages


def build_stages(backbones, data_root, out, voc_configs=(), coco_configs=(), seeds=1, coco_seeds=1,
                 first_seed=0, epochs=None, transfer_opts=(), num_gpus=1, random_init=False,
                 python=sys.executable, *, probe_presets=(), probe_opts=(), probe_voc_root=None,
                 pretrain_seeds=None, classification_tasks=(), svm_opts=(), semi_opts=(), semi_data_root=None,
                 semi_subsets=None, eval_every=0, eval_probes=(), eval_detection=(), eval_transfer_opts=(),
                 tasks=(), task_configs="reference"):
    """Every stage of the suite under `out`, in an order that runs each after its inputs, in the
    layout of suite.contract.Layout: for each backbone of `backbones` ({name: (pretraining config,
    overrides)}) its pretraining, its probes, its conversion and its fine-tunes (`seeds` per VOC
    config, `coco_seeds` per COCO config, from `first_seed`), then the table. With `random_init`,
    the same fine-tunes from no weights as backbone suite.contract.RANDOM_INIT, and its probes (the
    pretrained backbones' arch and stem, seed 0).

    pretrain_seeds: pretrain each backbone once per seed k (override seed=k) instead of once, as
    unit <b>/seed<k> (its own pretraining folder, probes and weights), and fine-tune each of those
    once, with SEED k: the table's n is then the number of pretraining seeds, and backbone seed k is
    paired with random init's seed k (its probes as unit random_init/seed<k>, fine-tune SEED k).
    `seeds`, `first_seed` and `coco_seeds` are not used then.

    probe_presets: pretrain.linear presets to run on each backbone (imagenet and cifar read
    `data_root` in its config's data.format; voc07 reads `probe_voc_root`, the folder holding
    VOC2007); probe_opts: their trailing flags (e.g. ("--epochs", "5")). A backbone with the CIFAR
    stem has no Detectron2 equivalent: it is pretrained and probed, never converted or fine-tuned.

    classification_tasks: names of suite.contract.CLASSIFICATION_TASKS, run on each pretraining (and
    with `random_init` on an untrained network, as the probes) into OUT/transfer/<b>/<task>/seed<k>/:
    voc07_svm and voc07_lowshot (pretrain.svm) read VOC2007/ from `probe_voc_root`, once per unit;
    semi_1pct and semi_10pct (pretrain.semisup) fine-tune on the ImageFolder `semi_data_root`
    (default `data_root`) with the subset list of SEMI_SUBSETS in `semi_subsets` (a folder), once per
    fine-tune seed (like the VOC fine-tunes; with pretrain_seeds, seed k). svm_opts, semi_opts: the
    trailing flags of the pretrain.svm and pretrain.semisup stages (e.g. ("--epochs", "1")).

    eval_every: N > 0 keeps a snapshot every N epochs (checkpoint.save_every_epochs=N, last on the
    pretraining's command line) and evaluates each as it appears (checkpoint_eval_stages: the
    eval_probes presets with probe_opts, a short fine-tune per eval_detection config with
    eval_transfer_opts); those stages come right after their pretraining, and the table skips them.

    tasks: names of suite.tasks.TASKS; each Detectron2 task adds the fine-tunes of its config
    (task_configs "reference": the real-data config, "synthetic": its synthetic-corpus twin), as many
    as a COCO config (`coco_seeds`) for a heavy task, else as a VOC config (`seeds`)."""
    layout = contract.Layout(Path(out).resolve())
    if random_init and RANDOM_INIT in backbones:
        raise PipelineError(f"a pretraining config is named {RANDOM_INIT}, the name of the "
                            "random-init baseline: rename the config")
    unknown = [p for p in (*probe_presets, *eval_probes) if p not in PROBE_PRESETS]
    if unknown:
        raise PipelineError(f"unknown probe preset {unknown[0]}: use {', '.join(PROBE_PRESETS)}")
    unknown = [t for t in classification_tasks if t not in contract.CLASSIFICATION_TASKS]
    if unknown:
        raise PipelineError(f"unknown classification task {unknown[0]}: use "
                            f"{', '.join(contract.CLASSIFICATION_TASKS)}")
    if set(classification_tasks) & set(contract.SVM_TASKS) and not probe_voc_root:
        raise PipelineError("the VOC07 SVM tasks read VOC2007/ from probe_voc_root (submit.py --probe-voc-root, "
                            "default $DETECTRON2_DATASETS): set it")
    if set(classification_tasks) & set(contract.SEMI_SUBSETS) and not semi_subsets:
        raise PipelineError("the semi-supervised tasks read their subset lists (1percent.txt, 10percent.txt) "
                            "from semi_subsets: set it to the folder holding them")
    if eval_every < 0 or (eval_every and not (eval_probes or eval_detection)):
        raise PipelineError(f"checkpoint evaluation every {eval_every} epochs: give N > 0 and what to run on each "
                            "snapshot (eval_probes, eval_detection; submit.py --eval-probe, --eval-detection)")
    if "voc07" in (*probe_presets, *eval_probes) and not probe_voc_root:
        raise PipelineError("the voc07 probe reads VOC2007/ from probe_voc_root (submit.py --probe-voc-root, "
                            "default $DETECTRON2_DATASETS): set it")
    abspath = lambda p: str(Path(p).resolve())  # noqa: E731  (jobs may start in another folder)
    voc_configs, coco_configs = task_detection_configs(tasks, task_configs, voc_configs, coco_configs)
    # units: (backbone, pretraining seed or None); a unit names its folders and stages
    seeded = pretrain_seeds is not None
    pretraining_seeds = pretrain_seeds if seeded else [None]
    units = [(b, k) for b in backbones for k in pretraining_seeds]
    if seeded:
        runs = [(c, None) for c in (*voc_configs, *coco_configs)]
    else:
        runs = [(c, range(first_seed, first_seed + seeds)) for c in voc_configs]
        runs += [(c, range(first_seed, first_seed + coco_seeds)) for c in coco_configs]
    stages, probes, sources = [], [], []  # sources: (backbone, seed, weights, the stage writing them)
    resolved = {name: resolve_backbone(abspath(config), opts, abspath(data_root))
                for name, (config, opts) in backbones.items()}

    def probe_stages(backbone, k, fmt, **source):
        return [probe_stage(contract.unit(backbone, k),
                            abspath(probe_voc_root) if preset == "voc07" else abspath(data_root), preset,
                            layout.probe_dir(backbone, preset, k), data_format=fmt, opts=probe_opts,
                            python=python, **source) for preset in probe_presets]

    if set(classification_tasks) & set(contract.SEMI_SUBSETS) and not semi_data_root:
        other = {b: r[2] for b, r in resolved.items() if r[2] != "imagefolder"}
        if other:
            raise PipelineError(f"the semi-supervised tasks fine-tune on an ImageFolder, and data_root is "
                                f"{', '.join(sorted(set(other.values())))} ({', '.join(other)}): set "
                                "semi_data_root to an ImageFolder with train/ and val/")
    semi_seeds = (lambda k: [k]) if seeded else (lambda k: list(range(first_seed, first_seed + seeds)))

    def classify(backbone, k, **source):
        # SVM: one run per pretraining (seed 0 without pretraining seeds, whatever first_seed: adding
        # fine-tune seeds adds no SVM run); semi-supervised: one per fine-tune seed, as the fine-tunes
        return classification_stages(
            classification_tasks, backbone,
            lambda task, seed: layout.transfer_dir(backbone, task, seed), k or 0, semi_seeds(k),
            probe_voc_root and abspath(probe_voc_root), abspath(semi_data_root or data_root),
            semi_subsets and abspath(semi_subsets), svm_opts, semi_opts, python, **source)

    for name, k in units:
        config, opts = backbones[name]
        unit = contract.unit(name, k)
        pre_dir, weights = layout.pretrain_dir(name, k), layout.weights(name, k)
        opts = (*opts, f"seed={k}") if seeded else opts
        opts = (*opts, f"checkpoint.save_every_epochs={eval_every}") if eval_every else opts
        stages.append(pretrain_stage(abspath(config), pre_dir, abspath(data_root), epochs, opts, unit, python))
        if eval_every:
            detection = [abspath(c) for c in eval_detection] if resolved[name][1] == "imagenet" else []
            stages += checkpoint_eval_stages(
                layout, name, k, epochs or resolved[name][3], eval_every, resolved[name][2], abspath(data_root),
                probe_presets=eval_probes, probe_opts=probe_opts,
                probe_voc_root=probe_voc_root and abspath(probe_voc_root), detection=detection,
                transfer_opts=eval_transfer_opts, num_gpus=num_gpus, python=python)
        probes += probe_stages(name, k, resolved[name][2], checkpoint=pre_dir / contract.CHECKPOINT,
                               after=(f"pretrain/{unit}",))
        probes += classify(name, k, checkpoint=pre_dir / contract.CHECKPOINT, after=(f"pretrain/{unit}",))
        if resolved[name][1] == "imagenet":
            stages.append(convert_stage(unit, pre_dir, weights, python))
            sources.append((name, k, weights, (f"convert/{unit}",)))
    if random_init:
        sources += [(RANDOM_INIT, k, "", ()) for k in pretraining_seeds]
        if probe_presets or classification_tasks:
            shapes = {r[:3] for r in resolved.values()}
            if len(shapes) != 1:
                raise PipelineError(
                    "the random-init probes take the pretrained backbones' arch, stem and data format, but "
                    + ("there is no pretraining config" if not shapes else
                       f"they differ ({', '.join(f'{b}: {a}/{s}/{f}' for b, (a, s, f, _) in resolved.items())})")
                    + ": run one pipeline per kind of backbone")
            arch, stem, fmt = shapes.pop()[:3]
            for k in pretraining_seeds:
                probes += probe_stages(RANDOM_INIT, k, fmt, random_init=(arch, stem), seed=k or 0)
                probes += classify(RANDOM_INIT, k, random_init=(arch, stem))
    transfers = [transfer_stage(abspath(det_config), weights, name,
                                layout.transfer_dir(name, contract.task_name(det_config), seed), seed,
                                num_gpus, transfer_opts, after, python)
                 for name, k, weights, after in sources
                 for det_config, fine_tune_seeds in runs for seed in (fine_tune_seeds or [k])]
    reads = [s.name for s in probes + transfers]
    return stages + probes + transfers + [results_stage(layout.root, reads, python)]


def task_detection_configs(tasks, which, voc_configs=(), coco_configs=()):
    """(voc-like, coco-like) config lists with the Detectron2 tasks of `tasks` added (paths from the
    repository root); a task of another kind, or an unknown one, is a PipelineError."""
    voc, coco = list(voc_configs), list(coco_configs)
    for name in tasks:
        task = task_registry.TASKS.get(name)
        if task is None:
            raise PipelineError(f"unknown task {name!r}: choose from {', '.join(task_registry.TASKS)}")
        if task.kind != task_registry.DETECTRON2:
            raise PipelineError(f"task {name!r} of kind {task.kind!r} has no stage builder here")
        config = str(REPO / task_registry.task_config(name, which))
        (coco if task.heavy else voc).append(config)
    return voc, coco


def run_stage(stage, extra=(), resume=False, env=None, log=print, check_done=True, ignore_signals=()):
    """Run one stage's command from the repo root; fail unless it wrote its done file (checked by
    the process that writes it: other ranks may finish first). `ignore_signals` are left to the
    caller alone (a Submitit job handles its timeout/preemption signals, the stage must not die)."""
    if stage.needs and not Path(stage.needs).is_file():
        raise PipelineError(f"[{stage.name}] reads {stage.needs}, which its pretraining did not write "
                            "(snapshots every checkpoint.save_every_epochs epochs)")
    argv = stage.command(extra, resume)
    log(f"[{stage.name}] {shlex.join(argv)}")
    environ = {**os.environ, **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), environ.get("PYTHONPATH")) if p)
    def ignore():  # in the child, before exec: SIG_IGN is inherited by everything it starts
        for sig in ignore_signals:
            signal.signal(sig, signal.SIG_IGN)

    # its own process group, so that leaving early takes down what it spawned too (torchrun's and
    # Detectron2's workers): Submitit's requeue handler exits by raising SystemExit in wait()
    proc = subprocess.Popen(argv, cwd=REPO, env=environ, start_new_session=True,
                            preexec_fn=ignore if ignore_signals else None)
    try:
        code = proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if code < 0:  # killed: what it spawned (torchrun's, Detectron2's workers) must not outlive it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise StageKilled(f"[{stage.name}] was killed by signal {signal.Signals(-code).name}: {shlex.join(argv)}")
    if code != 0:
        raise PipelineError(f"[{stage.name}] exited with code {code}; its output is above, and "
                            f"rerunning resumes it: {shlex.join(argv)}")
    if check_done and not stage.done():
        raise PipelineError(f"[{stage.name}] exited without writing {stage.done_file}")


def run_sequential(stages, log=print, env=None, extra=None, resume=False, check_done=True,
                   ignore_signals=()):
    """Run the stages in order, skipping complete ones (`pending`). `extra(stage)` gives the
    launcher flags of a stage (distributed set-up), `env` extra environment variables."""
    ran, todo = [], pending(stages)
    for stage in stages:
        if stage not in todo:
            log(f"[{stage.name}] complete: {stage.done_file}")
            continue
        run_stage(stage, extra(stage) if extra else (), resume, env, log, check_done, ignore_signals)
        ran.append(stage.name)
    return ran
