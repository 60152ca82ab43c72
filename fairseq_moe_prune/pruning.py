"""Prune a checkpoint from statistics: choose experts per target (global, pair, language) and write.

This is the library behind ``fairseq-moe-prune prune``: statistics -> metric -> selection ->
checkpoint surgery, one checkpoint per target, plus a manifest of what was kept and why.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

from tqdm import tqdm

from fairseq_moe_prune import stats as stats_lib
from fairseq_moe_prune.checkpoints.layouts import MoECheckpoint, open_checkpoint
from fairseq_moe_prune.checkpoints.surgery import (
    check_output,
    prune_checkpoint,
    save_sharded,
    save_single,
    staged_directory,
)
from fairseq_moe_prune.models.layout import MoELayerSpec
from fairseq_moe_prune.ranking import (
    Budget,
    SelectionError,
    fixed_per_layer_counts,
    metric_values,
    select_fixed,
    select_threshold,
)
from fairseq_moe_prune.recording import gate_fingerprint
from fairseq_moe_prune.stats import LayerCounts, MoEStats, StatsError

GRANULARITIES = ("global", "pair", "language")
Selection = Dict[str, List[int]]  # layer prefix -> kept original expert ids, ascending


@dataclass
class PruneOptions:
    metric: str = "importance"
    granularity: str = "language"
    selection: str = "fixed"  # "fixed" per layer, or "threshold" over all layers
    prune_fraction: Optional[float] = None
    keep: Optional[int] = None
    ratio: str = "3:1"  # encoder:decoder experts per layer, fixed selection
    threshold: Optional[float] = None  # cumulative metric mass, threshold selection
    min_per_layer: int = 2
    directions: Optional[List[str]] = None  # default: every pair in the statistics
    fp16: bool = False
    sharded: bool = False
    seed: int = 0  # for the random metric


@dataclass
class Choice:
    kept: Selection
    values: Dict[str, List[float]] = field(default_factory=dict)  # metric value of each kept expert


def choose(counts: Mapping[str, LayerCounts], specs: List[MoELayerSpec], options: PruneOptions, name: str) -> Choice:
    """Rank and select the experts of the layers in ``counts`` (a subset of ``specs`` is fine)."""
    layer_specs = [spec for spec in specs if spec.prefix in counts]
    values = {
        spec.prefix: metric_values(counts[spec.prefix], options.metric, f"{options.seed}:{name}:{spec.prefix}")
        for spec in layer_specs
    }
    if options.selection == "fixed":
        # the budget is over the whole model, so per-layer counts come from all layers
        per_layer = fixed_per_layer_counts(
            specs, Budget(options.prune_fraction, options.keep), options.ratio, options.min_per_layer
        )
        kept = select_fixed(values, {prefix: per_layer[prefix] for prefix in values})
    elif options.selection == "threshold":
        keep = None
        if options.threshold is None:
            total = sum(spec.num_experts for spec in specs)
            keep = round(Budget(options.prune_fraction, options.keep).kept_total(total) * len(layer_specs) / len(specs))
        kept = select_threshold(values, options.threshold, keep, options.min_per_layer)
    else:
        raise SelectionError(f"unknown selection {options.selection!r} (fixed or threshold)")
    return Choice(kept, {prefix: [float(values[prefix][e]) for e in ids] for prefix, ids in kept.items()})


def check_stats_match(stats: MoEStats, checkpoint: MoECheckpoint) -> None:
    weights = checkpoint.state["model"]
    fingerprint = gate_fingerprint([weights[f"{s.prefix}.gate.wg.weight"] for s in checkpoint.specs], checkpoint.specs)
    if stats.fingerprint != fingerprint:
        raise StatsError("the statistics come from another model (MoE layers or gate weights differ from the checkpoint)")


def direction_pairs(stats: Optional[MoEStats], options: PruneOptions) -> List[str]:
    if options.directions:
        for direction in options.directions:
            stats_lib.split_pair(direction)  # names become file names: letters, digits and _ only
        return list(options.directions)
    if stats is None:
        raise SelectionError("name the directions to write with --directions")
    return sorted(stats.pairs)


def language_choices(stats: MoEStats, specs: List[MoELayerSpec], options: PruneOptions) -> Dict[str, Choice]:
    """One expert set per language: encoder layers from its statistics as a source, decoder as a target."""
    return {language: choose(layers, specs, options, language) for language, layers in stats_lib.by_language(stats).items()}


def combine_direction(direction: str, per_language: Mapping[str, Choice], specs: List[MoELayerSpec]) -> Choice:
    source, target = stats_lib.split_pair(direction)
    combined = Choice({}, {})
    for spec in specs:
        language = source if spec.side == "encoder" else target
        role = "source" if spec.side == "encoder" else "target"
        if language not in per_language or spec.prefix not in per_language[language].kept:
            raise SelectionError(f"language {language} has no statistics as a {role} (needed for {direction})")
        combined.kept[spec.prefix] = per_language[language].kept[spec.prefix]
        combined.values[spec.prefix] = per_language[language].values.get(spec.prefix, [])
    return combined


def plan(stats: Optional[MoEStats], specs: List[MoELayerSpec], options: PruneOptions,
         imported: Optional[Dict[str, Choice]] = None) -> Tuple[Dict[str, Choice], Dict[str, Choice]]:
    """(choice per output name, choice per language for experts.json) without touching weights."""
    if options.granularity not in GRANULARITIES:
        raise SelectionError(f"unknown granularity {options.granularity!r} ({', '.join(GRANULARITIES)})")
    if imported is not None:
        return {d: combine_direction(d, imported, specs) for d in direction_pairs(stats, options)}, imported
    assert stats is not None
    if options.granularity == "global":
        return {"global": choose(stats_lib.total(stats), specs, options, "global")}, {}
    if options.granularity == "pair":
        outputs = {}
        for pair in direction_pairs(stats, options):
            if pair not in stats.pairs:
                raise SelectionError(f"language pair {pair} is not in the statistics (has {', '.join(sorted(stats.pairs))})")
            outputs[pair] = choose(stats.pairs[pair].layers, specs, options, pair)
        return outputs, {}
    per_language = language_choices(stats, specs, options)
    return {d: combine_direction(d, per_language, specs) for d in direction_pairs(stats, options)}, per_language


def experts_json(per_language: Mapping[str, Choice], specs: List[MoELayerSpec]) -> Dict[str, List[int]]:
    """The NLLB pruning paper's format: language -> global ids, id // experts-per-layer = MoE layer."""
    per_layer = uniform_count(specs)
    index = {spec.prefix: i for i, spec in enumerate(specs)}
    return {
        language: sorted(index[prefix] * per_layer + e for prefix, ids in choice.kept.items() for e in ids)
        for language, choice in sorted(per_language.items())
    }


