"""Checkpoints are untrusted: only the allowlisted classes are unpickled, nothing else runs."""

import os
import subprocess
import sys

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_moe_prune.checkpoints.safe_load import (
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
)
from tests.helpers import build_tiny_model, save_like_trainer


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
    assert state["cfg"]["model"].arch == "moe_transformer_tiny"  # an argparse.Namespace


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
