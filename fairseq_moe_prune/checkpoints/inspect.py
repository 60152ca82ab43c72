"""Read what a fairseq checkpoint says about its MoE layers, without building the model."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from fairseq_moe_prune.checkpoints.safe_load import CheckpointError, load_checkpoint
from fairseq_moe_prune.models.layout import MoELayerSpec, moe_layers


def model_config(state: Mapping[str, Any]) -> Any:
    """The model config of a fairseq checkpoint: ``cfg.model`` (new) or ``args`` (old)."""
    cfg = state.get("cfg")
    if cfg is not None and cfg.get("model") is not None:
        return cfg["model"]
    if state.get("args") is not None:
        return state["args"]
    raise CheckpointError("the checkpoint holds no model config (neither cfg.model nor args)")


def checked_layout(state: Mapping[str, Any]) -> List[MoELayerSpec]:
    """The MoE layers the config declares, verified against the weights actually present."""
    specs = moe_layers(model_config(state))
    if not specs:
        raise CheckpointError("the checkpoint's model has no MoE layers")
    weights: Dict[str, Any] = state["model"]
    for spec in specs:
        gate = weights.get(f"{spec.prefix}.gate.wg.weight")
        if gate is None:
            raise CheckpointError(f"missing {spec.prefix}.gate.wg.weight")
        if gate.shape[0] != spec.num_experts:
            raise CheckpointError(
                f"{spec.prefix}: the config says {spec.num_experts} experts, the gate has {gate.shape[0]} rows"
            )
        for expert in range(spec.num_experts):
            if f"{spec.prefix}.experts.{expert}.fc1.weight" not in weights:
                raise CheckpointError(f"missing {spec.prefix}.experts.{expert}")
    return specs


def describe_checkpoint(path: str) -> str:
    state = load_checkpoint(path)
    specs = checked_layout(state)
    weights = state["model"]
    lines = [f"{path}: {len(specs)} MoE layers, {sum(s.num_experts for s in specs)} experts"]
    for spec in specs:
        fc1 = weights[f"{spec.prefix}.experts.0.fc1.weight"]
        lines.append(
            f"  {spec.prefix:<32} {spec.num_experts:>4} experts  ffn {fc1.shape[0]}  dim {fc1.shape[1]}"
        )
    return "\n".join(lines)
