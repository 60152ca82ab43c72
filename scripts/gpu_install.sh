#!/usr/bin/env bash
# Install fairseq on a machine without network from what scripts/build_gpu_wheels.sh put in .gpu/wheels, for
# scripts/gpu_main_job.sh: fairseq's missing dependencies from their wheels (pip --no-index) into SITE, and
# fairseq-fixed unpacked into SRC with the C++/Cython extensions the main job imports built in place, in
# parallel, against this machine's own numpy and Python (no build isolation); then the console scripts run.py
# calls, into SITE/bin. Afterwards: PYTHONPATH=SRC:SITE and PATH=SITE/bin.
# fairseq's torch C++ extensions (libbase for BASE layers, libnat for non-autoregressive models, an alignment
# example) are left out: the job does not import them, and they take minutes to compile.
# Usage: bash scripts/gpu_install.sh SITE SRC
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=$1
SRC=$2
WHEELS=.gpu/wheels
PYTHON=$(command -v python3 || command -v python)
# the Python the wheels are for (this one; another only to check the wheels from a machine with another Python)
PYV=${PYV:-$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
rm -rf "$SITE" "$SRC" && mkdir -p "$SITE" "$SRC"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version "$PYV" \
    --target "$SITE" "$WHEELS"/bitarray-*.whl "$WHEELS"/cffi-*.whl "$WHEELS"/hydra_core-*.whl \
    "$WHEELS"/omegaconf-*.whl "$WHEELS"/antlr4_python3_runtime-*.whl
tar xzf "$WHEELS"/fairseq_fixed-0.12.3.1.tar.gz -C "$SRC" --strip-components 1
# the three as fairseq-fixed's setup.py lists them, with its flags
(cd "$SRC" && "$PYTHON" - "$(nproc)" <<'EOF'
import sys

import numpy
from setuptools import Extension, setup

flags = ["-std=c++11", "-O3"]
setup(
    name="fairseq-extensions",
    script_args=["-q", "build_ext", "--inplace", "--parallel", sys.argv[1]],
    ext_modules=[
        Extension("fairseq.libbleu", ["fairseq/clib/libbleu/libbleu.cpp", "fairseq/clib/libbleu/module.cpp"],
                  extra_compile_args=flags),
        Extension("fairseq.data.data_utils_fast", ["fairseq/data/data_utils_fast.pyx"], language="c++",
                  include_dirs=[numpy.get_include()], extra_compile_args=flags),
        Extension("fairseq.data.token_block_utils_fast", ["fairseq/data/token_block_utils_fast.pyx"],
                  language="c++", include_dirs=[numpy.get_include()], extra_compile_args=flags),
    ],
)
EOF
) >"$SRC.log" 2>&1 || { tail -n 20 "$SRC.log"; exit 1; }
# the console scripts, as pip writes them from fairseq-fixed's and this project's entry points
mkdir -p "$SITE/bin"
for entry in fairseq-train:fairseq_cli.train:cli_main fairseq-generate:fairseq_cli.generate:cli_main \
             fairseq-preprocess:fairseq_cli.preprocess:cli_main fairseq-interactive:fairseq_cli.interactive:cli_main \
             fairseq-moe-prune:fairseq_moe_prune.cli:main; do
    IFS=: read -r name module function <<<"$entry"
    printf '#!%s\nimport sys\nfrom %s import %s\nsys.exit(%s())\n' "$PYTHON" "$module" "$function" "$function" \
        >"$SITE/bin/$name"
    chmod +x "$SITE/bin/$name"
done
