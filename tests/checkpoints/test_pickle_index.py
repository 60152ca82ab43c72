"""pickle_index reads a checkpoint as torch.load(weights_only=True) does, without torch's unpickler; hostile pickles
are refused before anything is unpickled, and what it does not cover is left to torch."""

import argparse
import copy
import io
import pickle
import zipfile

import pytest
import torch

from fairseq_moe_prune.checkpoints import pickle_index
from fairseq_moe_prune.checkpoints.pickle_index import TensorRecord, Unsupported
from fairseq_moe_prune.checkpoints.safe_load import CheckpointError, UnsafeCheckpointError
from fairseq_moe_prune.checkpoints.streaming import CheckpointRecords, load_mapped, meta_weights, record_crcs
from fairseq_moe_prune.checkpoints.surgery import CheckpointView, save_sharded
from tests.checkpoints.test_safe_load import RunsCodeWhenLoaded
from tests.helpers import build_tiny_model, save_like_trainer


def assert_same(mine, theirs, where="state"):
    """The same structure: container types, keys in order, values; tensors compared by ``compare``."""
    assert type(mine) is type(theirs), where
    if isinstance(theirs, dict):
        assert list(mine) == list(theirs), where
        for key in theirs:
            assert_same(mine[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert len(mine) == len(theirs), where
        for i, (a, b) in enumerate(zip(mine, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, argparse.Namespace):
        assert_same(vars(mine), vars(theirs), where)
    elif isinstance(theirs, torch.Tensor):
        assert (mine.dtype, mine.shape, mine.stride(), mine.storage_offset()) == \
            (theirs.dtype, theirs.shape, theirs.stride(), theirs.storage_offset()), where
        assert torch.equal(mine, theirs), where
    else:
        assert mine == theirs, where


def data_pkl(state) -> bytes:
    """The pickle torch.save writes for ``state``: the same objects, shared the same way, give the same bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with zipfile.ZipFile(buffer) as archive:
        return archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))


@pytest.fixture
def fairseq_checkpoint(tmp_path):
    cfg, _, model = build_tiny_model(tmp_path / "data")
    save_like_trainer(cfg, model, tmp_path / "model.pt")
    return tmp_path / "model.pt"


def test_a_fairseq_checkpoint_reads_as_torch_loads_it(fairseq_checkpoint, tmp_path):
    path = str(fairseq_checkpoint)
    theirs = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    assert isinstance(theirs["cfg"]["model"], argparse.Namespace)  # the legacy config, as fairseq pickles it

    state, views, version = pickle_index.read_mapped(path)  # memory-mapped, as safe_load loads it
    assert_same(state, theirs)
    assert data_pkl(state) == data_pkl(theirs)  # even strings shared as torch's unpickler shares them
    assert all(type(ns) is argparse.Namespace for ns in (state["cfg"]["model"], state["args"]) if ns is not None)
    crcs = {view.data_ptr(): (path, info.filename, info.CRC, version) for view, info in views.values() if info.file_size}
    assert crcs == record_crcs(path, state)  # each storage matched to its record and CRC-32 as torch's mapping is
    assert sorted(load_mapped(path)[1].values()) == sorted(record_crcs(path, theirs).values())

    index = pickle_index.read_index(path)  # no tensor built, nothing but the pickle read
    meta = torch.load(path, map_location="meta", weights_only=True)["model"]
    assert list(index.state["model"]) == list(meta) and meta_weights(path).keys() == meta.keys()
    for key, tensor in meta.items():
        record = index.state["model"][key]
        assert isinstance(record, TensorRecord)
        assert (record.dtype, record.shape, record.stride, record.offset) == \
            (tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.storage_offset()), key
        if record.is_whole_storage():
            assert index.record(record).file_size == tensor.untyped_storage().nbytes()

    # a rank file of NLLB's sharded layout, tied weights included, read tensor by tensor
    weights = dict(theirs["model"])
    save_sharded(CheckpointView({"cfg": theirs["cfg"]}, weights), str(tmp_path / "m-shared.pt"))
    for name in ("m-shared.pt", "m-rank-0.pt"):
        loaded = torch.load(tmp_path / name, weights_only=True)["model"]
        records = CheckpointRecords(str(tmp_path / name))
        assert records.index is not None and records.mapped is None
        for key, tensor in loaded.items():
            assert torch.equal(records[key], tensor) and records[key].dtype == tensor.dtype, key


def test_a_hostile_pickle_is_refused_before_anything_is_unpickled(fairseq_checkpoint, tmp_path):
    state = torch.load(fairseq_checkpoint, weights_only=True)
    marker = tmp_path / "pwned"
    state["extra_state"]["payload"] = RunsCodeWhenLoaded(str(marker))
    torch.save(state, tmp_path / "evil.pt")
    for read in (pickle_index.read_index, pickle_index.read_mapped, load_mapped, CheckpointRecords):
        with pytest.raises(UnsafeCheckpointError, match=r"refusing to load: it pickles posix\.system"):
            read(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_what_it_does_not_cover_is_read_by_torch(tmp_path):
    parameter = torch.nn.Parameter(torch.randn(3, 2))  # allowlisted by torch, not a plain tensor
    torch.save({"model": {"p": parameter, "t": torch.arange(4)}}, tmp_path / "param.pt")
    torch.save({"model": {"t": torch.arange(4)}}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("param.pt", "legacy.pt"):
        with pytest.raises(Unsupported):
            pickle_index.read_index(str(tmp_path / name))
        records = CheckpointRecords(str(tmp_path / name))
        assert records.index is None and torch.equal(records["t"], torch.arange(4))
        assert_same(load_mapped(str(tmp_path / name))[0]["model"]["t"], torch.arange(4))
    empty = argparse.Namespace()  # never built when unpickled: still a plain Namespace
    torch.save({"model": {}, "args": empty, "again": [empty]}, tmp_path / "empty.pt")
    state = pickle_index.read_index(str(tmp_path / "empty.pt")).state
    assert type(state["args"]) is argparse.Namespace and state["again"][0] is state["args"]


@pytest.mark.parametrize("target", ["tensor", "storage", "storage type"])
def test_build_cannot_rewrite_the_frozen_records(target, tmp_path):
    """BUILD writes a state into ``__dict__`` past ``frozen=True``; on our records it is refused in one line."""
    storage_type = b"ctorch\nFloatStorage\n"
    storage = b"(X\x07\x00\x00\x00storage" + storage_type + b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
    tensor = b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"K\x00K\x04\x85K\x01\x85\x89}tR"
    forged = {"tensor": tensor, "storage": storage, "storage type": storage_type}[target]
    state = b"}(X\x06\x00\x00\x00offsetJ\xfb\xff\xff\xffX\x05\x00\x00\x00shapeX\x01\x00\x00\x00xu"
    data = b"\x80\x02" + forged + state + b"b."
    path = tmp_path / "forged.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/data/0", bytes(16))
    with pytest.raises(CheckpointError, match="sets the fields of a tensor or storage description") as error:
        pickle_index.read_index(str(path))
    assert "\n" not in str(error.value) and str(error.value).startswith(f"{path}: ")


def test_records_still_copy_and_pickle():
    record = TensorRecord(pickle_index.StorageRecord("0", torch.float32, 4), 0, (4,), (1,))
    assert copy.deepcopy(record) == record and pickle.loads(pickle.dumps(record)) == record
