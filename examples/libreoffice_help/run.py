#!/usr/bin/env python3
"""The main job, end to end on real text: LibreOffice help -> multilingual MoE -> pruning sweep -> report.

Steps (each is skipped when its output exists, so a rerun continues where it stopped):
  1. data      prepare_data.py: Debian packages -> aligned, split, SentencePiece, fairseq binaries
  2. train     fairseq-train: the plugin's MoE transformer, load-balancing loss, fixed number of updates
  3. record    fairseq-generate on dev with --moe-stats-out, every direction; stats merged into one file;
               calibration samples (--moe-calibration-out) of the same tokens
  4. sweep     prune at 25..90% with importance/activity per language, importance global and random,
               reconstruction loss per language; translate test with every pruned checkpoint
               (fairseq-generate's steps, in process); dynamic skipping on/off at 0, 50 and 80%
  5. report    sacrebleu chrF++ / BLEU per direction -> report.md and PNG plots

Example: python examples/libreoffice_help/run.py --preset default --work work/libreoffice_help
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Sequence

from fairseq_moe_prune import USER_DIR
from fairseq_moe_prune.stats import split_pair

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from prepare_data import DEBIAN_SUFFIX  # noqa: E402  (this folder, just put on the path)
ENGLISH = "eng_Latn"
EIGHT = "deu_Latn,fra_Latn,rus_Cyrl,ell_Grek,fin_Latn,tur_Latn,jpn_Jpan,zho_Hans"
FOUR = "deu_Latn,fra_Latn,rus_Cyrl,ell_Grek"  # 3 scripts: Latin, Cyrillic, Greek

PRESETS: Dict[str, Dict[str, object]] = {
    # CI's shrunk run: the committed two-language sample, a few updates, a few sentences
    "ci": dict(langs="deu_Latn,fra_Latn", sample=True, vocab=1000, max_words=100, max_train=0, updates=30,
               max_tokens=2048, lr=0.003, dropout=0.1, dims=(32, 64, 2, 2), experts=32, dev_max=10, test_max=10,
               beam=1),
    # README's main command, within 30 minutes on 2 CPU cores with the install. A model that translates
    # (a budget of 1,000 updates on 6,000 pairs per language did not: chrF++ 8.8) needs all the data and about
    # 13 minutes of training, so: the evidence run's 4 languages of 3 scripts (twice the training per direction
    # of 8 languages in the same time), both models trained side by side on one core each for 13 minutes, segments
    # of up to 20 English words (headings, UI strings, short sentences), many small batches at a high learning
    # rate without dropout (the model is far from overfitting), greedy decoding of 100 test sentences
    "default": dict(langs=FOUR, sample=False, vocab=8000, max_words=20, max_train=0, updates=1000000,
                    max_tokens=1024, lr=0.005, dropout=0.0, dims=(128, 512, 3, 4), experts=16, dev_max=100,
                    test_max=100, beam=1, train_minutes=13.0, warmup=400, loader_workers=0, side_by_side=True),
    # a better model on a bigger CPU machine (hours): all training data, a wider model
    "large": dict(langs=EIGHT, sample=False, vocab=16000, max_words=100, max_train=0, updates=6000,
                  max_tokens=8192, lr=0.003, dropout=0.1, dims=(256, 1024, 6, 4), experts=32, dev_max=500,
                  test_max=500, beam=4),
    # one H100, the whole job in one command of under 9 minutes (scripts/gpu_main_job.sh): all training
    # segments of up to 50 English words (193k pairs), a transformer-base-sized MoE in fp16 trained for 3.5
    # minutes of training time (updates is only a ceiling; about 2 epochs expected), a short warmup for that
    # short run, beam 4 on 250 test sentences per direction, six translating processes sharing the GPU. The
    # task-MoE's second training does not fit the 9 minutes beside it: --set task_moe=true --set
    # train_minutes=1.5 gives both models half the time
    "gpu": dict(langs=EIGHT, sample=False, vocab=16000, max_words=50, max_train=0, updates=50000,
                max_tokens=16384, lr=0.002, dropout=0.0, dims=(512, 1024, 6, 8), experts=16, dev_max=200,
                test_max=250, beam=4, train_minutes=3.5, warmup=400, fp16=True, workers=6, gen_max_tokens=16000,
                task_moe=False),
    # the evidence run (issue 23), whole in about 2 hours on 2 CPU cores: a token-MoE that translates, and the
    # task-MoE beside it on the same data, shape and budget. Why each choice:
    # - 4 languages of 3 scripts (Latin, Cyrillic, Greek), both directions: the fewest the comparison needs,
    #   so each direction gets twice the training the 8-language presets give it in the same time;
    # - segments of up to 25 English words: most of the help's sentences, short enough for many updates;
    # - d_model 256, expert FFN 1024 (4 x d_model), 16 experts in every 2nd layer of 4+4: the experts are large
    #   enough that the MoE layers dominate a decoding step, as in NLLB (the speed effects can show);
    # - both models train at once, one core each (one thread scales better than two threads on one model), for
    #   the same wall-clock budget of 60 minutes: about 0.85 updates/s each, so about 3,000 updates, 2 epochs;
    # - so every update counts: batches of 1,536 tokens, a short warmup (400 updates, 8 minutes) at a high
    #   learning rate, no dropout (2 epochs do not overfit; label smoothing stays);
    # - checkpoints every `curve_updates` updates give the learning curve (chrF++ against training minutes);
    # - beam 4 on 200 test sentences per direction, as the issue asks; the sweep's levels only those it names
    "evidence": dict(langs=FOUR, sample=False, vocab=8000, max_words=25,
                     max_train=0, updates=1000000, max_tokens=1536, lr=0.003, dropout=0.0, dims=(256, 1024, 4, 4),
                     experts=16, dev_max=300, test_max=200, beam=4, train_minutes=60.0, warmup=400,
                     loader_workers=0, side_by_side=True, levels="0.5,0.75,0.8,0.9", curve_updates=500,
                     evidence=True),
}
# settings that only some presets change; the others run with these
DEFAULT_SETTINGS: Dict[str, object] = dict(
    train_minutes=0.0,  # > 0: fairseq-train stops after this much training time (--stop-time-hours)
    warmup=0,  # learning-rate warmup updates; 0: a quarter of the updates, at most 1000
    fp16=False,  # fairseq's --fp16 in training and translation (a GPU's tensor cores)
    workers=2,  # fairseq-generate processes side by side in the record step, translating processes in the sweep
    gen_max_tokens=4000,  # tokens per translation batch
    levels="",  # the sweep's pruning levels, e.g. "0.5,0.8"; empty: all of sweep.LEVELS
    task_moe=True,  # train the task-level MoE too and compare it (step 4b)
    side_by_side=False,  # train the token- and task-MoE at once, one thread each (step 2), instead of one by one
    loader_workers=4,  # fairseq-train's --num-workers under a time budget (a GPU must not wait for batches)
    curve_updates=0,  # > 0: keep a checkpoint every this many updates and score them (the learning curve)
    evidence=False,  # the evidence run's extra comparisons: calibration of 2,048 tokens and held-out losses,
    # a remedy for into-English (experts every language shares)
)
CURVE_POINTS = 5  # learning-curve checkpoints scored besides the final model
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


def generation_args(subset: str, beam: int, max_tokens: int = 4000) -> List[str]:
    """NLLB's generation settings (beam 4 in its paper; greedy in the CPU presets, where the sweep's 21
    models x 16 directions of beam search would take most of the time), every sentence kept, output
    length bounded."""
    return ["--gen-subset", subset, "--beam", str(beam), "--max-len-a", "1.2", "--max-len-b", "10",
            "--max-tokens", str(max_tokens), "--required-batch-size-multiple", "1", "--remove-bpe", "sentencepiece",
            "--seed", "1"]


def setting(preset: Dict[str, object], key: str) -> object:
    return preset.get(key, DEFAULT_SETTINGS[key])


def warmup_updates(preset: Dict[str, object]) -> int:
    return int(setting(preset, "warmup")) or min(1000, int(preset["updates"]) // 4)  # type: ignore[call-overload]


def device_args(preset: Dict[str, object], cpu: bool) -> List[str]:
    """fairseq's device flags, for training and translation alike: --cpu, or fp16 where the preset asks."""
    if cpu:
        return ["--cpu"]
    return ["--fp16"] if setting(preset, "fp16") else []


