#!/usr/bin/env python3
"""Do the main job's figures depend on the CPU? Train the same model under each of torch's CPU kernel sets
(ATEN_CPU_CAPABILITY) and MKL's reproducibility mode (MKL_CBWR), and compare the trained weights.

Each setting runs the ci preset's training (the committed sample, 30 updates, one thread) in a fresh work folder
with the data prepared once, and prints a digest of the trained model's weights and the training time, side by
side in one run. Equal digests: the setting does not change the numbers on this machine; different digests: it
does, so another CPU (which picks other kernels by itself) gives other figures unless the setting is pinned.

    python scripts/repro_kernels.py [--work /tmp/repro] [--settings default,avx2,avx512]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "examples" / "libreoffice_help" / "run.py"


def weights_digest(checkpoint: Path) -> str:
    """sha256 of every tensor of the model, in key order (the file's own bytes also hold times and paths)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + state[key].detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def train(work: Path, data: Path, env: dict) -> tuple[str, float]:
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data").exists():
        shutil.copytree(data, work / "data")
    start = time.monotonic()
    subprocess.run([sys.executable, str(RUN), "--preset", "ci", "--work", str(work), "--until", "train",
                    "--set", "task_moe=false"], check=True, env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL)
    return weights_digest(work / "model" / "checkpoint_last.pt"), time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/repro_kernels"))
    parser.add_argument("--settings", default="default,default,avx2,avx512,cbwr",
                        help="comma-separated: default (torch's own choice), an ATEN_CPU_CAPABILITY value, or cbwr "
                             "(MKL_CBWR=COMPATIBLE); default is run twice to show the run-to-run spread")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    subprocess.run([sys.executable, str(RUN), "--preset", "ci", "--work", str(args.work / "prepare"), "--until", "data"],
                   check=True, stdout=subprocess.DEVNULL)
    data = args.work / "prepare" / "data"
    print(f"this CPU: torch picks {torch.backends.cpu.get_cpu_capability()} kernels")
    results = []
    for index, name in enumerate(args.settings.split(",")):
        env = {} if name == "default" else {"MKL_CBWR": "COMPATIBLE"} if name == "cbwr" else {"ATEN_CPU_CAPABILITY": name}
        digest, seconds = train(args.work / f"{index}-{name}", data, env)
        results.append((name, digest, seconds))
        print(f"{name:>8}: weights {digest}  training {seconds:.1f} s", flush=True)
    reference = results[0][1]
    for name, digest, seconds in results[1:]:
        print(f"same weights as default: {name}: {digest == reference}; "
              f"ratio training time {name} / default: {seconds / results[0][2]:.3f}")


if __name__ == "__main__":
    main()
