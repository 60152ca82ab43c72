"""fairseq's transformer layers with the FFN replaced by an MoE block, as in NLLB-200.

Attention, layer norms and residuals are fairseq's own modules under fairseq's names, so dense
parameters keep their keys; the FFN's ``fc1``/``fc2`` give way to ``moe_layer``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional

import torch
from fairseq import utils
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor

from fairseq_moe_prune.models.layout import MoEConfigError
from fairseq_moe_prune.moe.layer import GateOptions, MoELayer
from fairseq_moe_prune.moe.placement import building_context, place_layer, placement_options


def gate_options(cfg: Any) -> GateOptions:
    """The gating flags of a model config's NLLB fields."""
    return GateOptions(
        top1=bool(utils.safe_getattr(cfg, "moe_top1_expert", False)),
        use_fp32=bool(utils.safe_getattr(cfg, "moe_gating_use_fp32", False)),
        second_expert_policy=str(utils.safe_getattr(cfg, "moe_second_expert_policy", "sampling")),
        normalize_gate_prob_before_dropping=bool(
            utils.safe_getattr(cfg, "moe_normalize_gate_prob_before_dropping", False)
        ),
        eval_capacity_token_fraction=float(
            utils.safe_getattr(cfg, "moe_eval_capacity_token_fraction", 0.25)
        ),
        batch_prioritized_routing=bool(
            utils.safe_getattr(cfg, "moe_batch_prioritized_routing", False)
        ),
        use_pad_mask=bool(utils.safe_getattr(cfg, "use_moe_pad_mask", False)),
    )


def build_moe_layer(cfg: Any, embed_dim: int, ffn_dim: int, num_experts: int, skip_beta: float = 0.0) -> MoELayer:
    """An MoE block configured from the model config's NLLB fields (and its layer's skipping beta)."""
    options = dataclasses.replace(gate_options(cfg), skip_beta=float(skip_beta))
    activation_dropout = cfg.activation_dropout or utils.safe_getattr(cfg, "relu_dropout", 0) or 0
    return MoELayer(
        embed_dim,
        ffn_dim,
        num_experts,
        options,
        activation_fn=cfg.activation_fn,
        activation_dropout=float(activation_dropout),
        eom=float(utils.safe_getattr(cfg, "moe_eom", 0.0)),
    )


def build_placed_moe_layer(cfg: Any, embed_dim: int, ffn_dim: int, num_experts: int,
                           skip_beta: float = 0.0) -> MoELayer:
    """An MoE block whose experts live where the config says (:mod:`fairseq_moe_prune.moe.placement`);
    offloaded or placed experts are built without memory and get their weights from the checkpoint."""
    placement = placement_options(cfg)
    with building_context(placement):
        layer = build_moe_layer(cfg, embed_dim, ffn_dim, num_experts, skip_beta)
    place_layer(layer, placement)
    return layer


def residual_block(layer: Any, layer_norm: Any, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
    """fairseq's sub-layer wrapping: (pre- or post-) layer norm, dropout and the residual connection."""
    residual = x
    if layer.normalize_before:
        x = layer_norm(x)
    x = layer.dropout_module(sublayer(x))
    x = layer.residual_connection(x, residual)
    if not layer.normalize_before:
        x = layer_norm(x)
    return x


def moe_feed_forward(layer: Any, x: Tensor, padding_mask: Optional[Tensor], task_states: Optional[Tensor] = None) -> Tensor:
    """The FFN sub-block with the MoE in place of fc1/fc2.

    ``x`` is (time, batch, dim) as everywhere in fairseq; the MoE sees tokens batch-major,
    as NLLB's does, which fixes the order in which tokens take expert capacity. ``task_states``
    (batch, dim), when given, route each sentence by its task.
    """
    return residual_block(
        layer, layer.final_layer_norm, x,
        lambda h: layer.moe_layer(h.transpose(0, 1), padding_mask, task_states).transpose(0, 1),
    )


class MoEEncoderLayer(TransformerEncoderLayerBase):
    def __init__(self, cfg: Any, num_experts: int, skip_beta: float = 0.0):
        super().__init__(cfg)
        self.moe_layer = build_placed_moe_layer(cfg, self.embed_dim, cfg.encoder.ffn_embed_dim, num_experts, skip_beta)

    def build_fc1(self, *args: Any) -> None:
        return None  # no dense FFN in an MoE layer

    def build_fc2(self, *args: Any) -> None:
        return None

    def forward(
        self, x: Tensor, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None,
        task_states: Optional[Tensor] = None,
    ) -> Tensor:
        if attn_mask is not None:
            attn_mask = attn_mask.masked_fill(
                attn_mask.to(torch.bool), -1e8 if x.dtype == torch.float32 else -1e4
            )
        x = residual_block(
            self,
            self.self_attn_layer_norm,
            x,
            lambda h: self.self_attn(
                query=h, key=h, value=h, key_padding_mask=encoder_padding_mask, need_weights=False, attn_mask=attn_mask
            )[0],
        )
        return moe_feed_forward(self, x, encoder_padding_mask, task_states)


class MoEDecoderLayer(TransformerDecoderLayerBase):
    def __init__(self, cfg: Any, num_experts: int, no_encoder_attn: bool = False, skip_beta: float = 0.0):
        for flag in ("cross_self_attention", "scale_attn", "scale_heads", "scale_fc", "scale_resids"):
            if utils.safe_getattr(cfg, flag, False):
                raise MoEConfigError(f"--{flag.replace('_', '-')} is not supported in MoE layers")
        super().__init__(cfg, no_encoder_attn)
        self.moe_layer = build_placed_moe_layer(cfg, self.embed_dim, cfg.decoder.ffn_embed_dim, num_experts, skip_beta)

    def build_fc1(self, *args: Any) -> None:
        return None

    def build_fc2(self, *args: Any) -> None:
        return None

    def forward(
        self,
        x: Tensor,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
        task_states: Optional[Tensor] = None,
    ):
        need_attn = need_attn or need_head_weights
        attn: List[Optional[Tensor]] = [None]

        def attend(query: Tensor, module: Any, **kwargs: Any) -> Tensor:
            out, attn[0] = module(query=query, incremental_state=incremental_state, **kwargs)
            return out

        x = residual_block(
            self,
            self.self_attn_layer_norm,
            x,
            lambda h: attend(h, self.self_attn, key=h, value=h, key_padding_mask=self_attn_padding_mask,
                             need_weights=False, attn_mask=self_attn_mask),
        )
        if self.encoder_attn is not None and encoder_out is not None:
            x = residual_block(
                self,
                self.encoder_attn_layer_norm,
                x,
                lambda h: attend(h, self.encoder_attn, key=encoder_out, value=encoder_out,
                                 key_padding_mask=encoder_padding_mask, static_kv=True,
                                 need_weights=need_attn or (not self.training and self.need_attn),
                                 need_head_weights=need_head_weights),
            )
        return moe_feed_forward(self, x, self_attn_padding_mask, task_states), attn[0], None
