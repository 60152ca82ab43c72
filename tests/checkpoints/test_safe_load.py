"""Checkpoints are untrusted: only the allowlisted classes are unpickled, nothing else runs."""

import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_moe_prune.checkpoints.safe_load import (
    CheckpointError,
    UnsafeCheckpointError,
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
