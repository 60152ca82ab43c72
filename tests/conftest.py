"""Session fixtures for the end-to-end tests: a real corpus and a tiny MoE trained by fairseq-train.

Both are built once per test session from the committed LibreOffice help sample.
"""

import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from tests.helpers import USER_DIR

REPO = Path(__file__).resolve().parent.parent
LANGS = ["eng_Latn", "deu_Latn", "fra_Latn"]
PAIRS = ["eng_Latn-deu_Latn", "eng_Latn-fra_Latn", "deu_Latn-eng_Latn", "fra_Latn-eng_Latn"]
TEST_SENTENCES = 30


def run_cli(command: List[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a console script; on unexpected failure show the tail of its output."""
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{command[0]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def multilingual_args(corpus: Path, task: str = "translation_multi_simple_epoch") -> List[str]:
    """NLLB's multilingual task flags over the corpus."""
    return [str(corpus / "bin"), "--user-dir", USER_DIR, "--task", task, "--langs", ",".join(LANGS),
            "--lang-pairs", ",".join(PAIRS), "--encoder-langtok", "src", "--decoder-langtok"]


def task_moe_args(corpus: Path) -> List[str]:
    """NLLB's flags plus the target language token as the decoder's first input (task routing needs it)."""
    return [*multilingual_args(corpus), "--lang-tok-replacing-bos-eos"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    run_cli([sys.executable, str(REPO / "examples/libreoffice_help/prepare_data.py"),
             "--aligned-dir", str(REPO / "tests/data/libreoffice_help"), "--out", str(out),
             "--vocab-size", "1000", "--test-max", str(TEST_SENTENCES), "--valid-max", str(TEST_SENTENCES)])
    return out


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory) -> Path:
    """A tiny MoE (4 experts in encoder layer 1 and decoder layer 1) after 30 updates."""
    save_dir = tmp_path_factory.mktemp("model")
    result = run_cli(
        ["fairseq-train", *multilingual_args(corpus), "--arch", "moe_transformer_toy", "--share-all-embeddings",
         "--criterion", "moe_label_smoothed_cross_entropy", "--moe-gate-loss-wt", "0.01", "--label-smoothing", "0.1",
         "--optimizer", "adam", "--lr", "0.003", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
         "--max-tokens", "1500", "--max-update", "30", "--seed", "1", "--save-dir", str(save_dir),
         "--no-epoch-checkpoints", "--disable-validation", "--log-format", "simple", "--log-interval", "10",
         "--num-workers", "0"]
    )
    (save_dir / "train.log").write_text(result.stdout + result.stderr)
    return save_dir / "checkpoint_last.pt"


# README: "Recording, ranking, pruning" block (step 1, fairseq-generate --moe-stats-out) and "Reconstruction loss
# and dynamic skipping" block (--moe-calibration-out, same run)
@pytest.fixture(scope="session")
def recorded_test_set(corpus, trained, tmp_path_factory) -> Path:
    """One recording run per direction (eng->deu, deu->eng) over the test set: statistics ``{pair}.json`` and
    calibration samples in ``calibration/``, both from the same fairseq-generate."""
    folder = tmp_path_factory.mktemp("recorded")
    for source, target in (("eng_Latn", "deu_Latn"), ("deu_Latn", "eng_Latn")):
        run_cli(["fairseq-generate", *multilingual_args(corpus, "translation_multi_simple_epoch_moe"),
                 "--path", str(trained), "--source-lang", source, "--target-lang", target, "--gen-subset", "test",
                 "--beam", "2", "--max-len-b", "30", "--required-batch-size-multiple", "1",
                 "--moe-stats-out", str(folder / f"{source}-{target}.json"),
                 "--moe-calibration-out", str(folder / "calibration"), "--moe-calibration-tokens", "256"])
    return folder
