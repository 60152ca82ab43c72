"""Top-1 and top-2 gating with NLLB-200's semantics, as functions of tensors.

The numbers follow fairseq's ``nllb`` branch (``fairseq/modules/moe/top2gate.py``): softmax over all
experts (optionally in fp32), top-1 by argmax, top-2 by argmax with the top-1 masked, capacity
slots assigned in token order, dropped assignments removed, and the two weights renormalised.
Instead of NLLB's dense ``(tokens, experts, capacity)`` combine tensor we return, per token,
the ids of its experts and the weight of each, so dispatch costs O(tokens) memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq_moe_prune.layout import config_value

SECOND_EXPERT_POLICIES = ("all", "sampling", "random")


@dataclass(frozen=True)
class GateOptions:
    """NLLB's gating flags (its config's ``moe_*`` fields), with the nllb branch's defaults.

    The defaults are stated here once: the gating functions below, the model config (``MoEConfig``)
    and the config reader (:func:`gate_options`) take theirs from this class.
    """

    top1: bool = False
    use_fp32: bool = False
    second_expert_policy: str = "sampling"  # one of SECOND_EXPERT_POLICIES
    normalize_gate_prob_before_dropping: bool = False
    eval_capacity_token_fraction: float = 0.25
    batch_prioritized_routing: bool = False
    use_pad_mask: bool = False
    skip_beta: float = 0.0  # dynamic skipping of the second expert (moe_skip_betas); 0: off


# Each GateOptions field and the model config's (NLLB's) name for it
GATE_CONFIG_FIELDS = {
    "top1": "moe_top1_expert",
    "use_fp32": "moe_gating_use_fp32",
    "second_expert_policy": "moe_second_expert_policy",
    "normalize_gate_prob_before_dropping": "moe_normalize_gate_prob_before_dropping",
    "eval_capacity_token_fraction": "moe_eval_capacity_token_fraction",
    "batch_prioritized_routing": "moe_batch_prioritized_routing",
    "use_pad_mask": "use_moe_pad_mask",
}


def gate_options(cfg: Any, skip_beta: float = 0.0) -> GateOptions:
    """The gating flags of a model config's NLLB fields (a Namespace, omegaconf, dataclass or dict; and a layer's
    skipping beta); a field the config lacks or leaves unset takes GateOptions's default."""
    defaults = GateOptions()
    values = {}
    for name, config_name in GATE_CONFIG_FIELDS.items():
        default = getattr(defaults, name)
        value = config_value(cfg, config_name)
        values[name] = default if value is None else type(default)(value)
    return GateOptions(**values, skip_beta=float(skip_beta))


@dataclass
class Routing:
    """What a gate decided for a flat batch of S tokens.

    ``experts[s, j]`` is the j-th choice of token s (j = 0 for top-1, 1 for top-2), chosen before
    capacity dropping and padding masking; ``weights[s, j]`` is the combine weight that choice
    gets, 0 where it was dropped, masked or not sampled. ``probs`` is the full softmax.
    ``dispatch_mask[s, j]`` says whether the choice runs: its weight is non-zero before the cast to
    the input dtype, as NLLB's ``dispatch_mask`` (under fp16 a tiny weight can round to 0 and still run).
    """

    probs: Tensor  # (S, E), float32 when gating in fp32
    experts: Tensor  # (S, k), int64
    weights: Tensor  # (S, k), in the input dtype
    dispatch_mask: Tensor  # (S, k), bool
    l_aux: Tensor  # scalar load-balancing loss
    skipped: Optional[Tensor] = None  # (S,) bool: second expert skipped by dynamic skipping (None: rule off)


def expert_capacity(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    training: bool,
    eval_capacity_token_fraction: float,
) -> int:
    """Slots per expert: NLLB uses a fraction of all tokens at inference, k*ceil(S/E) in training."""
    if not training and eval_capacity_token_fraction > 0.0:
        return math.ceil(eval_capacity_token_fraction * num_tokens)
    return top_k * math.ceil(num_tokens / num_experts)


def load_balancing_loss(probs: Tensor, top1_mask: Tensor) -> Tensor:
    """GShard's auxiliary loss: mean(me * ce) * E^2, minimal when routing is uniform."""
    num_experts = probs.shape[1]
    me = probs.mean(dim=0)
    ce = top1_mask.to(probs.dtype).mean(dim=0)
    return (me * ce).mean() * num_experts * num_experts


