"""Launch the suite's stages with Submitit: `python slurm/submit.py {pretrain,transfer,pipeline}
[options] [-- stage args]`; Slurm jobs requeue and resume on timeout, --dry-run submits nothing.
Exit codes: 2 bad input (options, files, stage args: all checked before anything is submitted),
1 a job it waited for failed (--wait, --cluster debug), 0 otherwise."""
import argparse
import os
import shlex
import sys
from pathlib import Path
from unittest import mock

import submitit
from submitit.slurm import slurm as submitit_slurm

from slurm import pipeline, registry, tasks
from slurm.evaluate import CheckpointWatcher
from slurm.tasks import StageJob
from suite import contract
from suite import tasks as task_registry

CPU_STAGE_MINUTES = 60  # conversion and the results table take seconds


class UsageError(ValueError):
    """Bad command line or missing input: the message names it and the fix (exit code 2)."""


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("cluster (Submitit's AutoExecutor)")
    g.add_argument("--cluster", choices=("slurm", "local", "debug"),
                   help="default: slurm where `srun` exists, else local")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--comment")
    g.add_argument("--nodes", type=int, default=1, help="nodes per pretraining / fine-tuning job")
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--cpus-per-task", type=int, default=10, help="per GPU process (data loading)")
    g.add_argument("--mem-gb", type=float)
    g.add_argument("--timeout-min", type=int, default=72 * 60, help="per job, before a requeue")
    g.add_argument("--max-requeues", type=int, default=20, help="timeouts a job may requeue after")
    g.add_argument("--signal-delay-s", type=int, default=120,
                   help="Slurm sends USR2 this long before the time limit (requeue window)")
    g.add_argument("--job-dir", help="Submitit logs and pickles; %%j is the job id "
                                     "(default: OUTPUT/submitit/%%j)")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script(s) and the "
                                                          "commands; submit nothing")
    g.add_argument("--wait", action="store_true", help="wait for the jobs and report their outcome")

    parser = argparse.ArgumentParser(prog="python slurm/submit.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", parents=[common], help="one pretraining (one task per GPU)",
                       epilog="stage args: pretrain overrides, e.g. -- data.batch_size=512")
    p.add_argument("--config", required=True, help="configs/pretrain/NAME.yaml")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--data-root", help="ImageFolder root (default: the config's data.root)")
    p.add_argument("--epochs", type=int)

    t = sub.add_parser("transfer", parents=[common], help="detection fine-tunes, --seeds per config",
                       epilog="stage args: Detectron2 overrides, e.g. -- SOLVER.MAX_ITER 100")
    t.add_argument("--config-file", nargs="+", required=True, help="configs/detection/*.yaml")
    t.add_argument("--weights", required=True, help="converted backbone (.pkl)")
    t.add_argument("--output-root", required=True, help="runs go to ROOT/<backbone>/<task>/seed<k>/")
    t.add_argument("--backbone", help="name in the results (default: the weights' file name, as "
                                      "transfer/train_net.py files it)")
    t.add_argument("--seeds", type=int, default=5)
    t.add_argument("--first-seed", type=int, default=0)

    q = sub.add_parser("pipeline", parents=[common], help="pretrain -> probes, convert -> transfer -> table")
    q.add_argument("--pretrain-config", nargs="+", required=True, help="one backbone each")
    q.add_argument("--data-root", required=True)
    q.add_argument("--epochs", type=int)
    q.add_argument("--voc-config", nargs="*", default=["configs/detection/voc_R_50_C4_24k.yaml"])
    q.add_argument("--coco-config", nargs="*", default=["configs/detection/coco_R_50_C4_1x.yaml"])
    q.add_argument("--seeds", type=int, default=5, help="fine-tunes per VOC config")
    q.add_argument("--coco-seeds", type=int, default=1, help="fine-tunes per COCO config")
    q.add_argument("--first-seed", type=int, default=0)
    q.add_argument("--tasks", nargs="+", default=[], metavar="TASK",
                   help=f"more transfer tasks, comma- or space-separated: {', '.join(task_registry.TASK_NAMES)} "
                        "(README: Transfer tasks); heavy Detectron2 ones (COCO-sized) get --coco-seeds "
                        "fine-tunes, the others and the semi-supervised ones --seeds, the SVMs one run")
    q.add_argument("--task-configs", choices=("reference", "synthetic"), default="reference",
                   help="the Detectron2 tasks' reference configs (real data) or their synthetic-corpus twins")
    q.add_argument("--semi-data-root", help="semi_1pct / semi_10pct: the ImageFolder they fine-tune on "
                                            "(default: --data-root)")
    q.add_argument("--semi-subsets", help="semi_1pct / semi_10pct: the folder holding 1percent.txt and 10percent.txt")
    q.add_argument("--svm-opts", default="", help='pretrain.svm flags for the SVM tasks')
    q.add_argument("--semi-opts", default="", help='pretrain.semisup flags for the semi-supervised tasks')
    q.add_argument("--random-init", action="store_true",
                   help=f"also fine-tune from no pretrained weights (backbone {contract.RANDOM_INIT})")
    q.add_argument("--probe", nargs="+", default=[], choices=contract.PROBE_PRESETS, metavar="PRESET",
                   help="linear probes (and their kNN top-1) of every pretrained backbone, and of random "
                        f"init with --random-init: {', '.join(contract.PROBE_PRESETS)}")
    q.add_argument("--probe-opts", default="", help='pretrain.linear flags for every probe, e.g. "--epochs 10"')
    q.add_argument("--probe-voc-root", default=os.environ.get("DETECTRON2_DATASETS"),
                   help="the folder holding VOC2007/ for --probe voc07 (default: $DETECTRON2_DATASETS)")
    q.add_argument("--transfer-nodes", type=int, default=1)
    q.add_argument("--pretrain-opts", default="", help='pretrain overrides, e.g. "data.batch_size=512"')
    q.add_argument("--transfer-opts", default="", help='Detectron2 overrides, e.g. "SOLVER.MAX_ITER 100"')
    q.add_argument("--out", required=True, help="the pipeline's root folder")
    e = q.add_argument_group("checkpoint evaluation while pretraining runs (OUT/checkpoint_evals/, plotted)")
    e.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="keep a snapshot every N epochs and evaluate each as it appears (0: off)")
    e.add_argument("--eval-probe", nargs="+", default=[], choices=contract.PROBE_PRESETS, metavar="PRESET",
                   help="probes (kNN + linear) of each snapshot, with --probe-opts")
    e.add_argument("--eval-detection", nargs="+", default=[], metavar="CONFIG",
                   help="a short fine-tune of each snapshot per detection config (seed 0)")
    e.add_argument("--eval-poll-s", type=float, default=60.0,
                   help="how often the watcher job looks for the next snapshot (seconds)")
    e.add_argument("--eval-transfer-opts", default="", help='Detectron2 overrides of those fine-tunes, '
                                                            'e.g. "SOLVER.MAX_ITER 2000 SOLVER.STEPS (1500,)"')
    args = parser.parse_args(argv)
    args.stage_args = stage_args
    if args.command == "pipeline":
        try:
            args.tasks = task_registry.parse_task_list(args.tasks)
        except ValueError as e:
            parser.error(f"--tasks: {e}")
    if args.command == "pipeline" and stage_args:
        parser.error("pipeline takes stage args through --pretrain-opts / --transfer-opts, not after --")
    return args