def read_experts_json(path: str, specs: List[MoELayerSpec]) -> Dict[str, Choice]:
    """An experts.json: ``{language: [global expert ids]}``, every name and id checked."""
    per_layer = uniform_count(specs)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as error:
        raise SelectionError(f"{path}: cannot read experts.json ({error})") from None
    if not isinstance(data, dict) or not data:
        raise SelectionError(f"{path}: experts.json must map languages to lists of expert ids")
    choices = {}
    for language, ids in data.items():
        try:
            stats_lib.check_language(language)
        except StatsError as error:
            raise SelectionError(f"{path}: {error}") from None
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise SelectionError(f"{path}: the experts of {language} must be a list of whole-number ids")
        kept: Selection = {}
        for global_id in sorted(set(ids)):
            layer, expert = divmod(global_id, per_layer)
            if not 0 <= layer < len(specs):
                raise SelectionError(f"{path}: expert id {global_id} of {language} is out of range")
            kept.setdefault(specs[layer].prefix, []).append(expert)
        choices[language] = Choice(kept, {})
    return choices


def uniform_count(specs: List[MoELayerSpec]) -> int:
    counts = {spec.num_experts for spec in specs}
    if len(counts) != 1:
        raise SelectionError("experts.json ids need the same number of experts in every MoE layer")
    return counts.pop()


def prune(checkpoint_path: str, out_dir: str, options: PruneOptions, stats_path: Optional[str] = None,
          experts_json_in: Optional[str] = None, force: bool = False) -> Dict[str, object]:
    """Write one pruned checkpoint per target into ``out_dir`` (created whole, or not at all)."""
    inputs = [checkpoint_path, *(path for path in (stats_path, experts_json_in) if path)]
    check_output(out_dir, inputs, force)
    checkpoint = open_checkpoint(checkpoint_path)
    check_output(out_dir, checkpoint.ranks or [], force)
    stats = stats_lib.load(stats_path) if stats_path else None
    if stats is not None:
        if not stats.pairs:
            raise StatsError(f"{stats_path} holds no language pairs (nothing was recorded)")
        check_stats_match(stats, checkpoint)
    imported = read_experts_json(experts_json_in, checkpoint.specs) if experts_json_in else None
    if stats is None and imported is None:
        raise SelectionError("give --stats or --experts-json")
    outputs, per_language = plan(stats, checkpoint.specs, options, imported)

    with staged_directory(out_dir, force) as staging:
        return write_outputs(checkpoint, outputs, per_language, staging, options, stats_path, experts_json_in)


def write_outputs(checkpoint: MoECheckpoint, outputs: Mapping[str, Choice], per_language: Mapping[str, Choice],
                  staging: str, options: PruneOptions, stats_path: Optional[str],
                  experts_json_in: Optional[str]) -> Dict[str, object]:
    total = sum(spec.num_experts for spec in checkpoint.specs)
    manifest: Dict[str, object] = {
        "source_checkpoint": os.path.abspath(checkpoint.path),
        "statistics": os.path.abspath(stats_path) if stats_path else None,
        "experts_json": os.path.abspath(experts_json_in) if experts_json_in else None,
        "options": asdict(options),
        "outputs": {},
    }
    for name, choice in tqdm(sorted(outputs.items()), desc="pruned checkpoints", unit="ckpt", disable=None):
        pruned = prune_checkpoint(checkpoint, choice.kept)
        if options.sharded:
            paths = save_sharded(pruned, os.path.join(staging, f"{name}-shared.pt"), options.fp16)
            files = [os.path.basename(p) for p in paths]
        else:
            save_single(pruned, os.path.join(staging, f"{name}.pt"), options.fp16)
            files = [f"{name}.pt"]
        kept_total = sum(len(ids) for ids in choice.kept.values())
        manifest["outputs"][name] = {
            "files": files,
            "kept_experts": kept_total,
            "pruned_fraction": round(1 - kept_total / total, 6),
            "layers": {
                prefix: {"kept": ids, "metric": [round(v, 8) for v in choice.values.get(prefix, [])]}
                for prefix, ids in choice.kept.items()
            },
        }
        del pruned
    if per_language and len({spec.num_experts for spec in checkpoint.specs}) == 1:
        stats_lib.write_atomic(os.path.join(staging, "experts.json"),
                               json.dumps(experts_json(per_language, checkpoint.specs), sort_keys=True) + "\n")
    stats_lib.write_atomic(os.path.join(staging, "manifest.json"), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest
