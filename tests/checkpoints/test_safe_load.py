"""Checkpoints are untrusted: only the allowlisted classes are unpickled, nothing else runs."""

import io
import operator
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_moe_prune.checkpoints import pickle_index
from fairseq_moe_prune.checkpoints.safe_load import (
    CheckpointError,
    UnsafeCheckpointError,
    check_checkpoint,
    load_checkpoint,
    refusal_reason,
)
from tests.helpers import USER_DIR, build_tiny_model, save_like_trainer, write_dictionaries


class RunsCodeWhenLoaded:
    """A pickle payload: unpickling it would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def malicious_checkpoint(tmp_path):
    cfg, _, model = build_tiny_model(tmp_path / "data")
    save_like_trainer(cfg, model, tmp_path / "good.pt")
    state = torch.load(tmp_path / "good.pt", weights_only=True)
    marker = tmp_path / "pwned"
    state["extra_state"]["payload"] = RunsCodeWhenLoaded(str(marker))
    torch.save(state, tmp_path / "evil.pt")
    return tmp_path / "evil.pt", marker


def test_fairseq_checkpoint_with_namespace_config_loads(tmp_path):
    cfg, _, model = build_tiny_model(tmp_path / "data")
    save_like_trainer(cfg, model, tmp_path / "good.pt")
    state = load_checkpoint(str(tmp_path / "good.pt"))
    assert state["cfg"]["model"].arch == "moe_transformer_toy"  # an argparse.Namespace


def test_library_refuses_code_executing_pickle(malicious_checkpoint):
    path, marker = malicious_checkpoint
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load: it pickles posix\.system"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_fairseq_loading_is_guarded_even_when_weights_only_is_forced_off(malicious_checkpoint, monkeypatch):
    path, marker = malicious_checkpoint
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SystemExit, match="refusing to load"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert not marker.exists()


def test_missing_and_truncated_checkpoints_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "absent.pt"))
    cfg, _, model = build_tiny_model(tmp_path / "data")
    save_like_trainer(cfg, model, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(tmp_path / "cut.pt"))
    assert "\n" not in str(error.value)


def test_cli_reports_unsafe_checkpoint_in_one_line(malicious_checkpoint):
    path, marker = malicious_checkpoint
    result = subprocess.run(
        [sys.executable, "-m", "fairseq_moe_prune.cli", "info", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "tensorboardX" not in line]
    assert len(errors) == 1 and "refusing to load" in errors[0]
    assert not marker.exists()


@pytest.fixture
def legacy_checkpoints(tmp_path):
    """A good checkpoint in torch's legacy (pre-1.6, non-zip) format, and two malicious ones: the payload
    in the checkpoint's pickle (GLOBAL), and in the first of the format's pickles as protocol 4 (STACK_GLOBAL)."""
    cfg, _, model = build_tiny_model(tmp_path / "data")
    save_like_trainer(cfg, model, tmp_path / "good.pt")
    state = torch.load(tmp_path / "good.pt", weights_only=True)
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    marker = tmp_path / "pwned"
    state["extra_state"]["payload"] = RunsCodeWhenLoaded(str(marker))
    torch.save(state, tmp_path / "evil-legacy.pt", _use_new_zipfile_serialization=False)
    with open(tmp_path / "evil-first-pickle.pt", "wb") as f:
        pickle.dump(RunsCodeWhenLoaded(str(marker)), f, protocol=4)
        f.write((tmp_path / "legacy.pt").read_bytes())
    return tmp_path, marker


def test_legacy_format_is_scanned_too(legacy_checkpoints):
    folder, marker = legacy_checkpoints
    assert load_checkpoint(str(folder / "legacy.pt"))["cfg"]["model"].arch == "moe_transformer_toy"
    for name in ("evil-legacy.pt", "evil-first-pickle.pt"):
        with pytest.raises(UnsafeCheckpointError, match=r"it pickles posix\.system"):
            load_checkpoint(str(folder / name))
    assert not marker.exists()


@pytest.mark.slow
def test_stock_fairseq_generate_refuses_a_legacy_format_payload_with_weights_only_forced_off(legacy_checkpoints):
    folder, marker = legacy_checkpoints
    write_dictionaries(folder / "gen")
    result = subprocess.run(
        ["fairseq-generate", str(folder / "gen"), "--user-dir", USER_DIR, "--task", "translation", "-s", "src",
         "-t", "tgt", "--path", str(folder / "evil-legacy.pt"), "--gen-subset", "test"],
        capture_output=True, text=True, env={**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {folder / 'evil-legacy.pt'}: refusing to load")
    assert not marker.exists()


def test_a_corrupt_pickle_record_is_a_one_line_error(tmp_path):
    cfg, _, model = build_tiny_model(tmp_path / "data")
    save_like_trainer(cfg, model, tmp_path / "good.pt")
    with zipfile.ZipFile(tmp_path / "good.pt") as source, zipfile.ZipFile(tmp_path / "cut.pt", "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, data[: len(data) // 2] if info.filename.endswith("data.pkl") else data)
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(tmp_path / "good.pt", weights_only=True), legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "cut-legacy.pt").write_bytes(legacy.read_bytes()[:300])
    for name in ("cut.pt", "cut-legacy.pt"):
        with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
            load_checkpoint(str(tmp_path / name))
        assert "\n" not in str(error.value)


def test_refusals_do_not_pass_on_torchs_advice_to_load_unsafely(malicious_checkpoint):
    path, _ = malicious_checkpoint
    with pytest.raises(pickle.UnpicklingError) as error:
        torch.load(path, weights_only=True)
    assert "weights_only" in str(error.value)  # torch's own text suggests weights_only=False
    assert "weights_only" not in refusal_reason(error.value) and "posix.system" in refusal_reason(error.value)


class AddsStrings:
    """A harmless stand-in for a payload: a global off the allowlist that torch's full unpickler calls."""

    def __reduce__(self):
        return (operator.add, ("ev", "il"))


