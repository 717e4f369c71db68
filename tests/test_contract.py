"""suite/contract.py: the layout and its parsers agree, the one atomic writer leaves the old file or
the new one (never half, never a temp file) with open()'s mode, and the module needs no torch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from suite import contract as C

ROOT = Path(__file__).resolve().parents[1]


def test_the_contract_imports_the_standard_library_only():
    code = ("import sys, suite.contract; "
            "print(sorted({'torch', 'numpy', 'yaml', 'detectron2', 'submitit'} & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


@pytest.mark.parametrize("seed", [None, 0, 7])
def test_every_path_the_layout_builds_parses_back(tmp_path, seed):
    out = C.Layout(tmp_path / "out")
    run = C.pretrain_run(out.pretrain_dir("sane_r50", seed))
    assert (run.backbone, run.seed, run.home) == ("sane_r50", seed, out.pretrain_root)
    assert C.probe_owner(out.probe_dir("sane_r50", "cifar", seed)) == out.pretrain_dir("sane_r50", seed)
    assert C.backbone_of_weights(out.weights("sane_r50", seed)) == "sane_r50"
    assert C.fine_tune_run(out.transfer_dir("sane_r50", "voc_R_50_C4_24k", 3)) == ("sane_r50", "voc_R_50_C4_24k", 3)
    assert C.folder_seed(C.seed_folder(12)) == 12 and C.folder_seed("seed_4") == 4 and C.folder_seed("x") is None
    assert C.seed_sibling(out.transfer_dir("b", "t", 3), 5) == out.transfer_dir("b", "t", 5)
    assert C.seed_sibling(out.pretrain_dir("b"), 5) is None
    assert C.backbone_of_weights("") == C.RANDOM_INIT and C.backbone_of_weights("/w/moco_v2.pkl") == "moco_v2"
    assert C.backbone_name("configs/pretrain/sane_r50_200ep.yaml") == "sane_r50_200ep"
    assert C.done_file("transfer", out.transfer_dir("b", "t", 0)).name == C.FINE_TUNE_DONE


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_writes_give_the_mode_open_would_and_leave_no_temp(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        C.write_json(tmp_path / "a" / "x.json", {"k": 1}, mkdir=True)
        C.write_text(tmp_path / "t.md", "± —\n")
        C.replace_dir(tmp_path / "d", lambda d: (d / "f").write_text("1"))
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"k": 1}
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "± —\n"
    for p in (tmp_path / "a" / "x.json", tmp_path / "t.md"):
        assert p.stat().st_mode & 0o777 == mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert sorted(os.listdir(tmp_path)) == ["a", "d", "t.md"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path):
    target = tmp_path / "results.md"
    target.write_text("old")

    def half(f):
        f.write(b"new, half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        C.write_atomic(target, half)
    with pytest.raises(RuntimeError):
        C.replace_dir(tmp_path / "keep", lambda d: (_ for _ in ()).throw(RuntimeError()))
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["results.md"]
    C.write_atomic(target, lambda f: f.write(b"new"), keep_previous=tmp_path / "results.prev.md", fsync=True)
    assert target.read_text() == "new" and (tmp_path / "results.prev.md").read_text() == "old"


def test_stale_temp_files_of_killed_writes_are_removed(tmp_path):
    kept = ["checkpoint.pth", ".hidden", "notes.tmp"]
    stale = [".checkpoint.pth.tmp4242", ".final_metrics.json.123-0a1b2c3d.tmp"]
    for name in kept + stale:
        (tmp_path / name).write_text("x")
    assert sorted(C.remove_stale_temp(tmp_path)) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_corpus_classes_come_from_its_record(tmp_path):
    with pytest.raises(OSError):
        C.corpus_classes(tmp_path)
    C.Corpus(tmp_path).record.write_text(json.dumps({"classes": ["circle", "ring"]}))
    assert C.corpus_classes(tmp_path) == ("circle", "ring")
    C.Corpus(tmp_path).record.write_text("{}")
    with pytest.raises(ValueError, match="corpus.json"):
        C.corpus_classes(tmp_path)
