"""Prune a checkpoint from statistics: choose experts per target (global, pair, language) and write.

This is the library behind ``fairseq-moe-prune prune``: statistics -> metric -> selection ->
checkpoint surgery, one checkpoint per target, plus a manifest of what was kept and why.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

from torch import Tensor
from tqdm import tqdm

from fairseq_moe_prune import calibration as calibration_lib
from fairseq_moe_prune import reconstruction
from fairseq_moe_prune import stats as stats_lib
from fairseq_moe_prune.checkpoints.layouts import MoECheckpoint, checkpoint_files, open_checkpoint
from fairseq_moe_prune.checkpoints.streaming import materialize
from fairseq_moe_prune.checkpoints.surgery import CheckpointView, prune_checkpoint, save_sharded, save_single
from fairseq_moe_prune.files import check_output, input_files, open_regular, staged_directory, write_atomic
from fairseq_moe_prune.fingerprint import weights_fingerprint
from fairseq_moe_prune.layout import MoELayerSpec, config_value
from fairseq_moe_prune.models.task_routing import check_skipping
from fairseq_moe_prune.ranking import (
    GRANULARITIES,
    Budget,
    SelectionError,
    fixed_per_layer_counts,
    metric_values,
    select_fixed,
    select_threshold,
)
from fairseq_moe_prune.stats import Fingerprint, LayerCounts, MoEStats, StatsError

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
    skip_beta: Optional[str] = None  # dynamic skipping: "median" (of the calibration tokens), a number or one per layer
    beam: int = 4  # reconstruction: kept sets the search carries (1: greedy)
    exact_limit: int = 5000  # reconstruction: enumerate every kept set when there are at most this many
    shared: int = 0  # per language, fixed selection: this many of each layer's kept experts are the same for every
    # language, the most valuable by the statistics of all pairs pooled (a remedy for into-English over-generation)
    calibration_pool_tokens: int = calibration_lib.POOL_TOKENS  # reconstruction: most tokens a layer is judged on
    search_device: str = "cpu"  # reconstruction: where the experts are evaluated on the calibration tokens


@dataclass
class Choice:
    kept: Selection
    values: Dict[str, List[float]] = field(default_factory=dict)  # metric value of each kept expert
    losses: Dict[str, float] = field(default_factory=dict)  # reconstruction loss of each layer (reconstruction)


def choose(counts: Mapping[str, LayerCounts], specs: List[MoELayerSpec], options: PruneOptions, name: str,
           shared: Optional[Selection] = None) -> Choice:
    """Rank and select the experts of the layers in ``counts`` (a subset of ``specs`` is fine). ``shared``:
    experts each layer keeps whatever their value here, counted in its budget (fixed selection)."""
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
        kept = select_fixed(values, {prefix: per_layer[prefix] for prefix in values}, shared)
    elif options.selection == "threshold":
        keep = None
        if options.threshold is None:
            total = sum(spec.num_experts for spec in specs)
            keep = round(Budget(options.prune_fraction, options.keep).kept_total(total) * len(layer_specs) / len(specs))
        kept = select_threshold(values, options.threshold, keep, options.min_per_layer)
    else:
        raise SelectionError(f"unknown selection {options.selection!r} (fixed or threshold)")
    return Choice(kept, {prefix: [float(values[prefix][e]) for e in ids] for prefix, ids in kept.items()})


def materialized_experts(checkpoint: MoECheckpoint, wanted: Mapping[str, List[int]],
                         batch: int = 16) -> Iterator[Tuple[str, int, Dict[str, Tensor]]]:
    """(layer prefix, expert id, its tensors) of the wanted experts, read ``batch`` experts at a time (a sharded
    checkpoint opens its rank files once per batch)."""
    entries = checkpoint.experts(wanted)
    while True:
        chunk = list(itertools.islice(entries, batch))
        if not chunk:
            return
        tensors = materialize({(i, name): entry for i, (_, _, named) in enumerate(chunk) for name, entry in named.items()})
        for i, (prefix, expert, named) in enumerate(chunk):
            yield prefix, expert, {name: tensors[(i, name)] for name in named}


def checkpoint_fingerprint(checkpoint: MoECheckpoint) -> Fingerprint:
    """The fingerprint (fingerprint.py) of a checkpoint's MoE layers: gates and experts."""
    specs = checkpoint.specs
    experts = materialized_experts(checkpoint, {spec.prefix: list(range(spec.num_experts)) for spec in specs})
    return weights_fingerprint([checkpoint.state["model"][spec.gate_key] for spec in specs], experts, specs)


def check_stats_match(stats: MoEStats, fingerprint: Fingerprint) -> None:
    if stats.fingerprint != fingerprint:
        raise StatsError("the statistics come from another model (MoE layers, gate or expert weights differ from the "
                         "checkpoint)")


