"""The pruning sweep: prune the trained MoE with every method at every level, translate, score.

Each (method, level) is one call of the library behind ``fairseq-moe-prune prune``, writing real
pruned checkpoints (one per direction for per-language methods, one for global ones). Each
checkpoint is then loaded by fairseq's own loader and translates the test set of its directions
with fairseq-generate's steps in this process (``fairseq_moe_prune.evaluation``), so fairseq is
imported once rather than once per (checkpoint, direction). Scores go to ``sweep.json`` after every
run, so an interrupted sweep continues where it stopped; checkpoints are deleted once scored
(their ``manifest.json`` and ``experts.json`` stay).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.metrics.base import Metric

from fairseq_moe_prune import stats as stats_lib
from fairseq_moe_prune.evaluation import Translation, Translator
from fairseq_moe_prune.files import atomic_open
from fairseq_moe_prune.pruning import PruneOptions, prune
from fairseq_moe_prune.ranking import SelectionError


@dataclass(frozen=True)
class Method:
    name: str
    metric: str
    granularity: str  # "language": source-language encoder experts + target-language decoder experts
    calibration_tokens: int = 0  # reconstruction: the size of the calibration sample searched (0: the sweep's own)
    shared: int = 0  # per language: experts every language keeps in each layer, chosen from all pairs pooled


METHODS = (
    Method("importance per language", "importance", "language"),
    Method("reconstruction per language", "reconstruction", "language"),  # needs calibration samples
    Method("activity per language", "activity", "language"),
    Method("importance global", "importance", "global"),
    Method("random", "random", "global"),
)
# the evidence run's: reconstruction on a larger sample, and a remedy for into English (issue 23)
EVIDENCE_METHODS = (
    Method("reconstruction per language, 2,048 tokens", "reconstruction", "language", calibration_tokens=2048),
    Method("importance per language, 1 shared", "importance", "language", shared=1),
)
LEVELS = (0.25, 0.5, 0.75, 0.8, 0.9)
SKIP_LEVELS = (0.0, 0.5, 0.8)  # dynamic skipping on / off: the full model and importance per language
SINGLE = "--batch-size", "1"  # translating one sentence at a time (a served model's case), beside batches


def bleu_tokenizer(language: str) -> str:
    """sacrebleu's 13a splits on spaces, which Chinese and Japanese do not use."""
    return {"zho": "zh", "jpn": "char"}.get(language.split("_")[0], "13a")


def metrics(target: str) -> Dict[str, Metric]:
    """The report's metrics for a target language, as sacrebleu objects (scores and resampling)."""
    return {"chrf++": CHRF(word_order=2), "bleu": BLEU(tokenize=bleu_tokenizer(target))}


def score(hypotheses: List[str], references: List[str], target: str) -> Dict[str, float]:
    if len(hypotheses) != len(references):
        raise SystemExit(f"error: {len(hypotheses)} hypotheses for {len(references)} references")
    scores = {name: metric.corpus_score(hypotheses, [references]) for name, metric in metrics(target).items()}
    return {
        "chrf++": round(scores["chrf++"].score, 2),
        "bleu": round(scores["bleu"].score, 2),
        # hypothesis/reference length in the BLEU tokenizer's tokens, as sacrebleu reports it
        "length_ratio": round(scores["bleu"].sys_len / max(scores["bleu"].ref_len, 1), 4),
    }


def run_name(method: Method, level: float) -> str:
    size = f"-{method.calibration_tokens}" if method.calibration_tokens else ""
    shared = f"-shared{method.shared}" if method.shared else ""
    return f"{method.metric}{size}-{method.granularity}{shared}-{round(level * 100)}"


def quiet() -> None:
    """fairseq, hydra and matplotlib log at length (fairseq sets the root logger to INFO, hydra to
    DEBUG); the sweep prints its own progress."""
    logging.getLogger().setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)


_translators: Dict[bool, Translator] = {}  # per worker process: in batches (False), one sentence at a time (True)


