#!/usr/bin/env bash
# Build, here, what scripts/gpu_main_job.sh needs on a GPU machine that has Python 3.12 and its own CUDA torch
# but no fairseq and no network. Everything goes to .gpu/ (ignored by git), to be carried there:
#   .gpu/wheels/  Python 3.12 x86-64 wheels of fairseq's dependencies that machine lacks (bitarray, cffi,
#                 hydra-core, omegaconf, antlr4-python3-runtime) and the fairseq-fixed sdist, whose extensions
#                 are built there (scripts/gpu_install.sh)
#   .gpu/data/    the gpu preset's data, prepared here from Debian's packages (run.py --only-data), less what
#                 the job does not read (downloads, extracted HTML, SentencePiece inputs, raw training text)
#   .gpu/commit   the commit the job runs from, for its report's header
# Prints the carried size, which must stay under 64 MiB. Needs network (PyPI, Debian) and an installed
# fairseq-moe-prune (scripts/install.sh) for the data step. Usage: bash scripts/build_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
GPU=.gpu
mkdir -p "$GPU/wheels"

# the versions fairseq-fixed 0.12.3.1 pins (hydra-core, omegaconf) or runs with here
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$GPU/wheels" bitarray==3.12.3 cffi==2.0.0 hydra-core==1.3.2 omegaconf==2.3.0
# antlr4-python3-runtime (omegaconf's parser) is published as an sdist only: a pure-Python wheel built here
python -m pip wheel -q --no-deps -w "$GPU/wheels" antlr4-python3-runtime==4.9.3
# the sdist; its metadata step imports torch and cython, present here, so no isolated build environment
python -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$GPU/wheels" fairseq-fixed==0.12.3.1

# the data: prepared once (about 5 minutes on 2 cores), then the files the job reads copied
python examples/libreoffice_help/run.py --preset gpu --work "$GPU/prepare" --only-data
rm -rf "$GPU/data.partial"
mkdir -p "$GPU/data.partial/raw"
cp -r "$GPU/prepare/data/bin" "$GPU/prepare/data/prepared.json" "$GPU/data.partial/"
cp "$GPU"/prepare/data/raw/test.* "$GPU"/prepare/data/raw/valid.* "$GPU/data.partial/raw/"
rm -rf "$GPU/data"
mv "$GPU/data.partial" "$GPU/data"

git rev-parse --short=12 HEAD > "$GPU/commit"
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "$(cat "$GPU/commit") with uncommitted changes" > "$GPU/commit"
fi

du -sh "$GPU/wheels" "$GPU/data" "$GPU/commit"
total=$(du -sbc "$GPU/wheels" "$GPU/data" "$GPU/commit" | tail -n 1 | cut -f1)
echo "carried: $((total / 1024 / 1024)) MiB of 64 (carry: .gpu/wheels .gpu/data .gpu/commit)"
[ "$total" -lt $((64 * 1024 * 1024)) ] || { echo "error: over the 64 MiB a GPU call carries" >&2; exit 1; }