def check_inputs(args):
    """Inputs that a job would only discover after waiting in the queue."""
    files = {"pretrain": [args.config] if args.command == "pretrain" else [],
             "transfer": [*args.config_file, args.weights] if args.command == "transfer" else [],
             "pipeline": [*args.pretrain_config, *detection_configs(args), *args.eval_detection]
             if args.command == "pipeline" else []}[args.command]
    for f in files:
        if not Path(f).is_file():
            raise UsageError(f"{f}: no such file (paths are relative to {Path.cwd()})")
    root = getattr(args, "data_root", None)
    layouts = ("train", "cifar-10-batches-py", "cifar-100-python")  # data.format imagefolder / cifar*
    if root and not any((Path(root) / d).is_dir() for d in layouts):
        raise UsageError(f"--data-root {root}: no {root}/train/ folder (an ImageFolder root is needed; "
                         "data.format cifar10/cifar100: the folder holding cifar-10-batches-py/ or cifar-100-python/)")
    if "voc07" in getattr(args, "probe", ()) and not (Path(args.probe_voc_root or "") / "VOC2007").is_dir():
        raise UsageError(f"--probe voc07: no VOC2007/ in --probe-voc-root {args.probe_voc_root} "
                         "(default $DETECTRON2_DATASETS)")
    svm = [t for t in getattr(args, "tasks", ()) if t in contract.SVM_TASKS]
    if svm and not (Path(args.probe_voc_root or "") / "VOC2007").is_dir():
        raise UsageError(f"--tasks {svm[0]}: no VOC2007/ in --probe-voc-root {args.probe_voc_root} "
                         "(default $DETECTRON2_DATASETS)")
    semi = [t for t in getattr(args, "tasks", ()) if t in contract.SEMI_SUBSETS]
    if semi and not all((Path(args.semi_subsets or "") / contract.SEMI_SUBSETS[t]).is_file() for t in semi):
        raise UsageError(f"--tasks {semi[0]}: --semi-subsets {args.semi_subsets} must be a folder holding "
                         f"{', '.join(contract.SEMI_SUBSETS[t] for t in semi)}")
    check_numbers(args)
    if args.cluster in ("local", "debug") and max(args.nodes, getattr(args, "transfer_nodes", 1)) > 1:
        raise UsageError(f"--nodes > 1 needs --cluster slurm ({args.cluster} runs on this machine)")
    check_stage_overrides(args)
    if not args.dry_run:  # (a dry run writes nothing)
        out = {"pretrain": "output_dir", "transfer": "output_root", "pipeline": "out"}[args.command]
        for flag, folder in ((f"--{out.replace('_', '-')}", getattr(args, out)),
                             ("--job-dir", args.job_dir and args.job_dir.split("%j")[0])):
            if folder and not writable(folder):
                raise UsageError(f"{flag} {folder}: cannot be written (not a writable folder); pass "
                                 "a writable path")


