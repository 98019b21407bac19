#!/usr/bin/env bash
# Run the tests: bring their dependencies (the "test" extra: pytest and the reference packages open_clip_torch,
# transformers, clip-anytorch, clip-benchmark, scikit-learn) into .venv, then pytest with any arguments given,
# e.g. `bash scripts/test.sh tests/test_cli.py -x`. Creates .venv with scripts/setup.sh when it is missing.
# Quick when nothing changed: pip runs only when pyproject.toml or this script changed, or a test package is gone.
# Exits with pytest's status, so a failure, or no test collected (status 5), fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."
# torchvision is needed only by the reference packages; its wheels pin one torch build, so both are named
# here (torch as in scripts/setup.sh) and pip never swaps the torch the main job runs on.
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")

if [ ! -x .venv/bin/python ]; then
    bash scripts/setup.sh
fi
stamp=.venv/.clipforge-test-deps
wanted=$(cat pyproject.toml scripts/test.sh | sha256sum | cut -d' ' -f1)
installed() {  # every requirement of clipforge's test extra, and torchvision, is installed
    .venv/bin/python - <<'PY'
import importlib.metadata as metadata, re, sys
try:
    needed = [r for r in metadata.requires("clipforge") or [] if 'extra == "test"' in r] + ["torchvision"]
    for requirement in needed:
        metadata.version(re.match(r"[A-Za-z0-9_.\-]+", requirement).group())
except metadata.PackageNotFoundError:
    sys.exit(1)
PY
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ] || ! installed; then
    echo "test.sh: installing the test dependencies into .venv"
    if ! log=$(.venv/bin/python -m pip install -q "${TORCH_PINS[@]}" -e ".[test]" 2>&1); then
        printf '%s\n' "$log" >&2
        echo "test.sh: pip could not install the test dependencies" >&2
        exit 1
    fi
    printf '%s\n' "$wanted" > "$stamp"
fi
exec .venv/bin/python -m pytest -q "$@"
