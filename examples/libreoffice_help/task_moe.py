"""The task-level MoE beside the token-MoE (Kudugunta et al. 2021), on the same data and budget.

The task-MoE routes both sides by task (encoder by source language, decoder by target language), so
each direction's sub-network extracts to a plain dense fairseq ``transformer``. Four models translate
every test set, side by side in the same worker processes with the same batch settings, in an order
rotated per direction: the token-MoE, the token-MoE pruned per language to the sub-network's size (2
experts per MoE layer, importance), the task-MoE, and the extracted task-MoE sub-networks. Results go
to ``task_moe.json`` after the run; checkpoints written here are deleted once scored.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from sweep import SINGLE, quiet, score

from fairseq_moe_prune.checkpoints.extract import extract, task_fold
from fairseq_moe_prune.checkpoints.layouts import open_checkpoint
from fairseq_moe_prune.evaluation import Translation, Translator
from fairseq_moe_prune.files import atomic_open
from fairseq_moe_prune.models.task_routing import TaskSpace
from fairseq_moe_prune.moe.gate import gate_options
from fairseq_moe_prune.pruning import PruneOptions, prune
from fairseq_moe_prune.stats import split_pair

# what translating with the task-MoE needs beyond the token-MoE's flags (run.py trains it with these too)
GENERATE_FLAGS = ["--lang-tok-replacing-bos-eos"]
TOKEN, PRUNED, TASK, EXTRACTED = "token-MoE", "token-MoE pruned per language", "task-MoE", "task-MoE sub-network"
MODELS = (TOKEN, PRUNED, TASK, EXTRACTED)

_translators: Dict[str, Translator] = {}  # per worker process: "token" and "task" data formats, "-single" alike


def start_worker(token_args: Sequence[str], task_args: Sequence[str]) -> None:
    torch.set_num_threads(1)
    quiet()
    _translators["token"] = Translator(token_args)
    _translators["task"] = Translator(task_args)
    _translators["token-single"] = Translator([*token_args, *SINGLE])
    _translators["task-single"] = Translator([*task_args, *SINGLE])


def translate_direction(direction: str, runs: Sequence[Tuple[str, str, str]]) -> Dict[str, Translation]:
    """Each (model name, checkpoint, data format) translates the direction's test set, in the given order."""
    source, target = split_pair(direction)
    return {name: _translators[kind].translate(checkpoint, source, target) for name, checkpoint, kind in runs}


def task_routing_usage(checkpoint: str) -> Dict[str, Tuple[List[str], np.ndarray]]:
    """Per task-routed MoE layer: the languages (as sources in the encoder, targets in the decoder) and the
    combine weight each gives each expert: the routing itself, read from the gates and task embeddings."""
    opened = open_checkpoint(checkpoint)
    config, weights = opened.config, opened.state["model"]
    space = TaskSpace.from_config(config)
    options = gate_options(config)
    usage = {}
    for spec in opened.specs:
        languages = space.trained_sources() if spec.side == "encoder" else space.trained_targets()
        rows = np.zeros((len(languages), spec.num_experts))
        for i, language in enumerate(languages):
            task = space.langs.index(language)
            fold = task_fold(weights[spec.gate_key], weights[f"{spec.side}.moe_task_embed.weight"][task],
                             options, eom=0.0)
            rows[i, fold.experts] = fold.factors
        usage[spec.prefix] = (languages, rows)
    return usage


