#!/usr/bin/env python3
"""The main job, end to end on real text: LibreOffice help -> multilingual MoE -> pruning sweep -> report.

Steps (each is skipped when its output exists, so a rerun continues where it stopped):
  1. data      prepare_data.py: Debian packages -> aligned, split, SentencePiece, fairseq binaries
  2. train     fairseq-train: the plugin's MoE transformer, load-balancing loss, fixed number of updates
  3. record    fairseq-generate on dev with --moe-stats-out, every direction; stats merged into one file
  4. sweep     prune at 25..90% with importance/activity per language, importance global and random,
               translate test with every pruned checkpoint (fairseq-generate's steps, in process)
  5. report    sacrebleu chrF++ / BLEU per direction -> report.md and PNG plots

Example: python examples/libreoffice_help/run.py --preset default --work work/libreoffice_help
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
USER_DIR = HERE.parent.parent / "fairseq_moe_prune"
ENGLISH = "eng_Latn"
EIGHT = "deu_Latn,fra_Latn,rus_Cyrl,ell_Grek,fin_Latn,tur_Latn,jpn_Jpan,zho_Hans"

PRESETS: Dict[str, Dict[str, object]] = {
    # CI's shrunk run: the committed two-language sample, a few updates, a few sentences
    "ci": dict(langs="deu_Latn,fra_Latn", sample=True, vocab=1000, max_words=100, max_train=0, updates=30,
               max_tokens=2048, lr=0.003, dropout=0.1, dims=(32, 64, 2, 2), experts=32, dev_max=10, test_max=10,
               beam=1),
    # README's main command: 8 languages of 6 families and 5 scripts, under 20 minutes on 2 CPU cores. Tuned
    # for that budget: segments of up to 20 English words (headings, UI strings, short sentences), many small
    # batches at a high learning rate without dropout (the model is far from overfitting), greedy decoding
    "default": dict(langs=EIGHT, sample=False, vocab=8000, max_words=20, max_train=6000, updates=1000,
                    max_tokens=1024, lr=0.005, dropout=0.0, dims=(128, 512, 3, 4), experts=16, dev_max=100,
                    test_max=40, beam=1),
    # a better model on a bigger CPU machine (hours): all training data, a wider model
    "large": dict(langs=EIGHT, sample=False, vocab=16000, max_words=100, max_train=0, updates=6000,
                  max_tokens=8192, lr=0.003, dropout=0.1, dims=(256, 1024, 6, 4), experts=32, dev_max=500,
                  test_max=500, beam=4),
    # one GPU (about an hour on an H100): the large data, a wider model, more updates
    "gpu": dict(langs=EIGHT, sample=False, vocab=16000, max_words=100, max_train=0, updates=30000,
                max_tokens=16384, lr=0.003, dropout=0.1, dims=(512, 2048, 6, 8), experts=32, dev_max=1000,
                test_max=1000, beam=4),
}
# glibc returns big freed blocks to the OS at once; with these the training loop reuses them (~15% faster)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296",
              "MALLOC_TOP_PAD_": "268435456"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: Sequence[str], log_file: Path, progress: bool = False, env: Dict[str, str] | None = None) -> None:
    """Run a console script with its output in a log file; fail with the log's tail on error.
    With ``progress``, echo fairseq-train's latest update count and loss every 30 s."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as out:
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
        shown = None
        while process.poll() is None:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                found = re.findall(r"loss=([\d.]+).*num_updates=(\d+)", log_file.read_text()) if progress else []
                if found and found[-1] != shown:
                    shown = found[-1]
                    log(f"  ... {shown[1]} updates, loss {shown[0]}")
    if process.returncode != 0:
        tail = log_file.read_text().splitlines()[-15:]
        sys.exit(f"error: {command[0]} failed (exit {process.returncode}); see {log_file}:\n" + "\n".join(tail))


def directions(langs: str) -> List[str]:
    others = langs.split(",")
    return [f"{ENGLISH}-{x}" for x in others] + [f"{x}-{ENGLISH}" for x in others]


def task_args(data: Path, langs: str, task: str = "translation_multi_simple_epoch") -> List[str]:
    """NLLB's multilingual recipe: one model, language tokens on both sides."""
    return [
        str(data / "bin"), "--user-dir", str(USER_DIR), "--task", task,
        "--langs", ",".join([ENGLISH] + langs.split(",")), "--lang-pairs", ",".join(directions(langs)),
        "--encoder-langtok", "src", "--decoder-langtok",
    ]