def load_balancing_loss_of_choices(probs: Tensor, top1: Tensor, real: Optional[Tensor]) -> Tensor:
    """:func:`load_balancing_loss` from the first choices' ids (``real``: tokens that count), no one-hot mask."""
    num_tokens, num_experts = probs.shape
    me = probs.mean(dim=0)
    chosen = torch.ones_like(top1, dtype=probs.dtype) if real is None else real.to(probs.dtype)
    ce = torch.zeros_like(me).index_add_(0, top1, chosen) / num_tokens
    return (me * ce).mean() * num_experts * num_experts


def gate_probabilities(logits: Tensor, use_fp32: bool) -> Tuple[Tensor, Tensor]:
    """(logits, softmax over experts), in fp32 when asked, as NLLB's gates run under fp16."""
    if use_fp32:
        logits = logits.float()
    return logits, F.softmax(logits, dim=1)


def within_capacity(mask: Tensor, positions: Tensor, capacity: int) -> Tensor:
    """Per token: does its assignment in ``mask`` (tokens x experts, one-hot) get a slot?"""
    return (mask * (positions < capacity)).sum(dim=1).bool()


def slot_positions(mask: Tensor, priority: Optional[Tensor]) -> Tensor:
    """Position of each (token, expert) assignment in its expert's buffer: a running count.

    With ``priority`` (batch-prioritized routing) tokens with higher priority take slots first.
    """
    if priority is None:
        return torch.cumsum(mask, dim=0) - 1
    order = torch.argsort(-priority, dim=0, stable=True)
    positions = torch.cumsum(mask[order], dim=0) - 1
    return positions[torch.argsort(order, dim=0)]


