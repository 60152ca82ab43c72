#!/usr/bin/env python3
"""What does recording gate decisions cost? fairseq-generate with and without --moe-stats-out.

Runs the two commands alternately on the same model and data (so drift in machine load hits both
alike) and prints the median wall time of each, the median of fairseq's own generation time
("Translated N sentences ... in X s"), and their ratios.

Example (after the main job): python scripts/bench_recording.py --work work/libreoffice_help
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fairseq_moe_prune import USER_DIR  # noqa: E402
from fairseq_moe_prune.stats import check_language, split_pair  # noqa: E402


def language_flags(data: Path) -> List[str]:
    """``--langs`` and ``--lang-pairs`` from the data folder's lists, every name checked first: text read from a
    file becomes a command-line value only as a validated language name, never as a flag."""
    langs = [check_language(name) for name in (data / "langs.txt").read_text().strip().split(",")]
    pairs = ["-".join(split_pair(pair)) for pair in (data / "lang_pairs.txt").read_text().strip().split(",")]
    return ["--langs", ",".join(langs), "--lang-pairs", ",".join(pairs)]


def generate_command(work: Path, direction: str, beam: int, stats_out: Path = None) -> List[str]:
    data = work / "data" / "bin"
    source, target = split_pair(direction)
    command = [
        "fairseq-generate", str(data), "--user-dir", USER_DIR,
        "--task", "translation_multi_simple_epoch_moe",
        *language_flags(data),
        "--encoder-langtok", "src", "--decoder-langtok", "--source-lang", source, "--target-lang", target,
        "--path", str(work / "model" / "checkpoint_last.pt"), "--gen-subset", "test", "--beam", str(beam),
        "--max-tokens", "4000", "--required-batch-size-multiple", "1", "--quiet",
    ]
    if stats_out is not None:
        command += ["--moe-stats-out", str(stats_out)]
    return command


def timed_run(command: List[str]) -> Tuple[float, float]:
    """(wall seconds of the whole command, seconds fairseq reports for generation)."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"error: fairseq-generate failed:\n{result.stderr[-2000:]}")
    match = re.search(r"Translated [\d,]+ sentences \([\d,]+ tokens\) in ([\d.]+)s", result.stdout + result.stderr)
    if not match:
        sys.exit("error: could not find fairseq-generate's timing line")
    return wall, float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "work" / "libreoffice_help", help="main job folder")
    parser.add_argument("--direction", default="eng_Latn-deu_Latn")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5, help="runs of each command, alternating")
    args = parser.parse_args()
    if not (args.work / "model" / "checkpoint_last.pt").exists():
        sys.exit(f"error: no trained model under {args.work}; run examples/libreoffice_help/run.py first")

    plain, recorded = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            plain.append(timed_run(generate_command(args.work, args.direction, args.beam)))
            recorded.append(timed_run(generate_command(args.work, args.direction, args.beam, Path(tmp) / f"{run}.json")))
            print(f"run {run + 1}/{args.runs}: plain {plain[-1][1]:.2f}s, recording {recorded[-1][1]:.2f}s (generation)",
                  flush=True)

    def median(runs: List[Tuple[float, float]], index: int) -> float:
        return statistics.median(r[index] for r in runs)

    print(f"\n{'':<28}{'without':>10}{'with':>10}{'ratio':>8}")
    for label, index in (("wall time, whole command", 0), ("generation time (fairseq)", 1)):
        without, with_ = median(plain, index), median(recorded, index)
        print(f"{label:<28}{without:>9.2f}s{with_:>9.2f}s{with_ / without:>8.3f}")
    print(f"ratio generation time with / without recording: {median(recorded, 1) / median(plain, 1):.3f}")


if __name__ == "__main__":
    main()
