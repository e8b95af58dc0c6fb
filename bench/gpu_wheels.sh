#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels bench/gpu_check.sh installs on a GPU machine that has no internet.
#
#     bash bench/gpu_wheels.sh            # here, with PyPI reachable; then carry .whl/ along with the code
#
# The GPU machine has torch, timm, peft, numpy and onnxruntime; it lacks pycocotools (train_det / torchvision's
# COCO), segment-anything (the SAM oracle of the tests and of bench_peft's forward question) and possibly pytest.
# pycocotools is compiled: one wheel per CPython (3.10, 3.11, and the abi3 wheel for 3.12 and later), manylinux
# x86_64. The others are pure Python. --no-deps for pycocotools: its only dependency, numpy, is on the machine.
# About 3.3 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEST=.whl
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
for v in 3.10 3.11 3.12; do
    "$PY" -m pip download --quiet --only-binary=:all: --no-deps --implementation cp --python-version "$v" \
        "${PLATFORMS[@]}" --dest "$DEST" "pycocotools>=2.0"
done
# pure Python, with their dependencies as Python 3.10 needs them (exceptiongroup, tomli: only below 3.11)
"$PY" -m pip download --quiet --only-binary=:all: --python-version 3.10 --dest "$DEST" \
    "segment-anything>=1.0" pytest exceptiongroup tomli
ls -l "$DEST"
du -sh "$DEST"
