"""save_streaming writes what torch.save would: every tensor, tied weights tied, valid zip CRCs; corrupt input is refused."""

import os
import shutil
import struct
import zipfile

import pytest
import torch

from fairseq_moe_prune import cli
from fairseq_moe_prune.checkpoints.convert import convert
from fairseq_moe_prune.checkpoints.safe_load import CheckpointError
from fairseq_moe_prune.checkpoints.streaming import CheckpointRecords, SourceTensor, save_streaming
from tests.helpers import tiny_checkpoint_with_stats


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


def flip_a_byte(path, record_index):
    """Corrupt the bytes (not the header) of the ``record_index``-th tensor record of a zip checkpoint."""
    with zipfile.ZipFile(path) as archive:
        info = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 64][record_index]
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        offset = info.header_offset + 30 + name_length + extra_length + 10
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))
    return info.filename


def test_corrupt_input_bytes_are_refused_not_copied(tmp_path, capsys):
    checkpoint, stats_path = tiny_checkpoint_with_stats(tmp_path / "in")
    convert(str(checkpoint), str(tmp_path / "sharded"), "sharded")
    shutil.copyfile(checkpoint, tmp_path / "corrupt.pt")
    record = flip_a_byte(tmp_path / "corrupt.pt", 5)
    rank_record = flip_a_byte(tmp_path / "sharded" / "model-rank-2.pt", 0)
    keep_all = ["--prune-fraction", "0", "--ratio", "1:1"]
    cases = [
        (["prune", str(tmp_path / "corrupt.pt"), "--stats", str(stats_path), "--out", str(tmp_path / "a"), *keep_all],
         f"{tmp_path / 'corrupt.pt'}: record {record} is corrupt"),
        (["convert", str(tmp_path / "corrupt.pt"), str(tmp_path / "b.pt"), "--to", "single"],
         f"{tmp_path / 'corrupt.pt'}: record {record} is corrupt"),
        (["prune", str(tmp_path / "sharded" / "model-shared.pt"), "--stats", str(stats_path), "--out",
          str(tmp_path / "c"), *keep_all], f"{tmp_path / 'sharded' / 'model-rank-2.pt'}: record {rank_record} is corrupt"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 1
        assert capsys.readouterr().err.strip() == f"fairseq-moe-prune: error: {message} (its bytes do not match their CRC-32)"
    assert sorted(os.listdir(tmp_path)) == ["corrupt.pt", "in", "sharded"]


def test_checkpoint_records_read_each_tensor_from_its_own_record(tmp_path):
    torch.manual_seed(0)
    tied = torch.randn(6, 4)
    model = {"a": tied, "b": tied, "half": torch.randn(3, 5).half(), "ints": torch.arange(7), "empty": torch.zeros(0),
             "row": torch.randn(4, 8)[1]}  # a view: its storage is the whole matrix
    torch.save({"model": model}, tmp_path / "rank-0.pt")
    records = CheckpointRecords(str(tmp_path / "rank-0.pt"))
    assert sorted(records) == sorted(model) and "a" in records and "zzz" not in records
    for key, tensor in model.items():
        if key != "row":
            assert records[key].dtype == tensor.dtype and torch.equal(records[key], tensor), key
    assert records.mapped is None  # each tensor was its record's bytes, read alone
    assert torch.equal(records["row"], model["row"]) and records.mapped is not None  # part of a record: mapped

    data = (tmp_path / "rank-0.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    with zipfile.ZipFile(tmp_path / "rank-0.pt") as archive:
        end_of_a = max(info.header_offset for info in archive.infolist() if info.filename.endswith("/data/0"))
    cut.write_bytes(data[: end_of_a + 40] + data[-4096:])  # the first tensor's bytes are gone
    with pytest.raises(CheckpointError):
        CheckpointRecords(str(cut))["a"]