def direction_pairs(stats: Optional[MoEStats], options: PruneOptions) -> List[str]:
    if options.directions:
        for direction in options.directions:
            stats_lib.split_pair(direction)  # names become file names: letters, digits and _ only
        return list(options.directions)
    if stats is None:
        raise SelectionError("name the directions to write with --directions")
    return sorted(stats.pairs)


def language_choices(stats: MoEStats, specs: List[MoELayerSpec], options: PruneOptions) -> Dict[str, Choice]:
    """One expert set per language: encoder layers from its statistics as a source, decoder as a target;
    with ``options.shared``, each layer's first ``shared`` experts chosen from all pairs pooled, for all."""
    shared = None
    if options.shared:
        if options.selection != "fixed":
            raise SelectionError("--shared needs the fixed selection (a number of experts per layer)")
        pooled = {spec.prefix: options.shared for spec in specs}
        shared = select_fixed({prefix: metric_values(layer, options.metric, f"{options.seed}:global:{prefix}")
                               for prefix, layer in stats_lib.total(stats).items()}, pooled)
    return {language: choose(layers, specs, options, language, shared)
            for language, layers in stats_lib.by_language(stats).items()}


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
        if spec.prefix in per_language[language].losses:
            combined.losses[spec.prefix] = per_language[language].losses[spec.prefix]
    return combined


def plan(stats: Optional[MoEStats], specs: List[MoELayerSpec], options: PruneOptions,
         imported: Optional[Dict[str, Choice]] = None) -> Tuple[Dict[str, Choice], Dict[str, Choice]]:
    """(choice per output name, choice per language for experts.json) without touching weights."""
    if options.granularity not in GRANULARITIES:
        raise SelectionError(f"unknown granularity {options.granularity!r} ({', '.join(GRANULARITIES)})")
    if options.shared and options.granularity != "language":
        raise SelectionError("--shared applies to --granularity language (the other granularities share one set)")
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
        with open_regular(path) as f:  # a FIFO is refused, not waited on
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


def check_request(options: PruneOptions, stats_path: Optional[str], experts_json_in: Optional[str],
                  calibration_path: Optional[str]) -> None:
    """Refuse options that do not go together, before anything is read."""
    if options.shared < 0:
        raise SelectionError(f"--shared takes a number of experts (0 or more), got {options.shared}")
    if options.shared and options.metric == "reconstruction":
        raise SelectionError("--shared goes with the statistics metrics, not --metric reconstruction")
    if options.selection == "fixed" and options.threshold is not None:
        raise SelectionError("--threshold goes with --selection threshold")
    if options.prune_fraction is None and options.keep is None and options.threshold is None and not experts_json_in:
        raise SelectionError("give a budget: --prune-fraction, --keep or (with --selection threshold) --threshold")
    if not (stats_path or experts_json_in or calibration_path):
        raise SelectionError("give --stats, --calibration (with --metric reconstruction) or --experts-json")
    if options.beam < 1:
        raise SelectionError(f"--beam must be at least 1, got {options.beam}")
    calibration_lib.check_pool_tokens(options.calibration_pool_tokens)
    reconstruction.search_device(options.search_device)


def prune(checkpoint_path: str, out_dir: str, options: PruneOptions, stats_path: Optional[str] = None,
          experts_json_in: Optional[str] = None, force: bool = False,
          calibration_path: Optional[str] = None) -> Dict[str, object]:
    """Write one pruned checkpoint per target into ``out_dir`` (created whole, or not at all)."""
    check_request(options, stats_path, experts_json_in, calibration_path)
    inputs = [*checkpoint_files(checkpoint_path),
              *(file for path in (stats_path, experts_json_in, calibration_path) if path for file in input_files(path))]
    check_output(out_dir, inputs, force)
    checkpoint = open_checkpoint(checkpoint_path)
    stats = stats_lib.load(stats_path) if stats_path else None
    fingerprint = checkpoint_fingerprint(checkpoint) if stats_path or calibration_path else None
    if stats is not None:
        if not stats.pairs:
            raise StatsError(f"{stats_path} holds no language pairs (nothing was recorded)")
        check_stats_match(stats, fingerprint)
    calibration = load_calibration(calibration_path, checkpoint, fingerprint) if calibration_path else None
    imported = read_experts_json(experts_json_in, checkpoint.specs) if experts_json_in else None
    if options.metric == "reconstruction" and imported is None:
        outputs, per_language = reconstruction_plan(calibration, checkpoint, options)
    else:
        if stats is None and imported is None:
            raise SelectionError("give --stats or --experts-json")
        outputs, per_language = plan(stats, checkpoint.specs, options, imported)
    betas = {name: skip_betas(calibration, checkpoint.specs, options, name, choice) for name, choice in outputs.items()}
    for layer_betas in betas.values():
        if layer_betas is not None:
            check_skipping(checkpoint.config, layer_betas)

    with staged_directory(out_dir, force) as staging:
        return write_outputs(checkpoint, outputs, per_language, staging, options, stats_path, experts_json_in,
                             calibration_path, betas)