def training_time_args(preset: Dict[str, object]) -> List[str]:
    """A training budget in wall time (the GPU preset's), on top of the preset's ceiling of updates; data
    loading in worker processes so the GPU does not wait for batches; checkpoints without the optimizer's
    state, three times the model's size, which the statistics and the sweep would read 37 times (a resumed
    run starts a fresh optimizer)."""
    minutes = float(setting(preset, "train_minutes"))  # type: ignore[arg-type]
    curve = int(setting(preset, "curve_updates"))  # type: ignore[call-overload]
    kept = ["--save-interval-updates", str(curve), "--keep-interval-updates", "-1"] if curve > 0 else []
    if minutes <= 0:
        return kept
    return ["--stop-time-hours", f"{minutes / 60:.6f}", "--num-workers", str(setting(preset, "loader_workers")),
            "--no-save-optimizer-state", *kept]


def sweep_levels(preset: Dict[str, object]) -> List[float]:
    """The levels setting as fractions (empty: the sweep's own)."""
    text = str(setting(preset, "levels"))
    try:
        levels = [float(part) for part in text.split(",")] if text else []
    except ValueError:
        levels = [-1.0]
    if any(not 0 < level < 1 for level in levels):
        raise ValueError(f"--set levels takes fractions between 0 and 1 separated by commas, got {text!r}")
    return levels


