"""The package layout holds: libraries never import from tools/ and edit no sys.path, pretrain/ stays
free of Detectron2 and Submitit, suite/contract.py is standard library only, tools/*.py are thin
entry points, every console command of pyproject.toml resolves, and once installed the commands run
without PYTHONPATH from any folder."""
import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "transfer", "slurm", "suite")


def modules(*folders):
    return sorted(p for f in folders for p in (ROOT / f).glob("*.py"))


def imported(path):
    """Top-level names of every module `path` imports (at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_libraries_import_no_script_and_edit_no_sys_path():
    for path in modules(*PACKAGES, "tools"):
        assert "tools" not in imported(path), path
        assert "sys.path" not in path.read_text(), path
    for path in modules("pretrain"):  # the GPU machine's stack has neither
        assert not imported(path) & {"detectron2", "submitit", "transfer", "slurm", "matplotlib"}, path
    contract = imported(ROOT / "suite" / "contract.py")
    assert contract <= set(sys.stdlib_module_names), contract - set(sys.stdlib_module_names)


def test_tools_scripts_are_thin_entry_points():
    for path in modules("tools"):
        tree = ast.parse(path.read_text())
        assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], path
        froms = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert len(froms) == 1 and froms[0].module.split(".")[0] in PACKAGES, path
        assert [a.name for a in froms[0].names] == ["main"], path


def scripts():
    """[project.scripts] of pyproject.toml: {command: "module:function"} (tomllib is Python 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+) = "([\w.]+:\w+)"', text, flags=re.M))


def test_every_console_command_resolves_to_a_main():
    found = scripts()
    assert {"sane-pretrain", "sane-probe", "sane-convert", "sane-transfer", "sane-submit", "sane-results"} <= set(found)
    for command, target in found.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), command


def test_installed_commands_run_without_pythonpath(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import suite.contract, pretrain.convert, slurm.pipeline"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip("the suite is not installed in this environment (make setup installs it)")
    for argv in (["tools/convert_checkpoint.py", "--help"], ["tools/results_table.py", "--help"],
                 ["slurm/submit.py", "--help"]):
        r = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage" in r.stdout, (argv, r.stderr[-2000:])
    command = Path(sys.executable).parent / "sane-results"
    r = subprocess.run([str(command), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "no pretraining or detection runs" in r.stderr, r.stderr[-2000:]
