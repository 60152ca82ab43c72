"""Rank experts from statistics and choose which to keep: pure functions of counts.

Metrics follow Koishekenov et al. (2023), plus REAP saliency (Cerebras 2025); each is
normalised to sum to 1 within a layer.
Selection is either a fixed number per layer (with an encoder:decoder ratio) or one threshold
over all layers together (with a minimum per layer). Kept ids are returned in ascending order,
which is the order the pruned gate rows and experts take.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from fairseq_moe_prune.errors import FairseqMoEPruneError
from fairseq_moe_prune.layout import MoELayerSpec
from fairseq_moe_prune.stats import PROB_SCALE, REAP_SCALE, LayerCounts

METRICS = ("importance", "vanilla_importance", "activity", "top2", "load_balancing", "reap", "random")
SELECTIONS = ("fixed", "threshold")  # a number per layer, or one metric-mass threshold over all layers
GRANULARITIES = ("global", "pair", "language")  # one expert set for everything, per language pair, per language


class SelectionError(FairseqMoEPruneError, ValueError):
    """A budget or selection request that cannot be met."""


def metric_values(counts: LayerCounts, metric: str, seed_text: str = "") -> np.ndarray:
    """One score per expert of a layer, normalised to sum to 1 (uniform when nothing was counted)."""
    tokens = max(counts.tokens, 1)
    top1 = counts.top1 / tokens  # activity: share of tokens whose first choice is e
    conf1 = np.divide(counts.prob_first_sum / PROB_SCALE, counts.top1,
                      out=np.zeros(counts.num_experts), where=counts.top1 > 0)
    mean = counts.prob_sum / PROB_SCALE / tokens
    if metric == "importance":
        values = top1 * np.exp(conf1)
    elif metric == "vanilla_importance":
        values = top1 * conf1
    elif metric == "activity":
        values = top1
    elif metric == "top2":
        values = counts.top2 / tokens
    elif metric == "load_balancing":
        values = top1 * mean
    elif metric == "reap":
        # REAP saliency: mean over the tokens an expert ran on of gate weight * ||expert output||
        values = np.divide(counts.reap_sum / REAP_SCALE, counts.routed,
                           out=np.zeros(counts.num_experts), where=counts.routed > 0)
    elif metric == "random":
        # seeded by the layer (and anything else in seed_text) so runs are reproducible
        seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little")
        values = np.random.default_rng(seed).random(counts.num_experts)
    else:
        raise SelectionError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():  # counts that fit together (stats.check_consistent) never give this
        raise SelectionError(f"the {metric} metric is not finite for some expert; the counts are unusable")
    total = values.sum()
    return values / total if total > 0 else np.full(counts.num_experts, 1.0 / counts.num_experts)


def order_by_value(values: np.ndarray) -> List[int]:
    """Experts from most to least valuable; ties go to the lower id."""
    return sorted(range(len(values)), key=lambda e: (-values[e], e))


@dataclass(frozen=True)
class Budget:
    """How many experts to keep: a fraction to prune or a total to keep (over all MoE layers)."""

    prune_fraction: Optional[float] = None
    keep: Optional[int] = None

    def kept_total(self, total_experts: int) -> int:
        if (self.prune_fraction is None) == (self.keep is None):
            raise SelectionError("give exactly one of a fraction to prune or a number of experts to keep")
        if self.prune_fraction is not None:
            if not 0.0 <= self.prune_fraction < 1.0:
                raise SelectionError(f"the fraction to prune must be in [0, 1), got {self.prune_fraction}")
            return math.floor(round(total_experts * (1.0 - self.prune_fraction), 6))
        if not 1 <= self.keep <= total_experts:
            raise SelectionError(f"cannot keep {self.keep} of {total_experts} experts")
        return self.keep


def parse_ratio(text: str) -> tuple:
    try:
        enc, dec = (float(part) for part in text.split(":"))
    except ValueError:
        raise SelectionError(f"an encoder:decoder ratio looks like 3:1, got {text!r}") from None
    if not (1e-6 <= enc <= 1e6 and 1e-6 <= dec <= 1e6):  # also refuses nan and inf
        raise SelectionError(f"both sides of the ratio must be positive numbers, got {text!r}")
    return enc, dec


def fixed_per_layer_counts(
    specs: Sequence[MoELayerSpec], budget: Budget, ratio: str = "1:1", min_per_layer: int = 1
) -> Dict[str, int]:
    """Experts to keep in each layer: encoder and decoder layers in the ratio, rounded down.

    NLLB at 80% with 3:1: 1,536 * 0.2 = 307 kept -> x = floor(307 / (3*6 + 6)) = 12,
    so 36 per encoder layer and 12 per decoder layer (288 kept, 81.25% pruned), as in the paper.
    """
    total = sum(spec.num_experts for spec in specs)
    keep = budget.kept_total(total)
    enc, dec = parse_ratio(ratio)
    counts = layer_counts(specs, keep, enc, dec)
    for prefix, count in counts.items():
        if count < min_per_layer:
            raise SelectionError(f"the budget leaves {count} experts in {prefix}; at least {min_per_layer} are needed"
                                 f"{what_would_work(specs, keep, enc, dec, ratio, min_per_layer)}")
    return counts


def layer_counts(specs: Sequence[MoELayerSpec], keep: int, enc: float, dec: float) -> Dict[str, int]:
    """``keep`` experts shared out over the layers, encoder and decoder layers in the ratio enc:dec, rounded down."""
    weights = {"encoder": enc, "decoder": dec}
    layers = {side: [s for s in specs if s.side == side] for side in weights}
    unit = math.floor(keep / sum(weights[spec.side] for spec in specs) + 1e-9)
    per_side = {side: math.floor(weights[side] * unit + 1e-9) for side in weights}
    for side, other in (("encoder", "decoder"), ("decoder", "encoder")):
        # a side that cannot hold its share hands the surplus to the other side
        cap = min((s.num_experts for s in layers[side]), default=0)
        if layers[side] and layers[other] and per_side[side] > cap:
            per_side[other] += (per_side[side] - cap) * len(layers[side]) // len(layers[other])
            per_side[side] = cap
    return {spec.prefix: min(spec.num_experts, per_side[spec.side]) for spec in specs}


def what_would_work(specs: Sequence[MoELayerSpec], keep: int, enc: float, dec: float, ratio: str,
                    min_per_layer: int) -> str:
    """For an impossible budget: the smallest one that works with this ratio, and whether 1:1 works with this one."""
    total = sum(spec.num_experts for spec in specs)
    works = [larger for larger in range(keep + 1, total + 1)
             if min(layer_counts(specs, larger, enc, dec).values()) >= min_per_layer]
    if works:
        fraction = math.floor((1 - works[0] / total) * 10000) / 10000
        hints = [f"with --ratio {ratio} keep at least {works[0]} of {total} (--keep {works[0]} or "
                 f"--prune-fraction {fraction:g})"]
    else:
        hints = [f"no budget does with --ratio {ratio} on this model"]
    if (enc, dec) != (1.0, 1.0) and min(layer_counts(specs, keep, 1.0, 1.0).values()) >= min_per_layer:
        hints.append("or use --ratio 1:1 for this budget")
    return f": {', '.join(hints)}"


def select_fixed(values: Mapping[str, np.ndarray], counts: Mapping[str, int],
                 shared: Optional[Mapping[str, List[int]]] = None) -> Dict[str, List[int]]:
    """The ``counts[layer]`` most valuable experts of each layer, in ascending id order; ``shared[layer]``
    (if given) are kept first and count towards ``counts[layer]``."""
    kept = {}
    for prefix in values:
        first = list((shared or {}).get(prefix, []))[: counts[prefix]]
        rest = [e for e in order_by_value(values[prefix]) if e not in first]
        kept[prefix] = sorted(first + rest[: counts[prefix] - len(first)])
    return kept


def select_threshold(
    values: Mapping[str, np.ndarray],
    threshold: Optional[float] = None,
    keep: Optional[int] = None,
    min_per_layer: int = 4,
) -> Dict[str, List[int]]:
    """Over all layers together, the most valuable experts until their mass reaches ``threshold``.

    Each layer's values sum to 1, so the mass to reach is ``threshold * layers``. With ``keep``
    instead, exactly that many are taken. Every layer keeps at least ``min_per_layer``.
    """
    if (threshold is None) == (keep is None):
        raise SelectionError("give exactly one of a threshold or a number of experts to keep")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise SelectionError(f"the threshold must be in (0, 1], got {threshold}")
    chosen: Dict[str, set] = {}
    for prefix, layer_values in values.items():
        if min_per_layer > len(layer_values):
            raise SelectionError(f"{prefix} has only {len(layer_values)} experts, fewer than the minimum {min_per_layer}")
        chosen[prefix] = set(order_by_value(layer_values)[:min_per_layer])
    ranked = sorted(
        ((float(v), prefix, e) for prefix, layer_values in values.items() for e, v in enumerate(layer_values)),
        key=lambda item: (-item[0], item[1], item[2]),
    )
    mass_needed = None if threshold is None else threshold * len(values)
    mass = sum(float(values[p][e]) for p, ids in chosen.items() for e in ids)
    for value, prefix, expert in ranked:
        taken = sum(len(ids) for ids in chosen.values())
        if keep is not None and taken >= keep:
            break
        if mass_needed is not None and mass >= mass_needed - 1e-12:
            break
        if expert not in chosen[prefix]:
            chosen[prefix].add(expert)
            mass += value
    if keep is not None and sum(len(ids) for ids in chosen.values()) > keep:
        raise SelectionError(f"keeping {min_per_layer} per layer already exceeds the budget of {keep} experts")
    return {prefix: sorted(ids) for prefix, ids in chosen.items()}
