#!/usr/bin/env python3
"""The main job, end to end on real text: LibreOffice help -> tiny multilingual MoE -> BLEU/chrF++.

Steps (each is skipped when its output exists, so a rerun continues where it stopped):
  1. data       prepare_data.py: Debian packages -> aligned, split, SentencePiece, fairseq binaries
  2. train      fairseq-train with the plugin's MoE transformer and load-balancing criterion
  3. translate  fairseq-generate on the test set of every direction (every sentence is kept)
  4. score      sacrebleu BLEU and chrF++ per direction against the raw references

Example: python examples/libreoffice_help/run.py --work work/libreoffice_help
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import sacrebleu

HERE = Path(__file__).resolve().parent
USER_DIR = HERE.parent.parent / "fairseq_moe_prune"
ENGLISH = "eng_Latn"

PRESETS: Dict[str, Dict[str, object]] = {
    # a shrunk run for CI: the committed sample of two languages, a few updates
    "ci": dict(langs="deu_Latn,fra_Latn", sample=True, vocab=1000, max_train=0, updates=40,
               dims=(32, 64, 2, 2), experts=4, test_max=40),
    # README's main command: about 10 minutes on 2 CPU cores
    "default": dict(langs="deu_Latn,fra_Latn", sample=False, vocab=4000, max_train=12000, updates=600,
                    dims=(128, 256, 3, 4), experts=8, test_max=200),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: Sequence[str], log_file: Path) -> None:
    """Run a console script, its output to a log file; fail with the log's tail on error."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as out:
        result = subprocess.run(list(command), stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log_file.read_text().splitlines()[-15:]
        sys.exit(f"error: {command[0]} failed (exit {result.returncode}); see {log_file}:\n" + "\n".join(tail))


def directions(langs: str) -> List[str]:
    others = langs.split(",")
    return [f"{ENGLISH}-{x}" for x in others] + [f"{x}-{ENGLISH}" for x in others]


def task_args(data: Path, langs: str) -> List[str]:
    """NLLB's multilingual recipe: one model, language tokens on both sides."""
    return [
        str(data / "bin"), "--user-dir", str(USER_DIR), "--task", "translation_multi_simple_epoch",
        "--langs", ",".join([ENGLISH] + langs.split(",")), "--lang-pairs", ",".join(directions(langs)),
        "--encoder-langtok", "src", "--decoder-langtok",
    ]


def prepare_data(work: Path, preset: Dict[str, object]) -> Path:
    data = work / "data"
    command = [sys.executable, str(HERE / "prepare_data.py"), "--out", str(data), "--langs", str(preset["langs"]),
               "--vocab-size", str(preset["vocab"]), "--test-max", str(preset["test_max"])]
    if preset["sample"]:
        command += ["--aligned-dir", str(HERE.parent.parent / "tests" / "data" / "libreoffice_help")]
    if preset["max_train"]:
        command += ["--max-train", str(preset["max_train"])]
    run(command, work / "logs" / "data.log")
    return data


def train(work: Path, data: Path, preset: Dict[str, object]) -> Path:
    checkpoint = work / "model" / "checkpoint_last.pt"
    if checkpoint.exists():
        return checkpoint
    dim, ffn, layers, heads = preset["dims"]  # type: ignore[misc]
    run(
        ["fairseq-train", *task_args(data, str(preset["langs"])),
         "--sampling-method", "temperature", "--sampling-temperature", "1.5",
         "--arch", "moe_transformer", "--share-all-embeddings",
         "--encoder-embed-dim", str(dim), "--encoder-ffn-embed-dim", str(ffn), "--encoder-layers", str(layers),
         "--decoder-layers", str(layers), "--encoder-attention-heads", str(heads),
         "--decoder-attention-heads", str(heads), "--encoder-normalize-before", "--decoder-normalize-before",
         "--moe-freq", "2", "--moe-expert-count", str(preset["experts"]), "--moe-gating-use-fp32",
         "--moe-second-expert-policy", "all", "--moe-eval-capacity-token-fraction", "1.0",
         "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
         "--moe-gate-loss-wt", "0.01", "--dropout", "0.1",
         "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "0.002", "--lr-scheduler", "inverse_sqrt",
         "--warmup-updates", str(min(400, int(preset["updates"]) // 4)), "--clip-norm", "1.0",
         "--max-tokens", "4096", "--max-update", str(preset["updates"]), "--seed", "1",
         "--save-dir", str(checkpoint.parent), "--no-epoch-checkpoints", "--disable-validation",
         "--log-format", "simple", "--log-interval", "50", "--num-workers", "0"],
        work / "logs" / "train.log",
    )
    return checkpoint


def translate(work: Path, data: Path, checkpoint: Path, langs: str, direction: str) -> List[str]:
    """Hypotheses for the test set of one direction, in input order, detokenized."""
    src, tgt = direction.split("-")
    out_dir = work / "translations" / direction
    result = out_dir / "generate-test.txt"
    if not result.exists():
        run(["fairseq-generate", *task_args(data, langs), "--path", str(checkpoint),
             "--source-lang", src, "--target-lang", tgt, "--gen-subset", "test", "--beam", "4",
             "--max-tokens", "4000", "--required-batch-size-multiple", "1", "--remove-bpe", "sentencepiece",
             "--results-path", str(out_dir), "--seed", "1"],
            work / "logs" / f"generate-{direction}.log")
    hypotheses: Dict[int, str] = {}
    for line in result.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^D-(\d+)\t[^\t]*\t(.*)$", line)
        if match:
            hypotheses[int(match.group(1))] = match.group(2)
    return [hypotheses[i] for i in range(len(hypotheses))]


def references(data: Path, direction: str) -> List[str]:
    src, tgt = direction.split("-")
    pair = f"{ENGLISH}-{tgt}" if src == ENGLISH else f"{ENGLISH}-{src}"
    return (data / "raw" / f"test.{pair}.{tgt}").read_text(encoding="utf-8").splitlines()


def score(hypotheses: List[str], refs: List[str]) -> Dict[str, float]:
    if len(hypotheses) != len(refs):
        sys.exit(f"error: {len(hypotheses)} hypotheses for {len(refs)} references: sentences were lost")
    return {
        "bleu": round(sacrebleu.corpus_bleu(hypotheses, [refs]).score, 2),
        "chrf++": round(sacrebleu.corpus_chrf(hypotheses, [refs], word_order=2).score, 2),
        "sentences": len(refs),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("work/libreoffice_help"), help="output folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    log(f"1/4 data: LibreOffice help, English <-> {preset['langs']}")
    data = prepare_data(work, preset)
    log(f"2/4 train: MoE transformer, {preset['experts']} experts every 2nd layer, {preset['updates']} updates")
    checkpoint = train(work, data, preset)
    results = {}
    for i, direction in enumerate(directions(str(preset["langs"])), 1):
        log(f"3/4 translate {direction} ({i}/{len(directions(str(preset['langs'])))})")
        hypotheses = translate(work, data, checkpoint, str(preset["langs"]), direction)
        results[direction] = score(hypotheses, references(data, direction))
    log("4/4 scores (sacrebleu, test set)")
    print(f"{'direction':<20} {'BLEU':>6} {'chrF++':>7} {'sentences':>9}")
    for direction, result in results.items():
        print(f"{direction:<20} {result['bleu']:>6} {result['chrf++']:>7} {result['sentences']:>9}")
    (work / "scores.json").write_text(json.dumps(results, indent=1) + "\n")
    log(f"scores written to {work / 'scores.json'}")


if __name__ == "__main__":
    main()
