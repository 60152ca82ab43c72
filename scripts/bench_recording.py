#!/usr/bin/env python3
"""What does recording gate decisions cost? fairseq-generate with and without --moe-stats-out.

Runs the two commands alternately on the same model and data (so drift in machine load hits both
alike) and prints the median wall time of each, the median of fairseq's own generation time
("Translated N sentences (T tokens) ... in X s", taken to five digits as T / tokens per second), and
their ratios.

On a shared machine one run's speed differs from the next by 10-20%, more than the cost being measured,
so the recorded runs also time recording's own work inside the same process (the run's timing wrapper
adds it up: the teacher-forced decoder pass, the observers of the encoder's MoE layers, committing the
counts and rewriting the statistics file); generation time minus that work is what the same run would
have taken without recording. The headline ratio, on its own line, is the median over the recorded runs of

    ratio generation time with / without recording, own work timed inside each recorded run: X

and the separate-runs ratio is printed on a line of its own beside it.

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


# fairseq-generate as its console script runs it, recording's own work timed in the same process: each
# function that exists only for recording is wrapped with a clock (observers only outside the decoder pass,
# whose time already includes theirs), and the sum is printed at exit.
TIMED_GENERATE = """
import atexit, sys, time
from fairseq_moe_prune import recording
from fairseq_moe_prune.tasks import recording_hook
own = {"seconds": 0.0, "in_pass": False}

def timed(function, is_pass=False):
    def wrapper(*args, **kwargs):
        if own["in_pass"]:
            return function(*args, **kwargs)
        own["in_pass"] = is_pass
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            own["seconds"] += time.perf_counter() - start
            own["in_pass"] = False
    return wrapper

def timed_observer(make_observer):
    def wrapper(self, index):
        return timed(make_observer(self, index))
    return wrapper

mixin = recording_hook.GateRecordingMixin
mixin.decoder_pass = timed(mixin.decoder_pass, is_pass=True)
mixin.decoder_inputs = timed(mixin.decoder_inputs)
mixin.encoder_out = staticmethod(timed(mixin.encoder_out))
recording.Recorder.commit = timed(recording.Recorder.commit)
recording.Recorder._observer = timed_observer(recording.Recorder._observer)
recording_hook.StatsWriter.maybe_write = timed(recording_hook.StatsWriter.maybe_write)
atexit.register(lambda: print("RECORDING_SECONDS", own["seconds"], file=sys.stderr))
from fairseq_cli.generate import cli_main
sys.argv[0] = "fairseq-generate"
cli_main()
"""


def timed_run(command: List[str], own_work_timed: bool = False) -> Tuple[float, float, float]:
    """(wall seconds of the whole command, seconds fairseq reports for generation, seconds of recording's own
    work in it: 0 unless ``own_work_timed``)."""
    if own_work_timed:
        command = [sys.executable, "-c", TIMED_GENERATE, *command[1:]]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"error: fairseq-generate failed:\n{result.stderr[-2000:]}")
    output = result.stdout + result.stderr
    match = re.search(r"Translated [\d,]+ sentences \(([\d,]+) tokens\) in [\d.]+s "
                      r"\([\d.]+ sentences/s, ([\d.]+) tokens/s\)", output)
    if not match:
        sys.exit("error: could not find fairseq-generate's timing line")
    generation = int(match.group(1).replace(",", "")) / float(match.group(2))  # 5 digits, not fairseq's 0.1 s
    own = re.search(r"RECORDING_SECONDS ([\d.e-]+)", output)
    if own_work_timed and not own:
        sys.exit("error: the timed fairseq-generate printed no RECORDING_SECONDS line")
    return wall, generation, float(own.group(1)) if own else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "work" / "libreoffice_help", help="main job folder")
    parser.add_argument("--direction", default="eng_Latn-deu_Latn")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--runs", type=int, default=7, help="runs of each command, alternating")
    args = parser.parse_args()
    if not (args.work / "model" / "checkpoint_last.pt").exists():
        sys.exit(f"error: no trained model under {args.work}; run examples/libreoffice_help/run.py first")

    plain, recorded = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            plain.append(timed_run(generate_command(args.work, args.direction, args.beam)))
            recorded.append(timed_run(generate_command(args.work, args.direction, args.beam, Path(tmp) / f"{run}.json"),
                                      own_work_timed=True))
            _, generation, own = recorded[-1]
            print(f"run {run + 1}/{args.runs}: generation without recording {plain[-1][1]:.3f}s, with {generation:.3f}s "
                  f"(recording's own work {own:.3f}s of it: {generation / (generation - own):.4f}x)", flush=True)

    def median(runs: List[Tuple[float, float, float]], index: int) -> float:
        return statistics.median(r[index] for r in runs)

    print(f"\n{'':<28}{'without':>10}{'with':>10}{'ratio':>8}")
    for label, index in (("wall time, whole command", 0), ("generation time (fairseq)", 1)):
        without, with_ = median(plain, index), median(recorded, index)
        print(f"{label:<28}{without:>9.3f}s{with_:>9.3f}s{with_ / without:>8.3f}")
    spread = (max(r[1] for r in plain) - min(r[1] for r in plain)) / median(plain, 1)
    inside = statistics.median(generation / (generation - own) for _, generation, own in recorded)
    print(f"recording's own work inside the recorded runs: median {median(recorded, 2):.3f}s of {median(recorded, 1):.3f}s")
    print(f"ratio generation time with / without recording, separate runs (runs without recording spread over "
          f"{100 * spread:.0f}% of their median): {median(recorded, 1) / median(plain, 1):.3f}")
    print(f"ratio generation time with / without recording, own work timed inside each recorded run: {inside:.4f}")


if __name__ == "__main__":
    main()
