"""Load a checkpoint for a model whose experts are offloaded or placed over devices.

Stock ``fairseq-generate`` reads a checkpoint whole into host memory (``torch.load`` of an open
file), builds the model (a second copy of every weight) and copies one into the other. For the
full NLLB-200 MoE that is twice 101 GiB. Here the checkpoint is memory-mapped, the experts of an
offloaded or placed model are built without memory (:mod:`fairseq_moe_prune.moe.placement`), and
each expert tensor goes to its final place as it is read: an offloaded expert keeps the mapped
tensor itself as its host copy (page-locked only while copied, through a small staging ring), a placed expert is copied
onto its device. NLLB's sharded release (``X-shared.pt`` + ``X-rank-N.pt``) is read the same way,
every rank file mapped, none read whole.

:func:`load_checkpoint_to_cpu` does what fairseq's function of that name does (model overrides,
state upgrade) and is used in its place, by :func:`..safe_load.guard_fairseq_loading` (handed :func:`load_if_placed`), when the
overrides ask for offload or placement or the path is a sharded release.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from fairseq.checkpoint_utils import _upgrade_state_dict
from fairseq.dataclass.utils import overwrite_args_by_name
from omegaconf import DictConfig, OmegaConf, open_dict

from fairseq_moe_prune.checkpoints.layouts import (
    SHARED_SUFFIX,
    MoECheckpoint,
    check_gates,
    expert_tensors,
    is_expert_key,
    model_config,
    rank_paths,
)
from fairseq_moe_prune.checkpoints.safe_load import CheckpointError, load_checkpoint
from fairseq_moe_prune.layout import moe_layers, split_expert_key
from fairseq_moe_prune.moe.placement import check_placement

PLACEMENT_FIELDS = ("moe_expert_offload", "moe_expert_devices")
ALL_PLACEMENT_FIELDS = PLACEMENT_FIELDS + ("moe_offload_cache_experts",)


def loads_here(path: str, arg_overrides: Optional[Mapping[str, Any]]) -> bool:
    """Whether this module loads ``path`` rather than fairseq: offload or placement asked for, or a sharded release."""
    overrides = arg_overrides or {}
    return str(path).endswith(SHARED_SUFFIX) or any(overrides.get(name) for name in PLACEMENT_FIELDS)


def apply_overrides(state: Dict[str, Any], arg_overrides: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """fairseq's ``load_checkpoint_to_cpu`` after its ``torch.load``: overrides into the config, then upgrade."""
    if state.get("args") is not None and arg_overrides is not None:
        for name, value in arg_overrides.items():
            setattr(state["args"], name, value)
    if state.get("cfg") is not None:
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
        if arg_overrides is not None:
            overwrite_args_by_name(state["cfg"], arg_overrides)
            model = state["cfg"].get("model")
            if isinstance(model, DictConfig):  # fairseq overrides only the fields a config already has
                with open_dict(model):
                    for name in ALL_PLACEMENT_FIELDS:
                        if name in arg_overrides:
                            model[name] = arg_overrides[name]
    return _upgrade_state_dict(state)


def add_rank_experts(path: str, state: Dict[str, Any], checkpoint: MoECheckpoint) -> None:
    """Every expert of NLLB's rank files into ``state["model"]`` under its global id, memory-mapped."""
    per_rank = checkpoint.experts_per_rank()
    model = state["model"]
    for rank, rank_path in enumerate(checkpoint.ranks):
        weights = load_checkpoint(rank_path)["model"]  # mapped: nothing is read until used
        for spec in checkpoint.specs:
            for local in range(per_rank[spec.prefix]):
                for name, tensor in expert_tensors(weights, spec.prefix, local, rank_path).items():
                    model[spec.expert_key(rank * per_rank[spec.prefix] + local, name)] = tensor


def check_experts(path: str, weights: Mapping[str, Any], specs) -> None:
    """Each MoE layer has exactly the experts its config counts: ids 0..n-1, with the same tensor names."""
    counts = {spec.prefix: spec.num_experts for spec in specs}
    names: Dict[str, set] = {}
    for key in weights:
        parts = split_expert_key(key)
        if parts is None:
            continue
        prefix, expert, name = parts
        if prefix not in counts:
            raise CheckpointError(f"{path}: {key} belongs to no MoE layer of the model's config")
        if expert >= counts[prefix]:
            raise CheckpointError(f"{path}: {prefix} has expert {expert} but the config gives it "
                                  f"{counts[prefix]} experts")
        names.setdefault(prefix, set()).add(name)
    for spec in specs:
        for expert in range(spec.num_experts):
            for name in names.get(spec.prefix, {"fc1.weight"}):
                if spec.expert_key(expert, name) not in weights:
                    raise CheckpointError(f"{path}: missing {spec.expert_key(expert, name)} "
                                          f"(the config gives the layer {spec.num_experts} experts)")


def load_checkpoint_to_cpu(path: str, arg_overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """fairseq's ``checkpoint_utils.load_checkpoint_to_cpu``, memory-mapped, reading single or sharded files,
    with the experts checked against the config and the placement it asks for (one-line errors)."""
    path = str(path)
    ranks = rank_paths(path) if path.endswith(SHARED_SUFFIX) else None
    state = load_checkpoint(path)  # memory-mapped
    if "model" not in state:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' weights)")
    state = apply_overrides(state, arg_overrides)
    config = model_config(state)
    specs = moe_layers(config)
    check_placement(config, specs)
    check_gates(path, state["model"], specs)
    if ranks is not None:
        if any(is_expert_key(key) for key in state["model"]):
            raise CheckpointError(f"{path}: a shared file should hold no experts (they live in the rank files)")
        add_rank_experts(path, state, MoECheckpoint(path, state, specs, ranks))
    check_experts(path, state["model"], specs)
    return state



def load_if_placed(path: str, arg_overrides: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """The state of a checkpoint this module loads (offloaded or placed experts, NLLB's sharded release), or
    None: what the fairseq loading guard is handed (``safe_load.guard_fairseq_loading``)."""
    return load_checkpoint_to_cpu(path, arg_overrides) if loads_here(path, arg_overrides) else None
