#!/usr/bin/env bash
# Create .venv with clipforge (editable) and its test dependencies: the reference packages
# open_clip_torch, transformers and clip-anytorch, which the tests compare against.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torchvision is needed only by the reference packages; its wheels pin one torch build.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import clipforge, open_clip, transformers, clip; print('clipforge', clipforge.__version__, 'ready in .venv')"
