"""NLLB's gating numerics pinned on inputs small enough to check by hand."""

import math

import pytest
import torch

from fairseq_moe_prune.moe.gate import expert_capacity, top1gating, top2gating


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_top2_choice_and_renormalised_weights():
    logits = torch.tensor(
        [
            [2.0, 1.0, 0.0, 0.0],  # experts 0 then 1; weights are a softmax of the two logits
            [0.0, 0.0, 3.0, 1.0],  # experts 2 then 3
            [0.0, 1.0, 0.0, 1.0],  # a tie: argmax takes the lower id first
        ]
    )
    routing = top2gating(logits, second_expert_policy="all", eval_capacity_token_fraction=1.0)
    assert routing.experts.tolist() == [[0, 1], [2, 3], [1, 3]]
    expected = torch.tensor([[sigmoid(1), sigmoid(-1)], [sigmoid(2), sigmoid(-2)], [0.5, 0.5]])
    torch.testing.assert_close(routing.weights, expected)
    torch.testing.assert_close(routing.probs, torch.softmax(logits, dim=1))


def test_second_expert_policy_all_is_deterministic_and_sampling_is_not():
    torch.manual_seed(0)
    logits = torch.zeros(200, 8)
    logits[:, 0] = 5.0  # expert 0 first; the other seven tie for second
    routing_all = top2gating(logits, second_expert_policy="all", eval_capacity_token_fraction=1.0)
    assert set(routing_all.experts[:, 1].tolist()) == {1}
    sampled = top2gating(logits, second_expert_policy="sampling", eval_capacity_token_fraction=1.0)
    assert set(sampled.experts[:, 0].tolist()) == {0}
    assert set(sampled.experts[:, 1].tolist()) == set(range(1, 8))


def test_second_expert_policy_random_drops_unlikely_second_experts():
    torch.manual_seed(0)
    logits = torch.tensor([[20.0, 0.0, 0.0, 0.0]] * 50)  # gate2 ~ 2e-9: kept with probability 4e-9
    routing = top2gating(logits, second_expert_policy="random", eval_capacity_token_fraction=1.0)
    assert routing.weights[:, 1].eq(0).all()
    assert routing.weights[:, 0].eq(1).all()  # renormalised over what is left


def test_training_capacity_drops_in_token_order_and_renormalises():
    # 8 tokens, 4 experts: capacity 2 * ceil(8 / 4) = 4 slots per expert
    assert expert_capacity(8, 4, top_k=2, training=True, eval_capacity_token_fraction=1.0) == 4
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]] * 4 + [[0.0, 3.0, 2.0, 0.0]] * 4)
    routing = top2gating(logits, second_expert_policy="all", training=True)
    # expert 1 takes tokens 4-7 as their first choice (slots 0-3); tokens 0-3 queue behind, slots 4-7
    assert routing.experts.tolist() == [[0, 1]] * 4 + [[1, 2]] * 4
    assert routing.weights[:4].tolist() == [[1.0, 0.0]] * 4
    torch.testing.assert_close(routing.weights[4:], torch.tensor([[sigmoid(1), sigmoid(-1)]] * 4))


def test_eval_capacity_fraction_one_drops_no_token():
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]] * 64)  # every token wants experts 0 and 1
    routing = top2gating(logits, second_expert_policy="all", eval_capacity_token_fraction=1.0)
    assert routing.weights.ne(0).all()
    torch.testing.assert_close(routing.weights.sum(dim=1), torch.ones(64))
    # NLLB's default fraction 0.25 keeps ceil(0.25 * 64) = 16 slots per expert
    routing = top2gating(logits, second_expert_policy="all", eval_capacity_token_fraction=0.25)
    assert routing.weights[:, 0].ne(0).sum() == 16
    assert routing.weights[:, 1].ne(0).sum() == 16