# (flag, attribute, lowest value, what it counts) for the numbers a job cannot run with
NUMBERS = (("--nodes", "nodes", 1, "nodes per job"), ("--transfer-nodes", "transfer_nodes", 1, "nodes"),
           ("--gpus-per-node", "gpus_per_node", 0, "GPUs (0: a CPU job)"),
           ("--cpus-per-task", "cpus_per_task", 1, "CPUs"), ("--timeout-min", "timeout_min", 1, "minutes"),
           ("--max-requeues", "max_requeues", 0, "requeues"), ("--signal-delay-s", "signal_delay_s", 0, "seconds"),
           ("--seeds", "seeds", 1, "fine-tunes per config"), ("--coco-seeds", "coco_seeds", 0, "COCO fine-tunes"),
           ("--first-seed", "first_seed", 0, "the first seed"), ("--epochs", "epochs", 1, "epochs"),
           ("--eval-every", "eval_every", 0, "epochs between evaluated snapshots (0: none)"))


def check_numbers(args):
    """One UsageError line for the first option out of range (argparse only checks the type)."""
    for flag, attr, low, what in NUMBERS:
        value = getattr(args, attr, None)
        if value is not None and value < low:
            raise UsageError(f"{flag} {value}: must be >= {low} ({what})")


def check_stage_overrides(args):
    """Stage args each stage would refuse, found before anything is submitted: pretraining
    overrides through pretrain.config, Detectron2 opts through train_net's own config loader."""
    try:
        pre = shlex.split(args.pretrain_opts) if args.command == "pipeline" else list(args.stage_args)
        det = shlex.split(args.transfer_opts) if args.command == "pipeline" else list(args.stage_args)
    except ValueError as e:  # unbalanced quotes
        raise UsageError(f"--pretrain-opts / --transfer-opts do not parse ({e})") from None
    if args.command in ("pretrain", "pipeline"):
        from pretrain.config import load_config
        from pretrain.utils import UserError

        configs = [args.config] if args.command == "pretrain" else args.pretrain_config
        given = [f"epochs={args.epochs}"] if args.epochs else []
        for c in configs:
            try:
                load_config(c, given + pre)
            except UserError as e:
                raise UsageError(f"pretraining overrides {shlex.join(pre) or '(none)'}: {e}") from None
    if args.command in ("transfer", "pipeline"):
        from transfer.train_net import ScalingError, load_config

        configs = args.config_file if args.command == "transfer" else detection_configs(args)
        # the processes each fine-tune runs (a CPU job: one): its config is scaled to them
        nodes = args.transfer_nodes if args.command == "pipeline" else args.nodes
        shape = dict(num_gpus=max(1, args.gpus_per_node), num_machines=nodes)
        for c in configs:
            try:
                load_config(argparse.Namespace(config_file=c, opts=list(det), **shape))
            except ScalingError as e:
                raise UsageError(f"{c} on {shape['num_gpus']} GPU(s) x {nodes} node(s): {e}") from None
            except (KeyError, ValueError, AssertionError) as e:  # yacs: unknown key, type, odd list
                raise UsageError(f"{c}: Detectron2 overrides {shlex.join(det) or '(none)'} do not "
                                 f"apply ({e}); use KEY VALUE pairs of detectron2/config/defaults.py") from None