def write_outputs(checkpoint: MoECheckpoint, outputs: Mapping[str, Choice], per_language: Mapping[str, Choice],
                  staging: str, options: PruneOptions, stats_path: Optional[str],
                  experts_json_in: Optional[str], calibration_path: Optional[str] = None,
                  betas: Optional[Mapping[str, Optional[List[float]]]] = None) -> Dict[str, object]:
    total = sum(spec.num_experts for spec in checkpoint.specs)
    manifest: Dict[str, object] = {
        "source_checkpoint": os.path.abspath(checkpoint.path),
        "statistics": os.path.abspath(stats_path) if stats_path else None,
        "experts_json": os.path.abspath(experts_json_in) if experts_json_in else None,
        "calibration": os.path.abspath(calibration_path) if calibration_path else None,
        "options": asdict(options),
        "outputs": {},
    }
    for name, choice in tqdm(sorted(outputs.items()), desc="pruned checkpoints", unit="ckpt", disable=None):
        pruned = prune_checkpoint(checkpoint, choice.kept)
        layer_betas = (betas or {}).get(name)
        if layer_betas is not None:
            set_model_config(pruned, "moe_skip_betas", format_betas(layer_betas))
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
        if choice.losses:
            manifest["outputs"][name]["reconstruction_loss"] = {p: round(v, 8) for p, v in choice.losses.items()}
        if layer_betas is not None:
            manifest["outputs"][name]["skip_betas"] = format_betas(layer_betas)
        del pruned
    if per_language and len({spec.num_experts for spec in checkpoint.specs}) == 1:
        write_atomic(os.path.join(staging, "experts.json"),
                     json.dumps(experts_json(per_language, checkpoint.specs), sort_keys=True) + "\n")
    # strict JSON: a NaN or inf here is a bug upstream, refused rather than written as a bare NaN
    write_atomic(os.path.join(staging, "manifest.json"),
                 json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return manifest


# --- reconstruction-loss selection and dynamic skipping (Lu et al. 2024); see reconstruction.py -------------


def load_calibration(path: str, checkpoint: MoECheckpoint, fingerprint: Fingerprint) -> "calibration_lib.Calibration":
    calibration = calibration_lib.load(path)
    if calibration.fingerprint != fingerprint:
        raise StatsError("the calibration samples come from another model (MoE layers, gate or expert weights differ "
                         "from the checkpoint)")
    widths = {spec.prefix: int(checkpoint.state["model"][spec.gate_key].shape[1]) for spec in checkpoint.specs}
    for pair, layers in calibration.pairs.items():
        for prefix, sample in layers.items():
            if sample.inputs.shape[1] != widths[prefix]:
                raise StatsError(f"{path}: {pair} {prefix}: samples of width {sample.inputs.shape[1]}, but the "
                                 f"checkpoint's layer takes {widths[prefix]}")
    return calibration


def layer_experts(checkpoint: MoECheckpoint, spec: MoELayerSpec) -> List[Dict[str, Tensor]]:
    """The weights of every expert of one layer (a sharded checkpoint opens its rank files for them)."""
    return [tensors for _, _, tensors in materialized_experts(checkpoint, {spec.prefix: list(range(spec.num_experts))})]


def view_names(calibration: "calibration_lib.Calibration", options: PruneOptions) -> List[str]:
    """The expert sets to choose: "global", each pair, or each language (as a source or a target)."""
    if options.granularity == "global":
        return ["global"]
    if options.granularity == "pair":
        pairs = direction_pairs(calibration, options)
        for pair in pairs:
            if pair not in calibration.pairs:
                raise SelectionError(f"language pair {pair} is not in the calibration samples "
                                     f"(has {', '.join(sorted(calibration.pairs))})")
        return pairs
    return sorted({language for pair in calibration.pairs for language in stats_lib.split_pair(pair)})


def reconstruction_plan(calibration: Optional["calibration_lib.Calibration"], checkpoint: MoECheckpoint,
                        options: PruneOptions) -> Tuple[Dict[str, Choice], Dict[str, Choice]]:
    """Like :func:`plan`, with each layer's kept set chosen by reconstruction loss on calibration tokens.

    Layer by layer: the layer's experts are read once, and run once on each view's tokens.
    """
    if calibration is None:
        raise SelectionError("--metric reconstruction needs --calibration (samples from --moe-calibration-out)")
    if options.granularity not in GRANULARITIES:
        raise SelectionError(f"unknown granularity {options.granularity!r} ({', '.join(GRANULARITIES)})")
    if options.selection != "fixed":
        raise SelectionError("--metric reconstruction chooses a fixed number per layer (--selection fixed)")
    config = checkpoint.config
    if bool(config_value(config, "moe_top1_expert", False)):
        raise SelectionError("--metric reconstruction supports top-2 gating only")
    activation_fn = reconstruction.activation(str(config_value(config, "activation_fn", "relu")))
    eom = float(config_value(config, "moe_eom", 0.0))
    specs = checkpoint.specs
    per_layer = fixed_per_layer_counts(specs, Budget(options.prune_fraction, options.keep), options.ratio,
                                       options.min_per_layer)
    names = view_names(calibration, options)
    device = reconstruction.search_device(options.search_device)
    choices = {name: Choice({}, {}) for name in names}
    for spec in tqdm(specs, desc="reconstruction search", unit="layer", disable=None):
        if per_layer[spec.prefix] == spec.num_experts:  # nothing to choose (e.g. --prune-fraction 0 --skip-beta)
            for name in names:
                choices[name].kept[spec.prefix] = list(range(spec.num_experts))
            continue
        experts = layer_experts(checkpoint, spec)
        for name in names:
            pool, what = calibration_lib.view(calibration, options.granularity, name, spec.prefix,
                                              options.calibration_pool_tokens)
            if pool.size == 0:
                if options.granularity == "language":
                    continue  # this language never was on this side; combine_direction says so if it is needed
                raise SelectionError(f"the calibration samples have no tokens of {spec.prefix} from {what}")
            problem = reconstruction.layer_problem(pool.inputs, pool.probs, pool.outputs, pool.weights, experts,
                                                   activation_fn, eom, device)
            result = reconstruction.search(problem, per_layer[spec.prefix], options.exact_limit, options.beam)
            choices[name].kept[spec.prefix] = result.kept
            choices[name].values[spec.prefix] = result.removal_cost
            choices[name].losses[spec.prefix] = result.loss
            del problem
        del experts
    if options.granularity == "language":
        return {d: combine_direction(d, choices, specs) for d in direction_pairs(calibration, options)}, choices
    return choices, {}


def parse_skip_beta(text: str, specs: List[MoELayerSpec]) -> Optional[List[float]]:
    """``median`` -> None (computed per layer); a number -> every layer; a list -> one per MoE layer."""
    if text == "median":
        return None
    try:
        betas = [float(part) for part in text.split(",")]
    except ValueError:
        raise SelectionError(f"--skip-beta takes median, a number or one number per MoE layer, got {text!r}") from None
    if len(betas) == 1:
        betas = betas * len(specs)
    if len(betas) != len(specs):
        raise SelectionError(f"--skip-beta lists {len(betas)} betas but the model has {len(specs)} MoE layers")
    if any(not 0.0 <= beta <= 1.0 for beta in betas):
        raise SelectionError(f"skip betas must be in [0, 1], got {text!r}")
    return betas


def skip_betas(calibration: Optional["calibration_lib.Calibration"], specs: List[MoELayerSpec], options: PruneOptions,
               name: str, choice: Choice) -> Optional[List[float]]:
    """The per-layer betas to store for output ``name`` (None: no skipping)."""
    if options.skip_beta is None:
        return None
    betas = parse_skip_beta(options.skip_beta, specs)
    if betas is not None:
        return betas
    if calibration is None:
        raise SelectionError("--skip-beta median needs --calibration (samples from --moe-calibration-out)")
    betas = []
    for spec in specs:
        pool, what = calibration_lib.view(calibration, options.granularity, name, spec.prefix,
                                          options.calibration_pool_tokens)
        if pool.size == 0:
            raise SelectionError(f"the calibration samples have no tokens of {spec.prefix} from {what}")
        betas.append(reconstruction.median_skip_beta(pool.probs, pool.weights, choice.kept[spec.prefix]))
    return betas


def format_betas(betas: List[float]) -> str:
    return ",".join(f"{beta:.6f}" for beta in betas)


def set_model_config(pruned: CheckpointView, name: str, value: object) -> None:
    """Set a field of the pruned checkpoint's model config (a copy made by the surgery)."""
    state = pruned.state
    config = state["cfg"]["model"] if state.get("cfg") is not None and state["cfg"].get("model") is not None \
        else state["args"]
    if isinstance(config, dict):
        config[name] = value
    else:
        setattr(config, name, value)