def apply_overrides(preset: Dict[str, object], assignments: Sequence[str]) -> Dict[str, object]:
    """``KEY=VALUE`` (run.py --set) replaces a scalar setting of the preset, typed as the preset's own."""
    preset = dict(preset)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        current = preset.get(key, DEFAULT_SETTINGS.get(key))
        if not sep or current is None or isinstance(current, tuple):
            raise ValueError(f"--set takes KEY=VALUE with KEY one of "
                             f"{', '.join(sorted(k for k, v in {**DEFAULT_SETTINGS, **preset}.items() if not isinstance(v, tuple)))}"
                             f"; got {assignment!r}")
        try:
            if isinstance(current, bool):
                if text not in ("true", "false"):
                    raise ValueError(text)
                preset[key] = text == "true"
            else:
                preset[key] = type(current)(text)
        except ValueError:
            kind = {bool: "true or false", int: "a whole number", float: "a number"}.get(type(current), "text")
            raise ValueError(f"--set {key} takes {kind}, got {text!r}") from None
    return preset


def prepare_data(work: Path, preset: Dict[str, object]) -> Path:
    data = work / "data"
    command = [sys.executable, str(HERE / "prepare_data.py"), "--out", str(data), "--langs", str(preset["langs"]),
               "--vocab-size", str(preset["vocab"]), "--test-max", str(preset["test_max"]),
               "--valid-max", str(preset["dev_max"]), "--max-words", str(preset["max_words"])]
    if preset["sample"]:
        command += ["--aligned-dir", str(HERE.parent.parent / "tests" / "data" / "libreoffice_help")]
    if preset["max_train"]:
        command += ["--max-train", str(preset["max_train"])]
    marker = data / "prepared.json"  # the settings of a finished preparation (data carried to a GPU machine)
    settings = json.dumps(command[4:], indent=1) + "\n"
    if marker.exists() and marker.read_text() == settings:
        log("  prepared data found, with the same settings")
        return data
    run(command, work / "logs" / "data.log")
    marker.write_text(settings)
    return data


