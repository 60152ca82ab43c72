"""The console script imports only what a command uses: ``stats`` needs neither torch nor fairseq."""

import json
import subprocess
import sys

import numpy as np

from fairseq_moe_prune import stats

# Runs the CLI in a fresh interpreter, then prints which heavy modules the commands imported.
PROBE = """
import sys
from fairseq_moe_prune import cli
for argv in ({commands}):
    try:
        cli.main(argv)
    except SystemExit:  # --help
        pass
print("IMPORTED " + " ".join(sorted(name for name in ("torch", "fairseq") if name in sys.modules)))
"""


def imported_by(*commands) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE.format(commands="".join(f"{c!r}, " for c in commands))],
                            capture_output=True, text=True, check=True)
    return result.stdout.splitlines()[-1]


def write_stats(path: str) -> None:
    counts = stats.LayerCounts.zeros(4)
    counts.tokens = 3
    counts.top1 = counts.top2 = np.array([2, 1, 0, 0], dtype=np.int64)  # top-1 gating: top2 is top1
    fingerprint = stats.Fingerprint([("encoder.layers.1.moe_layer", 4)], "0" * 64, "0" * 64)
    pair = stats.PairStats(1, {"encoder.layers.1.moe_layer": counts})
    stats.save(stats.MoEStats(fingerprint, {}, {"src-tgt": pair}), path)


def test_help_and_stats_commands_import_neither_torch_nor_fairseq(tmp_path):
    write_stats(str(tmp_path / "a.json"))
    merged = str(tmp_path / "merged.json")
    line = imported_by(["--help"], ["stats", "show", str(tmp_path / "a.json")],
                       ["stats", "merge", merged, str(tmp_path / "a.json"), str(tmp_path / "a.json")])
    assert line.split() == ["IMPORTED"], line
    assert json.loads(open(merged).read())["pairs"]["src-tgt"]["sentences"] == 2


def test_registration_waits_for_fairseq():
    """Importing the package alone registers nothing; importing fairseq afterwards registers everything."""
    probe = ("import sys, fairseq_moe_prune; assert 'fairseq' not in sys.modules; "
             "from fairseq.models import ARCH_MODEL_REGISTRY; from fairseq.tasks import TASK_REGISTRY; "
             "from fairseq.criterions import CRITERION_REGISTRY; from fairseq import checkpoint_utils; "
             "print('moe_transformer_toy' in ARCH_MODEL_REGISTRY, 'translation_moe_recording' in TASK_REGISTRY, "
             "'moe_label_smoothed_cross_entropy' in CRITERION_REGISTRY, "
             "checkpoint_utils.load_checkpoint_to_cpu._moe_prune_guarded)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "True", "True", "True"]


def test_info_imports_torch_but_not_fairseq(tmp_path):
    assert imported_by(["info", str(tmp_path / "missing.pt")]).split() == ["IMPORTED", "torch"]
