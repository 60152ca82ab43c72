"""The stock fairseq console scripts train, translate with and refuse checkpoints through the plugin."""

import re

import pytest
import torch

from tests.conftest import TEST_SENTENCES, multilingual_args, run_cli

pytestmark = pytest.mark.slow


def hypothesis_ids(output: str):
    return sorted(int(m) for m in re.findall(r"^H-(\d+)\t", output, flags=re.M))


def test_fairseq_train_logs_the_load_balancing_loss(trained):
    log = (trained.parent / "train.log").read_text()
    losses = [float(v) for v in re.findall(r"moe_gate_loss[= ]([\d.]+)", log)]
    assert losses and all(0.5 < loss < 4.0 for loss in losses)  # 1.0 is perfectly balanced
    info = run_cli(["fairseq-moe-prune", "info", str(trained)]).stdout
    assert "2 MoE layers, 8 experts" in info and "encoder.layers.1.moe_layer" in info


def test_fairseq_generate_translates_every_sentence(corpus, trained):
    # 30 sentences in batches of 7 leave a partial batch that fairseq would drop by default
    result = run_cli(["fairseq-generate", *multilingual_args(corpus), "--path", str(trained),
                      "--source-lang", "eng_Latn", "--target-lang", "deu_Latn", "--gen-subset", "test",
                      "--beam", "3", "--batch-size", "7", "--required-batch-size-multiple", "1",
                      "--max-len-b", "40", "--remove-bpe", "sentencepiece"])
    assert hypothesis_ids(result.stdout) == list(range(TEST_SENTENCES))


def test_fairseq_interactive_translates_raw_text(corpus, trained):
    lines = ["Select the cell range.", "Click OK to close the dialog.", "Opens the Print dialog."]
    result = run_cli(["fairseq-interactive", *multilingual_args(corpus), "--path", str(trained),
                      "--source-lang", "eng_Latn", "--target-lang", "fra_Latn", "--beam", "2",
                      "--bpe", "sentencepiece", "--sentencepiece-model", str(corpus / "spm.model"),
                      "--input", "-", "--buffer-size", "2", "--batch-size", "2"],
                     input="\n".join(lines) + "\n")
    assert hypothesis_ids(result.stdout) == [0, 1, 2]


class RunsCodeWhenLoaded:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_stock_generate_refuses_a_code_executing_checkpoint_in_one_line(corpus, trained, tmp_path):
    state = torch.load(trained, weights_only=True)
    marker = tmp_path / "pwned"
    state["extra_state"]["payload"] = RunsCodeWhenLoaded(str(marker))
    torch.save(state, tmp_path / "evil.pt")
    result = run_cli(["fairseq-generate", *multilingual_args(corpus), "--path", str(tmp_path / "evil.pt"),
                      "--source-lang", "eng_Latn", "--target-lang", "deu_Latn", "--gen-subset", "test"],
                     check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "refusing to load: it pickles posix.system" in result.stderr
    assert not marker.exists()
