#!/usr/bin/env python3
"""How much faster does a task-MoE's extracted sub-network translate than the full token-MoE?

Trains two models of the main job's default shape (3+3 layers, d_model 128, FFN 512, 16 experts in
every 2nd layer, top-2) on the committed LibreOffice help sample for a few updates with fairseq-train:
a token-MoE and a task-MoE (both sides routed by task). Extracts the task-MoE's eng_Latn-deu_Latn
sub-network with ``fairseq-moe-prune extract`` (a plain dense ``transformer``, FFNs padded to one
width) and, in this process, the same sub-network with each layer at its own FFN width (the zero units
dropped: what keeping per-layer widths would buy). Every model then translates the same test set with
the same batch settings and exactly the same number of decoding steps (``--min-len`` = max length, so
weights trained for a few updates do not change the work), in alternating rounds, one thread. Prints the
median sentences/s of each and the ratios, for the main job's batches (greedy and beam 4) and for one
sentence at a time.

Example: python scripts/bench_extract.py --work /tmp/bench_extract
"""

import argparse
import logging
import statistics
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict, List

import torch

from fairseq_moe_prune import USER_DIR

REPO = Path(__file__).resolve().parent.parent
LANGS = "eng_Latn,deu_Latn,fra_Latn"
PAIRS = "eng_Latn-deu_Latn,eng_Latn-fra_Latn,deu_Latn-eng_Latn,fra_Latn-eng_Latn"
TASK_FLAGS = ["--moe-task-routing", "both", "--moe-task", "target", "--lang-tok-replacing-bos-eos"]


