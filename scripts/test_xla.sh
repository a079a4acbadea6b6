#!/usr/bin/env bash
# `make test-xla`: a real torch_xla training step of each stage on PJRT_DEVICE=CPU.
#
# torch_xla 2.9 needs torch 2.9 (the main .venv has torch 2.13), so it gets its own venv, .venv-xla: torch==2.9.*
# and torch_xla==2.9.* from PyPI (about 4 GB of downloads: torch's CUDA wheels come along), the rest of
# requirements.txt except the torch / triton pins, and the package itself (editable, no dependencies).
# Then tests/test_train_engines.py::test_xla_real_stage1_and_stage2 runs there with PJRT_DEVICE=CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${XLA_VENV:-.venv-xla}
STAMP="$VENV/.installed"
# The torch 2.9 download is multi-GB; an interrupted transfer (seen in CI: 240 of 287 MB, six resumes failed) should
# not fail the job: pip resumes partial downloads, and a failed install is retried (finished wheels are cached).
pip_install() {
    local attempt
    for attempt in 1 2 3; do
        "$VENV/bin/python" -m pip install --quiet --retries 10 --resume-retries 20 "$@" && return 0
        echo "test_xla.sh: pip install failed (attempt $attempt of 3), retrying" >&2
        sleep 10
    done
    return 1
}
if [ ! -f "$STAMP" ] || [ requirements.txt -nt "$STAMP" ]; then
    test -x "$VENV/bin/python" || $PYTHON -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip "setuptools==84.2.1"  # bdist_wheel for the editable install
    pip_install "torch==2.9.*" "torch_xla==2.9.*"
    grep -v -E '^(torch|triton|deepspeed)==' requirements.txt > "$VENV/requirements-xla.txt"
    pip_install -r "$VENV/requirements-xla.txt"
    CAMBRIAN_SKIP_NATIVE=1 "$VENV/bin/python" -m pip install --quiet --no-build-isolation --no-deps -e .
    touch "$STAMP"
fi
PJRT_DEVICE=CPU "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_train_engines.py -k xla "$@"
