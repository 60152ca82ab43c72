#!/usr/bin/env bash
# Install fairseq-moe-prune and its dependencies on Python 3.11 (CPU), from scratch or on top of an
# existing install (pip skips what is already there). The order matters: a CPU torch first, so that
# nothing pulls a multi-GB CUDA build; fairseq-fixed without build isolation, so that its C++
# extensions build against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore  # no third-party notices in the main job's output
# Already installed (the versions below, this checkout installed editable, torchaudio gone)? Then nothing to do.
if python - "$PWD" >/dev/null 2>&1 <<'CHECK'
import importlib.metadata, importlib.util, json, pathlib, sys
import accelerate, ctranslate2, fairseq, google.protobuf, matplotlib, pytest, torch, transformers
assert torch.__version__.split("+")[0] == "2.13.0" and transformers.__version__.startswith("4.")
assert importlib.metadata.version("fairseq-fixed") == "0.12.3.1"
assert importlib.util.find_spec("torchaudio") is None
source = json.loads(importlib.metadata.distribution("fairseq-moe-prune").read_text("direct_url.json"))
assert source["dir_info"].get("editable") and source["url"] == pathlib.Path(sys.argv[1]).resolve().as_uri()
CHECK
then
    echo "install.sh: everything is installed"
    exit 0
fi
python -m pip install -q torch==2.13.0
python -m pip install -q "numpy>=1.21.3" cython ninja
MAX_JOBS=2 python -m pip install -q --no-build-isolation fairseq-fixed==0.12.3.1
python -m pip install -q --no-build-isolation -e ".[test,hf,examples,offload,deploy]"
# fairseq-fixed pulls in a torchaudio that does not match torch; transformers imports it when present
python -m pip uninstall -q -y torchaudio 2>/dev/null || true
