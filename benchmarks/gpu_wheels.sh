#!/usr/bin/env bash
# The wheels a bare CUDA image lacks to run qgen, downloaded where a package registry is reachable, into
# .gpu_wheels/ (git-ignored), to travel with the working tree to a machine that has no network.
#
#   bash benchmarks/gpu_wheels.sh                 # for the image's Python 3.12, x86-64 Linux
#   PYTHON_VERSION=3.11 bash benchmarks/gpu_wheels.sh
#
# The image (torch 2.11 + CUDA 13, transformers 5.17, lightning 2.6, peft, tensorboard, scikit-learn, accelerate,
# pyarrow, pandas, sympy, httpx ...) already satisfies the rest of pyproject.toml's dependencies; these are the
# ones it has not, with the dependencies of theirs it has not either. Installed there without an index and
# without dependency resolution (the image's own packages stay as they are):
#
#   python3 -m pip install --no-index --no-deps .gpu_wheels/*.whl
#   python3 -m pip install --no-index --no-deps --no-build-isolation -e .
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.gpu_wheels}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
LIMIT_MIB=${LIMIT_MIB:-56}
WHEELS=(
    "bitsandbytes>=0.46"                                      # 4-bit / 8-bit layers (its CUDA kernels)
    "jsonargparse>=4.35" docstring-parser typeshed-client     # the command line (jsonargparse[signatures])
    "math-verify>=0.8" latex2sympy2_extended "antlr4-python3-runtime==4.13.2"  # answer checking
    "datasets>=3.0" dill multiprocess                         # data loading (pyarrow, xxhash: in the image)
    "httpx2>=2.0"                                             # the LLM judge's and served solver's HTTP client
    "trl>=1.0"                                                # the comparisons with TRL (benchmarks)
)
rm -rf "$OUT"
mkdir -p "$OUT"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any --dest "$OUT" "${WHEELS[@]}"
size=$(du -sm "$OUT" | cut -f1)
ls -1 "$OUT"
echo "$(ls "$OUT" | wc -l) wheels, ${size} MiB in $OUT (limit ${LIMIT_MIB} MiB)"
if [ "$size" -ge "$LIMIT_MIB" ]; then
    echo "gpu_wheels.sh: $OUT is ${size} MiB, over the ${LIMIT_MIB} MiB that may travel with the working tree" >&2
    exit 1
fi
