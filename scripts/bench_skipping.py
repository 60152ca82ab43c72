#!/usr/bin/env python3
"""What does dynamic expert skipping buy? fairseq-generate with the second expert skipped / not skipped.

Takes a model and calibration samples (``fairseq-generate --moe-calibration-out``), writes a copy of
the model with every expert kept and per-layer betas = the median w2/w1 of the calibration tokens
(``fairseq-moe-prune prune --prune-fraction 0 --skip-beta median``), then runs stock fairseq-generate
on the same data alternately with skipping on (the checkpoint's config) and off (``--model-overrides
"{'moe_skip_betas': None}"``), and prints the median generation tokens/s of each, their ratio, and
the chrF++ of each.

Example (after the main job): python scripts/bench_skipping.py --work work/libreoffice_help
Example (any model): python scripts/bench_skipping.py --checkpoint M.pt --data DATA/bin --calibration CAL
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench_recording import language_flags  # noqa: E402  (validated --langs / --lang-pairs)

from fairseq_moe_prune import USER_DIR  # noqa: E402
from fairseq_moe_prune.stats import split_pair  # noqa: E402


def generate_command(data: Path, checkpoint: Path, direction: str, beam: int, skipping: bool) -> List[str]:
    source, target = split_pair(direction)
    command = [
        "fairseq-generate", str(data), "--user-dir", USER_DIR,
        "--task", "translation_multi_simple_epoch",
        *language_flags(data),
        "--encoder-langtok", "src", "--decoder-langtok", "--source-lang", source, "--target-lang", target,
        "--path", str(checkpoint), "--gen-subset", "test", "--beam", str(beam), "--max-len-a", "1.2",
        "--max-len-b", "10", "--max-tokens", "4000", "--required-batch-size-multiple", "1",
        "--remove-bpe", "sentencepiece", "--seed", "1",
    ]
    if not skipping:
        command += ["--model-overrides", "{'moe_skip_betas': None}"]
    return command


def timed_run(command: List[str]) -> Tuple[float, float, List[str], List[str]]:
    """(tokens/s and sentences/s fairseq reports, detokenized hypotheses, references)."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: fairseq-generate failed:\n{result.stderr[-2000:]}")
    output = result.stdout + result.stderr
    match = re.search(r"Translated [\d,]+ sentences \([\d,]+ tokens\) in [\d.]+s \(([\d.]+) sentences/s, "
                      r"([\d.]+) tokens/s\)", output)
    if not match:
        sys.exit("error: could not find fairseq-generate's timing line")
    hypotheses, references = {}, {}
    for line in result.stdout.splitlines():
        found = re.match(r"^([DT])-(\d+)\t(?:[^\t]*\t)?(.*)$", line)
        if found:
            (hypotheses if found.group(1) == "D" else references)[int(found.group(2))] = found.group(3)
    ids = sorted(references)
    return float(match.group(2)), float(match.group(1)), [hypotheses[i] for i in ids], [references[i] for i in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="main job folder (model/, data/bin, calibration/)")
    parser.add_argument("--checkpoint", type=Path, help="the model (default: WORK/model/checkpoint_last.pt)")
    parser.add_argument("--data", type=Path, help="binarized data with langs.txt (default: WORK/data/bin)")
    parser.add_argument("--calibration", type=Path, help="calibration samples (default: WORK/calibration)")
    parser.add_argument("--direction", default="eng_Latn-deu_Latn")
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5, help="runs of each setting, alternating")
    args = parser.parse_args()
    work = args.work or REPO / "work" / "libreoffice_help"
    checkpoint = args.checkpoint or work / "model" / "checkpoint_last.pt"
    data = args.data or work / "data" / "bin"
    calibration = args.calibration or work / "calibration"
    for path in (checkpoint, data, calibration):
        if not path.exists():
            sys.exit(f"error: {path} does not exist (run the main job, or give --checkpoint, --data, --calibration)")

    # start-up speed: after the arguments and paths are checked, so a mistake costs no torch import
    import sacrebleu

    from fairseq_moe_prune.pruning import PruneOptions, prune

    on, off = [], []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = prune(str(checkpoint), str(Path(tmp) / "skipping"),
                         PruneOptions(metric="reconstruction", granularity="pair", prune_fraction=0.0,
                                      directions=[args.direction], skip_beta="median"),
                         calibration_path=str(calibration))
        output = manifest["outputs"][args.direction]
        skipping = Path(tmp) / "skipping" / output["files"][0]
        print(f"betas (median w2/w1 of the calibration tokens of {args.direction}): {output['skip_betas']}")
        for run in range(args.runs):
            on.append(timed_run(generate_command(data, skipping, args.direction, args.beam, True)))
            off.append(timed_run(generate_command(data, skipping, args.direction, args.beam, False)))
            print(f"run {run + 1}/{args.runs}: skipping {on[-1][0]:.1f} tokens/s, no skipping {off[-1][0]:.1f} "
                  "tokens/s", flush=True)

    def chrf(runs) -> float:
        return sacrebleu.corpus_chrf(runs[0][2], [runs[0][3]], word_order=2).score

    tokens_on, tokens_off = statistics.median(r[0] for r in on), statistics.median(r[0] for r in off)
    print(f"\n{'':<34}{'skipping':>10}{'none':>10}")
    print(f"{'generation tokens/s (median)':<34}{tokens_on:>10.1f}{tokens_off:>10.1f}")
    print(f"{'sentences/s (median)':<34}{statistics.median(r[1] for r in on):>10.2f}"
          f"{statistics.median(r[1] for r in off):>10.2f}")
    print(f"{'chrF++':<34}{chrf(on):>10.2f}{chrf(off):>10.2f}")
    print(f"skipping speed-up, generation tokens/s with / without skipping: {tokens_on / tokens_off:.3f}")


if __name__ == "__main__":
    main()
