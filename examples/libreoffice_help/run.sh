#!/usr/bin/env bash
# README's main command: install (skipped where already installed), then run the whole job on real data.
# Extra arguments go to run.py, e.g. --preset ci or --work DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/install.sh
python examples/libreoffice_help/run.py "$@"
