"""The task-level MoE beside the token-MoE (Kudugunta et al. 2021), on the same data and budget.

The task-MoE routes both sides by task (encoder by source language, decoder by target language), so
each direction's sub-network extracts to a plain dense fairseq ``transformer``. Four models translate
every test set, side by side in the same worker processes with the same batch settings, in an order
rotated per direction: the token-MoE, the token-MoE pruned per language to the sub-network's size (2
experts per MoE layer, importance), the task-MoE, and the extracted task-MoE sub-networks. The sub-networks
then also run where dense NLLB models are served: written as Hugging Face M2M100 (``convert --to hf``) and
converted to CTranslate2 int8 by CTranslate2's own converter, they translate the same test sets in the same
worker processes, one thread each, the same beam and length limits. Results go to ``task_moe.json`` after
the run; checkpoints written here are deleted once scored.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from sweep import SINGLE, quiet, score

from fairseq_moe_prune.checkpoints.convert import convert
from fairseq_moe_prune.checkpoints.extract import extract, task_fold
from fairseq_moe_prune.checkpoints.layouts import open_checkpoint
from fairseq_moe_prune.deploy import CTranslate2Engine, Output, to_ctranslate2
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
CT2 = "task-MoE sub-network, CTranslate2 int8"  # the same sub-networks, outside fairseq

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


def translate_ctranslate2(hf_folder: str, ct2_folder: str, sentences: List[str], beam: int,
                          max_len_a: float, max_len_b: int) -> Output:
    """One direction's test set through its CTranslate2 int8 sub-network, one thread (as the fairseq models)."""
    return CTranslate2Engine(hf_folder, ct2_folder, threads=1).translate(sentences, beam, max_len_a=max_len_a,
                                                                         max_len_b=max_len_b)


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
                 generate_args: Sequence[str], directions: Sequence[str], test_set: Callable[[str], Tuple[List[str], List[str]]],
                 ratio: str, log: Callable[[str], None], data: Path, beam: int, workers: int = 2):
        """``test_set(direction)``: its sources and references; ``data``: the data folder (bin/dict.txt and
        spm.model, for the sub-networks' M2M100 form); ``beam``: the beam of ``generate_args``."""
        self.work, self.token_checkpoint, self.task_checkpoint = work, token_checkpoint, task_checkpoint
        self.statistics, self.generate_args, self.directions = statistics, list(generate_args), list(directions)
        self.test_set, self.ratio, self.log, self.workers = test_set, ratio, log, workers
        self.data, self.beam = data, beam
        self.references: Callable[[str], List[str]] = lambda direction: test_set(direction)[1]
        self.results_path = work / "task_moe.json"

    def deploy(self, extracted: dict) -> Dict[str, Tuple[str, str]]:
        """Each direction's sub-network as M2M100 and as CTranslate2 int8: {direction: (hf folder, ct2 folder)}."""
        folders = {}
        for direction in self.directions:
            hf, ct2 = self.work / "deploy" / direction / "hf", self.work / "deploy" / direction / "ct2-int8"
            if not ct2.exists():
                convert(str(self.work / "extracted" / extracted["outputs"][direction]["file"]), str(hf), "hf",
                        force=True, dict_path=str(self.data / "bin" / "dict.txt"),
                        spm_path=str(self.data / "spm.model"))
                to_ctranslate2(str(hf), str(ct2), "int8")
            folders[direction] = (str(hf), str(ct2))
        return folders

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
        deployed = self.deploy(extracted)
        self.log(f"  extracted {len(extracted['outputs'])} sub-networks (and wrote them as M2M100 and CTranslate2 "
                 f"int8), pruned the token-MoE to 2 experts per layer ({time.monotonic() - start:.0f} s)")

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
            # the sub-networks in CTranslate2 int8, with fairseq-generate's length limits
            limits = [float(self.generate_args[self.generate_args.index(flag) + 1]) for flag in ("--max-len-a", "--max-len-b")]
            served = {d: pool.submit(translate_ctranslate2, *deployed[d], self.test_set(d)[0], self.beam, limits[0],
                                     int(limits[1])) for d in self.directions}
            ctranslate2_outputs = {d: job.result() for d, job in served.items()}

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
        directions = {}
        for direction, output in ctranslate2_outputs.items():
            directions[direction] = {
                **score(output.hypotheses, self.references(direction), split_pair(direction)[1]),
                "sentences": len(output.hypotheses), "seconds": round(output.seconds, 3),
                "parameters": results["models"][EXTRACTED]["directions"][direction]["parameters"],
                "hypotheses": output.hypotheses}
        results["models"][CT2] = {"directions": directions, "sentences_per_second": round(
            sum(d["sentences"] for d in directions.values()) / sum(d["seconds"] for d in directions.values()), 2)}
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
        shutil.rmtree(self.work / "deploy")
        self.log(f"  translated {len(self.directions)} directions with 4 models side by side "
                 f"({time.monotonic() - start:.0f} s)")
        return results


def mean_over(model: dict, key: str) -> float:
    return float(np.mean([scores[key] for scores in model["directions"].values()]))


def summary(results: dict) -> str:
    """One line for the log."""
    models = results["models"]
    return ", ".join(f"{name} chrF++ {mean_over(models[name], 'chrf++'):.2f} "
                     f"({models[name]['sentences_per_second']:.1f} sent/s)" for name in MODELS + (CT2,) if name in models)

