"""Metrics and selection on hand-made counts."""

import math

import numpy as np
import pytest

from fairseq_moe_prune.layout import MoELayerSpec
from fairseq_moe_prune.ranking import (
    Budget,
    SelectionError,
    fixed_per_layer_counts,
    metric_values,
    select_fixed,
    select_threshold,
)
from fairseq_moe_prune.stats import PROB_SCALE, REAP_SCALE, LayerCounts


def counts(top1, conf1, mean, top2=None, routed=None, reap=None) -> LayerCounts:
    top1 = np.array(top1, dtype=np.int64)
    tokens = int(top1.sum())
    return LayerCounts(
        tokens=tokens,
        top1=top1,
        top2=np.array(top2 if top2 is not None else top1 * 2, dtype=np.int64),
        prob_sum=np.round(np.array(mean) * tokens * PROB_SCALE).astype(np.int64),
        prob_first_sum=np.round(np.array(conf1) * top1 * PROB_SCALE).astype(np.int64),
        prob_second_sum=np.zeros(len(top1), dtype=np.int64),
        rank_sum=np.zeros(len(top1), dtype=np.int64),
        routed=np.array(routed if routed is not None else top1, dtype=np.int64),
        reap_sum=np.round(np.array(reap if reap is not None else np.zeros(len(top1))) * REAP_SCALE).astype(np.int64),
    )


LAYER = counts(top1=[50, 30, 20, 0], conf1=[0.4, 0.9, 0.5, 0.0], mean=[0.3, 0.3, 0.2, 0.2])


def test_metrics_follow_the_paper_and_are_normalised():
    top1 = np.array([0.5, 0.3, 0.2, 0.0])
    expected = {
        "activity": top1,
        "vanilla_importance": top1 * [0.4, 0.9, 0.5, 0.0],
        "importance": top1 * np.exp([0.4, 0.9, 0.5, 0.0]),
        "load_balancing": top1 * [0.3, 0.3, 0.2, 0.2],
    }
    for metric, raw in expected.items():
        np.testing.assert_allclose(metric_values(LAYER, metric), raw / raw.sum(), rtol=1e-9, err_msg=metric)
    np.testing.assert_allclose(metric_values(LAYER, "top2"), [0.5, 0.3, 0.2, 0.0])
    # exp(confidence) lies between 1 and e, so importance still follows how often an expert comes first:
    # the frequent expert 0 (0.5 * e^0.4 = 0.746) edges out the confident expert 1 (0.3 * e^0.9 = 0.738).
    # Vanilla importance weighs confidence linearly and prefers expert 1 (0.3 * 0.9 = 0.27 > 0.5 * 0.4 = 0.20).
    assert np.argmax(metric_values(LAYER, "importance")) == 0
    assert metric_values(LAYER, "vanilla_importance")[1] > metric_values(LAYER, "vanilla_importance")[0]
    assert np.argmax(metric_values(LAYER, "vanilla_importance")) == 1


def test_reap_is_the_mean_weighted_output_norm_of_the_tokens_an_expert_ran_on():
    layer = counts(top1=[2, 2, 0], conf1=[0.5, 0.5, 0], mean=[0.3, 0.3, 0.4], routed=[4, 2, 0], reap=[8.0, 6.0, 0.0])
    np.testing.assert_allclose(metric_values(layer, "reap"), [2.0, 3.0, 0.0] / np.float64(5.0))


def test_random_metric_is_seeded_by_its_text():
    a = metric_values(LAYER, "random", "0:global:enc")
    assert np.allclose(a, metric_values(LAYER, "random", "0:global:enc"))
    assert not np.allclose(a, metric_values(LAYER, "random", "1:global:enc"))
    assert math.isclose(a.sum(), 1.0)


def test_layer_with_no_tokens_gets_uniform_values():
    empty = LayerCounts.zeros(4)
    np.testing.assert_allclose(metric_values(empty, "importance"), [0.25] * 4)


NLLB = [MoELayerSpec(side, layer, 128) for side in ("encoder", "decoder") for layer in (3, 7, 11, 15, 19, 23)]


@pytest.mark.parametrize("fraction, enc, dec", [(0.0, 128, 128), (0.5, 96, 32), (0.75, 48, 16), (0.8, 36, 12)])
def test_fixed_budget_with_3_to_1_ratio_matches_the_paper(fraction, enc, dec):
    per_layer = fixed_per_layer_counts(NLLB, Budget(prune_fraction=fraction), "3:1")
    assert per_layer["encoder.layers.3.moe_layer"] == enc and per_layer["decoder.layers.23.moe_layer"] == dec
    assert sum(per_layer.values()) <= round(1536 * (1 - fraction))


def test_budget_errors_are_clear():
    with pytest.raises(SelectionError, match=r"in \[0, 1\)"):
        Budget(prune_fraction=1.0).kept_total(10)
    with pytest.raises(SelectionError, match="cannot keep 11 of 10"):
        Budget(keep=11).kept_total(10)
    with pytest.raises(SelectionError, match="at least 2 are needed"):
        fixed_per_layer_counts(NLLB, Budget(prune_fraction=0.999), "3:1", min_per_layer=2)
    with pytest.raises(SelectionError, match="ratio"):
        fixed_per_layer_counts(NLLB, Budget(prune_fraction=0.5), "3-1")


def test_fixed_selection_takes_the_best_per_layer_in_ascending_id_order():
    values = {"a": np.array([0.1, 0.4, 0.1, 0.4]), "b": np.array([0.7, 0.1, 0.1, 0.1])}
    assert select_fixed(values, {"a": 2, "b": 3}) == {"a": [1, 3], "b": [0, 1, 2]}  # ties -> lower id


def test_threshold_selection_reaches_the_mass_with_a_minimum_per_layer():
    values = {"a": np.array([0.7, 0.2, 0.1, 0.0]), "b": np.array([0.25, 0.25, 0.25, 0.25])}
    # mass to reach: 0.5 * 2 layers = 1.0; the minimum of 1 per layer gives a0 (0.7) + b0 (0.25),
    # then the best remaining, b1 (0.25 beats a1's 0.2), reaches it
    assert select_threshold(values, threshold=0.5, min_per_layer=1) == {"a": [0], "b": [0, 1]}
    assert select_threshold(values, keep=5, min_per_layer=2) == {"a": [0, 1], "b": [0, 1, 2]}
    with pytest.raises(SelectionError, match="exceeds the budget"):
        select_threshold(values, keep=3, min_per_layer=2)


def test_shared_experts_are_kept_first_and_count_towards_the_layers_budget():
    values = {"a": np.array([0.1, 0.4, 0.1, 0.4]), "b": np.array([0.7, 0.1, 0.1, 0.1])}
    # expert 2 of "a" is shared: kept although two experts are worth more, and the layer keeps 2 in all
    assert select_fixed(values, {"a": 2, "b": 3}, {"a": [2]}) == {"a": [1, 2], "b": [0, 1, 2]}
    # a shared expert the language would keep anyway costs nothing; more shared than the budget: the first ones
    assert select_fixed(values, {"a": 2, "b": 1}, {"a": [1], "b": [3, 2]}) == {"a": [1, 3], "b": [3]}
