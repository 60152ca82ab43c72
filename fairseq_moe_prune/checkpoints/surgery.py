"""Checkpoint surgery: keep chosen experts, slice gate rows, record per-layer counts in the config.

The result is an ordinary fairseq checkpoint of the same model class, so stock fairseq loads it.
Kept experts are renumbered 0..k-1 in ascending order of their original ids, and the gate keeps
exactly their rows in that order, so the softmax and top-2 run over the kept experts only.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from typing import Any, Dict, List, Mapping

import torch
from torch import Tensor

from fairseq_moe_prune.checkpoints.layouts import SHARED_SUFFIX, MoECheckpoint, is_expert_key
from fairseq_moe_prune.checkpoints.safe_load import CheckpointError
from fairseq_moe_prune.models.layout import MoELayerSpec, format_counts


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


def _cast(tensor: Tensor, fp16: bool) -> Tensor:
    return tensor.half() if fp16 and tensor.is_floating_point() else tensor


def prune_state(checkpoint: MoECheckpoint, kept: Mapping[str, List[int]], fp16: bool = False) -> Dict[str, Any]:
    """The pruned checkpoint as a state dict ready for ``torch.save``; the optimizer state is dropped.

    Weights keep the original key order; each layer's kept experts follow its gate.
    """
    for spec in checkpoint.specs:
        ids = kept[spec.prefix]
        if not ids or ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= spec.num_experts:
            raise CheckpointError(f"{spec.prefix}: kept ids must be distinct, ascending, in 0..{spec.num_experts - 1}")
    experts: Dict[str, Dict[int, Dict[str, Tensor]]] = {}
    for prefix, expert, tensors in checkpoint.experts(kept):
        experts.setdefault(prefix, {})[expert] = tensors

    weights: Dict[str, Tensor] = {}
    for key, value in checkpoint.dense_weights().items():
        prefix = key[: -len(".gate.wg.weight")] if key.endswith(".moe_layer.gate.wg.weight") else None
        if prefix is None:
            weights[key] = _cast(value, fp16)
            continue
        ids = kept[prefix]
        weights[key] = _cast(value[torch.tensor(ids)], fp16)
        for new_id, old_id in enumerate(ids):
            for name, tensor in experts[prefix][old_id].items():
                weights[f"{prefix}.experts.{new_id}.{name}"] = _cast(tensor, fp16)

    state = {k: v for k, v in checkpoint.state.items() if k not in ("model", "last_optimizer_state")}
    state["model"] = weights
    config = pruned_config(checkpoint.config, checkpoint.specs, kept)
    if state.get("cfg") is not None and state["cfg"].get("model") is not None:
        state["cfg"] = dict(state["cfg"], model=config)
    else:
        state["args"] = config
    return state


def save_single(state: Dict[str, Any], path: str) -> None:
    """torch.save to a temporary file beside ``path``, then rename: never a half-written file.

    Saving through a file object keeps torch's archive name fixed ("archive"), so the bytes do
    not depend on the file's name: the same state always gives the same file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_sharded(state: Dict[str, Any], shared_path: str) -> List[str]:
    """NLLB's layout: ``X-shared.pt`` without experts and ``X-rank-N.pt`` with expert N of every layer.

    Needs the same number of experts in every MoE layer, as the nllb branch's loader does.
    """
    if not shared_path.endswith(SHARED_SUFFIX):
        raise CheckpointError(f"a sharded checkpoint is named X{SHARED_SUFFIX}, got {shared_path}")
    experts: Dict[str, Dict[str, Tensor]] = {}  # "prefix.experts.N.name" grouped by N below
    counts = {}
    for key, value in state["model"].items():
        if is_expert_key(key):
            prefix, rest = key.split(".experts.", 1)
            expert, name = rest.split(".", 1)
            experts.setdefault(expert, {})[f"{prefix}.experts.0.{name}"] = value
            counts.setdefault(prefix, set()).add(int(expert))
    per_layer = {len(ids) for ids in counts.values()}
    if len(per_layer) != 1:
        raise CheckpointError("the sharded layout needs the same number of experts in every MoE layer")
    shared = dict(state, model={k: v for k, v in state["model"].items() if not is_expert_key(k)})
    base = shared_path[: -len(SHARED_SUFFIX)]
    paths = [shared_path] + [f"{base}-rank-{rank}.pt" for rank in range(per_layer.pop())]
    save_single(shared, paths[0])
    for rank, path in enumerate(paths[1:]):
        save_single({"model": experts[str(rank)]}, path)
    return paths


def publish_directory(staging: str, out: str, force: bool) -> None:
    """Move a finished staging folder to ``out``; an existing ``out`` is replaced only with ``force``."""
    if os.path.exists(out):
        if not force:
            raise CheckpointError(f"{out} exists (use --force to replace it)")
        trash = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)), prefix=".old-")
        os.replace(out, os.path.join(trash, "old"))
        os.replace(staging, out)
        shutil.rmtree(trash)
    else:
        os.replace(staging, out)
