"""The statistics file: per language pair, per MoE layer, per expert counts of gate decisions.

Only counts are stored, so that merging runs is addition; metrics are derived later (ranking).
Sums of probabilities are kept in fixed point (integers in units of 2**-32) so that addition is
exact and associative: two halves of a dev set merge into the very counts one run over all of it
gives. The file is canonical JSON, written atomically.

Files are input like any other: names, numbers and shapes are checked when a file is read. Each
recording run is listed in ``runs`` with an identity (a digest of what it recorded, so the same
inputs still give the same bytes) and the size of the subset it translated; a merged file lists
the runs it adds up, and merging one run twice is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from fairseq_moe_prune.errors import FairseqMoEPruneError
from fairseq_moe_prune.files import check_output, open_regular, write_atomic
from fairseq_moe_prune.layout import PREFIX_PATTERN, MoELayerSpec

FORMAT = "fairseq-moe-prune/stats"
# 2 added routed / reap_sum (REAP saliency); 3 added runs (identity and subset size); 4 added skipped;
# 5 fingerprints the experts too (model.experts_sha256, see fingerprint.py)
VERSION = 5
# Older files have no experts fingerprint, so nothing tells which experts they were counted on: refused
# (record them again). Within version 5 nothing is optional.
READABLE_VERSIONS = (5,)
PROB_SCALE = 2**32  # probabilities are summed as round(p * PROB_SCALE)
REAP_SCALE = 2**20  # gate weight * expert output norm, summed as round(v * REAP_SCALE)

# The per-expert arrays of a layer, all int64.
COUNT_FIELDS = ("top1", "top2", "prob_sum", "prob_first_sum", "prob_second_sum", "rank_sum", "routed", "reap_sum",
                "skipped")


class StatsError(FairseqMoEPruneError, ValueError):
    """A statistics file is unreadable or does not fit what it is used with."""


LANGUAGE = re.compile(r"^[A-Za-z0-9_]{1,64}$")  # eng_Latn; a name from a file becomes part of a file name
SUBSET = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_COUNT = 2**63 - 1  # counts are int64


def check_language(name: Any, what: str = "language") -> str:
    """A language name from a file or the command line: letters, digits and ``_`` only (e.g. eng_Latn)."""
    if not isinstance(name, str) or not LANGUAGE.fullmatch(name):
        raise StatsError(f"{what} {str(name)[:40]!r} is not a language name (letters, digits and _ only, e.g. eng_Latn)")
    return name


def whole_number(value: Any, what: str) -> int:
    """A count read from a file: a JSON integer in [0, 2**63)."""
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise StatsError(f"{what} must be a whole number >= 0, got {str(value)[:40]}")
    return value


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
    skipped: Optional[np.ndarray] = None  # tokens whose second choice e was skipped (dynamic skipping); None: 0

    def __post_init__(self) -> None:
        if self.skipped is None:
            self.skipped = np.zeros(len(self.top1), dtype=np.int64)

    @classmethod
    def zeros(cls, num_experts: int) -> "LayerCounts":
        return cls(0, *(np.zeros(num_experts, dtype=np.int64) for _ in COUNT_FIELDS))

    @property
    def num_experts(self) -> int:
        return len(self.top1)

    def __add__(self, other: "LayerCounts") -> "LayerCounts":
        if other.num_experts != self.num_experts:
            raise StatsError(f"cannot add counts of {self.num_experts} and {other.num_experts} experts")
        summed = [getattr(self, name) + getattr(other, name) for name in COUNT_FIELDS]
        # counts are never negative, so a sum past int64 wraps below zero
        if self.tokens + other.tokens > MAX_COUNT or any((array < 0).any() for array in summed):
            raise StatsError("the counts overflow 64-bit integers when added")
        return LayerCounts(self.tokens + other.tokens, *summed)

    def to_json(self) -> Dict[str, Any]:
        return {"tokens": int(self.tokens), **{name: getattr(self, name).tolist() for name in COUNT_FIELDS}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], num_experts: int, where: str) -> "LayerCounts":
        """Counts of a layer with ``num_experts`` experts; ``where`` names it in errors."""
        if not isinstance(data, dict):
            raise StatsError(f"{where} is not an object")
        arrays = []
        for name in COUNT_FIELDS:
            values = data[name]
            if not isinstance(values, list) or len(values) != num_experts:
                raise StatsError(f"{where}.{name} must list {num_experts} counts, one per expert")
            if not all(type(value) is int for value in values) or min(values) < 0 or max(values) > MAX_COUNT:
                raise StatsError(f"{where}.{name} must hold whole numbers >= 0")
            arrays.append(values)
        tokens = whole_number(data["tokens"], f"{where}.tokens")
        check_consistent(tokens, dict(zip(COUNT_FIELDS, arrays)), where)
        return cls(tokens, *(np.array(values, dtype=np.int64) for values in arrays))


def check_consistent(tokens: int, counts: Mapping[str, List[int]], where: str) -> None:
    """The counts of one layer against each other, as the recorder makes them (exact integers).

    Every real token has one first choice and at most one second, so per expert: top1 <= top2 <= tokens,
    routed <= tokens, skipped <= top2 - top1 (second choices only); probabilities are at most 1 each, so
    prob_first_sum <= top1 * PROB_SCALE, prob_second_sum <= (top2 - top1) * PROB_SCALE and prob_sum <= tokens *
    PROB_SCALE; ranks are below the number of experts. A file breaking one of these was not written by the
    recorder (or by adding such files), and derived metrics would leave [0, 1] (importance NaN, shares over 100%).
    """
    num_experts = len(counts["top1"])
    if sum(counts["top1"]) > tokens:
        raise StatsError(f"{where}: top1 counts add up to more than its {tokens} tokens")
    bounds = {
        "top1": lambda e: counts["top2"][e], "top2": lambda e: tokens, "routed": lambda e: tokens,
        "skipped": lambda e: counts["top2"][e] - counts["top1"][e],
        "prob_sum": lambda e: tokens * PROB_SCALE, "prob_first_sum": lambda e: counts["top1"][e] * PROB_SCALE,
        "prob_second_sum": lambda e: (counts["top2"][e] - counts["top1"][e]) * PROB_SCALE,
        "rank_sum": lambda e: tokens * (num_experts - 1),
    }
    for name, bound in bounds.items():
        for expert, value in enumerate(counts[name]):
            if value > bound(expert):
                raise StatsError(f"{where}.{name}[{expert}] = {value} exceeds what {tokens} tokens can give "
                                 f"({bound(expert)}); the counts do not fit together")


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
    """Identifies the model statistics were gathered on: its MoE layers, a hash of its gates and one of its
    experts (what is hashed, and why: ``fingerprint.py``)."""

    layers: List[Tuple[str, int]]  # (prefix, experts) in layout order
    gate_sha256: str
    experts_sha256: str

    @property
    def specs(self) -> List[MoELayerSpec]:
        """The MoE layers, in layout order."""
        return [MoELayerSpec.from_prefix(prefix, count) for prefix, count in self.layers]

    def to_json(self) -> Dict[str, Any]:
        return {"moe_layers": [[prefix, count] for prefix, count in self.layers], "gate_sha256": self.gate_sha256,
                "experts_sha256": self.experts_sha256}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Fingerprint":
        layers = data["moe_layers"]
        if not isinstance(layers, list) or not layers:
            raise StatsError("model.moe_layers must list the MoE layers")
        for entry in layers:
            if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                    or not PREFIX_PATTERN.match(entry[0]) or type(entry[1]) is not int or not 1 <= entry[1] <= 2**20):
                raise StatsError(f"model.moe_layers: {str(entry)[:60]} is not [layer prefix, experts]")
        if len({prefix for prefix, _ in layers}) != len(layers):
            raise StatsError("model.moe_layers lists a layer twice")
        digests = []
        for name in ("gate_sha256", "experts_sha256"):
            if not isinstance(data[name], str) or not re.fullmatch(r"[0-9a-f]{64}", data[name]):
                raise StatsError(f"model.{name} is not a sha256 digest")
            digests.append(data[name])
        return cls([(prefix, count) for prefix, count in layers], *digests)


@dataclass(frozen=True)
class Run:
    """One recording run: its identity, the pair it recorded and the size of the subset it was given."""

    id: str  # sha256 of what the run recorded (see identify_runs)
    pair: str
    subset: str  # fairseq's subset name, e.g. "valid"
    subset_sentences: int  # sentences of the subset (or of its shard) the run was given

    def to_json(self) -> Dict[str, Any]:
        return {"id": self.id, "pair": self.pair, "subset": self.subset, "subset_sentences": self.subset_sentences}

    @classmethod
    def from_json(cls, data: Any) -> "Run":
        if not isinstance(data, dict):
            raise StatsError("runs: an entry is not an object")
        if not isinstance(data["id"], str) or not re.fullmatch(r"[0-9a-f]{64}", data["id"]):
            raise StatsError("runs: an id is not a sha256 digest")
        if not isinstance(data["subset"], str) or not SUBSET.match(data["subset"]):
            raise StatsError(f"runs: {str(data['subset'])[:40]!r} is not a subset name")
        split_pair(data["pair"])
        return cls(data["id"], data["pair"], data["subset"], whole_number(data["subset_sentences"], "runs: subset_sentences"))


@dataclass
class MoEStats:
    fingerprint: Fingerprint
    settings: Dict[str, Any]  # how the counts were gathered (decoder tokens, beam, ...)
    pairs: Dict[str, PairStats] = field(default_factory=dict)  # keyed by "src-tgt"
    runs: List[Run] = field(default_factory=list)  # the recording runs counted here, by id

    def to_json(self) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "prob_scale": PROB_SCALE,
            "reap_scale": REAP_SCALE,
            "model": self.fingerprint.to_json(),
            "settings": self.settings,
            "runs": [run.to_json() for run in sorted(self.runs, key=lambda run: run.id)],
            "pairs": {
                pair: {
                    "sentences": stats.sentences,
                    "layers": {prefix: counts.to_json() for prefix, counts in stats.layers.items()},
                }
                for pair, stats in sorted(self.pairs.items())
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> "MoEStats":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StatsError("not a fairseq-moe-prune statistics file")
        if (data.get("version") not in READABLE_VERSIONS or data.get("prob_scale") != PROB_SCALE
                or data.get("reap_scale") != REAP_SCALE):
            raise StatsError(f"statistics format version {str(data.get('version'))[:20]} is not supported "
                             f"(need {VERSION}); record them again with this version")
        fingerprint = Fingerprint.from_json(data["model"])
        if not isinstance(data["settings"], dict):
            raise StatsError("settings is not an object")
        if not isinstance(data["pairs"], dict):
            raise StatsError("pairs is not an object")
        experts = dict(fingerprint.layers)
        pairs = {}
        for pair, entry in data["pairs"].items():
            split_pair(pair)
            if not isinstance(entry, dict) or not isinstance(entry["layers"], dict):
                raise StatsError(f"pairs.{pair} is not an object with layers")
            if set(entry["layers"]) != set(experts):
                raise StatsError(f"pairs.{pair}: its layers ({', '.join(sorted(entry['layers']))[:80]}) "
                                 "are not the model's MoE layers")
            layers = {prefix: LayerCounts.from_json(counts, experts[prefix], f"pairs.{pair}.{prefix}")
                      for prefix, counts in entry["layers"].items()}
            pairs[pair] = PairStats(whole_number(entry["sentences"], f"pairs.{pair}.sentences"), layers)
        runs = data["runs"]
        if not isinstance(runs, list):
            raise StatsError("runs is not a list")
        runs = [Run.from_json(run) for run in runs]
        for pair, pair_stats in pairs.items():  # a run counts at most the sentences it was given
            given = sum(run.subset_sentences for run in runs if run.pair == pair)
            if any(run.pair == pair for run in runs) and pair_stats.sentences > given:
                raise StatsError(f"pairs.{pair}.sentences ({pair_stats.sentences}) is more than its runs were given ({given})")
        return cls(fingerprint, dict(data["settings"]), pairs, runs)


def split_pair(pair: Any) -> Tuple[str, str]:
    """``eng_Latn-deu_Latn`` -> (``eng_Latn``, ``deu_Latn``); anything else is a one-line error."""
    if not isinstance(pair, str):
        raise StatsError(f"language pair {str(pair)[:40]!r} is not of the form SRC-TGT")
    source, _, target = pair.partition("-")
    if not source or not target:
        raise StatsError(f"language pair {pair[:40]!r} is not of the form SRC-TGT")
    return check_language(source, f"language pair {pair[:40]!r}: source"), check_language(target, f"language pair {pair[:40]!r}: target")


def identify_runs(stats: MoEStats, subset: str, subset_sentences: int) -> MoEStats:
    """``stats`` of one recording run, listed as that run: one entry per pair, its id a digest of what it recorded.

    The id depends only on the model, the settings, the pair's counts and the subset, so the same
    inputs give the same file, and two files holding the same recording cannot be merged.
    """
    runs = []
    for pair, pair_stats in sorted(stats.pairs.items()):
        content = MoEStats(stats.fingerprint, stats.settings, {pair: pair_stats}).to_json()
        content["runs"] = [{"subset": subset, "subset_sentences": subset_sentences}]
        digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        runs.append(Run(digest, pair, subset, subset_sentences))
    return MoEStats(stats.fingerprint, stats.settings, stats.pairs, runs)


def is_stats_file(path: str) -> bool:
    """Whether ``path`` starts like a file :func:`save` writes (canonical JSON: "format" comes first)."""
    head = json.dumps({"format": FORMAT}, separators=(",", ":"))[:-1]
    try:
        with open(path, "rb") as f:
            return f.read(len(head)).decode("utf-8", "replace") == head
    except OSError:
        return False


def save(stats: MoEStats, path: str) -> None:
    write_atomic(path, json.dumps(stats.to_json(), sort_keys=True, separators=(",", ":")) + "\n")


def load(path: str) -> MoEStats:
    try:
        with open_regular(path) as f:  # a FIFO is refused, not waited on
            data = json.load(f)
    except FileNotFoundError:
        raise StatsError(f"{path}: no such statistics file") from None
    except OSError as error:
        raise StatsError(f"{path}: cannot read the statistics file ({error.strerror or error})") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, too deep or too long
        raise StatsError(f"{path}: not a statistics file ({getattr(error, 'msg', None) or type(error).__name__})") from None
    try:
        return MoEStats.from_json(data)
    except KeyError as error:
        raise StatsError(f"{path}: malformed statistics file (missing {str(error)[:60]})") from None
    except (TypeError, AttributeError):
        raise StatsError(f"{path}: malformed statistics file (an entry has the wrong type)") from None
    except StatsError as error:
        raise StatsError(f"{path}: {error}") from None


def check_compatible(a: MoEStats, b: MoEStats, what: str = "statistics") -> None:
    if a.fingerprint != b.fingerprint:
        raise StatsError(f"{what} come from different models (MoE layers, gate or expert weights differ)")
    if a.settings != b.settings:
        differing = sorted(k for k in set(a.settings) | set(b.settings) if a.settings.get(k) != b.settings.get(k))
        raise StatsError(f"{what} were gathered with different settings: {', '.join(differing)}")


def merge(all_stats: Iterable[MoEStats], names: Optional[Sequence[str]] = None) -> MoEStats:
    """Add the counts of several runs (per pair); refuses runs over different models or settings,
    and one run counted twice (``names`` name the inputs in that error)."""
    all_stats = list(all_stats)
    names = list(names) if names is not None else [f"input {n + 1}" for n in range(len(all_stats))]
    if not all_stats:
        raise StatsError("nothing to merge")
    first = all_stats[0]
    merged = MoEStats(first.fingerprint, dict(first.settings), {})
    seen: Dict[str, str] = {}  # run id -> the input it came from
    for name, stats in zip(names, all_stats):
        check_compatible(first, stats)
        for run in stats.runs:
            if run.id in seen:
                raise StatsError(f"{name} and {seen[run.id]} both hold the recording of {run.pair} on {run.subset} "
                                 f"(run {run.id[:12]}); merging it twice would count its sentences twice")
            seen[run.id] = name
            merged.runs.append(run)
        for pair, pair_stats in stats.pairs.items():
            merged.pairs[pair] = merged.pairs[pair] + pair_stats if pair in merged.pairs else pair_stats
    return merged


def merge_files(out: str, inputs: Sequence[str], force: bool = False) -> MoEStats:
    """``stats merge``: add up the files ``inputs`` into ``out``; never writes over one of the inputs."""
    if os.path.isdir(out):
        raise StatsError(f"{out} is a folder; name the statistics file to write")
    check_output(out, inputs, force)
    merged = merge([load(path) for path in inputs], inputs)
    save(merged, out)
    return merged


def by_language(stats: MoEStats) -> Dict[str, Dict[str, LayerCounts]]:
    """The per-language view: encoder layers from pairs with that SOURCE language, decoder from TARGET."""
    view: Dict[str, Dict[str, LayerCounts]] = {}
    for pair, pair_stats in sorted(stats.pairs.items()):
        source, target = split_pair(pair)
        for prefix, counts in pair_stats.layers.items():
            language = source if MoELayerSpec.from_prefix(prefix, counts.num_experts).side == "encoder" else target
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


def coverage(stats: MoEStats, pair: str) -> str:
    """How much of the subsets its runs were given a pair's sentences cover, e.g. `` of 37 in valid (100.0%)``."""
    runs = [run for run in stats.runs if run.pair == pair]
    if not runs:
        return " (subset size not recorded)"
    given = sum(run.subset_sentences for run in runs)
    subsets = ", ".join(sorted({run.subset for run in runs}))
    share = stats.pairs[pair].sentences / given * 100 if given else 0.0
    return f" of {given} in {subsets} ({share:.1f}% covered)"


def summary(stats: MoEStats, top: int = 5) -> str:
    """A per-layer table of the most and least used experts (share of tokens as first choice)."""
    lines = [
        f"model: {len(stats.fingerprint.layers)} MoE layers, gates {stats.fingerprint.gate_sha256[:12]}; "
        f"settings: {json.dumps(stats.settings, sort_keys=True)}",
    ]
    for pair, pair_stats in sorted(stats.pairs.items()):
        lines.append(f"{pair}: {pair_stats.sentences} sentences{coverage(stats, pair)}")
    lines.append(f"{'layer':<28} {'tokens':>9}  most used (expert:top1%)  |  least used")
    for prefix, counts in total(stats).items():
        share = counts.top1 / max(counts.tokens, 1) * 100
        order = np.argsort(-share, kind="stable")
        most = " ".join(f"{e}:{share[e]:.1f}" for e in order[:top])
        least = " ".join(f"{e}:{share[e]:.1f}" for e in order[::-1][:top])
        lines.append(f"{prefix:<28} {counts.tokens:>9}  {most}  |  {least}")
    return "\n".join(lines)
