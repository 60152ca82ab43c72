#!/usr/bin/env bash
# README's test command, self-sufficient on a fresh machine: install what is missing (scripts/install.sh,
# a few seconds when everything is there), then run every test. CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# install.sh installed every extra: a test that needs one fails when it is missing instead of skipping
export FAIRSEQ_MOE_PRUNE_REQUIRE_EXTRAS=1
python -m pytest tests -q "$@"