def detection_configs(args):
    """The pipeline's Detectron2 configs: --voc-config, --coco-config and those of --tasks."""
    return [*args.voc_config, *args.coco_config,
            *(str(pipeline.REPO / task_registry.task_config(t, args.task_configs))
              for t in args.tasks if t in task_registry.TASKS)]


def writable(folder):
    """Can this process create or write `folder` (the nearest existing parent is a writable dir)?"""
    p = Path(folder).resolve()
    while not p.exists():
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK)


def stages_for(args):
    py = sys.executable
    gpus = max(1, args.gpus_per_node)
    if args.command == "pretrain":
        return [pipeline.pretrain_stage(Path(args.config).resolve(), Path(args.output_dir).resolve(),
                                        args.data_root and Path(args.data_root).resolve(), args.epochs,
                                        args.stage_args, python=py)]
    if args.command == "transfer":
        weights = Path(args.weights).resolve()
        backbone = args.backbone or contract.backbone_of_weights(weights)
        root = Path(args.output_root).resolve()
        return [pipeline.transfer_stage(Path(c).resolve(), weights, backbone,
                                        contract.fine_tune_dir(root, backbone, contract.task_name(c), s),
                                        s, gpus, args.stage_args, python=py)
                for c in args.config_file for s in range(args.first_seed, args.first_seed + args.seeds)]
    backbones = pipeline.named_configs(args.pretrain_config, shlex.split(args.pretrain_opts))
    return pipeline.build_stages(backbones, args.data_root, args.out, args.voc_config, args.coco_config,
                                 args.seeds, args.coco_seeds, args.first_seed, args.epochs,
                                 shlex.split(args.transfer_opts), gpus, args.random_init, py,
                                 probe_presets=args.probe, probe_opts=shlex.split(args.probe_opts),
                                 probe_voc_root=args.probe_voc_root, eval_every=args.eval_every,
                                 eval_probes=args.eval_probe, eval_detection=args.eval_detection,
                                 eval_transfer_opts=shlex.split(args.eval_transfer_opts),
                                 tasks=[t for t in args.tasks if t in task_registry.TASKS],
                                 task_configs=args.task_configs,
                                 classification_tasks=[t for t in args.tasks if t in contract.CLASSIFICATION_TASKS],
                                 svm_opts=shlex.split(args.svm_opts), semi_opts=shlex.split(args.semi_opts),
                                 semi_data_root=args.semi_data_root, semi_subsets=args.semi_subsets)


