"""The MoE layers and the encoder/decoder loops pinned to fairseq's own transformer on a dense config.

An MoE layer with one expert and top-1 gating routes every token to that expert with weight exactly 1
(the softmax of one logit), so with the dense layers' FFN weights in the expert our model must compute
what fairseq's ``transformer`` computes: any drift of our copies of fairseq's layer forwards and layer
loops from fairseq's (norm placement, residuals, attention masks and dropout, incremental state) shows.
Dropout after the FFN is left out of the training comparison: the MoE sees tokens batch-major (as NLLB's
does), so the same random draws fall on other elements than in fairseq's time-major dense FFN.
"""

import pytest
import torch

from tests.helpers import build_tiny_model, random_batch

TINY = ["--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--encoder-layers", "2",
        "--encoder-attention-heads", "2", "--decoder-layers", "2", "--decoder-attention-heads", "2"]


def pinned_models(tmp_path, *flags):
    """(our MoE model with one expert per MoE layer, fairseq's transformer) with the same weights."""
    _, _, moe = build_tiny_model(tmp_path / "moe", "--moe-expert-count", "1", "--moe-top1-expert", *TINY, *flags)
    _, _, dense = build_tiny_model(tmp_path / "dense", *TINY, *flags, arch="transformer")
    dense_state = dense.state_dict()
    state = {}
    for key, value in moe.state_dict().items():
        if ".moe_layer.gate." in key:
            state[key] = torch.randn_like(value)  # any gate: one expert takes every token with weight 1
        else:
            state[key] = dense_state[key.replace("moe_layer.experts.0.", "")]
    moe.load_state_dict(state)
    assert len([key for key in state if ".moe_layer.experts.0.fc1.weight" in key]) == 2
    return moe, dense


@pytest.mark.parametrize("pre_norm", [False, True])
def test_moe_layers_with_one_expert_compute_fairseqs_transformer(tmp_path, pre_norm):
    flags = ["--encoder-normalize-before", "--decoder-normalize-before"] if pre_norm else []
    moe, dense = pinned_models(tmp_path, "--dropout", "0", "--attention-dropout", "0.1", *flags)
    src, lengths, prev = random_batch(seed=5)
    prev[1, 4:] = 1  # padding in the decoder input too

    moe.train()
    dense.train()
    torch.manual_seed(0)
    trained_moe, moe_extra = moe(src, lengths, prev)
    torch.manual_seed(0)
    trained_dense, _ = dense(src, lengths, prev)
    assert torch.equal(trained_moe, trained_dense)
    assert len(moe_extra["l_aux"]) == 2

    moe.eval()
    dense.eval()
    with torch.no_grad():
        out_moe, extra_moe = moe(src, lengths, prev)
        out_dense, extra_dense = dense(src, lengths, prev)
        assert torch.equal(out_moe, out_dense)
        assert torch.equal(extra_moe["attn"][0], extra_dense["attn"][0])

        # incremental decoding, one token at a time, as the generator does
        encoder_moe = moe.encoder(src, src_lengths=lengths)
        encoder_dense = dense.encoder(src, src_lengths=lengths)
        assert torch.equal(encoder_moe["encoder_out"][0], encoder_dense["encoder_out"][0])
        state_moe, state_dense = {}, {}
        for t in range(prev.shape[1]):
            step_moe, step_extra_moe = moe.decoder(prev[:, :t + 1], encoder_moe, incremental_state=state_moe)
            step_dense, step_extra_dense = dense.decoder(prev[:, :t + 1], encoder_dense, incremental_state=state_dense)
            assert torch.equal(step_moe, step_dense)
            torch.testing.assert_close(step_moe[[0, 2], 0], out_dense[[0, 2], t])  # sentences without padding
            assert torch.equal(step_extra_moe["attn"][0], step_extra_dense["attn"][0])