def test_padding_mask_on_frees_capacity_and_off_lets_padding_take_slots():
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]] * 4)  # capacity 2 * ceil(4 / 4) = 2
    padding = torch.tensor([True, True, False, False])
    unmasked = top2gating(logits, None, second_expert_policy="all", training=True)
    assert unmasked.weights.ne(0).tolist() == [[True, True]] * 2 + [[False, False]] * 2
    masked = top2gating(logits, padding, second_expert_policy="all", training=True)
    assert masked.weights.ne(0).tolist() == [[False, False]] * 2 + [[True, True]] * 2


def test_fp32_gating_under_fp16_inputs():
    torch.manual_seed(0)
    logits = (torch.randn(16, 8) * 4).half()
    routing = top2gating(logits, use_fp32=True, second_expert_policy="all", eval_capacity_token_fraction=1.0)
    assert routing.probs.dtype == torch.float32
    assert routing.weights.dtype == torch.float16
    reference = torch.softmax(logits.float(), dim=1)
    torch.testing.assert_close(routing.probs, reference)
    top2 = reference.topk(2, dim=1)
    assert routing.experts.tolist() == top2.indices.tolist()
    expected = (top2.values / top2.values.sum(dim=1, keepdim=True)).half()
    torch.testing.assert_close(routing.weights, expected)


def test_load_balancing_loss_is_one_when_balanced_and_grows_with_skew():
    balanced = top2gating(torch.eye(4) * 10, second_expert_policy="all", training=True)
    torch.testing.assert_close(balanced.l_aux, torch.tensor(1.0))
    skewed_logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]] * 4)
    skewed = top2gating(skewed_logits, second_expert_policy="all", training=True)
    p0 = torch.softmax(skewed_logits[0], dim=0)[0]
    torch.testing.assert_close(skewed.l_aux, 4 * p0)  # mean([p0, 0, 0, 0]) * 16


def test_batch_prioritized_routing_gives_capacity_to_confident_tokens():
    logits = torch.tensor([[1.0, 0, 0, 0], [6.0, 0, 0, 0], [5.0, 0, 0, 0], [0.5, 0, 0, 0]])
    in_order = top2gating(logits, second_expert_policy="all", training=True)
    assert in_order.weights[:, 0].ne(0).tolist() == [True, True, False, False]
    prioritized = top2gating(logits, second_expert_policy="all", training=True, batch_prioritized_routing=True)
    assert prioritized.weights[:, 0].ne(0).tolist() == [False, True, True, False]


def test_top1_weight_is_the_gate_probability_and_capacity_is_one_share():
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    routing = top1gating(logits, training=True)  # capacity ceil(4 / 2) = 2
    probs = torch.softmax(logits, dim=1)
    assert routing.experts[:, 0].tolist() == [0, 0, 0, 1]
    torch.testing.assert_close(
        routing.weights[:, 0], torch.stack([probs[0, 0], probs[1, 0], torch.tensor(0.0), probs[3, 1]])
    )


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError):
        top2gating(torch.zeros(2, 4), second_expert_policy="best")


def test_task_gating_routes_each_sentence_by_its_task_and_balances_over_sentences():
    from fairseq_moe_prune.moe.gate import broadcast_routing, load_balancing_loss, task_gating

    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0], [2.0, 1.0, 0.0, 0.0]])  # tasks a, b, a
    routing = task_gating(logits, second_expert_policy="sampling", training=False)  # no sampling at inference
    assert routing.experts.tolist() == [[0, 1], [2, 3], [0, 1]]
    torch.testing.assert_close(routing.weights[1], torch.tensor([sigmoid(2), sigmoid(-2)]))
    # the loss is GShard's over the 3 sentences: 2 of them choose expert 0 first, 1 chooses expert 2
    probs = torch.softmax(logits, dim=1)
    expected = (probs.mean(0) * torch.tensor([2 / 3, 0, 1 / 3, 0])).mean() * 16
    torch.testing.assert_close(routing.l_aux, expected)
    torch.testing.assert_close(routing.l_aux, load_balancing_loss(probs, torch.eye(4)[[0, 2, 0]]))

    padding = torch.tensor([False, False, True, False, False, False, True, True, False])  # 3 sentences x 3 tokens
    tokens = broadcast_routing(routing, 3, padding)
    assert tokens.experts.tolist() == [[0, 1]] * 3 + [[2, 3]] * 3 + [[0, 1]] * 3  # every token: its sentence's
    assert tokens.weights[padding].abs().sum() == 0 and bool((tokens.weights[~padding] > 0).all())
    assert tokens.l_aux is routing.l_aux