def top2gating(
    logits: Tensor,
    padding_mask: Optional[Tensor] = None,
    *,
    use_fp32: bool = GateOptions.use_fp32,
    second_expert_policy: str = GateOptions.second_expert_policy,
    normalize_gate_prob_before_dropping: bool = GateOptions.normalize_gate_prob_before_dropping,
    training: bool = False,
    eval_capacity_token_fraction: float = GateOptions.eval_capacity_token_fraction,
    batch_prioritized_routing: bool = GateOptions.batch_prioritized_routing,
    skip_beta: float = GateOptions.skip_beta,
) -> Routing:
    """Route each of the S tokens of ``logits`` (S, E) to two experts.

    ``padding_mask`` (S,) marks tokens that take no expert slot (NLLB's ``use_moe_pad_mask``).
    ``skip_beta`` > 0 switches on dynamic skipping (:func:`second_expert_skipped`).
    """
    if second_expert_policy not in SECOND_EXPERT_POLICIES:
        raise ValueError(f"unknown second expert policy {second_expert_policy!r}")
    out_dtype = logits.dtype
    logits, probs = gate_probabilities(logits, use_fp32)
    num_tokens, num_experts = probs.shape

    top1 = probs.argmax(dim=1)
    second_logits = logits
    if second_expert_policy == "sampling":
        # Gumbel-max trick: sample the second expert from the softmax instead of taking the argmax.
        gumbel = torch.distributions.gumbel.Gumbel(
            torch.tensor(0.0, device=logits.device), torch.tensor(1.0, device=logits.device)
        )
        second_logits = logits + gumbel.rsample(logits.shape).to(logits.dtype)
    top2 = second_logits.scatter(1, top1[:, None], float("-inf")).argmax(dim=1)

    gate1 = probs.gather(1, top1[:, None]).squeeze(1)
    gate2 = probs.gather(1, top2[:, None]).squeeze(1)
    if normalize_gate_prob_before_dropping:
        denom = torch.clamp(gate1 + gate2, min=torch.finfo(gate1.dtype).eps)
        gate1, gate2 = gate1 / denom, gate2 / denom
    sampled2 = None  # with the "random" policy: is the second expert kept at all?
    if second_expert_policy == "random":
        # keep the second expert with probability 2 * its gate value
        sampled2 = 2 * gate2 > torch.rand_like(gate2)
    skipped = None
    if skip_beta > 0:
        skipped = second_expert_skipped(gate1, gate2, skip_beta)
        # a skipped second expert takes no slot and is never computed
        sampled2 = ~skipped if sampled2 is None else sampled2 & ~skipped

    capacity = expert_capacity(num_tokens, num_experts, 2, training, eval_capacity_token_fraction)
    if capacity >= num_tokens:
        # An expert takes at most one of each token's two choices, so with a slot per token no
        # assignment is dropped: no slot bookkeeping, only padding and sampling decide (None: all kept).
        kept1 = None if padding_mask is None else ~padding_mask
        kept2 = kept1 if sampled2 is None else (sampled2 if kept1 is None else kept1 & sampled2)
        l_aux = load_balancing_loss_of_choices(probs, top1, kept1)
    else:
        top1_mask = F.one_hot(top1, num_experts)
        top2_mask = F.one_hot(top2, num_experts)
        if sampled2 is not None:
            top2_mask = top2_mask * sampled2[:, None]
        if padding_mask is not None:
            real = (~padding_mask)[:, None]
            top1_mask = top1_mask * real
            top2_mask = top2_mask * real

        priority = probs.max(dim=1).values if batch_prioritized_routing else None
        positions1 = slot_positions(top1_mask, priority)
        # second choices queue behind every first choice of the same expert
        positions2 = slot_positions(top2_mask, priority) + top1_mask.sum(dim=0, keepdim=True)
        l_aux = load_balancing_loss(probs, top1_mask)
        kept1 = within_capacity(top1_mask, positions1, capacity)
        kept2 = within_capacity(top2_mask, positions2, capacity)

    # without normalisation before dropping, gate1 and gate2 are still the raw probabilities
    weight1 = gate1 if kept1 is None else gate1 * kept1
    weight2 = gate2 if kept2 is None else gate2 * kept2
    if not normalize_gate_prob_before_dropping:
        denom = torch.clamp(weight1 + weight2, min=torch.finfo(weight1.dtype).eps)
        weight1, weight2 = weight1 / denom, weight2 / denom
    if skipped is not None:
        # the first expert alone, with weight exactly 1 (0 where capacity dropped it)
        first_alone = torch.ones_like(weight1) if kept1 is None else kept1.to(weight1.dtype)
        weight1 = torch.where(skipped, first_alone, weight1)
        weight2 = torch.where(skipped, torch.zeros_like(weight2), weight2)

    weights = torch.stack([weight1, weight2], dim=1)
    return Routing(
        probs=probs,
        experts=torch.stack([top1, top2], dim=1),
        weights=weights.to(out_dtype),
        dispatch_mask=weights != 0,
        l_aux=l_aux,
        skipped=skipped,
    )


def second_expert_skipped(gate1: Tensor, gate2: Tensor, beta: float) -> Tensor:
    """Dynamic skipping (Lu et al. 2024): drop the second expert where w2 < beta * w1.

    ``gate1``/``gate2`` are the two chosen experts' probabilities from the full softmax, before the
    top-2 renormalisation; beta = 0 never skips.
    """
    return gate2 < beta * gate1


def top1gating(
    logits: Tensor,
    padding_mask: Optional[Tensor] = None,
    *,
    use_fp32: bool = GateOptions.use_fp32,
    training: bool = False,
    eval_capacity_token_fraction: float = GateOptions.eval_capacity_token_fraction,
) -> Routing:
    """Route each token to its argmax expert with weight = its gate probability (Switch style)."""
    out_dtype = logits.dtype
    _, probs = gate_probabilities(logits, use_fp32)
    num_tokens, num_experts = probs.shape

    top1 = probs.argmax(dim=1)
    weight = probs.gather(1, top1[:, None]).squeeze(1)
    capacity = expert_capacity(num_tokens, num_experts, 1, training, eval_capacity_token_fraction)
    if capacity >= num_tokens:  # no token can be dropped: only padding takes weight away
        kept = None if padding_mask is None else ~padding_mask
        l_aux = load_balancing_loss_of_choices(probs, top1, kept)
    else:
        top1_mask = F.one_hot(top1, num_experts)
        if padding_mask is not None:
            top1_mask = top1_mask * (~padding_mask)[:, None]
        positions = slot_positions(top1_mask, None)
        l_aux = load_balancing_loss(probs, top1_mask)
        kept = within_capacity(top1_mask, positions, capacity)
    if kept is not None:
        weight = weight * kept
    return Routing(
        probs=probs,
        experts=top1[:, None],
        weights=weight[:, None].to(out_dtype),
        dispatch_mask=weight[:, None] != 0,
        l_aux=l_aux,
    )