def train(work: Path, data: Path, preset: Dict[str, object], model_dir: str = "model",
          extra_args: Sequence[str] = (), device: Sequence[str] = (), threads: int = 0) -> Path:
    """fairseq-train to a fixed number of updates. An interrupted run resumes from its last saved
    checkpoint (fairseq's own --restore-file default); ``trained`` marks a finished one. ``threads`` > 0
    sets torch's intra-op threads (OMP_NUM_THREADS)."""
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
         "--warmup-updates", str(warmup_updates(preset)), "--clip-norm", "1.0",
         "--max-tokens", str(preset["max_tokens"]), "--max-update", str(preset["updates"]), "--seed", "1",
         "--save-dir", str(checkpoint.parent), "--no-epoch-checkpoints", "--disable-validation",
         "--log-format", "simple", "--log-interval", "10", "--num-workers", "0", *extra_args,
         *device, *training_time_args(preset)],
        work / "logs" / f"train-{model_dir}.log" if extra_args else work / "logs" / "train.log",
        progress=True, env={**MALLOC_ENV, **({"OMP_NUM_THREADS": str(threads)} if threads else {})},
    )
    finished.touch()
    return checkpoint


def record(work: Path, data: Path, checkpoint: Path, langs: str, beam: int, workers: int = 2,
           extra_args: Sequence[str] = ()) -> Path:
    """Gate statistics of every direction on dev (the paper uses FLORES dev), merged into one file, and
    calibration samples of the same tokens. Two fairseq-generate processes run side by side, one thread each."""
    merged = work / "stats.json"
    if not merged.exists():
        record_every_direction(work, data, checkpoint, langs, beam, workers, extra_args, "record", "valid",
                               CALIBRATION_TOKENS, work / "calibration", statistics=work / "stats")
        files = [work / "stats" / f"{direction}.json" for direction in directions(langs)]
        run(["fairseq-moe-prune", "stats", "merge", str(merged), *map(str, files)], work / "logs" / "merge.log")
    return merged


CALIBRATION_TOKENS = 256  # per MoE layer and direction: enough for 16 experts, cheap to search
LARGE_CALIBRATION = 2048  # the evidence run's second size (Lu et al. use far more tokens, on 8 experts)


def record_every_direction(work: Path, data: Path, checkpoint: Path, langs: str, beam: int, workers: int,
                           extra_args: Sequence[str], name: str, subset: str, tokens: int, calibration: Path,
                           statistics: Path | None = None) -> None:
    """fairseq-generate on ``subset`` of every direction with --moe-calibration-out (and --moe-stats-out into
    ``statistics``): calibration samples of the MoE layers' inputs and outputs, taken in the same runs as the
    statistics, over the same tokens. Each run writes into a folder of its own that joins ``calibration``
    only when the run succeeded, so an interrupted step reruns just its unfinished directions."""
    calibration.mkdir(parents=True, exist_ok=True)

    def one(direction: str) -> None:
        src, tgt = split_pair(direction)
        done, parts = work / "logs" / f"{name}-{direction}.done", work / f"{calibration.name}.parts" / direction
        if not done.exists():
            shutil.rmtree(parts, ignore_errors=True)  # an interrupted run's
            parts.mkdir(parents=True)
            recording = ["--moe-calibration-out", str(parts), "--moe-calibration-tokens", str(tokens)]
            if statistics is not None:
                statistics.mkdir(parents=True, exist_ok=True)
                (statistics / f"{direction}.json").unlink(missing_ok=True)
                recording += ["--moe-stats-out", str(statistics / f"{direction}.json")]
            run(["fairseq-generate", *task_args(data, langs, "translation_multi_simple_epoch_moe"),
                 "--path", str(checkpoint), "--source-lang", src, "--target-lang", tgt,
                 *generation_args(subset, beam), *extra_args, *recording],
                work / "logs" / f"{name}-{direction}.log", env={"OMP_NUM_THREADS": "1"})
            for file in sorted(parts.iterdir()):
                os.replace(file, calibration / file.name)
            parts.rmdir()
            done.touch()
        log(f"  {name}: {direction}")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, directions(langs)))


