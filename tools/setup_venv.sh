#!/usr/bin/env bash
# Create .venv with Python 3.10, install the tested stack of requirements*.txt, then the suite itself
# (pyproject.toml, editable: its packages and commands). The stamp holds a hash of the requirement
# files and one of pyproject.toml: a second call is a no-op while both match, reinstalls the suite
# alone when pyproject.toml changed, and builds .venv anew when a requirement file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
REQS=(requirements.txt)
NODEPS=requirements-nodeps.txt  # installed with --no-deps (its comments say why)
stamp="$(cat "${REQS[@]}" "$NODEPS" | sha256sum | cut -d' ' -f1) $(sha256sum pyproject.toml | cut -d' ' -f1)"

install_suite() {  # editable, over the pinned stack: --no-deps keeps requirements.txt's versions
  local out  # (setuptools' editable build warns at length: shown only when it fails)
  out=$("$VENV/bin/python" -m pip install -q --no-deps -e . 2>&1) \
    || { echo "$out" >&2; echo "setup: 'pip install -e .' failed (output above)" >&2; exit 1; }
  "$VENV/bin/python" -c "import pretrain, transfer, slurm, suite.contract" \
    || { echo "setup: the suite does not import after 'pip install -e .'" >&2; exit 1; }
}

if [[ -x $VENV/bin/python && -f $VENV/.stamp ]]; then
  installed=$(cat "$VENV/.stamp")
  if [[ $installed == "$stamp" ]]; then
    echo "setup: $VENV is up to date"; exit 0
  fi
  if [[ ${installed%% *} == "${stamp%% *}" ]]; then  # the same stack: only pyproject.toml changed
    echo "setup: pyproject.toml changed: reinstalling the suite into $VENV"
    install_suite
    echo "$stamp" > "$VENV/.stamp"
    exit 0
  fi
fi

runs() { [[ -n $1 ]] && "$1" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; }
py=""
if [[ -n ${PYTHON:-} ]]; then
  runs "$PYTHON" || { echo "setup: PYTHON=$PYTHON is not a working Python 3.10" >&2; exit 2; }
  py=$PYTHON
elif runs "$(command -v python3.10 || true)"; then
  py=$(command -v python3.10)
elif command -v pyenv >/dev/null; then
  for d in "$(pyenv root)"/versions/3.10*; do
    if runs "$d/bin/python3.10"; then py=$d/bin/python3.10; break; fi
  done
fi
if [[ -z $py ]]; then
  echo "setup: no Python 3.10 found. The tested stack (torch 2.3.1, sal-detectron2) needs CPython 3.10:" >&2
  echo "       install it (e.g. 'pyenv install 3.10') or run 'make setup PYTHON=/path/to/python3.10'." >&2
  exit 2
fi
echo "setup: creating $VENV with $py"
rm -rf "$VENV"
"$py" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -m pip install -q "${REQS[@]/#/-r}" 2>&1 | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -m pip install -q --no-deps -r "$NODEPS" 2>&1 | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -c "import torch, torchvision, detectron2, submitit, pycocotools, lvis, shapely, cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling" \
  || { echo "setup: the installed stack does not import; see the pip output above" >&2; exit 1; }
install_suite
echo "$stamp" > "$VENV/.stamp"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, detectron2; print("torch", torch.__version__, "detectron2", detectron2.__version__)'))"
