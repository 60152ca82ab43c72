"""Our top-2 gating against a second implementation: Hugging Face's NllbMoe router.

The router (``NllbMoeTop2Router``) has NLLB's capacity dropping, second-expert policies, normalisation
before dropping, batch-prioritized routing and the pad mask. Both routers get the same gate weight and the
same tokens, and for the sampling policies the same seed: both draw their Gumbel noise and their uniform
numbers from torch's global generator in the same order, so the draws are the same. The decision is
compared as HF returns it: the first choices that kept their slot and the (tokens, experts) combine weights.

Where HF departs from NLLB's fairseq branch (fairseq/modules/moe/top2gate.py) the case is left out here and
explained at the case; we follow the branch.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fairseq_moe_prune.moe.layer import Gate, GateOptions
from tests.helpers import import_extra

nllb_moe = import_extra("transformers.models.nllb_moe.modeling_nllb_moe")

DIM, EXPERTS = 16, 8


def hf_router(options: GateOptions, training: bool) -> "nllb_moe.NllbMoeTop2Router":
    config = nllb_moe.NllbMoeConfig(
        d_model=DIM,
        num_experts=EXPERTS,
        # NLLB's training capacity 2 * ceil(S / E); HF's default is a fixed 64 slots. A router remembers the
        # capacity of its first call, so every call gets a fresh one.
        expert_capacity=None,
        router_dtype="float32",
        router_bias=False,
        router_ignore_padding_tokens=False,
        second_expert_policy=options.second_expert_policy,
        normalize_router_prob_before_dropping=options.normalize_gate_prob_before_dropping,
        batch_prioritized_routing=options.batch_prioritized_routing,
        moe_eval_capacity_token_fraction=options.eval_capacity_token_fraction,
    )
    return nllb_moe.NllbMoeTop2Router(config).train(training)


def ours_as_hf(gate: Gate, tokens: torch.Tensor, padding: torch.Tensor | None):
    """(first choices that kept their slot as a one-hot (S, E) mask, combine weights (S, E))."""
    routing = gate(tokens, padding)
    kept1 = routing.weights[:, 0] != 0
    top1_mask = F.one_hot(routing.experts[:, 0], EXPERTS) * kept1[:, None]
    combine = torch.zeros(tokens.shape[0], EXPERTS).scatter_add_(1, routing.experts, routing.weights)
    return top1_mask, combine


def route_both(options: GateOptions, training: bool, padded: bool, seed: int):
    torch.manual_seed(seed)
    batch, time = 4, 10
    x = torch.randn(batch, time, DIM) * 3  # peaked gates: capacity drops and ties in neither
    padding = None
    if padded:
        lengths = torch.tensor([10, 7, 3, 9])
        padding = torch.arange(time)[None, :] >= lengths[:, None]  # right padding, (batch, time)

    hf = hf_router(options, training)
    ours = Gate(DIM, EXPERTS, options).train(training)
    with torch.no_grad():
        ours.wg.weight.copy_(hf.classifier.weight)
        flat_padding = None if padding is None else padding.reshape(-1)
        torch.manual_seed(seed + 1)
        hf_top1, hf_combine = hf(x, flat_padding)
        torch.manual_seed(seed + 1)
        our_top1, our_combine = ours_as_hf(ours, x.reshape(-1, DIM), flat_padding)
    return (hf_top1, hf_combine), (our_top1, our_combine), flat_padding


CASES = [
    (policy, normalize, prioritized, fraction, training, padded)
    for policy, normalize, prioritized, fraction, training, padded in itertools.product(
        ["all", "sampling", "random"], [False, True], [False, True], [0.25, 1.0, 0.0], [False, True], [False, True])
    # HF's "random" policy recomputes the second expert's raw probability, samples with it and keeps it as the
    # combine weight, overwriting the normalised one; NLLB samples with and combines the normalised weight.
    if not (policy == "random" and normalize)
    # in training the eval capacity fraction plays no part: one training case per other setting
    and not (training and fraction != 0.25)
]


@pytest.mark.parametrize("policy, normalize, prioritized, fraction, training, padded", CASES)
def test_top2_gating_equals_hf_nllb_moe_router(policy, normalize, prioritized, fraction, training, padded):
    options = GateOptions(second_expert_policy=policy, normalize_gate_prob_before_dropping=normalize,
                          batch_prioritized_routing=prioritized, eval_capacity_token_fraction=fraction,
                          use_fp32=True)
    seed = CASES.index((policy, normalize, prioritized, fraction, training, padded))  # other tokens in each case
    (hf_top1, hf_combine), (our_top1, our_combine), padding = route_both(options, training, padded, seed)
    assert torch.equal(our_top1, hf_top1.to(our_top1.dtype))
    torch.testing.assert_close(our_combine, hf_combine, rtol=0, atol=1e-6)
    if padding is not None:
        assert our_combine[padding].eq(0).all()


@pytest.mark.parametrize("fraction, training", [(0.25, False), (0.0, False), (0.25, True)])
def test_the_comparison_sees_capacity_drops_priorities_and_samples(fraction, training):
    """The cases above are not vacuous: assignments are dropped for capacity, batch-prioritized routing
    changes which ones, and the sampled second experts differ from the argmax ones."""
    kept = {}
    for prioritized in (False, True):
        options = GateOptions(second_expert_policy="all", batch_prioritized_routing=prioritized,
                              eval_capacity_token_fraction=fraction, use_fp32=True)
        (_, hf_combine), (_, our_combine), _ = route_both(options, training, padded=False, seed=0)
        kept[prioritized] = our_combine.ne(0)
        assert kept[prioritized].sum() < 2 * our_combine.shape[0]  # some assignments were dropped
    assert not torch.equal(kept[False], kept[True])

    argmax = route_both(GateOptions(second_expert_policy="all", eval_capacity_token_fraction=1.0, use_fp32=True),
                        training=False, padded=False, seed=0)[1][1]
    sampled = route_both(GateOptions(second_expert_policy="sampling", eval_capacity_token_fraction=1.0,
                                     use_fp32=True), training=False, padded=False, seed=0)[1][1]
    assert not torch.equal(argmax.ne(0), sampled.ne(0))