def test_side(data: Path, direction: str, side: int) -> List[str]:
    """The direction's test sentences (side 0) or references (side 1), as prepared (raw/)."""
    src, tgt = split_pair(direction)
    pair = f"{ENGLISH}-{tgt}" if src == ENGLISH else f"{ENGLISH}-{src}"
    return (data / "raw" / f"test.{pair}.{(src, tgt)[side]}").read_text(encoding="utf-8").splitlines()


def sources(data: Path, direction: str) -> List[str]:
    return test_side(data, direction, 0)


def references(data: Path, direction: str) -> List[str]:
    return test_side(data, direction, 1)


def trained_for(work: Path, preset: Dict[str, object], device: Sequence[str]) -> str:
    """The updates a time-budgeted training reached (the model line gives only their ceiling)."""
    found = re.findall(r"num_updates[= ](\d+)", (work / "logs" / "train.log").read_text()) \
        if (work / "logs" / "train.log").exists() else []
    if float(setting(preset, "train_minutes")) <= 0 or not found:  # type: ignore[arg-type]
        return ""
    return (f"- Training: a budget of {setting(preset, 'train_minutes')} minutes of training time; stopped at update "
            f"{found[-1]}; {'fp16' if '--fp16' in device else 'fp32'}.")


def provenance(cpu: bool = False) -> str:
    """When, from which commit and on what the job ran, for the report's header."""
    commit = os.environ.get("MAIN_JOB_COMMIT", "")
    if not commit:
        try:
            head = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short=12", "HEAD"],
                                  capture_output=True, text=True, timeout=30)
            dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=30)
            commit = head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")
        except OSError:
            pass
    import torch  # loaded by then (fairseq)

    if torch.cuda.is_available() and not cpu:
        device = f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    else:
        device = f"CPU, {os.cpu_count()} cores (torch {torch.__version__})"
    return (f"- Run: {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; commit {commit or 'unknown'}; "
            f"device {device}.")


def machine_and_data(data: Path, langs: str) -> str:
    """What a figure depends on besides the code, for another machine to compare with: the CPU and the kernels
    torch picked on it, the threads, the Debian packages the text came from and a digest of the prepared
    corpus (SentencePiece model, dictionary and binaries)."""
    import torch  # loaded by then (fairseq)

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    used = {f"libreoffice-help-{DEBIAN_SUFFIX[language]}" for language in [ENGLISH, *langs.split(",")]
            if language in DEBIAN_SUFFIX}
    packages = sorted(re.sub(r"%3a", ":", path.name[:-len("_all.deb")]).replace("_", " ")
                      for path in (data / "debs").glob("*.deb") if path.name.split("_")[0] in used)
    digest = hashlib.sha256()
    for path in [data / "spm.model", *sorted((data / "bin").iterdir())]:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return (f"- Machine: {cpu}; torch CPU kernels {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads in this process (trainings and translating workers: one each, as "
            f"stated above); MKL_CBWR={os.environ.get('MKL_CBWR', 'unset')}, "
            f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')}.\n"
            f"- Data: {', '.join(packages) or 'the committed sample'}; prepared corpus sha256 "
            f"{digest.hexdigest()[:16]} (spm.model and bin/).")


def curve_points(model: Path, train_log: Path) -> List[tuple]:
    """(updates, training minutes, checkpoint) of up to CURVE_POINTS of the checkpoints kept every
    curve_updates updates, evenly spread; the minutes are fairseq's wall clock since the training started
    (its log's ``wall``)."""
    if not train_log.exists():
        return []
    minutes = {int(found.group(1)): float(found.group(2)) / 60
               for found in re.finditer(r"num_updates=(\d+).*? wall=([\d.]+)", train_log.read_text())}
    kept = sorted((int(m.group(1)), path) for path in model.glob("checkpoint_*_*.pt")
                  if (m := re.fullmatch(r"checkpoint_\d+_(\d+)\.pt", path.name)))
    kept = [(updates, path) for updates, path in kept if updates in minutes]
    step = max(1, math.ceil(len(kept) / CURVE_POINTS))
    return [(updates, minutes[updates], path) for updates, path in kept[::-1][::step][::-1]]


