"""Checkpoint surgery: keep chosen experts, slice gate rows, record per-layer counts in the config.

The result is an ordinary fairseq checkpoint of the same model class, so stock fairseq loads it.
Kept experts are renumbered 0..k-1 in ascending order of their original ids, and the gate keeps
exactly their rows in that order, so the softmax and top-2 run over the kept experts only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping

import torch

from fairseq_moe_prune.checkpoints.layouts import SHARED_SUFFIX, MoECheckpoint, is_expert_key
from fairseq_moe_prune.checkpoints.safe_load import CheckpointError
from fairseq_moe_prune.checkpoints.streaming import Entry, RecordCRCs, check_crc, save_streaming
from fairseq_moe_prune.layout import MoELayerSpec, expert_key, format_counts, gate_layer, split_expert_key


def pruned_config(config: Any, specs: List[MoELayerSpec], kept: Mapping[str, List[int]]) -> Any:
    """A copy of the model config describing the pruned shape.

    Uniform counts are written in the nllb branch's plain form (``moe_expert_count = k``);
    otherwise ``encoder_moe_expert_counts`` / ``decoder_moe_expert_counts`` list each layer's count.
    """
    config = copy.copy(config)
    values: Dict[str, Any] = {}
    counts = [len(kept[spec.prefix]) for spec in specs]
    if len(set(counts)) == 1:
        values = {"moe_expert_count": counts[0], "encoder_moe_expert_counts": None, "decoder_moe_expert_counts": None}
    else:
        for side in ("encoder", "decoder"):
            side_counts = [len(kept[s.prefix]) for s in specs if s.side == side]
            values[f"{side}_moe_expert_counts"] = format_counts(side_counts) if side_counts else None
    for name, value in values.items():
        if isinstance(config, dict):
            config[name] = value
        else:
            setattr(config, name, value)
    return config


@dataclass
class CheckpointView:
    """A checkpoint to write: its other entries, and the weights (some still in their files).

    Pruning (:func:`prune_checkpoint`), conversion (:func:`view_checkpoint`, ``hf.read_hf``) and extraction
    make one; ``save_single``, ``save_sharded`` and ``hf.write_hf`` write one.
    """

    state: Dict[str, Any]  # everything but "model"; the optimizer state is dropped
    model: Dict[str, Entry]
    records: RecordCRCs = field(default_factory=dict)  # CRC-32s of the input storages tensors of model use


def prune_checkpoint(checkpoint: MoECheckpoint, kept: Mapping[str, List[int]]) -> CheckpointView:
    """Keep ``kept[layer]`` experts of each MoE layer. Weights keep their key order; experts follow their gate."""
    for spec in checkpoint.specs:
        ids = kept[spec.prefix]
        if not ids or ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= spec.num_experts:
            raise CheckpointError(f"{spec.prefix}: kept ids must be distinct, ascending, in 0..{spec.num_experts - 1}")
    experts: Dict[str, Dict[int, Dict[str, Entry]]] = {}
    for prefix, expert, tensors in checkpoint.experts(kept):
        experts.setdefault(prefix, {})[expert] = tensors

    model: Dict[str, Entry] = {}
    for key, value in checkpoint.dense_weights().items():
        prefix = gate_layer(key)
        if prefix is None:
            model[key] = value
            continue
        if prefix not in kept:
            raise CheckpointError(f"{checkpoint.path}: {key} is the gate of no MoE layer of the model config")
        check_crc(value, checkpoint.records, set())  # the gate is written as a slice, a new tensor
        model[key] = value[torch.tensor(kept[prefix])]
        for new_id, old_id in enumerate(kept[prefix]):
            for name, tensor in experts[prefix][old_id].items():
                model[expert_key(prefix, new_id, name)] = tensor

    state = {k: v for k, v in checkpoint.state.items() if k not in ("model", "last_optimizer_state")}
    config = pruned_config(checkpoint.config, checkpoint.specs, kept)
    if state.get("cfg") is not None and state["cfg"].get("model") is not None:
        state["cfg"] = dict(state["cfg"], model=config)
    else:
        state["args"] = config
    return CheckpointView(state, model, checkpoint.records)


def view_checkpoint(checkpoint: MoECheckpoint) -> CheckpointView:
    """The whole checkpoint as a view to write: every expert kept (the optimizer state is dropped)."""
    return prune_checkpoint(checkpoint, {spec.prefix: list(range(spec.num_experts)) for spec in checkpoint.specs})


def save_single(pruned: CheckpointView, path: str, fp16: bool = False) -> None:
    """One checkpoint file, written atomically and deterministically."""
    save_streaming(pruned.state, pruned.model, path, torch.float16 if fp16 else None, pruned.records)


def save_sharded(pruned: CheckpointView, shared_path: str, fp16: bool = False) -> List[str]:
    """NLLB's layout: ``X-shared.pt`` without experts and ``X-rank-N.pt`` with expert N of every layer.

    Needs the same number of experts in every MoE layer, as the nllb branch's loader does.
    """
    if not shared_path.endswith(SHARED_SUFFIX):
        raise CheckpointError(f"a sharded checkpoint is named X{SHARED_SUFFIX}, got {shared_path}")
    ranks: Dict[int, Dict[str, Entry]] = {}
    counts: Dict[str, int] = {}
    for key, value in pruned.model.items():
        parts = split_expert_key(key)
        if parts is not None:
            prefix, expert, name = parts
            ranks.setdefault(expert, {})[expert_key(prefix, 0, name)] = value
            counts[prefix] = max(counts.get(prefix, 0), expert + 1)
    if len(set(counts.values())) != 1:
        raise CheckpointError("the sharded layout needs the same number of experts in every MoE layer")
    dtype = torch.float16 if fp16 else None
    shared = {k: v for k, v in pruned.model.items() if not is_expert_key(k)}
    base = shared_path[: -len(SHARED_SUFFIX)]
    paths = [shared_path] + [f"{base}-rank-{rank}.pt" for rank in sorted(ranks)]
    save_streaming(pruned.state, shared, shared_path, dtype, pruned.records)
    for rank, path in zip(sorted(ranks), paths[1:]):
        save_streaming({}, ranks[rank], path, dtype, pruned.records)
    return paths
