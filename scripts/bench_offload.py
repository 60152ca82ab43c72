#!/usr/bin/env python3
"""What does expert offload cost, and how lean is loading into it?

Builds a random model with NLLB-200's layout (24+24 layers, an MoE layer every 4th, 128 experts in
each of the 12) at small width (scripts/bench_prune.py's builder), saved as one file and in NLLB's
sharded layout, and prints, side by side in this one run:
  - fairseq-generate tokens/s with experts offloaded / resident (same data, beam 4)
  - peak RSS of loading the model (fairseq's loader: build + weights in place) above the process's
    RSS before loading, / the size of the experts on disk: resident (stock loading), offloaded from
    one file, offloaded from the sharded release
  - peak RSS of the whole generation run, offloaded and resident

Offload here runs with "host" and "device" both the CPU (no GPU on the machine this was written on):
each routed expert is still copied into its layer's device cache and computed from the copy, so the
ratio is the cost of that copying plus the cache bookkeeping, not of a PCIe transfer.

Example: python scripts/bench_offload.py --work /tmp/bench_offload
"""

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import REPO, build_model, task_args  # noqa: E402  (one NLLB-shaped builder)

LOAD_SCRIPT = """
import ast, re, sys, time
import fairseq_moe_prune  # registers the model and our loading
from fairseq import checkpoint_utils
def status(field):  # kB -> bytes
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
start = time.perf_counter()
models, _ = checkpoint_utils.load_model_ensemble([sys.argv[1]], arg_overrides=ast.literal_eval(sys.argv[2]))
print("LOAD", before, status("VmHWM"), time.perf_counter() - start)
"""
RSS_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
)
OFFLOAD = "{'moe_expert_offload': True, 'moe_offload_cache_experts': %d}"


def run(command: List[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {command[:3]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.stdout + result.stderr


def load(checkpoint: Path, overrides: str) -> Tuple[int, int, float]:
    """(RSS before loading, peak RSS after, seconds) of fairseq's loader in a fresh process."""
    output = run([sys.executable, "-c", LOAD_SCRIPT, str(checkpoint), overrides])
    before, after, seconds = re.search(r"LOAD (\d+) (\d+) ([\d.]+)", output).groups()
    return int(before), int(after), float(seconds)


def generate(data: Path, checkpoint: Path, overrides: str) -> Tuple[float, int]:
    """(tokens/s as fairseq-generate reports it, peak RSS of the run) on the eng->deu test set."""
    command = ["fairseq-generate", *task_args(data), "--path", str(checkpoint), "--source-lang", "eng_Latn",
               "--target-lang", "deu_Latn", "--gen-subset", "test", "--beam", "4", "--max-len-a", "0",
               "--max-len-b", "20", "--batch-size", "16", "--required-batch-size-multiple", "1", "--quiet",
               "--model-overrides", overrides]
    output = run([sys.executable, "-c", RSS_WRAPPER, *command])
    speed = float(re.search(r"sentences/s, ([\d.]+) tokens/s", output).group(1))
    return speed, int(re.search(r"MAXRSS_KB (\d+)", output).group(1)) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_offload"))
    parser.add_argument("--ffn", type=int, default=512, help="expert FFN width (512: 0.75 GiB of fp32 experts)")
    parser.add_argument("--cache", type=int, default=8, help="offloaded experts kept on the device per layer")
    parser.add_argument("--reuse", action="store_true", help="reuse the data and model of an earlier run in --work")
    parser.add_argument("--loading-only", action="store_true", help="measure loading, not generation")
    args = parser.parse_args()
    work = args.work
    single, shared = work / "full.pt", work / "full-shared.pt"
    if not (args.reuse and shared.exists()):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        print("data: the committed LibreOffice help sample", flush=True)
        subprocess.run([sys.executable, str(REPO / "examples/libreoffice_help/prepare_data.py"), "--aligned-dir",
                        str(REPO / "tests/data/libreoffice_help"), "--out", str(work / "data"), "--vocab-size",
                        "1000", "--test-max", "48"], check=True, capture_output=True)
        print("model: random, NLLB-shaped, saved as one file and sharded", flush=True)
        build_model(work / "data", work, args.ffn)
    experts_bytes = sum(p.stat().st_size for p in work.glob("full-rank-*.pt"))
    mib = 2**20
    print(f"  12 MoE layers x 128 experts of 128x{args.ffn}: {experts_bytes / mib:.0f} MiB of experts on disk "
          f"(rank files), one file {single.stat().st_size / mib:.0f} MiB", flush=True)

    offload = OFFLOAD % args.cache
    print("loading (fresh process each)", flush=True)
    loads = {
        "resident, one file (stock loading)": load(single, "{}"),
        "offloaded, one file": load(single, offload),
        "offloaded, sharded release": load(shared, offload),
    }
    print()
    for label, (before, after, seconds) in loads.items():
        print(f"peak RSS of loading / size of the experts on disk, {label}: {(after - before) / mib:.0f} MiB "
              f"above the {before / mib:.0f} MiB before loading / {experts_bytes / mib:.0f} MiB = ratio "
              f"{(after - before) / experts_bytes:.2f} (goal <= 1.1; {seconds:.1f} s)")
    if args.loading_only:
        return
    print("generation: resident, then offloaded", flush=True)
    start = time.perf_counter()
    resident_speed, resident_rss = generate(work / "data", single, "{}")
    offload_speed, offload_rss = generate(work / "data", single, offload)
    print(f"  both runs {time.perf_counter() - start:.0f} s")
    print(f"tokens/s offloaded / resident (cache {args.cache} experts per layer, host and device both CPU): "
          f"{offload_speed:.1f} / {resident_speed:.1f} = ratio {offload_speed / resident_speed:.2f}")
    print(f"peak RSS of the generation run / size of the experts on disk, offloaded: {offload_rss / mib:.0f} MiB / "
          f"{experts_bytes / mib:.0f} MiB = ratio {offload_rss / experts_bytes:.2f}")
    print(f"peak RSS of the generation run / size of the experts on disk, resident:  {resident_rss / mib:.0f} MiB / "
          f"{experts_bytes / mib:.0f} MiB = ratio {resident_rss / experts_bytes:.2f}")


if __name__ == "__main__":
    main()
