"""fairseq's transformer layers with the FFN replaced by an MoE block, as in NLLB-200.

Attention, layer norms and residuals are fairseq's own modules under fairseq's names, so dense
parameters keep their keys; the FFN's ``fc1``/``fc2`` give way to ``moe_layer``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from fairseq import utils
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor

from fairseq_moe_prune.layout import MoEConfigError
from fairseq_moe_prune.moe.gate import gate_options
from fairseq_moe_prune.moe.layer import MoELayer
from fairseq_moe_prune.moe.placement import building_context, place_layer, placement_options


def build_moe_layer(cfg: Any, embed_dim: int, ffn_dim: int, num_experts: int, skip_beta: float) -> MoELayer:
    """An MoE block configured from the model config's NLLB fields (and its layer's skipping beta), its
    experts where the config says (:mod:`fairseq_moe_prune.moe.placement`): offloaded or placed experts
    are built without memory and get their weights from the checkpoint."""
    placement = placement_options(cfg)
    activation_dropout = cfg.activation_dropout or utils.safe_getattr(cfg, "relu_dropout", 0) or 0
    with building_context(placement):
        layer = MoELayer(
            embed_dim,
            ffn_dim,
            num_experts,
            gate_options(cfg, skip_beta),
            activation_fn=cfg.activation_fn,
            activation_dropout=float(activation_dropout),
            eom=float(utils.safe_getattr(cfg, "moe_eom", 0.0)),
        )
    place_layer(layer, placement)
    return layer


class MoESublayer:
    """The FFN sub-layer of both MoE layers: fairseq 0.12's lines around its FFN (norm, dropout, residual),
    the MoE block in the FFN's place."""

    def moe_sublayer(self, x: Tensor, padding_mask: Optional[Tensor],
                     task_states: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(output, load-balancing loss) for ``x`` (time, batch, dim); ``padding_mask`` (batch, time)."""
        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        # the MoE sees tokens batch-major, as NLLB's does, which fixes the order in which tokens take capacity
        x, l_aux = self.moe_layer(x.transpose(0, 1), padding_mask, task_states)
        x = x.transpose(0, 1)
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x, l_aux


class MoEEncoderLayer(MoESublayer, TransformerEncoderLayerBase):
    """fairseq 0.12's encoder layer with the MoE block in place of fc1/fc2 (its forward, line for line; the
    FFN sub-layer in :class:`MoESublayer`)."""

    def __init__(self, cfg: Any, num_experts: int, skip_beta: float = 0.0):
        super().__init__(cfg)
        self.moe_layer = build_moe_layer(cfg, self.embed_dim, cfg.encoder.ffn_embed_dim, num_experts, skip_beta)

    def build_fc1(self, *args: Any) -> None:
        return None  # no dense FFN in an MoE layer

    def build_fc2(self, *args: Any) -> None:
        return None

    def forward(
        self, x: Tensor, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None,
        task_states: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """(output, the MoE block's load-balancing loss). ``x`` is (time, batch, dim); ``task_states``
        (batch, dim), when given, route each sentence by its task."""
        if attn_mask is not None:
            attn_mask = attn_mask.masked_fill(attn_mask.to(torch.bool), -1e8 if x.dtype == torch.float32 else -1e4)

        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=encoder_padding_mask, need_weights=False,
                              attn_mask=attn_mask)
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        x, l_aux = self.moe_sublayer(x, encoder_padding_mask, task_states)
        return x, l_aux


class MoEDecoderLayer(MoESublayer, TransformerDecoderLayerBase):
    """fairseq 0.12's decoder layer with the MoE block in place of fc1/fc2 (its forward, line for line, the
    FFN sub-layer in :class:`MoESublayer`, without the options refused here)."""

    def __init__(self, cfg: Any, num_experts: int, no_encoder_attn: bool = False, skip_beta: float = 0.0):
        for flag in ("cross_self_attention", "scale_attn", "scale_heads", "scale_fc", "scale_resids"):
            if utils.safe_getattr(cfg, flag, False):
                raise MoEConfigError(f"--{flag.replace('_', '-')} is not supported in MoE layers")
        super().__init__(cfg, no_encoder_attn)
        self.moe_layer = build_moe_layer(cfg, self.embed_dim, cfg.decoder.ffn_embed_dim, num_experts, skip_beta)

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
    ) -> Tuple[Tensor, Optional[Tensor], None, Tensor]:
        """(output, attention, None, the MoE block's load-balancing loss), as NLLB's decoder layer returns."""
        if need_head_weights:
            need_attn = True

        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, attn = self.self_attn(query=x, key=x, value=x, key_padding_mask=self_attn_padding_mask,
                                 incremental_state=incremental_state, need_weights=False, attn_mask=self_attn_mask)
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        if self.encoder_attn is not None and encoder_out is not None:
            residual = x
            if self.normalize_before:
                x = self.encoder_attn_layer_norm(x)
            x, attn = self.encoder_attn(query=x, key=encoder_out, value=encoder_out,
                                        key_padding_mask=encoder_padding_mask, incremental_state=incremental_state,
                                        static_kv=True, need_weights=need_attn or (not self.training and self.need_attn),
                                        need_head_weights=need_head_weights)
            x = self.dropout_module(x)
            x = self.residual_connection(x, residual)
            if not self.normalize_before:
                x = self.encoder_attn_layer_norm(x)

        x, l_aux = self.moe_sublayer(x, self_attn_padding_mask, task_states)
        return x, attn, None, l_aux
