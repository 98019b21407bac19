#!/usr/bin/env bash
# Create .venv with what the main job needs: torch and clipforge (editable) with its runtime dependencies.
# The test dependencies (pytest and the reference packages the tests compare against) are installed by
# scripts/test.sh, which runs this script first when .venv is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_PIN="torch==2.14.1"  # scripts/test.sh pins the same torch with its torchvision

# pip, quiet, without this machine's harmless "WARNING: Location" lines, but failing when pip fails.
pip_install() {
    local log
    if ! log=$(.venv/bin/python -m pip install -q "$@" 2>&1); then
        printf '%s\n' "$log" >&2
        echo "setup: pip install $* failed" >&2
        return 1
    fi
    printf '%s\n' "$log" | grep -v -e "^WARNING: Location" -e '^$' || true
}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip_install --upgrade pip
pip_install "$TORCH_PIN"
pip_install -e .
.venv/bin/python -c "import clipforge; print('clipforge', clipforge.__version__, 'ready in .venv')"