class TaskComparison:
    """Extracts, prunes to the same size, translates side by side, keeps the scores and speeds."""

    def __init__(self, work: Path, token_checkpoint: Path, task_checkpoint: Path, statistics: Path,
                 generate_args: Sequence[str], directions: Sequence[str], references: Callable[[str], List[str]],
                 ratio: str, log: Callable[[str], None], workers: int = 2):
        self.work, self.token_checkpoint, self.task_checkpoint = work, token_checkpoint, task_checkpoint
        self.statistics, self.generate_args, self.directions = statistics, list(generate_args), list(directions)
        self.references, self.ratio, self.log, self.workers = references, ratio, log, workers
        self.results_path = work / "task_moe.json"

    def run(self) -> dict:
        if self.results_path.exists():
            return json.loads(self.results_path.read_text())
        self.work.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        extracted = extract(str(self.task_checkpoint), str(self.work / "extracted"), self.directions, force=True)
        moe_layers = len(open_checkpoint(str(self.token_checkpoint)).specs)
        options = PruneOptions(metric="importance", granularity="language", keep=2 * moe_layers, ratio=self.ratio,
                               directions=self.directions)
        pruned = prune(str(self.token_checkpoint), str(self.work / "pruned"), options,
                       stats_path=str(self.statistics), force=True)
        self.log(f"  extracted {len(extracted['outputs'])} sub-networks, pruned the token-MoE to 2 experts per "
                 f"layer ({time.monotonic() - start:.0f} s)")

        runs = {}
        for direction in self.directions:
            runs[direction] = [
                (TOKEN, str(self.token_checkpoint), "token"),
                (PRUNED, str(self.work / "pruned" / pruned["outputs"][direction]["files"][0]), "token"),
                (TASK, str(self.task_checkpoint), "task"),
                (EXTRACTED, str(self.work / "extracted" / extracted["outputs"][direction]["file"]), "task"),
            ]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=start_worker,
                                 initargs=(self.generate_args, [*self.generate_args, *GENERATE_FLAGS])) as pool:
            jobs = {d: pool.submit(translate_direction, d, runs[d][i % 4:] + runs[d][:i % 4])
                    for i, d in enumerate(self.directions)}
            translations = {d: job.result() for d, job in jobs.items()}
            # one sentence at a time (a served model's case): the token-MoE and the sub-network, every 4th
            # direction, in both orders
            timed = self.directions[::4]
            singles = {d: pool.submit(translate_direction, d,
                                      [(name, checkpoint, f"{kind}-single") for name, checkpoint, kind in
                                       (runs[d][0], runs[d][3])][:: 1 if i % 2 == 0 else -1])
                       for i, d in enumerate(timed)}
            alone = {d: job.result() for d, job in singles.items()}

        results: dict = {"models": {}, "usage": {}}
        for name in MODELS:
            directions = {}
            for direction in self.directions:
                translation = translations[direction][name]
                directions[direction] = {
                    **score(translation.hypotheses, self.references(direction), split_pair(direction)[1]),
                    "sentences": translation.sentences, "parameters": translation.parameters,
                    "seconds": round(translation.seconds, 3),
                    "hypotheses": translation.hypotheses}  # for the report's paired bootstrap intervals
            sentences = sum(d["sentences"] for d in directions.values())
            seconds = sum(d["seconds"] for d in directions.values())
            results["models"][name] = {"directions": directions, "sentences_per_second": round(sentences / seconds, 2)}
            if name in (TOKEN, EXTRACTED):
                results["models"][name]["single_sentences_per_second"] = round(
                    sum(alone[d][name].sentences for d in alone) / sum(alone[d][name].seconds for d in alone), 3)
                results["models"][name]["single_directions"] = list(alone)
        first = extracted["outputs"][self.directions[0]]
        results["extracted_zero_padding"] = first["zero_padding_parameters"]
        results["extracted_arch"] = first["arch"]
        results["usage"] = {prefix: {"languages": languages, "weights": rows.round(4).tolist()}
                            for prefix, (languages, rows) in task_routing_usage(str(self.task_checkpoint)).items()}
        with atomic_open(str(self.results_path), "w") as f:
            f.write(json.dumps(results, indent=1, sort_keys=True) + "\n")
        for folder in ("extracted", "pruned"):  # keep the manifests, not the checkpoints
            for file in (self.work / folder).glob("*.pt"):
                os.unlink(file)
        self.log(f"  translated {len(self.directions)} directions with 4 models side by side "
                 f"({time.monotonic() - start:.0f} s)")
        return results


def mean_over(model: dict, key: str) -> float:
    return float(np.mean([scores[key] for scores in model["directions"].values()]))


def summary(results: dict) -> str:
    """One line for the log."""
    models = results["models"]
    return ", ".join(f"{name} chrF++ {mean_over(models[name], 'chrf++'):.2f} "
                     f"({models[name]['sentences_per_second']:.1f} sent/s)" for name in MODELS)

