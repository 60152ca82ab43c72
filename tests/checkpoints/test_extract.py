"""A task-routed MoE layer for a fixed task is one dense FFN: folding it changes nothing but the shape."""

import pytest
import torch
import torch.nn.functional as F

from fairseq_moe_prune.checkpoints.extract import fold_ffn, pad_ffn, task_fold
from fairseq_moe_prune.moe.layer import GateOptions, MoELayer


def dense(ffn, x):
    return F.linear(F.relu(F.linear(x, ffn["fc1.weight"], ffn["fc1.bias"])), ffn["fc2.weight"], ffn["fc2.bias"])


@pytest.mark.parametrize("top1", [False, True])
def test_folded_and_padded_ffn_equals_the_task_routed_layer(top1):
    torch.manual_seed(0)
    options = GateOptions(top1=top1, second_expert_policy="sampling", use_fp32=True, eval_capacity_token_fraction=0.25,
                          use_pad_mask=True)
    layer = MoELayer(8, 16, 6, options, eom=0.2).eval()
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    task_embed = torch.randn(3, 8)
    x = torch.randn(4, 5, 8)  # 4 sentences of task 1, 5 tokens each: far over a capacity of 0.25
    padding = torch.zeros(4, 5, dtype=torch.bool)
    padding[1, :2] = True
    with torch.no_grad():
        expected, _ = layer(x, padding, task_embed[[1, 1, 1, 1]])
        fold = task_fold(layer.gate.wg.weight, task_embed[1], options, eom=0.2)
        experts = [{name: p for name, p in layer.experts[e].named_parameters()} for e in fold.experts]
        ffn = pad_ffn(fold_ffn(experts, fold.factors), 48)
    assert len(fold.experts) == (1 if top1 else 2) and ffn["fc1.weight"].shape == (48, 8)
    torch.testing.assert_close(dense(ffn, x)[~padding], expected[~padding], atol=1e-6, rtol=1e-6)
    other = task_fold(layer.gate.wg.weight, task_embed[0], options, eom=0.2)  # the test can fail
    assert other != fold
