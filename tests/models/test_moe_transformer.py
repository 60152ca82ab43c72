"""The registered MoE transformer: NLLB's layout and keys, per-layer counts, checkpoint round trips."""

import argparse
from dataclasses import fields

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.models import ARCH_CONFIG_REGISTRY

from fairseq_moe_prune.layout import MOE_CONFIG_FIELDS, MoEConfigError, moe_layers
from fairseq_moe_prune.models.moe_transformer import MoEConfig, MoETransformerModel
from tests.helpers import build_tiny_model, logits, random_batch, save_like_trainer


def nllb_args(**overrides) -> argparse.Namespace:
    args = argparse.Namespace(**overrides)
    ARCH_CONFIG_REGISTRY["transformer_24_24_big"](args)
    return args


def test_layout_names_every_field_of_moe_config_in_order():
    """One list of our config fields (layout.py, read by extract without the model) and MoEConfig agree."""
    assert MOE_CONFIG_FIELDS == tuple(f.name for f in fields(MoEConfig) if f.name != "_name")


def test_nllb_layout_has_1536_experts_in_layers_3_7_11_15_19_23():
    specs = moe_layers(nllb_args())
    assert [(s.side, s.layer) for s in specs] == [
        (side, layer) for side in ("encoder", "decoder") for layer in (3, 7, 11, 15, 19, 23)
    ]
    assert sum(s.num_experts for s in specs) == 1536
    assert specs[0].prefix == "encoder.layers.3.moe_layer"


def test_nllb_shaped_model_has_nllb_state_dict_keys(tmp_path):
    # NLLB's exact layer layout and expert count, with the widths shrunk so it builds in seconds
    _, _, model = build_tiny_model(
        tmp_path, "--encoder-embed-dim", "8", "--encoder-ffn-embed-dim", "4", "--decoder-embed-dim", "8",
        "--decoder-ffn-embed-dim", "4", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
        arch="transformer_24_24_big",
    )
    keys = set(model.state_dict())
    assert "encoder.layers.3.moe_layer.gate.wg.weight" in keys
    assert model.state_dict()["encoder.layers.3.moe_layer.gate.wg.weight"].shape == (128, 8)
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert f"encoder.layers.3.moe_layer.experts.127.{name}" in keys
        assert f"decoder.layers.23.moe_layer.experts.0.{name}" in keys
        assert f"encoder.layers.2.{name}" in keys  # dense layers keep fairseq's FFN keys
    assert not any(k.startswith("encoder.layers.3.fc") for k in keys)
    assert "encoder.layers.3.moe_layer.gate.wg.bias" not in keys
    assert len([k for k in keys if k.endswith("gate.wg.weight")]) == 12


def test_per_layer_counts_build_layers_of_different_sizes(tmp_path):
    _, _, model = build_tiny_model(
        tmp_path, "--encoder-moe-expert-counts", "3", "--decoder-moe-expert-counts", "2"
    )
    assert [layer.num_experts for layer in model.moe_layers()] == [3, 2]


def test_inconsistent_counts_are_refused_with_a_clear_message(tmp_path):
    with pytest.raises(MoEConfigError, match="lists 2 counts but the encoder has 1 MoE layers"):
        build_tiny_model(tmp_path, "--encoder-moe-expert-counts", "3,3")


def test_save_then_load_gives_bit_identical_logits(tmp_path):
    cfg, _, model = build_tiny_model(tmp_path / "data")
    batch = random_batch()
    before = logits(model, batch)
    save_like_trainer(cfg, model, tmp_path / "model.pt")
    [loaded], _ = checkpoint_utils.load_model_ensemble([str(tmp_path / "model.pt")])
    assert isinstance(loaded, MoETransformerModel)
    assert torch.equal(before, logits(loaded, batch))


def test_non_uniform_checkpoint_round_trips_with_no_extra_flag(tmp_path):
    cfg, _, model = build_tiny_model(
        tmp_path / "data", "--encoder-moe-expert-counts", "3", "--decoder-moe-expert-counts", "1"
    )
    batch = random_batch(seed=3)
    before = logits(model, batch)
    save_like_trainer(cfg, model, tmp_path / "model.pt")
    [loaded], _ = checkpoint_utils.load_model_ensemble([str(tmp_path / "model.pt")])
    assert [layer.num_experts for layer in loaded.moe_layers()] == [3, 1]
    assert torch.equal(before, logits(loaded, batch))