def run(command: List[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {command[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def task_args(data: Path) -> List[str]:
    return [str(data / "bin"), "--user-dir", USER_DIR, "--task", "translation_multi_simple_epoch", "--langs", LANGS,
            "--lang-pairs", PAIRS, "--encoder-langtok", "src", "--decoder-langtok"]


def train(data: Path, out: Path, updates: int, extra: List[str]) -> Path:
    if not (out / "checkpoint_last.pt").exists():
        run(["fairseq-train", *task_args(data), *extra, "--arch", "moe_transformer", "--share-all-embeddings",
             "--encoder-embed-dim", "128", "--encoder-ffn-embed-dim", "512", "--encoder-layers", "3",
             "--decoder-layers", "3", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
             "--encoder-normalize-before", "--decoder-normalize-before", "--moe-freq", "2", "--moe-expert-count", "16",
             "--moe-gating-use-fp32", "--moe-second-expert-policy", "all", "--moe-eval-capacity-token-fraction", "1.0",
             "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--moe-gate-loss-wt", "0.01",
             "--optimizer", "adam", "--lr", "0.003", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
             "--max-tokens", "1024", "--max-update", str(updates), "--seed", "1", "--save-dir", str(out),
             "--no-epoch-checkpoints", "--disable-validation", "--num-workers", "0"])
    return out / "checkpoint_last.pt"


def per_layer_widths(model: torch.nn.Module) -> torch.nn.Module:
    """The padded dense model with its zero FFN units dropped, each layer at its own width."""
    for layer in [*model.encoder.layers, *model.decoder.layers]:
        keep = (layer.fc1.weight != 0).any(dim=1) | (layer.fc1.bias != 0)
        fc1, fc2 = torch.nn.Linear(layer.fc1.in_features, int(keep.sum())), torch.nn.Linear(int(keep.sum()), layer.fc2.out_features)
        with torch.no_grad():
            fc1.weight.copy_(layer.fc1.weight[keep])
            fc1.bias.copy_(layer.fc1.bias[keep])
            fc2.weight.copy_(layer.fc2.weight[:, keep])
            fc2.bias.copy_(layer.fc2.bias)
        layer.fc1, layer.fc2 = fc1, fc2
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_extract"))
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--length", type=int, default=20, help="decoding steps of every hypothesis")
    parser.add_argument("--test-sentences", type=int, default=100, help="at most this many (the sample has fewer)")
    args = parser.parse_args()
    work = args.work.resolve()
    data = work / "data"
    if not (data / "bin").exists():
        run([sys.executable, str(REPO / "examples/libreoffice_help/prepare_data.py"), "--aligned-dir",
             str(REPO / "tests/data/libreoffice_help"), "--out", str(data), "--vocab-size", "1000",
             "--test-max", str(args.test_sentences), "--valid-max", "10"])
    token = train(data, work / "token_moe", args.updates, [])
    task = train(data, work / "task_moe", args.updates, TASK_FLAGS)
    extracted = work / "extracted"
    if not (extracted / "eng_Latn-deu_Latn.pt").exists():
        run([sys.executable, "-m", "fairseq_moe_prune.cli", "extract", str(task), "--task", "eng_Latn-deu_Latn",
             "--out", str(extracted), "--force"])

    torch.set_num_threads(1)
    from fairseq_moe_prune.evaluation import Translator  # start-up speed: fairseq only after the training children ran

    logging.getLogger().setLevel(logging.WARNING)  # fairseq and hydra log every dataset load
    warnings.filterwarnings("ignore", category=UserWarning)

    class FixedModel(Translator):
        """Translates with a model built here instead of one loaded from a file."""

        def __init__(self, generate_args, model):
            super().__init__(generate_args)
            self.model = model

        def load(self, checkpoint, source, target):
            self.setup(source, target)
            return self.model

    settings = {  # the main job's batches (greedy and NLLB's beam 4), and one sentence at a time
        "greedy, --max-tokens 4000": ["--beam", "1", "--max-tokens", "4000"],
        "beam 4, --max-tokens 4000": ["--beam", "4", "--max-tokens", "4000"],
        "greedy, --batch-size 1": ["--beam", "1", "--batch-size", "1"],
    }
    results: Dict[str, Dict[str, List[float]]] = {}
    sentences = 0
    for setting, batching in settings.items():
        generation = ["--gen-subset", "test", *batching, "--max-len-a", "0", "--max-len-b", str(args.length),
                      "--min-len", str(args.length), "--required-batch-size-multiple", "1", "--seed", "1"]
        token_args = [*task_args(data), *generation]
        task_moe_args = [*task_args(data), "--lang-tok-replacing-bos-eos", *generation]
        sub = str(extracted / "eng_Latn-deu_Latn.pt")
        narrow = per_layer_widths(Translator(task_moe_args).load(sub, "eng_Latn", "deu_Latn"))
        runs = [("token-MoE", Translator(token_args), str(token)), ("task-MoE", Translator(task_moe_args), str(task)),
                ("sub-network, dense transformer", Translator(task_moe_args), sub),
                ("sub-network, per-layer widths", FixedModel(task_moe_args, narrow), sub)]
        for name, translator, checkpoint in runs:  # warm-up: load, set up the task, first batches
            sentences = translator.translate(checkpoint, "eng_Latn", "deu_Latn").sentences
        for round_ in range(args.rounds):
            for name, translator, checkpoint in runs[round_ % len(runs):] + runs[:round_ % len(runs)]:
                translation = translator.translate(checkpoint, "eng_Latn", "deu_Latn")
                results.setdefault(name, {}).setdefault(setting, []).append(translation.sentences / translation.seconds)

    print(f"models of the main job's default shape, {args.updates} updates; eng_Latn-deu_Latn test set "
          f"({sentences} sentences), every hypothesis {args.length} tokens, one thread, "
          f"median of {args.rounds} alternating rounds")
    for setting in settings:
        speed = {name: statistics.median(values[setting]) for name, values in results.items()}
        print(f"{setting}: " + ", ".join(f"{name} {value:.1f} sent/s" for name, value in speed.items()))
        print(f"{setting}: throughput extracted sub-network (dense transformer) / full token-MoE: "
              f"{speed['sub-network, dense transformer'] / speed['token-MoE']:.2f}x")
        print(f"{setting}: throughput task-MoE / token-MoE: {speed['task-MoE'] / speed['token-MoE']:.2f}x; "
              f"per-layer widths / padded dense transformer: "
              f"{speed['sub-network, per-layer widths'] / speed['sub-network, dense transformer']:.2f}x")


if __name__ == "__main__":
    main()
