"""Outputs appear whole or not at all: SIGTERM at any moment, or a killed run, leaves nothing behind."""

import os
import signal
import subprocess
import sys

import pytest

from fairseq_moe_prune import cli, files
from fairseq_moe_prune.files import owner
from tests.helpers import tiny_checkpoint_with_stats

# Runs the CLI and sends itself SIGTERM the first time an audit event (a temporary file or folder being
# created) names a path containing the given text: the signal lands exactly at that moment.
TERMINATE_AT = """
import os, signal, sys
from fairseq_moe_prune import cli
event, text = sys.argv[1], sys.argv[2]
sent = []
def hook(name, args):
    if name == event and not sent and text in str(args[0]):
        sent.append(name)
        os.kill(os.getpid(), signal.SIGTERM)
sys.addaudithook(hook)
sys.exit(cli.main(sys.argv[3:]))
"""


def leftovers(folder):
    return [path for path in folder.rglob("*") if path.name.startswith((".tmp-", ".staging-"))]


@pytest.mark.slow
def test_sigterm_at_any_moment_leaves_no_staging_folder_or_temporary_file(tmp_path):
    checkpoint, stats_path = tiny_checkpoint_with_stats(tmp_path / "in")
    prune = ["prune", str(checkpoint), "--stats", str(stats_path), "--prune-fraction", "0.5", "--ratio", "1:1"]
    moments = {  # name: (audit event, text in its path, command)
        "staging folder created": ("tempfile.mkdtemp", ".staging-", [*prune, "--out", str(tmp_path / "a" / "out")]),
        "checkpoint being written": ("tempfile.mkstemp", ".staging-", [*prune, "--out", str(tmp_path / "b" / "out")]),
        "single file being written": ("tempfile.mkstemp", ".tmp-",
                                      ["convert", str(checkpoint), str(tmp_path / "c" / "out.pt"), "--to", "single"]),
    }
    processes = {name: subprocess.Popen([sys.executable, "-c", TERMINATE_AT, event, text, *argv],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, (event, text, argv) in moments.items()}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 128 + signal.SIGTERM, (name, stderr)
        assert stderr.strip().splitlines()[-1] == "fairseq-moe-prune: terminated", name
    for folder in ("a", "b", "c"):
        assert os.listdir(tmp_path / folder) == []


def test_the_leftovers_of_a_killed_run_are_removed_by_the_next_run(tmp_path, capsys):
    checkpoint, stats_path = tiny_checkpoint_with_stats(tmp_path / "in")
    dead = subprocess.Popen(["true"])
    dead.wait()
    host, _ = owner().split("-")
    out = tmp_path / "runs"
    (out / f".staging-{host}-{dead.pid}-x1y2z3" / "sub").mkdir(parents=True)  # as a SIGKILLed run leaves them
    (out / f".staging-{host}-{dead.pid}-x1y2z3" / "eng_Latn-deu_Latn.pt").write_bytes(b"partial")
    (out / f".tmp-{host}-{dead.pid}-abcdefmodel.pt").write_bytes(b"partial")
    alive = [f".staging-{host}-{os.getpid()}-running", f".staging-00000000-{dead.pid}-other-host", "keep.txt"]
    for name in alive:
        (out / name).mkdir()
    assert cli.main(["prune", str(checkpoint), "--stats", str(stats_path), "--out", str(out / "pruned"),
                     "--prune-fraction", "0.5", "--ratio", "1:1"]) == 0
    assert sorted(os.listdir(out)) == sorted([*alive, "pruned"])


class Noted(files.WrittenAtExit):
    def __init__(self):
        self.writes = 0
        self.open()

    def write(self) -> None:
        self.writes += 1


def test_sigterm_exits_through_atexit_from_the_first_file_written_at_exit_until_it_closes():
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        first, second = Noted(), Noted()
        assert signal.getsignal(signal.SIGTERM) is files.exit_on_sigterm and (first.writes, second.writes) == (1, 1)
        second.close()
        assert signal.getsignal(signal.SIGTERM) is files.exit_on_sigterm and second.writes == 2
        first.close()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # someone else's handler is left alone
        third = Noted()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        third.close()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
