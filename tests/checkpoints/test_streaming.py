"""save_streaming writes what torch.save would: every tensor, tied weights tied, valid zip CRCs."""

import zipfile

import torch

from fairseq_moe_prune.checkpoints.streaming import SourceTensor, save_streaming


def test_streamed_file_loads_like_torch_save(tmp_path):
    torch.manual_seed(0)
    tied = torch.randn(5, 3)
    source = {"model": {"experts.7.fc1.weight": torch.randn(4, 2), "experts.7.fc1.bias": torch.arange(4.0)}}
    torch.save(source, tmp_path / "rank-7.pt")
    state = {"extra_state": {"meter": torch.tensor(3.5), "empty": torch.zeros(0)}, "cfg": {"lr": 0.1}}
    model = {
        "encoder.embed_tokens.weight": tied,
        "decoder.embed_tokens.weight": tied,  # one tensor under two keys, as fairseq's shared embeddings
        "steps": torch.arange(3),
        "experts.0.fc1.weight": SourceTensor(str(tmp_path / "rank-7.pt"), "experts.7.fc1.weight", (4, 2), torch.float32),
        "experts.0.fc1.bias": SourceTensor(str(tmp_path / "rank-7.pt"), "experts.7.fc1.bias", (4,), torch.float32),
    }
    save_streaming(state, model, str(tmp_path / "out.pt"), dtype=torch.float16)
    with zipfile.ZipFile(tmp_path / "out.pt") as archive:
        assert archive.testzip() is None
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    weights = loaded["model"]
    assert torch.equal(weights["encoder.embed_tokens.weight"], tied.half())
    assert weights["encoder.embed_tokens.weight"].data_ptr() == weights["decoder.embed_tokens.weight"].data_ptr()
    assert torch.equal(weights["steps"], torch.arange(3))  # integers are not cast
    assert torch.equal(weights["experts.0.fc1.weight"], source["model"]["experts.7.fc1.weight"].half())
    assert torch.equal(weights["experts.0.fc1.bias"], torch.arange(4.0).half())
    assert loaded["extra_state"]["meter"].item() == 3.5 and loaded["cfg"] == {"lr": 0.1}