def start_worker(generate_args: Sequence[str]) -> None:
    """Small models translate faster on one thread per process than on two threads in one."""
    torch.set_num_threads(1)
    quiet()
    _translators[False] = Translator(generate_args)
    _translators[True] = Translator([*generate_args, *SINGLE])


def translate(checkpoint: str, direction: str, single: bool = False) -> Translation:
    assert _translators, "start_worker runs first in every worker"
    source, target = stats_lib.split_pair(direction)
    return _translators[single].translate(checkpoint, source, target)


class Sweep:
    """Holds the results file and fills it run by run; ``workers`` processes translate side by side."""

    def __init__(self, work: Path, checkpoint: Path, statistics: Path, generate_args: Sequence[str],
                 directions: Sequence[str], references: Callable[[str], List[str]], ratio: str,
                 log: Callable[[str], None], workers: int = 2, calibration: Optional[Path] = None,
                 calibrations: Optional[Dict[int, Path]] = None):
        """``calibrations``: further calibration samples by size, for methods that name one."""
        self.work, self.checkpoint, self.statistics = work, checkpoint, statistics
        self.calibration = calibration if calibration is not None and calibration.exists() else None
        self.calibrations = {size: path for size, path in (calibrations or {}).items() if path.exists()}
        self.directions, self.ratio, self.log = list(directions), ratio, log
        self.references = {direction: references(direction) for direction in self.directions}
        self.moe_layers = len(stats_lib.load(str(statistics)).fingerprint.specs)
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=start_worker, initargs=(list(generate_args),))
        self.results_path = work / "sweep.json"
        self.results: Dict[str, dict] = (
            json.loads(self.results_path.read_text(encoding="utf-8")) if self.results_path.exists() else {}
        )

    def save(self) -> None:
        with atomic_open(str(self.results_path), "w") as f:
            f.write(json.dumps(self.results, indent=1, sort_keys=True, ensure_ascii=False) + "\n")

    def evaluate(self, checkpoints: Dict[str, Path]) -> Dict[str, Dict[str, float]]:
        """Scores of each direction's checkpoint on that direction's test set."""
        jobs = {d: self.pool.submit(translate, str(checkpoints[d]), d) for d in self.directions}
        scores = {}
        for direction, job in jobs.items():
            translation = job.result()
            target = stats_lib.split_pair(direction)[1]
            scores[direction] = {**score(translation.hypotheses, self.references[direction], target),
                                 "sentences": translation.sentences, "parameters": translation.parameters,
                                 "seconds": round(translation.seconds, 2),
                                 # kept for the report's confidence intervals (paired bootstrap over sentences)
                                 "hypotheses": translation.hypotheses}
        return scores

    def run_full(self) -> None:
        if "full" in self.results:
            return
        start = time.monotonic()
        scores = self.evaluate({d: self.checkpoint for d in self.directions})
        self.results["full"] = {"method": "full model", "level": 0.0, "pruned_fraction": 0.0, "directions": scores}
        self.save()
        self.log(f"full model: chrF++ {mean(self.results['full'], 'chrf++'):.2f} ({time.monotonic() - start:.0f} s)")

    def run_pruned(self, method: Method, level: float) -> None:
        name = run_name(method, level)
        if name in self.results:
            return
        found = self.calibrations.get(method.calibration_tokens) if method.calibration_tokens else self.calibration
        calibration = str(found) if method.metric == "reconstruction" and found is not None else None
        if method.metric == "reconstruction" and calibration is None:
            return  # a work folder from before calibration samples were taken
        start = time.monotonic()
        out = self.work / name
        options = PruneOptions(metric=method.metric, granularity=method.granularity, prune_fraction=level,
                               ratio=self.ratio, directions=self.directions if method.granularity != "global" else None,
                               shared=method.shared)
        try:
            manifest = prune(str(self.checkpoint), str(out), options, stats_path=str(self.statistics), force=True,
                             calibration_path=calibration)
        except SelectionError:
            # the level leaves fewer than the 2 experts top-2 routing needs in some layer: keep 2 in every
            # layer instead, the smallest model there is (the report shows the share actually pruned)
            options = replace(options, prune_fraction=None, keep=options.min_per_layer * self.moe_layers)
            manifest = prune(str(self.checkpoint), str(out), options, stats_path=str(self.statistics), force=True,
                             calibration_path=calibration)
        outputs = manifest["outputs"]
        scores = self.evaluate({d: out / outputs[d if d in outputs else "global"]["files"][0]
                                for d in self.directions})
        first = next(iter(outputs.values()))
        self.results[name] = {"method": method.name, "level": level, "pruned_fraction": first["pruned_fraction"],
                              "kept_experts": first["kept_experts"], "directions": scores, "folder": name}
        self.save()
        for output in outputs.values():
            for file in output["files"]:
                os.unlink(out / file)
        self.log(f"{method.name} {level:.0%} ({first['pruned_fraction']:.1%} of experts pruned): "
                 f"chrF++ {mean(self.results[name], 'chrf++'):.2f} ({time.monotonic() - start:.0f} s)")

    def run(self, methods: Sequence[Method] = METHODS, levels: Sequence[float] = LEVELS,
            curve: Sequence[Tuple[int, float, Path]] = ()) -> Dict[str, dict]:
        """Every method at every level, then skipping on / off; ``curve``: (updates, minutes, checkpoint) of
        the training's learning curve, scored first."""
        try:
            if curve:
                self.run_curve(curve)
            self.run_full()
            for level in levels:
                for method in methods:
                    self.run_pruned(method, level)
            if self.calibration is not None:
                self.run_skipping()
        finally:
            self.pool.shutdown(cancel_futures=True)
        return self.results


    def run_curve(self, points: Sequence[Tuple[int, float, Path]]) -> Dict[str, dict]:
        """The learning curve: each (updates, training minutes, checkpoint) scored like the full model, into
        ``curve.json`` (kept between runs; the checkpoints are the training's own)."""
        path = self.work / "curve.json"
        curve = json.loads(path.read_text()) if path.exists() else {}
        for updates, minutes, checkpoint in points:
            if str(updates) in curve:
                continue
            scores = self.evaluate({d: checkpoint for d in self.directions})
            curve[str(updates)] = {"updates": updates, "minutes": round(minutes, 2),
                                   "chrf++": round(float(np.mean([s["chrf++"] for s in scores.values()])), 2),
                                   "min_chrf++": min(s["chrf++"] for s in scores.values()),
                                   "directions": {d: s["chrf++"] for d, s in scores.items()}}
            with atomic_open(str(path), "w") as f:
                f.write(json.dumps(curve, indent=1, sort_keys=True) + "\n")
            self.log(f"learning curve: {updates} updates ({minutes:.1f} min): chrF++ {curve[str(updates)]['chrf++']:.2f}")
        return curve

    # --- dynamic skipping on / off (Lu et al. 2024): the same models translated side by side --------------

    def run_skipping(self, levels: Sequence[float] = SKIP_LEVELS) -> None:
        """For the full model and importance per language at ``levels``: the model with skipping betas
        (median w2/w1 of the calibration tokens, per layer and language) and without, each direction
        translated by both at once (one per worker), so speeds are measured under the same load."""
        path = self.work / "skipping.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        for level in levels:
            name = f"skip-{round(level * 100)}"
            if name in results:
                continue
            start = time.monotonic()
            checkpoints = {}
            for skipping in (True, False):
                out = self.work / f"{name}-{'on' if skipping else 'off'}"
                options = PruneOptions(metric="importance", granularity="language", prune_fraction=level,
                                       ratio=self.ratio, directions=self.directions,
                                       skip_beta="median" if skipping else None)
                try:
                    manifest = prune(str(self.checkpoint), str(out), options, stats_path=str(self.statistics),
                                     calibration_path=str(self.calibration), force=True)
                except SelectionError:  # as in run_pruned: 2 experts in every layer
                    options = replace(options, prune_fraction=None, keep=options.min_per_layer * self.moe_layers)
                    manifest = prune(str(self.checkpoint), str(out), options, stats_path=str(self.statistics),
                                     calibration_path=str(self.calibration), force=True)
                checkpoints[skipping] = {d: out / manifest["outputs"][d]["files"][0] for d in self.directions}
            # without skipping the model is the sweep's own run (same selection, same greedy output): its chrF++
            # is known, so only every 4th direction is translated again, beside the same direction with skipping
            known = self.results.get("full" if level == 0 else run_name(METHODS[0], level))
            timed = self.directions[::4] if known is not None else self.directions
            jobs, single = {}, {}
            for d in self.directions:
                jobs[(d, True)] = self.pool.submit(translate_counting_skips, str(checkpoints[True][d]), d)
                if d in timed:
                    jobs[(d, False)] = self.pool.submit(translate_counting_skips, str(checkpoints[False][d]), d)
            for d in timed:  # and one sentence at a time, with and without, side by side again
                for skipping in (True, False):
                    single[(d, skipping)] = self.pool.submit(translate, str(checkpoints[skipping][d]), d, True)
            entry = {"level": level, "pruned_fraction": manifest["outputs"][self.directions[0]]["pruned_fraction"],
                     "timed_directions": timed}
            for skipping in (True, False):
                done = {d: jobs[(d, skipping)].result() for d in self.directions if (d, skipping) in jobs}
                chrf = {d: score(t.hypotheses, self.references[d], stats_lib.split_pair(d)[1])["chrf++"]
                        for d, (t, _, _) in done.items()}
                if not skipping and known is not None:
                    chrf = {d: known["directions"][d]["chrf++"] for d in self.directions}
                entry["on" if skipping else "off"] = {
                    "chrf++": round(float(np.mean(list(chrf.values()))), 2),
                    "directions": chrf,
                    "sentences_per_second": round(sum(done[d][0].sentences for d in timed)
                                                  / sum(done[d][0].seconds for d in timed), 2),
                    "skipped_share": round(sum(s for _, s, _ in done.values())
                                           / max(1, sum(n for _, _, n in done.values())), 4),
                }
                alone = [single[(d, skipping)].result() for d in timed]
                entry["on" if skipping else "off"]["single_sentences_per_second"] = round(
                    sum(t.sentences for t in alone) / sum(t.seconds for t in alone), 3)
            results[name] = entry
            with atomic_open(str(path), "w") as f:
                f.write(json.dumps(results, indent=1, sort_keys=True) + "\n")
            for skipping in (True, False):
                for file in checkpoints[skipping].values():
                    if file.exists():
                        os.unlink(file)
            self.log(f"skipping at {level:.0%}: chrF++ {entry['on']['chrf++']:.2f} vs {entry['off']['chrf++']:.2f}, "
                     f"{entry['on']['sentences_per_second']:.2f} vs {entry['off']['sentences_per_second']:.2f} "
                     f"sentences/s in batches, {entry['on']['single_sentences_per_second']:.2f} vs "
                     f"{entry['off']['single_sentences_per_second']:.2f} one at a time, "
                     f"{entry['on']['skipped_share']:.1%} of second experts skipped "
                     f"({time.monotonic() - start:.0f} s)")


def translate_counting_skips(checkpoint: str, direction: str) -> Tuple[Translation, int, int]:
    """(translation, second experts skipped, second experts chosen) over every MoE layer's real tokens
    during generation: the MoE layers' observer counts what the gates decided."""
    assert _translators, "start_worker runs first in every worker"
    source, target = stats_lib.split_pair(direction)
    model = _translators[False].load(checkpoint, source, target)
    counts = [0, 0]

    def count(record) -> None:
        routing = record.routing
        real = torch.ones_like(routing.experts[:, 0], dtype=torch.bool) if record.padding is None else ~record.padding
        counts[1] += int(real.sum())
        if routing.skipped is not None:
            counts[0] += int((routing.skipped & real).sum())

    layers = model.moe_layers()
    for layer in layers:
        layer.observer = count
    try:
        translation = _translators[False].translate(checkpoint, source, target)
    finally:
        for layer in layers:
            layer.observer = None
    return translation, counts[0], counts[1]


def mean(run: dict, key: str) -> float:
    """A score averaged over a run's directions."""
    return float(np.mean([scores[key] for scores in run["directions"].values()]))