def output_of(args):
    """The folder a launch writes to: --output-dir, --output-root or --out."""
    out = {"pretrain": "output_dir", "transfer": "output_root", "pipeline": "out"}[args.command]
    return Path(getattr(args, out)).resolve()


def default_job_dir(args):
    return str(contract.job_dir(output_of(args)))


def resources(args, kind):
    """AutoExecutor parameters of one job running a stage of this kind."""
    gpus = args.gpus_per_node or None  # a CPU-only job asks for no GPU line at all
    if kind == "pretrain":  # one task per GPU, env:// rendezvous
        shape = dict(nodes=args.nodes, gpus_per_node=gpus, tasks_per_node=gpus or 1,
                     cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min)
    elif kind == "transfer":  # one task per node: Detectron2's launch() spawns one process per GPU
        shape = dict(nodes=getattr(args, "transfer_nodes", args.nodes), gpus_per_node=gpus, tasks_per_node=1,
                     cpus_per_task=args.cpus_per_task * (gpus or 1), timeout_min=args.timeout_min)
    elif kind == "probe":  # pretrain.linear: one process on one GPU (frozen features, a linear layer)
        shape = dict(nodes=1, gpus_per_node=1 if gpus else None, tasks_per_node=1,
                     cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min)
    elif kind == "watch":  # slurm/evaluate.py: one CPU, alive (and requeued) as long as the pretraining
        shape = dict(nodes=1, tasks_per_node=1, cpus_per_task=1, timeout_min=args.timeout_min)
    else:
        shape = dict(nodes=1, tasks_per_node=1, cpus_per_task=args.cpus_per_task, timeout_min=CPU_STAGE_MINUTES)
    return dict(shape, mem_gb=args.mem_gb, slurm_partition=args.partition, slurm_account=args.account,
                slurm_qos=args.qos, slurm_constraint=args.constraint, slurm_comment=args.comment,
                slurm_signal_delay_s=args.signal_delay_s)


def make_executor(args, cluster, name, params, dependency=None):
    folder = args.job_dir or default_job_dir(args)
    limits = dict(slurm_max_num_timeout=args.max_requeues, local_max_num_timeout=args.max_requeues)
    executor = submitit.AutoExecutor(folder, cluster=cluster, **limits)
    if cluster != "slurm":  # one machine: no node count, no Slurm-only option
        params = {k: v for k, v in params.items() if not k.startswith("slurm_") and k != "nodes"}
    executor.update_parameters(name=name, **params, **slurm_dependency(dependency if cluster == "slurm" else None))
    return executor


def slurm_dependency(dependency):
    """sbatch's --dependency, and --kill-on-invalid-dep: a job that waits `afterok` for a job that
    failed is cancelled by Slurm (by default it would stay pending forever), so that the table,
    which waits `afterany`, runs and lists the failure."""
    if not dependency:
        return {}
    return dict(slurm_dependency=dependency, slurm_additional_parameters={"kill-on-invalid-dep": "yes"})


class _SbatchRenderer(submitit_slurm.SlurmExecutor):
    """A SlurmExecutor that only renders: it also exists where `srun` is missing (a --dry-run off
    the cluster), which SlurmExecutor's affinity() check refuses."""

    @classmethod
    def affinity(cls):
        return 2


