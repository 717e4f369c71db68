"""Bad inputs, one table: each case is a command of the suite, its exit code and the words its
one-line message must hold; no traceback. Hostile weights files (pickles whose unpickling would
create a marker file) are among them, for every tool that opens weights: the marker must not
appear. Cases run in this process through each tool's main() (fast); BAD_INPUTS_SUBPROCESS=1
runs them as real `python ...` commands instead."""
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS = os.environ.get("BAD_INPUTS_SUBPROCESS") == "1"
DEMO_DET = "configs/detection/demo_shapes_voc_R_18_C4.yaml"
TINY_DET = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.MAX_ITER", "1"]
TINY_PRE = ["model.arch=resnet18", "model.dim=16", "model.queue=64", "data.crop=32", "data.batch_size=8",
            "data.num_workers=0", "mm.crops=[16]", "log.progress=false", "log.tensorboard=false",
            "knn.every_epochs=0", "device=cpu", "epochs=1"]


class RunsCode:
    """Unpickling this calls `func(arg)`: a weights file that runs code (here: creates a file)."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def shell_touch(marker):
    return RunsCode(os.system, f"touch {marker}")


def exec_touch(marker):
    return RunsCode(exec, f"open({str(marker)!r}, 'w').close()")


def resnet_backbone(arch):
    torch.manual_seed(0)
    sd = getattr(torchvision.models, arch)(weights=None).state_dict()
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


@pytest.fixture(scope="module")
def files(module_tmp, corpus):
    """Every bad input of the table, and the markers folder the hostile ones would write to."""
    from pretrain import convert as cc

    d = module_tmp("bad")
    markers = d / "markers"
    markers.mkdir()
    p = {"d": d, "markers": markers, "data": corpus / "imagefolder", "corpus": corpus}

    # hostile files: a Detectron2-looking .pkl whose arrays hide a call, a MoCo-like .pth, ...
    (d / "evil.pkl").write_bytes(pickle.dumps(
        {"model": {"stem.conv1.weight": np.zeros((2, 2), np.float32), "x": shell_touch(markers / "pkl")},
         "__author__": "zoo", "matching_heuristics": True}))
    (d / "evil_exec.pkl").write_bytes(pickle.dumps({"blobs": [exec_touch(markers / "pkl_exec")]}, protocol=2))
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)},
                "arch": shell_touch(markers / "pth")}, d / "evil.pth")
    (d / "pre_evil").mkdir()
    torch.save({"model": {}, "iter": exec_touch(markers / "resume")}, d / "pre_evil" / "checkpoint.pth")
    (d / "det_evil").mkdir()
    torch.save({"model": shell_touch(markers / "snapshot")}, d / "det_evil" / "model_0000009.pth")
    (d / "det_evil" / "last_checkpoint").write_text("model_0000009.pth")

    # damaged and unsuitable files
    good = d / "r18.pth"
    torch.save(resnet_backbone("resnet18"), good)
    (d / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (d / "empty.pth").write_bytes(b"")
    torch.save([1, 2, 3], d / "list.pth")
    cc.convert(good, d / "r18.pkl", log=lambda s: None)
    (d / "truncated.pkl").write_bytes((d / "r18.pkl").read_bytes()[:5000])
    nan = cc.to_detectron2(resnet_backbone("resnet18"))
    nan["model"]["res4.0.conv1.weight"][0, 0, 0, 0] = np.nan
    (d / "nan.pkl").write_bytes(pickle.dumps(nan))
    r50 = cc.to_detectron2(resnet_backbone("resnet50"))
    (d / "r50.pkl").write_bytes(pickle.dumps(r50))
    partial = cc.to_detectron2(resnet_backbone("resnet18"))
    partial["model"] = {k: v for k, v in partial["model"].items() if not k.startswith("res4.1.")}
    (d / "partial.pkl").write_bytes(pickle.dumps(partial))

    for name, content in (("pre_truncated", (d / "truncated.pth").read_bytes()), ("pre_empty", b""),
                          ("pre_list", (d / "list.pth").read_bytes())):
        (d / name).mkdir()
        (d / name / "checkpoint.pth").write_bytes(content)
    (d / "pre_other").mkdir()  # another model's checkpoint (and no config.yaml to tell)
    torch.save({"model": {"encoder_q.conv1.weight": torch.zeros(1)}, "optimizer": {}, "iter": 3, "config": {}},
               d / "pre_other" / "checkpoint.pth")
    (d / "det_empty").mkdir()
    (d / "det_empty" / "last_checkpoint").write_text("")
    (d / "det_truncated").mkdir()
    shutil.copy(d / "truncated.pth", d / "det_truncated" / "model_0000009.pth")
    (d / "det_truncated" / "last_checkpoint").write_text("model_0000009.pth\n")
    (d / "afile").write_text("a file where a folder should be")
    (d / "runs" / "r").mkdir(parents=True)  # a pretraining run for results_table and the plots
    (d / "runs" / "r" / "config.yaml").write_text("method: sane\nmodel: {arch: resnet18}\ndata: {}\n")
    (d / "runs" / "r" / "metrics.jsonl").write_text(
        '{"type": "train", "epoch": 0, "iter": 1, "loss": 5.0, "lr": 0.1}\n'
        '{"type": "train", "epoch": 0, "iter": 2, "loss": 4.0, "lr": 0.1}\n')
    (d / "images" / "train").mkdir(parents=True)  # an ImageFolder root without images
    (d / "images" / "train" / "cls").mkdir()
    return {k: str(v) for k, v in p.items()}


def det(*extra):
    flags = [a for a in extra if a.startswith("--")]  # before the trailing KEY VALUE opts
    return ["transfer/train_net.py", "--config-file", DEMO_DET, *flags, *TINY_DET,
            *[a for a in extra if not a.startswith("--")]]


def pre(out, *extra, data="{data}"):
    return ["-m", "pretrain", "--config", "configs/pretrain/demo.yaml", *TINY_PRE, f"data.root={data}",
            f"output_dir={out}", *extra]


def submit(*argv):
    return ["slurm/submit.py", *argv]


SUBMIT_PRE = ["pretrain", "--config", "configs/pretrain/demo.yaml", "--output-dir", "{d}/sub",
              "--data-root", "{data}", "--dry-run", "--cluster", "slurm"]
SUBMIT_DET = ["transfer", "--config-file", DEMO_DET, "--weights", "{d}/r18.pkl", "--output-root",
              "{d}/subdet", "--dry-run", "--cluster", "slurm"]

# (case, command after `python`, exit code, words its one line must hold); a case of a failing
# stage lists the stage's own line first, then the launcher's: (..., words, 2 lines)
CASES = [
    # -- weights files that would run code: refused by name, the marker never appears
    ("convert-hostile-pth", ["tools/convert_checkpoint.py", "{d}/evil.pth", "{d}/o1.pkl"], 2,
     ["evil.pth", "refused", "posix.system"]),
    ("convert-hostile-pkl", ["tools/convert_checkpoint.py", "{d}/evil.pkl", "{d}/o2.pkl"], 2,
     ["evil.pkl", "refused", "posix.system"]),
    ("linear-hostile-pth", ["-m", "pretrain.linear", "--checkpoint", "{d}/evil.pth", "--data", "{data}",
                            "--output-dir", "{d}/lin1"], 2, ["evil.pth", "refused"]),
    ("pretrain-resume-hostile", pre("{d}/pre_evil"), 2, ["pre_evil/checkpoint.pth", "refused"]),
    ("detectron2-weights-hostile-pkl", det("OUTPUT_DIR", "{d}/det1", "MODEL.WEIGHTS", "{d}/evil.pkl"), 2,
     ["evil.pkl", "refused", "posix.system"]),
    ("detectron2-weights-hostile-caffe2-pkl",
     det("OUTPUT_DIR", "{d}/det2", "MODEL.WEIGHTS", "{d}/evil_exec.pkl"), 2, ["evil_exec.pkl", "exec"]),
    ("detectron2-weights-hostile-pth", det("OUTPUT_DIR", "{d}/det3", "MODEL.WEIGHTS", "{d}/evil.pth"), 2,
     ["evil.pth", "refused"]),
    ("detectron2-resume-hostile-snapshot", det("--resume", "OUTPUT_DIR", "{d}/det_evil", "MODEL.WEIGHTS",
                                               "{d}/r18.pkl"), 2, ["model_0000009.pth", "refused"]),
    ("detectron2-eval-only-hostile", det("--eval-only", "OUTPUT_DIR", "{d}/det4", "MODEL.WEIGHTS",
                                         "{d}/evil.pkl"), 2, ["evil.pkl", "refused"]),
    # -- damaged checkpoints in an output dir: named, with what to do (no earlier one is kept here)
    ("pretrain-truncated-checkpoint", pre("{d}/pre_truncated"), 2,
     ["pre_truncated/checkpoint.pth", "truncated", "no earlier good checkpoint"]),
    ("pretrain-zero-byte-checkpoint", pre("{d}/pre_empty"), 2, ["pre_empty/checkpoint.pth", "empty"]),
    ("pretrain-not-a-checkpoint", pre("{d}/pre_list"), 2, ["pre_list/checkpoint.pth", "not a pretraining checkpoint"]),
    ("pretrain-another-models-checkpoint", pre("{d}/pre_other"), 2, ["pre_other/checkpoint.pth", "does not fit"]),
    ("detectron2-empty-last-checkpoint", det("--resume", "OUTPUT_DIR", "{d}/det_empty", "MODEL.WEIGHTS",
                                             "{d}/r18.pkl"), 2, ["last_checkpoint is empty", "remove"]),
    ("detectron2-truncated-snapshot", det("--resume", "OUTPUT_DIR", "{d}/det_truncated", "MODEL.WEIGHTS",
                                          "{d}/r18.pkl"), 2, ["model_0000009.pth", "truncated", "no other"]),
    # -- weights that do not fit or are not weights
    ("detectron2-truncated-weights", det("OUTPUT_DIR", "{d}/det5", "MODEL.WEIGHTS", "{d}/truncated.pkl"), 2,
     ["truncated.pkl", "truncated"]),
    ("detectron2-zero-byte-weights", det("OUTPUT_DIR", "{d}/det6", "MODEL.WEIGHTS", "{d}/empty.pth"), 2,
     ["empty.pth", "empty"]),
    ("detectron2-not-weights", det("OUTPUT_DIR", "{d}/det7", "MODEL.WEIGHTS", "{d}/list.pth"), 2,
     ["list.pth", "not a checkpoint"]),
    ("detectron2-nan-weights", det("OUTPUT_DIR", "{d}/det8", "MODEL.WEIGHTS", "{d}/nan.pkl"), 2,
     ["nan.pkl", "NaN", "res4.0.conv1.weight"]),
    ("detectron2-r50-weights-for-r18", det("OUTPUT_DIR", "{d}/det9", "MODEL.WEIGHTS", "{d}/r50.pkl"), 2,
     ["r50.pkl", "23 backbone tensors", "backbone.res2.0.conv1.weight"]),
    ("detectron2-missing-backbone-tensors", det("OUTPUT_DIR", "{d}/det10", "MODEL.WEIGHTS", "{d}/partial.pkl"),
     2, ["partial.pkl", "backbone tensors", "res4.1"]),
    ("convert-truncated", ["tools/convert_checkpoint.py", "{d}/truncated.pth", "{d}/o3.pkl"], 2,
     ["truncated.pth", "truncated"]),
    ("convert-zero-byte", ["tools/convert_checkpoint.py", "{d}/empty.pth", "{d}/o4.pkl"], 2, ["empty.pth", "empty"]),
    ("linear-truncated", ["-m", "pretrain.linear", "--checkpoint", "{d}/truncated.pth", "--data", "{data}"], 2,
     ["truncated.pth", "truncated"]),
    # -- config values no run can use: found with the config, before anything is written
    ("pretrain-batch-size-0", pre("{d}/p1", "data.batch_size=0"), 2, ["data.batch_size=0", ">= 1"]),
    ("pretrain-queue-below-batch", pre("{d}/p2", "model.queue=4"), 2, ["model.queue=4", "data.batch_size=8"]),
    ("pretrain-epochs-0", pre("{d}/p3", "epochs=0"), 2, ["epochs=0", ">= 1"]),
    ("pretrain-momentum-above-1", pre("{d}/p4", "model.m=1.5"), 2, ["model.m=1.5", "[0, 1]"]),
    ("pretrain-resume-allow-unsafe-key", pre("{d}/p5", "resume_allow=[model.queue]"), 2,
     ["resume_allow", "model.queue", "epochs"]),
    # -- outputs that cannot be written, in every tool
    ("pretrain-output-unwritable", pre("{d}/afile/run"), 2, ["output_dir=", "afile", "writable"]),
    ("convert-output-unwritable", ["tools/convert_checkpoint.py", "{d}/r18.pth", "{d}/afile/x.pkl"], 2,
     ["afile/x.pkl", "cannot write"]),
    ("linear-output-unwritable", ["-m", "pretrain.linear", "--checkpoint", "{d}/r18.pth", "--data", "{data}",
                                  "--arch", "resnet18", "--epochs", "1", "--image-size", "32", "--num-workers", "0",
                                  "--output-dir", "{d}/afile/lin"], 2, ["--output-dir", "afile/lin", "writable"]),
    ("detectron2-output-unwritable", det("OUTPUT_DIR", "{d}/afile/det", "MODEL.WEIGHTS", "{d}/r18.pkl"), 2,
     ["OUTPUT_DIR", "afile/det", "writable"]),
    ("results-table-output-unwritable", ["tools/results_table.py", "{d}/runs", "--out", "{d}/afile/t.md"], 2,
     ["--out", "afile/t.md", "cannot be written"]),
    ("plot-results-output-unwritable", ["tools/plot_results.py", "{d}/runs", "--out", "{d}/afile/plots"], 2,
     ["--out", "afile/plots", "cannot be written"]),
    ("synthetic-data-output-unwritable", ["tools/make_synthetic_data.py", "--out", "{d}/afile/c",
                                          "--num-train", "2", "--num-test", "1", "--size", "32"], 2,
     ["afile/c"]),
    ("benchmark-output-unwritable", ["tools/benchmark.py", "--cpu", "--json", "{d}/afile/b.json"], 2,
     ["--json", "afile/b.json", "cannot be written"]),
    ("theorem2-output-unwritable", ["tools/theorem2.py", "--plot", "{d}/afile/t.png"], 2,
     ["--plot", "afile/t.png", "cannot be written"]),
    ("submit-output-unwritable", submit("pretrain", "--config", "configs/pretrain/demo.yaml", "--output-dir",
                                        "{d}/afile/run", "--data-root", "{data}", "--cluster", "slurm"), 2,
     ["--output-dir", "afile/run", "writable"]),
    # -- slurm/submit.py: checked before anything is submitted
    ("submit-seeds-0", submit(*SUBMIT_DET, "--seeds", "0"), 2, ["--seeds 0", ">= 1"]),
    ("submit-nodes-0", submit(*SUBMIT_PRE, "--nodes", "0"), 2, ["--nodes 0", ">= 1"]),
    ("submit-negative-timeout", submit(*SUBMIT_PRE, "--timeout-min", "-5"), 2, ["--timeout-min -5", ">= 1"]),
    ("submit-pretrain-override-type", submit(*SUBMIT_PRE, "--", "data.batch_size=abc"), 2,
     ["data.batch_size", "expects int"]),
    ("submit-pretrain-override-unknown", submit(*SUBMIT_PRE, "--", "model.queu=16"), 2,
     ["model.queu", "model.queue"]),
    ("submit-pretrain-override-form", submit(*SUBMIT_PRE, "--", "epochs"), 2, ["epochs", "key=value"]),
    ("submit-detectron2-override-type", submit(*SUBMIT_DET, "--", "SOLVER.MAX_ITER", "abc"), 2,
     ["SOLVER.MAX_ITER", "abc"]),
    ("submit-detectron2-override-odd", submit(*SUBMIT_DET, "--", "SOLVER.MAX_ITER"), 2, ["SOLVER.MAX_ITER", "odd"]),
    ("submit-pipeline-opts-quotes", submit("pipeline", "--pretrain-config", "configs/pretrain/demo.yaml",
                                           "--data-root", "{data}", "--out", "{d}/pipe", "--dry-run",
                                           "--transfer-opts", "SOLVER.MAX_ITER '3"), 2,
     ["--transfer-opts", "do not parse"]),
    ("submit-pipeline-pretrain-opts-range", submit("pipeline", "--pretrain-config", "configs/pretrain/demo.yaml",
                                                   "--data-root", "{data}", "--out", "{d}/pipe", "--dry-run",
                                                   "--pretrain-opts", "model.queue=8"), 2,
     ["model.queue=8", "data.batch_size=32"]),
    # -- a failing stage under --cluster debug: an error line and exit 1, no debugger prompt
    ("submit-debug-failing-stage", submit("pretrain", "--config", "configs/pretrain/demo.yaml", "--output-dir",
                                          "{d}/dbg", "--data-root", "{d}/images", "--cluster", "debug",
                                          "--gpus-per-node", "0", "--", *TINY_PRE), 1,
     ["[pretrain/demo] exited with code 2"], 2),
]


def entry_points():
    """In-process equivalents of the commands: each tool's main(argv) -> exit code."""
    from pretrain import linear
    from pretrain.__main__ import main as pretrain_main
    from slurm import submit as submit_mod
    from pretrain import benchmark
    from pretrain import convert as convert_checkpoint
    from suite import corpus as make_synthetic_data
    from suite import plots as plot_results
    from suite import results as results_table
    from suite import theorem2
    from transfer import train_net

    return {("tools/convert_checkpoint.py",): convert_checkpoint.main, ("-m", "pretrain"): pretrain_main,
            ("-m", "pretrain.linear"): lambda argv: linear.main(argv) and 0,
            ("transfer/train_net.py",): train_net.cli, ("slurm/submit.py",): submit_mod.main,
            ("tools/results_table.py",): results_table.main, ("tools/plot_results.py",): plot_results.main,
            ("tools/make_synthetic_data.py",): make_synthetic_data.main, ("tools/benchmark.py",): benchmark.main,
            ("tools/theorem2.py",): theorem2.main}


