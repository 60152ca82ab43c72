"""The statistics file: per language pair, per MoE layer, per expert counts of gate decisions.

Only counts are stored, so that merging runs is addition; metrics are derived later (ranking).
Sums of probabilities are kept in fixed point (integers in units of 2**-32) so that addition is
exact and associative: two halves of a dev set merge into the very bytes one run over all of it
writes. The file is canonical JSON, written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from fairseq_moe_prune.files import atomic_open

FORMAT = "fairseq-moe-prune/stats"
VERSION = 2  # 2 added routed / reap_sum (REAP saliency)
PROB_SCALE = 2**32  # probabilities are summed as round(p * PROB_SCALE)
REAP_SCALE = 2**20  # gate weight * expert output norm, summed as round(v * REAP_SCALE)

# The per-expert arrays of a layer, all int64.
COUNT_FIELDS = ("top1", "top2", "prob_sum", "prob_first_sum", "prob_second_sum", "rank_sum", "routed", "reap_sum")


class StatsError(ValueError):
    """A statistics file is unreadable or does not fit what it is used with."""


@dataclass
class LayerCounts:
    """Counts for one MoE layer: ``tokens`` real tokens seen, and per-expert arrays."""

    tokens: int
    top1: np.ndarray  # tokens whose first choice is e
    top2: np.ndarray  # tokens that have e among their (up to) two choices
    prob_sum: np.ndarray  # sum of p(e) over all tokens, fixed point
    prob_first_sum: np.ndarray  # sum of p(e) over tokens whose first choice is e, fixed point
    prob_second_sum: np.ndarray  # sum of p(e) over tokens whose second choice is e, fixed point
    rank_sum: np.ndarray  # sum of e's rank (0 = most probable) over all tokens
    routed: np.ndarray  # tokens e actually processed (after capacity and policy)
    reap_sum: np.ndarray  # sum over those tokens of gate weight * ||e's output||, fixed point (REAP)

    @classmethod
    def zeros(cls, num_experts: int) -> "LayerCounts":
        return cls(0, *(np.zeros(num_experts, dtype=np.int64) for _ in COUNT_FIELDS))

    @property
    def num_experts(self) -> int:
        return len(self.top1)

    def __add__(self, other: "LayerCounts") -> "LayerCounts":
        if other.num_experts != self.num_experts:
            raise StatsError(f"cannot add counts of {self.num_experts} and {other.num_experts} experts")
        return LayerCounts(
            self.tokens + other.tokens,
            *(getattr(self, name) + getattr(other, name) for name in COUNT_FIELDS),
        )

    def to_json(self) -> Dict[str, Any]:
        return {"tokens": int(self.tokens), **{name: getattr(self, name).tolist() for name in COUNT_FIELDS}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LayerCounts":
        arrays = [np.asarray(data[name], dtype=np.int64) for name in COUNT_FIELDS]
        if len({len(a) for a in arrays}) != 1:
            raise StatsError("per-expert arrays of a layer differ in length")
        return cls(int(data["tokens"]), *arrays)


@dataclass
class PairStats:
    """What one language pair (direction) contributed: sentences and counts per MoE layer."""

    sentences: int
    layers: Dict[str, LayerCounts]  # keyed by MoE layer prefix, e.g. "encoder.layers.3.moe_layer"

    def __add__(self, other: "PairStats") -> "PairStats":
        if set(self.layers) != set(other.layers):
            raise StatsError("cannot add statistics over different MoE layers")
        return PairStats(
            self.sentences + other.sentences,
            {prefix: self.layers[prefix] + other.layers[prefix] for prefix in self.layers},
        )


@dataclass
class Fingerprint:
    """Identifies the model statistics were gathered on: its MoE layers and a hash of its gates."""

    layers: List[Tuple[str, int]]  # (prefix, experts) in layout order
    gate_sha256: str

    def to_json(self) -> Dict[str, Any]:
        return {"moe_layers": [[prefix, count] for prefix, count in self.layers], "gate_sha256": self.gate_sha256}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Fingerprint":
        return cls([(str(p), int(c)) for p, c in data["moe_layers"]], str(data["gate_sha256"]))


@dataclass
class MoEStats:
    fingerprint: Fingerprint
    settings: Dict[str, Any]  # how the counts were gathered (decoder tokens, beam, ...)
    pairs: Dict[str, PairStats] = field(default_factory=dict)  # keyed by "src-tgt"

    def to_json(self) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "prob_scale": PROB_SCALE,
            "reap_scale": REAP_SCALE,
            "model": self.fingerprint.to_json(),
            "settings": self.settings,
            "pairs": {
                pair: {
                    "sentences": stats.sentences,
                    "layers": {prefix: counts.to_json() for prefix, counts in stats.layers.items()},
                }
                for pair, stats in sorted(self.pairs.items())
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "MoEStats":
        if data.get("format") != FORMAT:
            raise StatsError("not a fairseq-moe-prune statistics file")
        if data.get("version") != VERSION or data.get("prob_scale") != PROB_SCALE or data.get("reap_scale") != REAP_SCALE:
            raise StatsError(f"statistics format version {data.get('version')} is not supported (need {VERSION}); "
                             "record them again with this version")
        pairs = {
            pair: PairStats(
                int(entry["sentences"]),
                {prefix: LayerCounts.from_json(counts) for prefix, counts in entry["layers"].items()},
            )
            for pair, entry in data["pairs"].items()
        }
        return cls(Fingerprint.from_json(data["model"]), dict(data["settings"]), pairs)


def split_pair(pair: str) -> Tuple[str, str]:
    source, _, target = pair.partition("-")
    if not source or not target:
        raise StatsError(f"language pair {pair!r} is not of the form SRC-TGT")
    return source, target


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a mix."""
    with atomic_open(path, "w") as f:
        f.write(text)