def zip_bytes(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def directory_of(data: bytes):
    """(central directory offset, size, the end record) of an archive that has neither comment nor zip64."""
    end = data[-22:]
    assert end[:4] == b"PK\x05\x06"
    size, offset = struct.unpack("<LL", end[12:20])
    return offset, size, end


def two_directories(torchs: bytes, shown: bytes) -> bytes:
    """An archive whose end record gives ``torchs`` central directory's offset as written (torch reads that
    one) while ``shown``'s directory, of the same size, sits just before the end record (zipfile reads that
    one, shifting every offset by the difference)."""
    offset, size, end = directory_of(torchs)
    shown_offset, shown_size, _ = directory_of(shown)
    assert shown_size == size and shown_offset <= offset
    start = offset + size  # where the shown archive's records go
    located = start + shown_offset  # where its directory goes
    shift = located - offset  # what zipfile adds to every offset it reads
    directory = bytearray(shown[shown_offset:shown_offset + size])
    position = 0
    while position < size:
        header = struct.unpack_from("<L", directory, position + 42)[0]
        struct.pack_into("<L", directory, position + 42, header + start - shift)
        position += 46 + sum(struct.unpack_from("<HHH", directory, position + 28))
    return torchs[:start] + shown[:shown_offset] + bytes(directory) + end


def test_the_scan_reads_the_pickle_torch_unpickles_not_the_one_zipfile_shows(tmp_path, monkeypatch):
    tensor = torch.arange(4.0)
    path = tmp_path / "two-directories.pt"
    path.write_bytes(two_directories(zip_bytes({"x": tensor, "v": AddsStrings()}), zip_bytes({"x": tensor, "v": "good"})))
    with zipfile.ZipFile(path) as archive:  # what Python's zipfile shows: a harmless pickle
        shown = archive.read("archive/data.pkl")
    assert b"good" in shown and b"operator" not in shown
    assert torch.load(path, weights_only=False)["v"] == "evil"  # what torch unpickles: the other one
    with pytest.raises(CheckpointError, match="central directory does not end where the end record starts") as error:
        check_checkpoint(str(path))  # the scan that guards fairseq's own torch.load
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="central directory"):
        pickle_index.read_index(str(path))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SystemExit, match="central directory"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))


@pytest.mark.parametrize("forgery", ["appended", "prepended", "comment", "duplicate name", "name in other case"])
def test_archives_read_differently_by_zipfile_and_torch_are_refused(tmp_path, forgery):
    data = zip_bytes({"x": torch.arange(4.0)})
    offset, size, end = directory_of(data)
    if forgery == "appended":
        data += b"\0" * 16
    elif forgery == "prepended":
        data = data[:4] + data  # still starts as a zip: torch's test of the format passes
    elif forgery == "comment":
        data = data[:-2] + struct.pack("<H", 3) + b"abc"
    else:
        first = data[offset:offset + 46 + sum(struct.unpack_from("<HHH", data, offset + 28))]
        if forgery == "name in other case":
            first = first.replace(b"data.pkl", b"DATA.PKL")
        entries = struct.unpack_from("<H", end, 10)[0] + 1
        end = end[:8] + struct.pack("<HHLL", entries, entries, size + len(first), offset) + end[20:]
        data = data[:offset + size] + first + end
    (tmp_path / "forged.pt").write_bytes(data)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        load_checkpoint(str(tmp_path / "forged.pt"))
    assert "\n" not in str(error.value)


def test_zip64_archives_are_read(tmp_path, monkeypatch):
    data = zip_bytes({"x": torch.arange(4.0)})
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)  # zipfile then writes the zip64 end records
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(tmp_path / "zip64.pt", "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
    assert b"PK\x06\x06" in (tmp_path / "zip64.pt").read_bytes()
    assert torch.equal(load_checkpoint(str(tmp_path / "zip64.pt"))["x"], torch.arange(4.0))