def binarized_count(prefix: Path) -> int:
    """Sentences in a fairseq binary (the raw training text is not carried to a GPU machine)."""
    from fairseq.data.indexed_dataset import MMapIndexedDataset  # start-up speed: fairseq only when counting

    return len(MMapIndexedDataset.Index(str(prefix) + ".idx"))


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


TASK_TRAIN_FLAGS = ["--moe-task-routing", "both", "--moe-task", "target", "--lang-tok-replacing-bos-eos"]


def task_moe_comparison(work: Path, data: Path, preset: Dict[str, object], checkpoint: Path, statistics: Path,
                        langs: str, beam: int, ratio: str, device: Sequence[str] = ()) -> dict:
    """Train the task-level MoE (same data, updates and batch size as the token-MoE), extract its
    sub-networks and translate the test sets with four models side by side (task_moe.py)."""
    from task_moe import TaskComparison, summary  # start-up speed: torch and fairseq only when this step runs

    task_checkpoint = train(work, data, preset, "task_model", TASK_TRAIN_FLAGS, device)
    log("  trained the task-MoE")
    generate = generation_args("test", beam, int(setting(preset, "gen_max_tokens")))  # type: ignore[call-overload]
    comparison = TaskComparison(work / "task_moe", checkpoint, task_checkpoint, statistics,
                                [*task_args(data, langs), *generate, *device], directions(langs),
                                lambda d: (sources(data, d), references(data, d)), ratio, log, data, beam)
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
    parser.add_argument("--cpu", action="store_true",
                        help="run on the CPU even where a GPU is (fairseq's --cpu; no fp16): e.g. the gpu preset's "
                             "code path, shrunk with --set, on a machine without one")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="replace one of the preset's settings, e.g. --set updates=20 --set test_max=10")
    parser.add_argument("--only-data", action="store_true",
                        help="prepare the preset's data and stop (for a machine without network: "
                             "scripts/build_gpu_wheels.sh)")
    parser.add_argument("--until", choices=("data", "train", "record"),
                        help="stop after this step (a later run continues from there: each step's output is kept)")
    args = parser.parse_args(argv)
    from fairseq_moe_prune.ranking import SelectionError, parse_ratio  # imports fairseq, as the sweep does later

    try:
        parse_ratio(args.ratio)  # now, not after training
        preset = apply_overrides(PRESETS[args.preset], args.set)
        levels = sweep_levels(preset)
    except (SelectionError, ValueError) as error:
        parser.error(str(error))
    langs, beam = str(preset["langs"]), int(preset["beam"])  # type: ignore[call-overload]
    device = device_args(preset, args.cpu)
    workers = int(setting(preset, "workers"))  # type: ignore[call-overload]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}
    start = time.monotonic()

    def step(name: str, message: str) -> None:
        timings[name] = round(max(0.0, time.monotonic() - start - sum(timings.values())), 1)
        log(message)

    log(f"1/5 data: LibreOffice help, English <-> {langs}")
    data = prepare_data(work, preset)
    if args.only_data or args.until == "data":
        log(f"data ready: {data}")
        return
    step("data", f"2/5 train: MoE transformer, {preset['experts']} experts in every 2nd layer, "
                 f"{preset['updates']} updates")
    if setting(preset, "side_by_side") and setting(preset, "task_moe"):
        log("  the task-MoE trains beside it, one thread each")
        with ThreadPoolExecutor(max_workers=2) as pool:
            token_job = pool.submit(train, work, data, preset, device=device, threads=1)
            task_job = pool.submit(train, work, data, preset, "task_model", TASK_TRAIN_FLAGS, device, 1)
            checkpoint, _ = token_job.result(), task_job.result()
    else:
        checkpoint = train(work, data, preset, device=device)
    if args.until == "train":
        log(f"trained: {checkpoint}")
        return
    step("train", f"3/5 record: expert statistics on dev, {len(directions(langs))} directions")
    statistics = record(work, data, checkpoint, langs, beam, workers, device)
    evidence = bool(setting(preset, "evidence"))
    if evidence:  # a larger calibration sample on dev, and one on test sentences that no selection sees
        record_every_direction(work, data, checkpoint, langs, beam, workers, device, "calibrate-2048", "valid",
                               LARGE_CALIBRATION, work / "calibration-2048")
        record_every_direction(work, data, checkpoint, langs, beam, workers, device, "calibrate-heldout", "test",
                               LARGE_CALIBRATION, work / "calibration-heldout")
    if args.until == "record":
        log(f"recorded: {statistics}")
        return
    step("record", "4/5 sweep: prune, translate test, score")

    from report import write_report  # matplotlib and fairseq load only now
    from sweep import EVIDENCE_METHODS, LEVELS, METHODS, Sweep, quiet

    quiet()

    generate_args = [*task_args(data, langs),
                     *generation_args("test", beam, int(setting(preset, "gen_max_tokens"))), *device]  # type: ignore[call-overload]
    sweep = Sweep(work / "sweep", checkpoint, statistics, generate_args,
                  directions(langs), lambda d: references(data, d), args.ratio, log, workers=workers,
                  calibration=work / "calibration", calibrations={LARGE_CALIBRATION: work / "calibration-2048"})
    levels = levels or LEVELS
    methods = (*METHODS, *EVIDENCE_METHODS) if evidence else METHODS
    curve = curve_points(work / "model", work / "logs" / "train.log") if setting(preset, "curve_updates") else []
    results = sweep.run(methods, levels, curve)
    heldout = None
    if evidence:
        from heldout import compare  # reads checkpoints through the library (torch): only when asked for

        samples = {f"dev, {CALIBRATION_TOKENS} tokens": work / "calibration",
                   f"dev, {LARGE_CALIBRATION} tokens": work / "calibration-2048",
                   f"held-out (test sentences), {LARGE_CALIBRATION} tokens": work / "calibration-heldout"}
        heldout = compare(work / "sweep", checkpoint, samples, results,
                          ["importance per language", *(m.name for m in methods if m.metric == "reconstruction")])
        log(f"  reconstruction losses of {len(heldout)} runs' kept sets on dev and held-out tokens")
    task_results = None
    if setting(preset, "task_moe"):
        step("sweep", f"4b/5 task-MoE: routed by source (encoder) and target language (decoder), same data and "
                      f"{preset['updates']} updates; sub-networks extracted, four models translate side by side")
        task_results = task_moe_comparison(work, data, preset, checkpoint, statistics, langs, beam, args.ratio,
                                           device)
        step("task", "5/5 report")
    else:
        step("sweep", "5/5 report")
    train_pairs = sum(binarized_count(data / "bin" / f"train.{ENGLISH}-{x}.{ENGLISH}") for x in langs.split(","))
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
        f"{', '.join(f'{level:.0%}' for level in levels)}; methods {', '.join(m.name for m in methods)}.",
        f"- Translation: {decoding}, the same settings for every model; chrF++ and BLEU by sacrebleu "
        "(BLEU tokenizer zh for Chinese, char for Japanese, 13a otherwise).",
        f"- Reconstruction loss and skipping betas: {CALIBRATION_TOKENS} calibration tokens per MoE layer and "
        "direction, sampled on dev in the statistics runs.",
        f"- Preset `{args.preset}`; time per step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
    ]
    if task_results is not None:
        setup.append(f"- Task-MoE: the same recipe with {' '.join(TASK_TRAIN_FLAGS)}; its sub-network per direction "
                     "extracted with `fairseq-moe-prune extract` (a plain dense `transformer`); the token-MoE pruned "
                     "per language to 2 experts per MoE layer (importance) for the same number of parameters.")
    setup += [f"- Settings replaced (--set): {', '.join(args.set)}." if args.set else "", trained_for(work, preset, device),
              provenance(args.cpu), machine_and_data(data, langs)]
    setup = [line for line in setup if line]
    report = write_report(work / "sweep", results, statistics, setup, task_moe=task_results,
                          references=sweep.references, workers=os.cpu_count() or 1, heldout=heldout)
    step("report", f"report: {report}")
    (work / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    log(f"done in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
