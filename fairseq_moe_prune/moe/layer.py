"""The MoE feed-forward block: a gate, a list of expert FFNs, dispatch and combine.

Parameter names match NLLB's checkpoints; their keys are spelled once, in ``layout.py`` (``MoELayerSpec``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fairseq_moe_prune.moe.gate import GateOptions, Routing, broadcast_routing, task_gating, top1gating, top2gating
from fairseq_moe_prune.moe.placement import RESIDENT


class Gate(nn.Module):
    """A bias-free linear router; the routing itself lives in :mod:`fairseq_moe_prune.moe.gate`."""

    def __init__(self, embed_dim: int, num_experts: int, options: GateOptions):
        super().__init__()
        self.wg = nn.Linear(embed_dim, num_experts, bias=False)
        self.options = options

    def forward(self, tokens: Tensor, padding_mask: Optional[Tensor]) -> Routing:
        logits = self.wg(tokens)
        opts = self.options
        if opts.top1:
            return top1gating(
                logits,
                padding_mask,
                use_fp32=opts.use_fp32,
                training=self.training,
                eval_capacity_token_fraction=opts.eval_capacity_token_fraction,
            )
        return top2gating(
            logits,
            padding_mask,
            use_fp32=opts.use_fp32,
            second_expert_policy=opts.second_expert_policy,
            normalize_gate_prob_before_dropping=opts.normalize_gate_prob_before_dropping,
            training=self.training,
            eval_capacity_token_fraction=opts.eval_capacity_token_fraction,
            batch_prioritized_routing=opts.batch_prioritized_routing,
            skip_beta=opts.skip_beta,
        )

    def route_tasks(self, task_states: Tensor, tokens_per_sentence: int, padding_mask: Optional[Tensor]) -> Routing:
        """Task routing: the gate sees each sentence's task embedding (B, dim) instead of its tokens."""
        opts = self.options
        routing = task_gating(
            self.wg(task_states),
            top1=opts.top1,
            use_fp32=opts.use_fp32,
            second_expert_policy=opts.second_expert_policy,
            normalize_gate_prob_before_dropping=opts.normalize_gate_prob_before_dropping,
            training=self.training,
        )
        return broadcast_routing(routing, tokens_per_sentence, padding_mask)


class Expert(nn.Module):
    """One expert: the plain transformer FFN (fc1, activation, dropout, fc2)."""

    def __init__(self, embed_dim: int, ffn_dim: int, activation_fn: str, activation_dropout: float):
        # fairseq is imported here, where it is used: pruning reads this module's types without it
        from fairseq import utils
        from fairseq.modules.fairseq_dropout import FairseqDropout

        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.activation_fn = utils.get_activation_fn(activation_fn)
        self.activation_dropout = FairseqDropout(activation_dropout, module_name="Expert")

    def forward(self, x: Tensor) -> Tensor:
        # fc1 and fc2's own computation (nn.Linear.forward is F.linear), called without three module
        # calls: at a decoding step each expert sees a few tokens, where the calls cost about as much
        # as the arithmetic. The dropout runs only where it drops anything (FairseqDropout's own test).
        hidden = self.activation_fn(F.linear(x, self.fc1.weight, self.fc1.bias))
        dropout = self.activation_dropout
        if dropout.p > 0 and (dropout.training or dropout.apply_during_inference):
            hidden = dropout(hidden)
        return F.linear(hidden, self.fc2.weight, self.fc2.bias)


@dataclass
class Dispatch:
    """The (token, expert) pairs that actually ran, grouped by expert."""

    token_ids: Tensor  # (N,) index of the token in the flat batch
    experts: Tensor  # (N,) expert id, ascending
    weights: Tensor  # (N,) combine weight
    output_norms: Optional[Tensor] = None  # (N,) L2 norm of the expert's output, when asked for


@dataclass
class RoutingRecord:
    """What one forward of a MoE layer decided and computed, handed to its observer."""

    layer: "MoELayer"
    routing: Routing
    padding: Optional[Tensor]  # (tokens,) True at padding, or None
    dispatch: Dispatch
    inputs: Tensor  # (tokens, dim) the layer's input, flat
    outputs: Tensor  # (tokens, dim) the layer's output, flat