def gshard_loss(gate_weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """GShard's load-balancing loss written out for every token of ``x``: E * sum_e(mean softmax_e * top-1 share_e)."""
    probs = torch.softmax(x.reshape(-1, x.shape[-1]).float() @ gate_weight.float().T, dim=1)
    num_experts = probs.shape[1]
    shares = torch.nn.functional.one_hot(probs.argmax(dim=1), num_experts).float().mean(dim=0)
    return num_experts * (probs.mean(dim=0) * shares).sum()


@pytest.mark.parametrize("decoder_layerdrop", ["0", "1"])
def test_moe_model_trains_its_gates_through_the_criterion(tmp_path, decoder_layerdrop):
    """loss = cross-entropy + weight * sample_size * mean(GShard loss of each MoE layer that ran); with
    decoder layerdrop 1 every decoder layer is skipped in training and its MoE adds nothing."""
    from fairseq.criterions import build_criterion
    from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

    cfg, task, model = build_tiny_model(
        tmp_path, "--criterion", "moe_label_smoothed_cross_entropy", "--moe-gate-loss-wt", "0.5",
        "--label-smoothing", "0.1", "--dropout", "0", "--decoder-layerdrop", decoder_layerdrop,
    )
    criterion = build_criterion(cfg.criterion, task)
    src, lengths, prev = random_batch()
    sample = {
        "net_input": {"src_tokens": src, "src_lengths": lengths, "prev_output_tokens": prev},
        "target": torch.roll(prev, -1, dims=1),
        "ntokens": prev.numel(),
    }
    logits(model, (src, lengths, prev))  # an eval forward first: every MoE layer runs once
    gate_inputs = {}
    hooks = [model.get_submodule(spec.prefix).register_forward_pre_hook(
        lambda module, inputs, prefix=spec.prefix: gate_inputs.setdefault(prefix, inputs[0].detach()))
        for spec in moe_layers(cfg.model)]
    model.train()
    loss, sample_size, log = criterion(model, sample)
    for hook in hooks:
        hook.remove()
    ran = ["encoder.layers.1.moe_layer"] + (["decoder.layers.1.moe_layer"] if decoder_layerdrop == "0" else [])
    assert sorted(gate_inputs) == sorted(ran)
    expected_gate = sample_size * torch.stack(
        [gshard_loss(model.get_submodule(prefix).gate.wg.weight, gate_inputs[prefix]) for prefix in ran]).mean()
    stock = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)
    with torch.no_grad():
        cross_entropy, _, _ = stock(model, sample)
    torch.testing.assert_close(log["moe_gate_loss"], expected_gate)
    torch.testing.assert_close(loss.detach(), cross_entropy + 0.5 * expected_gate)
    loss.backward()
    assert all(model.get_submodule(prefix).gate.wg.weight.grad.abs().sum() > 0 for prefix in ran)


@pytest.mark.parametrize("override, message", [
    ({"moe_expert_offload": "False"}, "moe_expert_offload must be true or false"),
    ({"moe_gating_use_fp32": 1}, "moe_gating_use_fp32 must be true or false"),
    ({"moe_offload_cache_experts": "4"}, "moe_offload_cache_experts must be a whole number"),
    ({"moe_offload_cache_experts": float("inf")}, "moe_offload_cache_experts must be a whole number"),
    ({"moe_expert_count": True}, "moe_expert_count must be a whole number"),
    ({"moe_eval_capacity_token_fraction": float("nan")}, "must be a finite number"),
    ({"moe_eom": 1.5}, r"moe_eom must be a finite number in \[0, 1\]"),
    ({"moe_second_expert_policy": "best"}, "moe_second_expert_policy must be one of all, sampling, random"),
    ({"moe_skip_betas": 0.5}, "moe_skip_betas must be a string"),
])
def test_every_field_of_ours_is_type_checked_where_the_model_is_built(tmp_path, override, message):
    """--model-overrides and checkpoints hand the model any Python value: a wrong type is refused in one line."""
    cfg, task, _ = build_tiny_model(tmp_path / "data")
    for name, value in override.items():
        setattr(cfg.model, name, value)
    with pytest.raises(MoEConfigError, match=message):
        task.build_model(cfg.model)