def sbatch_script(args, name, params, dependency=None, array_size=None):
    """--dry-run: the script that make_executor()'s executor would sbatch, rendered by Submitit.
    Submitit has no public call for this, so here alone its internals are used: the parameter
    translation and the renderer of its SlurmExecutor (what AutoExecutor.submit runs).
    tests/test_slurm_cluster.py checks the result against the script a real sbatch received."""
    ex = _SbatchRenderer(args.job_dir or default_job_dir(args), max_num_timeout=args.max_requeues)
    params = {k: v for k, v in dict(params, name=name, **slurm_dependency(dependency)).items() if v is not None}
    ex.update_parameters(**ex._convert_parameters({k: v for k, v in params.items() if not k.startswith("slurm_")}),
                         **{k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")})
    if array_size and array_size > 1:
        ex.parameters["map_count"] = array_size  # as SlurmExecutor submits a job array
    return ex._make_submission_file_text(ex._submitit_command_str, uid="dry-run")


def slurm_plan(todo, queued=()):
    """Jobs to submit as (name, kind, stages, names they wait for): one per pretraining and
    conversion, one job array per backbone's fine-tunes, one for the table. `queued`: the names of
    stages that jobs submitted earlier still run (waited for as well)."""
    pending = {s.name for s in todo} | set(queued)
    jobs, arrays = [], {}
    for s in todo:
        after = tuple(a for a in s.after if a in pending)
        if s.needs:  # a checkpoint evaluation: its pretraining's watcher submits it once the snapshot exists
            key = ("watch", pipeline.watcher_of(s))
            if key not in arrays:
                arrays[key] = (key[1], "watch", [], ())
                jobs.append(arrays[key])
            arrays[key][2].append(s)
        elif s.kind == "transfer":
            key = ("transfer", s.after)
            if key not in arrays:
                arrays[key] = (f"transfer/{s.name.split('/')[1]}", "transfer", [], after)
                jobs.append(arrays[key])
            arrays[key][2].append(s)
        else:
            jobs.append((s.name, s.kind, [s], after))
    return jobs


def local_plan(args, todo):
    """One job on this machine runs the incomplete stages in order, in a single task: torchrun and
    Detectron2 start the per-GPU processes (slurm.tasks), so a requeue takes them down together."""
    kind = "pretrain" if all(s.kind == "pretrain" for s in todo) else "transfer"
    return [(args.command, kind, todo, ())], dict(resources(args, kind), tasks_per_node=1,
                                                  timeout_min=args.timeout_min)


def describe(args, cluster, executor_args, group, log):
    """--dry-run: the sbatch script (Slurm) or the local job's shape, and the commands."""
    if cluster == "slurm":  # (a watcher is one job, whatever it submits)
        log(sbatch_script(args, *executor_args, array_size=1 if group[0].needs else len(group)))
    else:
        shape = {k: v for k, v in executor_args[1].items() if v is not None and not k.startswith("slurm_")}
        log(f"# one {cluster} job on this machine: " + ", ".join(f"{k}={v}" for k, v in shape.items()))
        if (args.gpus_per_node or 0) > 1:  # what StageJob runs in a one-task job
            group = [tasks.with_torchrun(s, args.gpus_per_node) if s.kind == "pretrain" else s for s in group]
    log("\n".join("# runs: " + shlex.join(s.command()) + (f"  (once {s.needs} exists)" if s.needs else "")
                   for s in group))


def launch(args, stages, log=print):
    """Submit the incomplete `stages` (or describe them with --dry-run); returns the jobs."""
    cluster = args.cluster or ("slurm" if args.dry_run else submitit.AutoExecutor.which())
    # jobs unpickle slurm.tasks: this checkout first (an installed suite imports anyway; a checkout run
    # in place, or one of several sharing an environment, must run its own code)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(pipeline.REPO), os.environ.get("PYTHONPATH")) if p)
    todo = pipeline.pending(stages)
    for s in stages:
        if s not in todo:
            log(f"[{s.name}] complete: {s.done_file}")
    if not todo:
        log("nothing to do: every stage is complete")
        return []
    jobs_file = contract.jobs_file(output_of(args))
    watchers = sorted({pipeline.watcher_of(s) for s in todo if s.needs})
    queued = registry.in_flight(jobs_file, [s.name for s in todo] + watchers)  # {stage: (job id, state)}
    if queued and cluster != "slurm":  # one local job runs every stage: nothing can wait for it
        name, (job_id, state) = next(iter(queued.items()))
        raise UsageError(f"[{name}] is still {state} in job {job_id} on this machine (submitted earlier, "
                         f"{jobs_file}): let it finish or kill it, then run this again")
    # a queued stage is waited for; a queued table is submitted again if a run it reads is new
    submit = pipeline.pending(todo, settled=lambda s: s.name in queued or (
        bool(s.needs) and pipeline.watcher_of(s) in queued))
    for s in todo:
        if s not in submit:
            log(f"[{s.name}] {queued[s.name][1]} in job {queued[s.name][0]}: waited for, not submitted again")
    if not submit:
        log("nothing to submit: the incomplete stages are in jobs still queued or running")
        return []
    plan, local_params = local_plan(args, submit) if cluster != "slurm" else (slurm_plan(submit, queued), None)
    # stage name -> the id (dry run: the name) of the job that runs it
    job_of = {name: job_id.split("_")[0] for name, (job_id, _) in queued.items()}
    jobs = []
    for name, kind, group, after in plan:
        waits = sorted({job_of[a] for a in after})
        # the table runs whatever became of the runs it reads (it lists the failed ones); every other
        # stage needs its inputs complete
        kind_of_wait = "afterany:" if all(s.refresh for s in group) else "afterok:"
        dep = kind_of_wait + ":".join(waits) if waits else None
        executor_args = (name.replace("/", "_"), local_params or resources(args, kind), dep)
        if args.dry_run:  # (a local executor would already create its folder)
            log(f"# ---- job {name}" + (f" (after {', '.join(waits)})" if waits else ""))
            if kind == "watch":
                log("# submits each stage below once the snapshot it reads exists")
            describe(args, cluster, executor_args, group, log)
            job_of.update((s.name, name) for s in group)
            continue
        executor = make_executor(args, cluster, *executor_args)
        if kind == "watch":
            job = executor.submit(CheckpointWatcher(args, group, args.eval_poll_s))
            registry.record(jobs_file, {name: registry.entry_of(job, cluster)})
            log(f"submitted {name}: job {job.job_id}, submits {len(group)} checkpoint evaluation(s) as their "
                f"snapshots appear; logs in {job.paths.folder}")
            jobs.append(job)
            continue
        if cluster == "slurm" and len(group) > 1:
            with executor.batch():  # a job array
                submitted = [executor.submit(StageJob([s])) for s in group]
        else:
            submitted = [executor.submit(StageJob(group))]
        job_id = str(submitted[0].job_id).split("_")[0]  # an array's id covers all its tasks
        job_of.update((s.name, job_id) for s in group)
        if cluster != "debug":  # (a debug job runs inside this process)
            owners = submitted if len(submitted) == len(group) else submitted * len(group)
            registry.record(jobs_file, {s.name: registry.entry_of(job, cluster) for s, job in zip(group, owners)})
        log(f"submitted {name}: job {job_id}" + (f" ({len(group)} array tasks)" if len(submitted) > 1 else "")
            + (f", {dep}" if dep else "") + f"; logs in {submitted[0].paths.folder}")
        jobs += submitted
    return jobs


def main(argv=None):
    args = parse_args(argv)
    try:
        check_inputs(args)
        stages = stages_for(args)
    except (UsageError, pipeline.PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        jobs = launch(args, stages)
    except (UsageError, registry.RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except submitit.core.utils.FailedSubmissionError as e:
        print(f"error: sbatch refused the job: {e}", file=sys.stderr)
        return 1
    if args.wait or args.cluster == "debug":
        for job in jobs:
            try:
                # Submitit's DebugJob opens pdb.post_mortem on a failure: a prompt, not an error
                with mock.patch("pdb.post_mortem", lambda *a, **k: None):
                    job.result()
            except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
                print(f"error: job {job.job_id} failed; its log: {job.paths.stdout}\n{e}", file=sys.stderr)
                return 1
            except pipeline.PipelineError as e:  # --cluster debug raises the stage's own error
                print(f"error: {e}", file=sys.stderr)
                return 1
        print(f"{len(jobs)} job(s) finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