def generation_args(subset: str, beam: int) -> List[str]:
    """NLLB's generation settings (beam 4 in its paper; greedy in the CPU presets, where the sweep's 21
    models x 16 directions of beam search would take most of the time), every sentence kept, output
    length bounded."""
    return ["--gen-subset", subset, "--beam", str(beam), "--max-len-a", "1.2", "--max-len-b", "10",
            "--max-tokens", "4000", "--required-batch-size-multiple", "1", "--remove-bpe", "sentencepiece",
            "--seed", "1"]


def prepare_data(work: Path, preset: Dict[str, object]) -> Path:
    data = work / "data"
    command = [sys.executable, str(HERE / "prepare_data.py"), "--out", str(data), "--langs", str(preset["langs"]),
               "--vocab-size", str(preset["vocab"]), "--test-max", str(preset["test_max"]),
               "--valid-max", str(preset["dev_max"]), "--max-words", str(preset["max_words"])]
    if preset["sample"]:
        command += ["--aligned-dir", str(HERE.parent.parent / "tests" / "data" / "libreoffice_help")]
    if preset["max_train"]:
        command += ["--max-train", str(preset["max_train"])]
    run(command, work / "logs" / "data.log")
    return data


def train(work: Path, data: Path, preset: Dict[str, object], model_dir: str = "model",
          extra_args: Sequence[str] = ()) -> Path:
    """fairseq-train to a fixed number of updates. An interrupted run resumes from its last saved
    checkpoint (fairseq's own --restore-file default); ``trained`` marks a finished one."""
    checkpoint, finished = work / model_dir / "checkpoint_last.pt", work / model_dir / "trained"
    if finished.exists():
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
         "--moe-gate-loss-wt", "0.01", "--dropout", str(preset["dropout"]),
         "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", str(preset["lr"]),
         "--lr-scheduler", "inverse_sqrt",
         "--warmup-updates", str(min(1000, int(preset["updates"]) // 4)), "--clip-norm", "1.0",
         "--max-tokens", str(preset["max_tokens"]), "--max-update", str(preset["updates"]), "--seed", "1",
         "--save-dir", str(checkpoint.parent), "--no-epoch-checkpoints", "--disable-validation",
         "--log-format", "simple", "--log-interval", "10", "--num-workers", "0", *extra_args],
        work / "logs" / f"train-{model_dir}.log" if extra_args else work / "logs" / "train.log",
        progress=True, env=MALLOC_ENV,
    )
    finished.touch()
    return checkpoint


def record(work: Path, data: Path, checkpoint: Path, langs: str, beam: int) -> Path:
    """Gate statistics of every direction on dev (the paper uses FLORES dev), merged into one file.
    Two fairseq-generate processes run side by side, one thread each."""
    merged = work / "stats.json"
    if merged.exists():
        return merged

    def one(direction: str) -> Path:
        src, tgt = direction.split("-")
        out = work / "stats" / f"{direction}.json"
        if not out.exists():
            run(["fairseq-generate", *task_args(data, langs, "translation_multi_simple_epoch_moe"),
                 "--path", str(checkpoint), "--source-lang", src, "--target-lang", tgt,
                 *generation_args("valid", beam),
                 "--moe-stats-out", str(out)],
                work / "logs" / f"record-{direction}.log", env={"OMP_NUM_THREADS": "1"})
        log(f"  recorded {direction}")
        return out

    with ThreadPoolExecutor(max_workers=2) as pool:
        files = list(pool.map(one, directions(langs)))
    run(["fairseq-moe-prune", "stats", "merge", str(merged), *map(str, files)], work / "logs" / "merge.log")
    return merged


def references(data: Path, direction: str) -> List[str]:
    src, tgt = direction.split("-")
    pair = f"{ENGLISH}-{tgt}" if src == ENGLISH else f"{ENGLISH}-{src}"
    return (data / "raw" / f"test.{pair}.{tgt}").read_text(encoding="utf-8").splitlines()


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


TASK_TRAIN_FLAGS = ["--moe-task-routing", "both", "--moe-task", "target", "--lang-tok-replacing-bos-eos"]


