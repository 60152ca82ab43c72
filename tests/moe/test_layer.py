"""The MoE block: dispatch/combine against a brute-force loop, and the dense-FFN equivalence."""

import pytest
import torch

from fairseq_moe_prune.moe.layer import Expert, GateOptions, MoELayer

ALL = GateOptions(second_expert_policy="all", eval_capacity_token_fraction=1.0, use_fp32=True)


def make_layer(num_experts=4, options=ALL, eom=0.0, dim=8, ffn=16, seed=0) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(dim, ffn, num_experts, options, eom=eom)


def brute_force(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Every token through each of its experts, one at a time, weighted as the gate says."""
    tokens = x.reshape(-1, x.shape[-1])
    routing = layer.gate(tokens, None)
    out = torch.zeros_like(tokens)
    for s in range(tokens.shape[0]):
        for expert, weight in zip(routing.experts[s].tolist(), routing.weights[s]):
            if weight != 0:
                out[s] += weight * layer.experts[expert](tokens[s]) * (1 - layer.eom)
    return out.reshape(x.shape)


@pytest.mark.parametrize("top1", [False, True])
def test_dispatch_and_combine_equal_a_per_token_loop(top1):
    layer = make_layer(options=GateOptions(top1=top1, second_expert_policy="all", eval_capacity_token_fraction=1.0), eom=0.2).eval()
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(layer(x)[0], brute_force(layer, x))


def record_expert_calls(layer: MoELayer, calls: list) -> None:
    """Append (expert id, number of tokens) to ``calls`` whenever an expert runs."""
    for j, expert in enumerate(layer.experts):
        expert.register_forward_hook(ExpertCall(j, calls))


class ExpertCall:
    def __init__(self, expert_id: int, calls: list):
        self.expert_id = expert_id
        self.calls = calls

    def __call__(self, module, inputs, output) -> None:
        self.calls.append((self.expert_id, inputs[0].shape[0]))


def test_experts_without_tokens_are_skipped_at_inference_and_run_in_training():
    layer = make_layer(num_experts=16).eval()
    calls = []
    record_expert_calls(layer, calls)
    x = torch.randn(1, 2, 8)  # 2 tokens reach at most 4 of the 16 experts
    torch.testing.assert_close(layer(x)[0], brute_force(layer, x))
    routing = layer.gate(x[0], None)
    used = sorted(set(routing.experts[routing.weights != 0].tolist()))
    assert 1 <= len(used) <= 4
    calls.clear()
    layer(x)
    # at inference exactly the experts with tokens ran, each once, on its tokens
    assert sorted(calls) == [(j, int(((routing.experts == j) & (routing.weights != 0)).sum())) for j in used]
    calls.clear()
    assert layer(x[:, :0])[0].shape == (1, 0, 8)
    assert calls == []

    layer.train()
    calls.clear()
    layer(x)[0].sum().backward()
    assert sorted(j for j, _ in calls) == list(range(16))  # every expert ran, most on no tokens
    assert sum(n for _, n in calls) == 4  # 2 tokens x 2 choices (capacity 2*ceil(2/16) = 2 drops none)
    assert all(expert.fc1.weight.grad is not None for expert in layer.experts)


def test_copies_of_one_ffn_equal_that_dense_ffn_times_one_minus_eom():
    layer = make_layer(num_experts=6, eom=0.2).eval()
    for expert in layer.experts[1:]:
        expert.load_state_dict(layer.experts[0].state_dict())
    x = torch.randn(4, 7, 8)
    dense = layer.experts[0](x)
    torch.testing.assert_close(layer(x)[0], dense * 0.8)
    layer.eom = 0.0
    torch.testing.assert_close(layer(x)[0], dense)


def test_eom_masks_whole_expert_outputs_in_training_without_rescaling():
    layer = make_layer(num_experts=2, eom=0.5)
    for expert in layer.experts[1:]:
        expert.load_state_dict(layer.experts[0].state_dict())
    layer.train()
    torch.manual_seed(1)
    x = torch.randn(1, 64, 8)  # 2 experts, 64 tokens: capacity 64 covers every assignment
    out = layer(x)[0][0]
    dense = layer.experts[0](x[0])
    weights = layer.gate(x[0], None).weights
    # each token keeps 0, 1 or both of its two expert outputs, never a rescaled one
    candidates = torch.stack([torch.zeros(64), weights[:, 0], weights[:, 1], weights.sum(1)], dim=1)
    ratio = (out * dense).sum(1) / (dense * dense).sum(1)
    distance = (candidates - ratio[:, None]).abs().min(dim=1).values
    assert distance.max() < 1e-4
    assert (ratio.abs() < 1e-6).any() and ((ratio - 1).abs() < 1e-4).any()


@pytest.mark.parametrize("use_pad_mask", [True, False])
def test_padding_mask_reaches_the_gate_only_with_use_pad_mask(use_pad_mask):
    seen = []
    # capacity for every token, so that only the pad mask can take an expert away
    options = GateOptions(second_expert_policy="all", eval_capacity_token_fraction=1.0, use_pad_mask=use_pad_mask)
    layer = make_layer(options=options).eval()
    layer.observer = lambda record: seen.append((record.routing, record.padding))
    x = torch.randn(2, 3, 8)
    padding = torch.tensor([[False, False, True], [False, True, True]])
    out, _ = layer(x, padding)
    routing, observed_padding = seen[0]
    assert observed_padding.tolist() == padding.reshape(-1).tolist()  # the observer sees padding either way
    # the gate alone decides what the layer gets: padding=None gives the same output without the pad mask
    unmasked, _ = layer(x)
    if use_pad_mask:
        assert routing.weights.reshape(2, 3, 2)[padding].eq(0).all()
        assert out[padding].eq(0).all()  # padding positions get no expert output
        assert not torch.equal(out, unmasked)
    else:
        # padding tokens are routed like any other and get an expert output
        assert routing.weights.reshape(2, 3, 2)[padding].ne(0).all()
        assert out[padding].ne(0).any(dim=1).all()
        torch.testing.assert_close(out, unmasked, rtol=0, atol=0)
    assert out[~padding].ne(0).any()


def test_l_aux_is_returned_for_the_criterion_and_gradients_reach_the_gate():
    layer = make_layer().train()
    x = torch.randn(2, 6, 8)
    out, l_aux = layer(x)
    (out.sum() + l_aux).backward()
    assert layer.gate.wg.weight.grad is not None and layer.gate.wg.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.7])
def test_skipping_layer_equals_first_expert_alone_where_the_rule_fires_and_never_runs_skipped_experts(beta):
    layer = make_layer(num_experts=6, options=GateOptions(second_expert_policy="all", eval_capacity_token_fraction=1.0,
                                                          use_fp32=True, skip_beta=beta), eom=0.2).eval()
    plain = make_layer(num_experts=6, eom=0.2).eval()  # the same weights (same seed), no skipping
    x = torch.randn(4, 9, 8)
    tokens = x.reshape(-1, 8)
    calls = []
    for expert in layer.experts:
        expert.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    out = layer(x)[0].reshape(-1, 8)
    ran = sum(calls)  # token rows the experts processed
    probs = torch.softmax(layer.gate.wg(tokens).float(), dim=1)
    top = probs.topk(2, dim=1)
    fires = top.values[:, 1] < beta * top.values[:, 0]
    with torch.no_grad():
        expected = plain(x)[0].reshape(-1, 8)
        for s in torch.nonzero(fires).squeeze(1).tolist():
            expected[s] = layer.experts[int(top.indices[s, 0])](tokens[s]) * 0.8
    if beta == 0.0:
        assert torch.equal(out, plain(x)[0].reshape(-1, 8))  # bit-identical to no skipping
    torch.testing.assert_close(out, expected)
    assert ran == 2 * tokens.shape[0] - int(fires.sum())  # skipped experts never ran


def test_expert_computes_what_its_modules_compute_and_drops_exactly_where_its_dropout_would():
    torch.manual_seed(0)
    expert = Expert(8, 16, "relu", 0.5)
    x = torch.randn(5, 8)

    def modules(seed):
        torch.manual_seed(seed)
        return expert.fc2(expert.activation_dropout(expert.activation_fn(expert.fc1(x))))

    def forward(seed):
        torch.manual_seed(seed)
        return expert(x)

    expert.eval()
    assert torch.equal(forward(1), modules(1))
    kept = forward(1)
    for mode in ("train", "retain_dropout"):
        if mode == "train":
            expert.train()
        else:
            expert.eval()
            expert.activation_dropout.apply_during_inference = True
        assert torch.equal(forward(2), modules(2))
        assert not torch.equal(forward(2), kept)  # p = 0.5 on 80 units: something was dropped


def test_dispatch_follows_the_fp32_weights_under_fp16():
    """As NLLB's dispatch_mask: a second expert whose fp32 weight (about 2e-9) rounds to 0 in fp16 still runs,
    with weight 0, so what is recorded as routed does not depend on the input dtype."""
    layer = make_layer(num_experts=4).half().eval()  # gating in fp32, second expert always, no capacity limit
    with torch.no_grad():
        layer.gate.wg.weight.zero_()
        layer.gate.wg.weight[:, 0] = torch.tensor([0.0, -20.0, -25.0, -25.0])
    x = torch.zeros(1, 3, 8, dtype=torch.float16)
    x[..., 0] = 1.0  # logits (0, -20, -25, -25): expert 1's probability is e^-20 of expert 0's
    seen = []
    layer.observer = lambda record: seen.append((record.routing, record.dispatch))
    with torch.no_grad():
        out, _ = layer(x)
    routing, dispatch = seen[0]
    assert routing.weights.dtype == torch.float16 and routing.weights[:, 1].eq(0).all()
    assert routing.dispatch_mask.all()
    assert dispatch.experts.tolist() == [0, 0, 0, 1, 1, 1] and dispatch.token_ids.tolist() == [0, 1, 2, 0, 1, 2]
    assert dispatch.weights[3:].eq(0).all()
    with torch.no_grad():
        torch.testing.assert_close(out[0], layer.experts[0](x[0]))