def save(stats: MoEStats, path: str) -> None:
    write_atomic(path, json.dumps(stats.to_json(), sort_keys=True, separators=(",", ":")) + "\n")


def load(path: str) -> MoEStats:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise StatsError(f"{path}: no such statistics file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StatsError(f"{path}: not a statistics file ({error.msg if hasattr(error, 'msg') else error})") from None
    try:
        return MoEStats.from_json(data)
    except (KeyError, TypeError) as error:
        raise StatsError(f"{path}: malformed statistics file (missing {error})") from None
    except StatsError as error:
        raise StatsError(f"{path}: {error}") from None


def check_compatible(a: MoEStats, b: MoEStats, what: str = "statistics") -> None:
    if a.fingerprint != b.fingerprint:
        raise StatsError(f"{what} come from different models (MoE layers or gate weights differ)")
    if a.settings != b.settings:
        differing = sorted(k for k in set(a.settings) | set(b.settings) if a.settings.get(k) != b.settings.get(k))
        raise StatsError(f"{what} were gathered with different settings: {', '.join(differing)}")


def merge(all_stats: Iterable[MoEStats]) -> MoEStats:
    """Add the counts of several runs (per pair); refuses runs over different models or settings."""
    all_stats = list(all_stats)
    if not all_stats:
        raise StatsError("nothing to merge")
    first = all_stats[0]
    merged = MoEStats(first.fingerprint, dict(first.settings), {})
    for stats in all_stats:
        check_compatible(first, stats)
        for pair, pair_stats in stats.pairs.items():
            merged.pairs[pair] = merged.pairs[pair] + pair_stats if pair in merged.pairs else pair_stats
    return merged


def by_language(stats: MoEStats) -> Dict[str, Dict[str, LayerCounts]]:
    """The per-language view: encoder layers from pairs with that SOURCE language, decoder from TARGET."""
    view: Dict[str, Dict[str, LayerCounts]] = {}
    for pair, pair_stats in sorted(stats.pairs.items()):
        source, target = split_pair(pair)
        for prefix, counts in pair_stats.layers.items():
            language = source if prefix.startswith("encoder.") else target
            layers = view.setdefault(language, {})
            layers[prefix] = layers[prefix] + counts if prefix in layers else counts
    return view


def total(stats: MoEStats, pairs: Optional[Iterable[str]] = None) -> Dict[str, LayerCounts]:
    """Counts summed over pairs (all by default): the language-agnostic (global) view."""
    chosen = sorted(stats.pairs) if pairs is None else list(pairs)
    result: Dict[str, LayerCounts] = {}
    for pair in chosen:
        for prefix, counts in stats.pairs[pair].layers.items():
            result[prefix] = result[prefix] + counts if prefix in result else counts
    return result


def summary(stats: MoEStats, top: int = 5) -> str:
    """A per-layer table of the most and least used experts (share of tokens as first choice)."""
    lines = [
        f"model: {len(stats.fingerprint.layers)} MoE layers, gates {stats.fingerprint.gate_sha256[:12]}; "
        f"settings: {json.dumps(stats.settings, sort_keys=True)}",
    ]
    for pair, pair_stats in sorted(stats.pairs.items()):
        lines.append(f"{pair}: {pair_stats.sentences} sentences")
    lines.append(f"{'layer':<28} {'tokens':>9}  most used (expert:top1%)  |  least used")
    for prefix, counts in total(stats).items():
        share = counts.top1 / max(counts.tokens, 1) * 100
        order = np.argsort(-share, kind="stable")
        most = " ".join(f"{e}:{share[e]:.1f}" for e in order[:top])
        least = " ".join(f"{e}:{share[e]:.1f}" for e in order[::-1][:top])
        lines.append(f"{prefix:<28} {counts.tokens:>9}  {most}  |  {least}")
    return "\n".join(lines)