def test_task_gating_samples_the_second_expert_only_in_training():
    from fairseq_moe_prune.moe.gate import task_gating

    torch.manual_seed(0)
    logits = torch.zeros(200, 8)
    logits[:, 0] = 5.0
    assert set(task_gating(logits, training=False).experts[:, 1].tolist()) == {1}
    assert set(task_gating(logits, training=True).experts[:, 1].tolist()) == set(range(1, 8))
    top1 = task_gating(logits, top1=True)
    assert top1.experts.tolist() == [[0]] * 200
    torch.testing.assert_close(top1.weights[:, 0], torch.softmax(logits, 1)[:, 0])


# --- dynamic skipping (Lu et al. 2024): skip the second expert where w2 < beta * w1


def test_skipping_follows_the_rule_before_renormalisation_and_gives_the_first_expert_weight_one():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0],   # w2 / w1 = e^-1 = 0.37: skipped at beta 0.5
                           [1.0, 0.5, 0.0, -1.0],   # w2 / w1 = e^-0.5 = 0.61: kept
                           [0.0, 0.0, 3.0, 2.9]])   # w2 / w1 = e^-0.1 = 0.90: kept
    routing = top2gating(logits, second_expert_policy="all", eval_capacity_token_fraction=1.0, skip_beta=0.5)
    assert routing.skipped.tolist() == [True, False, False]
    assert routing.weights[0].tolist() == [1.0, 0.0]
    plain = top2gating(logits, second_expert_policy="all", eval_capacity_token_fraction=1.0)
    assert plain.skipped is None
    assert torch.equal(routing.weights[1:], plain.weights[1:]) and torch.equal(routing.experts, plain.experts)


@pytest.mark.parametrize("beta", [0.2, 0.5, 0.9])
def test_skipping_equals_a_brute_force_recomputation_token_by_token(beta):
    torch.manual_seed(1)
    logits = torch.randn(300, 8) * 2
    routing = top2gating(logits, second_expert_policy="all", eval_capacity_token_fraction=1.0, use_fp32=True,
                         skip_beta=beta)
    probs = torch.softmax(logits.float(), dim=1)
    for s in range(300):
        order = sorted(range(8), key=lambda e: (-float(probs[s, e]), e))
        w1, w2 = float(probs[s, order[0]]), float(probs[s, order[1]])
        assert routing.experts[s].tolist() == order[:2]
        if w2 < beta * w1:
            assert routing.skipped[s] and routing.weights[s].tolist() == [1.0, 0.0]
        else:
            assert not routing.skipped[s]
            torch.testing.assert_close(routing.weights[s], torch.tensor([w1, w2]) / (w1 + w2))
    assert 0 < int(routing.skipped.sum()) < 300


def test_skipped_experts_take_no_capacity_slot():
    # 4 tokens prefer expert 0, then 1 far behind; expert 1's slots are left to token 4's first choice
    logits = torch.tensor([[4.0, 0.0, -9.0]] * 4 + [[0.0, 4.0, -9.0]])
    routing = top2gating(logits, second_expert_policy="all", training=True, skip_beta=0.5)
    assert routing.skipped.tolist() == [True] * 5 and routing.weights[:, 0].eq(1).all()