def task_gating(
    logits: Tensor,
    *,
    top1: bool = GateOptions.top1,
    use_fp32: bool = GateOptions.use_fp32,
    second_expert_policy: str = GateOptions.second_expert_policy,
    normalize_gate_prob_before_dropping: bool = GateOptions.normalize_gate_prob_before_dropping,
    training: bool = False,
) -> Routing:
    """Route each of B sentences by its task: ``logits`` (B, E) come from the sentence's task embedding.

    Task-level MoE (Kudugunta et al. 2021): every token of a sentence goes to its task's experts, so
    nothing is dropped for capacity and, at inference, the choice is deterministic (argmax; the second
    expert is sampled only in training), which makes a task's sub-network a fixed set of experts with
    fixed weights. The load-balancing loss is GShard's over the B sentences, not over tokens.
    """
    if second_expert_policy not in SECOND_EXPERT_POLICIES:
        raise ValueError(f"unknown second expert policy {second_expert_policy!r}")
    out_dtype = logits.dtype
    logits, probs = gate_probabilities(logits, use_fp32)
    num_experts = probs.shape[1]
    top1_ids = probs.argmax(dim=1)
    top1_mask = F.one_hot(top1_ids, num_experts)
    l_aux = load_balancing_loss(probs, top1_mask)
    gate1 = probs.gather(1, top1_ids[:, None]).squeeze(1)
    if top1:
        return Routing(probs=probs, experts=top1_ids[:, None], weights=gate1[:, None].to(out_dtype),
                       dispatch_mask=gate1[:, None] != 0, l_aux=l_aux)

    second_logits = logits
    if training and second_expert_policy == "sampling":
        gumbel = torch.distributions.gumbel.Gumbel(
            torch.tensor(0.0, device=logits.device), torch.tensor(1.0, device=logits.device)
        )
        second_logits = logits + gumbel.rsample(logits.shape).to(logits.dtype)
    top2_ids = second_logits.masked_fill(top1_mask.bool(), float("-inf")).argmax(dim=1)
    gate2 = probs.gather(1, top2_ids[:, None]).squeeze(1)
    kept2 = torch.ones_like(gate2)
    if training and second_expert_policy == "random":
        kept2 = (2 * gate2 > torch.rand_like(gate2)).to(gate2.dtype)
    if normalize_gate_prob_before_dropping:
        denom = torch.clamp(gate1 + gate2, min=torch.finfo(gate1.dtype).eps)
        weight1, weight2 = gate1 / denom, gate2 / denom * kept2
    else:
        weight1, weight2 = gate1, gate2 * kept2
        denom = torch.clamp(weight1 + weight2, min=torch.finfo(weight1.dtype).eps)
        weight1, weight2 = weight1 / denom, weight2 / denom
    weights = torch.stack([weight1, weight2], dim=1)
    return Routing(
        probs=probs,
        experts=torch.stack([top1_ids, top2_ids], dim=1),
        weights=weights.to(out_dtype),
        dispatch_mask=weights != 0,
        l_aux=l_aux,
    )


def broadcast_routing(routing: Routing, tokens_per_sentence: int, padding_mask: Optional[Tensor] = None) -> Routing:
    """A per-sentence routing repeated for each of the sentence's tokens (batch-major flat order).

    ``padding_mask`` (B * T,) zeroes the weights of padding tokens (NLLB's ``use_moe_pad_mask``); the
    load-balancing loss stays the per-sentence one.
    """
    weights = routing.weights.repeat_interleave(tokens_per_sentence, dim=0)
    dispatch_mask = routing.dispatch_mask.repeat_interleave(tokens_per_sentence, dim=0)
    if padding_mask is not None:
        weights = weights * (~padding_mask)[:, None].to(weights.dtype)
        dispatch_mask = dispatch_mask & (~padding_mask)[:, None]
    return Routing(
        probs=routing.probs.repeat_interleave(tokens_per_sentence, dim=0),
        experts=routing.experts.repeat_interleave(tokens_per_sentence, dim=0),
        weights=weights,
        dispatch_mask=dispatch_mask,
        l_aux=routing.l_aux,
    )
