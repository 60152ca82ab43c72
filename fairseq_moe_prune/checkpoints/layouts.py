"""Read fairseq MoE checkpoints in both layouts: one file, or NLLB's expert-sharded files.

Sharded: ``X-shared.pt`` holds everything whose key does not name an expert (gates included,
plus the config); ``X-rank-N.pt`` holds rank N's experts of every MoE layer, numbered locally from
``experts.0``: global expert = N * experts-per-rank + local id. Files are memory-mapped and rank
files are opened one at a time, so reading never holds more than the shared part and one shard.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from torch import Tensor

from fairseq_moe_prune.checkpoints.safe_load import CheckpointError
from fairseq_moe_prune.checkpoints.streaming import Entry, RecordCRCs, SourceTensor, load_mapped, meta_weights
from fairseq_moe_prune.layout import (
    MoEConfigError,
    MoELayerSpec,
    expert_head,
    expert_key,
    moe_layers,
    split_expert_key,
)

SHARED_SUFFIX = "-shared.pt"


def model_config(state: Mapping[str, Any]) -> Any:
    """The model config of a fairseq checkpoint: ``cfg.model`` (current) or ``args`` (old)."""
    cfg = state.get("cfg")
    if cfg is not None and cfg.get("model") is not None:
        return cfg["model"]
    if state.get("args") is not None:
        return state["args"]
    raise CheckpointError("the checkpoint holds no model config (neither cfg.model nor args)")


def task_config(state: Mapping[str, Any]) -> Any:
    """The task config of a fairseq checkpoint: ``cfg.task`` (current) or ``args`` (old); None without either."""
    cfg = state.get("cfg")
    task = cfg.get("task") if isinstance(cfg, Mapping) else None
    return task if task is not None else state.get("args")


def is_expert_key(key: str) -> bool:
    return split_expert_key(key) is not None


def rank_files(shared_path: str) -> List[Tuple[int, str]]:
    """(N, path) of every ``X-rank-N.pt`` beside ``X-shared.pt``, in order of N."""
    base = shared_path[: -len(SHARED_SUFFIX)]
    directory = os.path.dirname(os.path.abspath(base))
    pattern = re.compile(re.escape(os.path.basename(base)) + r"-rank-(\d+)\.pt$")
    return sorted((int(m.group(1)), os.path.join(os.path.dirname(base), m.group(0)))
                  for m in map(pattern.match, os.listdir(directory)) if m)


def checkpoint_files(path: str) -> List[str]:
    """Every file a checkpoint consists of: the file, and beside an ``X-shared.pt`` each ``X-rank-N.pt``."""
    if not path.endswith(SHARED_SUFFIX) or not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return [path]
    return [path, *(rank_path for _, rank_path in rank_files(path))]


def rank_paths(shared_path: str) -> List[str]:
    """``X-rank-0.pt`` ... ``X-rank-{N-1}.pt`` beside ``X-shared.pt``; a gap is an error."""
    base = shared_path[: -len(SHARED_SUFFIX)]
    ranks = [rank for rank, _ in rank_files(shared_path)]
    if not ranks:
        raise CheckpointError(f"{shared_path}: no {os.path.basename(base)}-rank-N.pt files beside it")
    missing = sorted(set(range(ranks[-1] + 1)) - set(ranks))
    if missing:
        raise CheckpointError(f"missing shard {base}-rank-{missing[0]}.pt")
    return [f"{base}-rank-{rank}.pt" for rank in ranks]


@dataclass
class MoECheckpoint:
    """A checkpoint opened for reading: its state without experts, and a way to stream experts."""

    path: str
    state: Dict[str, Any]  # the checkpoint (or shared part); state["model"] may lack experts
    specs: List[MoELayerSpec]
    ranks: Optional[List[str]] = None  # rank files of a sharded checkpoint
    records: RecordCRCs = field(default_factory=dict)  # CRC-32 of each memory-mapped storage of state

    @property
    def config(self) -> Any:
        return model_config(self.state)

    def dense_weights(self) -> Dict[str, Tensor]:
        """Every weight that does not belong to an expert (gates included)."""
        return {k: v for k, v in self.state["model"].items() if not is_expert_key(k)}

    def experts(self, wanted: Mapping[str, List[int]]) -> Iterator[Tuple[str, int, Dict[str, Entry]]]:
        """(layer prefix, original expert id, its tensors) for every wanted expert.

        A single file gives the (memory-mapped) tensors; a sharded checkpoint gives
        :class:`SourceTensor` references, read when written, one rank file at a time.
        """
        if self.ranks is None:
            for prefix, ids in wanted.items():
                for expert in ids:
                    yield prefix, expert, expert_tensors(self.state["model"], prefix, expert, self.path)
            return
        # every rank file has the same layout (NLLB's does): shapes come from rank 0, and each tensor is
        # checked against them when it is finally read
        per_rank = self.experts_per_rank()
        first = meta_weights(self.ranks[0])  # the pickle alone: no tensor bytes read
        shapes = {p: {n: (tuple(t.shape), t.dtype) for n, t in expert_tensors(first, p, 0, self.ranks[0]).items()}
                  for p in wanted}
        del first
        for prefix, ids in wanted.items():
            for expert in ids:
                rank, local = divmod(expert, per_rank[prefix])
                yield prefix, expert, {
                    name: SourceTensor(self.ranks[rank], expert_key(prefix, local, name), shape, dtype)
                    for name, (shape, dtype) in shapes[prefix].items()
                }

    def experts_per_rank(self) -> Dict[str, int]:
        counts = {}
        for spec in self.specs:
            per_rank, remainder = divmod(spec.num_experts, len(self.ranks))
            if remainder or per_rank == 0:
                raise CheckpointError(
                    f"{spec.prefix} has {spec.num_experts} experts, which {len(self.ranks)} rank files cannot share"
                )
            counts[spec.prefix] = per_rank
        return counts


def expert_tensors(weights: Mapping[str, Tensor], prefix: str, expert: int, path: str) -> Dict[str, Tensor]:
    head = expert_head(prefix, expert)
    tensors = {key[len(head):]: value for key, value in weights.items() if key.startswith(head)}
    if not tensors:
        raise CheckpointError(f"{path}: missing {head}* (truncated or mismatched checkpoint?)")
    return tensors


def open_checkpoint(path: str, dense: bool = False) -> MoECheckpoint:
    """Open a single-file checkpoint or, given ``X-shared.pt``, an expert-sharded one; a model without MoE
    layers only where ``dense`` allows it (conversion)."""
    ranks = rank_paths(path) if path.endswith(SHARED_SUFFIX) else None
    state, records = load_mapped(path, read_ahead=ranks is not None)  # a shared part is written whole
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' weights)")
    try:
        specs = moe_layers(model_config(state))
    except MoEConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except (ValueError, TypeError):  # a config field of the wrong type
        raise CheckpointError(f"{path}: the model config's MoE fields are not numbers") from None
    if not specs and not (dense and ranks is None):
        raise CheckpointError(f"{path}: the model has no MoE layers")
    check_gates(path, state["model"], specs)
    return MoECheckpoint(path, state, specs, ranks, records)


def check_gates(path: str, weights: Mapping[str, Tensor], specs: List[MoELayerSpec]) -> None:
    """Each MoE layer's gate has one row per expert of the config."""
    for spec in specs:
        gate = weights.get(spec.gate_key)
        if not isinstance(gate, Tensor) or gate.dim() != 2:
            raise CheckpointError(f"{path}: missing {spec.gate_key}")
        if gate.shape[0] != spec.num_experts:
            raise CheckpointError(
                f"{path}: {spec.prefix} has {spec.num_experts} experts in the config but {gate.shape[0]} gate rows"
            )


def describe_checkpoint(path: str) -> str:
    """A few lines on a checkpoint's MoE layers: experts per layer and expert shape."""
    checkpoint = open_checkpoint(path)
    first = {spec.prefix: [0] for spec in checkpoint.specs}
    shapes = {prefix: tensors["fc1.weight"].shape for prefix, _, tensors in checkpoint.experts(first)}
    layout = f"sharded over {len(checkpoint.ranks)} rank files" if checkpoint.ranks else "single file"
    lines = [f"{path}: {len(checkpoint.specs)} MoE layers, "
             f"{sum(s.num_experts for s in checkpoint.specs)} experts ({layout})"]
    for spec in checkpoint.specs:
        ffn, dim = shapes[spec.prefix]
        lines.append(f"  {spec.prefix:<32} {spec.num_experts:>4} experts  ffn {ffn}  dim {dim}")
    return "\n".join(lines)
