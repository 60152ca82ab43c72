#!/usr/bin/env bash
# The main job's gpu preset, whole, on a GPU machine without network (Python 3.12 with its own CUDA torch, no
# fairseq), in one command:
#   1. install fairseq's missing dependencies from the carried wheels (pip --no-index) into a folder of its own,
#   2. unpack fairseq-fixed's sdist and build the extensions the job imports in place, in parallel, against that
#      machine's Python and numpy (no build isolation), and write the console scripts run.py calls
#      (scripts/gpu_install.sh),
#   3. run examples/libreoffice_help/run.py --preset gpu on the carried data (data, train, record, sweep, report),
#   4. copy report.md, sweep.json, the three PNGs, timings.json and the logs into one folder, $OUT.
# Steps 1-2 are skipped where fairseq already imports (e.g. to try the job on a CPU machine).
#
# Here first: bash scripts/build_gpu_wheels.sh   (fills .gpu/: wheels, prepared data, commit; 32 MiB)
# There, from the repository root, carrying .gpu/wheels, .gpu/data and .gpu/commit:
#   OUT=/some/folder bash scripts/gpu_main_job.sh [more run.py arguments]
# With this workplace's device tool, whose machines set OUT and return at most 8 files of it (this writes 8):
#   run(command="bash scripts/gpu_main_job.sh", carry=[".gpu/wheels", ".gpu/data", ".gpu/commit"], timeout_s=600)
# Environment: OUT (required), WORK (the job's work folder, default /tmp/gpu_main_job), MAIN_JOB_COMMIT (default:
# .gpu/commit). On a machine without a GPU, e.g.: bash scripts/gpu_main_job.sh --cpu --set updates=20 ...
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
: "${OUT:?set OUT to the folder for the report}"
WORK=${WORK:-/tmp/gpu_main_job}
SITE=${SITE:-/tmp/gpu_main_job_site}  # fairseq's dependencies and the console scripts
SRC=${SRC:-/tmp/gpu_main_job_fairseq}  # fairseq-fixed, unpacked and built in place
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON=$(command -v python3 || command -v python)
exec > >(tee "$OUT/job.log") 2>&1
START=$(date +%s)
stamp() { echo "[$(date -u +%H:%M:%S)] +$(($(date +%s) - START)) s: $*"; }

stamp "start on $(hostname); $("$PYTHON" -c 'import sys, torch; print("Python", sys.version.split()[0], "torch", torch.__version__, "GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")')"
if ! "$PYTHON" -c "import fairseq" 2>/dev/null; then
    stamp "install: fairseq's dependencies into $SITE, fairseq-fixed built in $SRC (scripts/gpu_install.sh)"
    bash "$REPO/scripts/gpu_install.sh" "$SITE" "$SRC"
    export PYTHONPATH="$SRC:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
    "$PYTHON" -c "import fairseq, fairseq.data.data_utils_fast, fairseq.libbleu; print('fairseq', fairseq.__version__)"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# what the report needs from that machine's own packages, checked before minutes of training
"$PYTHON" -c "from sacrebleu.significance import _bootstrap_resample; import matplotlib, numpy"

stamp "job: run.py --preset gpu $*"
if [ -d "$REPO/.gpu/data" ] && [ ! -e "$WORK/data" ]; then
    ln -s "$REPO/.gpu/data" "$WORK/data"  # prepared here without network: run.py finds it and skips the step
fi
export MAIN_JOB_COMMIT=${MAIN_JOB_COMMIT:-$(cat "$REPO/.gpu/commit" 2>/dev/null || true)}
status=0
"$PYTHON" "$REPO/examples/libreoffice_help/run.py" --preset gpu --work "$WORK" "$@" || status=$?

stamp "copy results to $OUT (exit $status)"
# 8 files at most come back from a GPU call, 16 MiB each: job.log and these 7 (sweep.json gzipped if too big)
for f in "$WORK"/sweep/report.md "$WORK"/sweep/*.png "$WORK"/timings.json "$WORK"/logs/train.log; do
    if [ -f "$f" ]; then cp "$f" "$OUT/"; fi
done
if [ -f "$WORK/sweep/sweep.json" ]; then
    if [ "$(stat -c %s "$WORK/sweep/sweep.json")" -lt $((15 * 1024 * 1024)) ]; then
        cp "$WORK/sweep/sweep.json" "$OUT/"
    else
        gzip -c "$WORK/sweep/sweep.json" >"$OUT/sweep.json.gz"
    fi
fi
stamp "done"
exit $status