def task_moe_comparison(work: Path, data: Path, preset: Dict[str, object], checkpoint: Path, statistics: Path,
                        langs: str, beam: int, ratio: str) -> dict:
    """Train the task-level MoE (same data, updates and batch size as the token-MoE), extract its
    sub-networks and translate the test sets with four models side by side (task_moe.py)."""
    from task_moe import TaskComparison, summary

    task_checkpoint = train(work, data, preset, "task_model", TASK_TRAIN_FLAGS)
    log("  trained the task-MoE")
    comparison = TaskComparison(work / "task_moe", checkpoint, task_checkpoint, statistics,
                                [*task_args(data, langs), *generation_args("test", beam)], directions(langs),
                                lambda d: references(data, d), ratio, log)
    results = comparison.run()
    log("  " + summary(results))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("work/libreoffice_help"), help="output folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--ratio", default="1:1",
                        help="encoder:decoder experts per MoE layer (NLLB used 3:1 with 128 experts per layer; "
                             "with 16, 1:1 keeps the two experts top-2 routing needs in every layer longest)")
    args = parser.parse_args(argv)
    from fairseq_moe_prune.ranking import SelectionError, parse_ratio  # imports fairseq, as the sweep does later

    try:
        parse_ratio(args.ratio)  # now, not after training
    except SelectionError as error:
        parser.error(str(error))
    preset = PRESETS[args.preset]
    langs, beam = str(preset["langs"]), int(preset["beam"])
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}
    start = time.monotonic()

    def step(name: str, message: str) -> None:
        timings[name] = round(max(0.0, time.monotonic() - start - sum(timings.values())), 1)
        log(message)

    log(f"1/5 data: LibreOffice help, English <-> {langs}")
    data = prepare_data(work, preset)
    step("data", f"2/5 train: MoE transformer, {preset['experts']} experts in every 2nd layer, "
                 f"{preset['updates']} updates")
    checkpoint = train(work, data, preset)
    step("train", f"3/5 record: expert statistics on dev, {len(directions(langs))} directions")
    statistics = record(work, data, checkpoint, langs, beam)
    step("record", "4/5 sweep: prune, translate test, score")

    from report import write_report  # matplotlib and fairseq load only now
    from sweep import LEVELS, METHODS, Sweep, quiet

    quiet()

    generate_args = [*task_args(data, langs), *generation_args("test", beam)]
    sweep = Sweep(work / "sweep", checkpoint, statistics, generate_args,
                  directions(langs), lambda d: references(data, d), args.ratio, log)
    results = sweep.run()
    step("sweep", f"4b/5 task-MoE: routed by source (encoder) and target language (decoder), same data and "
                  f"{preset['updates']} updates; sub-networks extracted, four models translate side by side")
    task_results = task_moe_comparison(work, data, preset, checkpoint, statistics, langs, beam, args.ratio)
    step("task", "5/5 report")
    train_pairs = sum(line_count(data / "raw" / f"train.{ENGLISH}-{x}.{ENGLISH}") for x in langs.split(","))
    test_sentences = line_count(data / "raw" / f"test.{ENGLISH}-{langs.split(',')[0]}.{ENGLISH}")
    dim, ffn, layers, heads = preset["dims"]  # type: ignore[misc]
    decoding = "greedy search" if beam == 1 else f"beam {beam}"
    setup = [
        f"- Data: LibreOffice help (Debian packages, MPL-2.0), English <-> {langs.replace(',', ', ')}: "
        f"{len(directions(langs))} directions, {train_pairs} training pairs (each used in both directions), "
        f"{test_sentences} test sentences per direction; split by English source string.",
        f"- Model: {layers}+{layers} layers, d_model {dim}, FFN {ffn}, {preset['experts']} experts (top-2, NLLB "
        f"gating) in every 2nd layer; {preset['updates']} updates of up to {preset['max_tokens']} tokens.",
        f"- Statistics: fairseq-generate with --moe-stats-out on dev ({preset['dev_max']} sentences per direction, "
        "decoder over the hypotheses), merged.",
        f"- Pruning: fixed number of experts per layer, encoder:decoder ratio {args.ratio}; levels "
        f"{', '.join(f'{level:.0%}' for level in LEVELS)}; methods {', '.join(m.name for m in METHODS)}.",
        f"- Translation: {decoding}, the same settings for every model; chrF++ and BLEU by sacrebleu "
        "(BLEU tokenizer zh for Chinese, char for Japanese, 13a otherwise).",
        f"- Preset `{args.preset}`; time per step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
    ]
    setup.append(f"- Task-MoE: the same recipe with {' '.join(TASK_TRAIN_FLAGS)}; its sub-network per direction "
                 "extracted with `fairseq-moe-prune extract` (a plain dense `transformer`); the token-MoE pruned per "
                 "language to 2 experts per MoE layer (importance) for the same number of parameters.")
    report = write_report(work / "sweep", results, statistics, setup, task_moe=task_results)
    step("report", f"report: {report}")
    (work / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    log(f"done in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