# Called after every forward with that forward's record; used to record decisions and calibration samples.
RoutingObserver = Callable[[RoutingRecord], None]


class MoELayer(nn.Module):
    """Replaces a transformer layer's FFN: each token goes to its top-1 (or top-2) experts.

    ``eom`` is NLLB's expert output masking: in training each (token, expert) output is zeroed
    with probability ``eom`` (no rescaling), at inference every output is scaled by ``1 - eom``.
    The forward returns the output and the layer's load-balancing loss, as NLLB's ``MOELayer`` does.
    """

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        num_experts: int,
        gate_options: GateOptions,
        activation_fn: str = "relu",
        activation_dropout: float = 0.0,
        eom: float = 0.0,
    ):
        super().__init__()
        self.gate = Gate(embed_dim, num_experts, gate_options)
        self.experts = nn.ModuleList(
            Expert(embed_dim, ffn_dim, activation_fn, activation_dropout) for _ in range(num_experts)
        )
        self.eom = eom
        self.observer: Optional[RoutingObserver] = None
        self.placement = RESIDENT  # where the experts run (fairseq_moe_prune.moe.placement)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                task_states: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(output, load-balancing loss) for ``x``: (batch, time, dim); ``padding_mask``: (batch, time),
        True at padding; ``task_states`` (batch, dim): each sentence's task embedding, given when the
        layer routes by task."""
        batch, time, dim = x.shape
        tokens = x.reshape(-1, dim)
        flat_padding = padding_mask.reshape(-1) if padding_mask is not None else None
        gate_padding = flat_padding if self.gate.options.use_pad_mask else None
        if task_states is None:
            routing = self.gate(tokens, gate_padding)
        else:
            routing = self.gate.route_tasks(task_states, time, gate_padding)
        combined, dispatch = self.dispatch_and_combine(tokens, routing, with_norms=self.observer is not None)
        if self.observer is not None:
            self.observer(RoutingRecord(self, routing, flat_padding, dispatch, tokens, combined))
        return combined.reshape(batch, time, dim), routing.l_aux

    def dispatch_and_combine(self, tokens: Tensor, routing: Routing, with_norms: bool = False) -> Tuple[Tensor, Dispatch]:
        """Run each expert once on the tokens routed to it and add up the weighted outputs."""
        top_k = routing.experts.shape[1]
        weights = routing.weights.reshape(-1)
        # NLLB dispatches exactly where the combine weight is non-zero before its cast to the input dtype
        # (routing.dispatch_mask): the other (token, choice) pairs get the key num_experts, so that one
        # stable sort groups the others by expert, in token order, and leaves these last; one host sync
        # reads the group sizes.
        keys = routing.experts.reshape(-1).masked_fill(~routing.dispatch_mask.reshape(-1), self.num_experts)
        keys, order = torch.sort(keys, stable=True)
        counts = torch.bincount(keys, minlength=self.num_experts + 1).tolist()
        routed = len(keys) - counts.pop()
        experts, order = keys[:routed], order[:routed]
        token_ids = order if top_k == 1 else torch.div(order, top_k, rounding_mode="floor")
        weights = weights.index_select(0, order)  # index_select: the same rows as indexing, less overhead
        chunks = tokens.index_select(0, token_ids).split(counts)
        # In training every expert runs, even on no tokens, so that each gets a gradient (zero if unused)
        # and the optimizer treats all alike; at inference experts without tokens are skipped (one decoding
        # step of one language uses few experts).
        outputs = torch.cat(self.placement.run(self, chunks, skip_empty=not self.training) or [tokens[:0]])
        dispatch = Dispatch(token_ids, experts, weights, outputs.float().norm(dim=1) if with_norms else None)

        if self.eom > 0:
            if self.training:
                keep = torch.rand(outputs.shape[0], 1, device=outputs.device) > self.eom
                outputs = outputs * keep
            else:
                outputs = outputs * (1 - self.eom)
        combined = torch.zeros_like(tokens)
        combined.index_add_(0, token_ids, outputs * weights[:, None])
        return combined, dispatch