def run(cmd, capfd, env):
    if SUBPROCESS:
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                           text=True, timeout=600, stdin=subprocess.DEVNULL)
        return r.returncode, r.stdout, r.stderr
    entries = entry_points()
    key = tuple(cmd[:2]) if cmd[0] == "-m" else (cmd[0],)
    capfd.readouterr()
    try:
        code = entries[key](cmd[len(key):])
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.detectron2
@pytest.mark.parametrize("case,command,code,words,n_lines", [(*c, 1)[:5] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, command, code, words, n_lines, files, capfd, monkeypatch):
    env = {"SHAPES_ROOT": files["corpus"], "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)
    got, out, err = run([c.format(**files) for c in command], capfd, env)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in out + err and "(Pdb)" not in out + err, err[-3000:]
    assert got == code, (got, err[-3000:])
    assert len(lines) == n_lines, err[-3000:]
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    assert not os.listdir(files["markers"]), "a weights file ran code"


def test_the_hostile_files_would_run_code_if_unpickled(files, tmp_path):
    """The control: plain pickle / torch.load(weights_only=False) does run each payload."""
    d, markers = Path(files["d"]), Path(files["markers"])
    try:
        with open(d / "evil.pkl", "rb") as f:
            pickle.load(f)
        with open(d / "evil_exec.pkl", "rb") as f:
            pickle.load(f)
        torch.load(d / "evil.pth", weights_only=False)
        torch.load(d / "det_evil" / "model_0000009.pth", weights_only=False)
        torch.load(d / "pre_evil" / "checkpoint.pth", weights_only=False)
        assert sorted(os.listdir(markers)) == ["pkl", "pkl_exec", "pth", "resume", "snapshot"]
    finally:
        for m in markers.iterdir():
            m.unlink()
