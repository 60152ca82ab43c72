"""--moe-stats-out through the stock fairseq-generate: every sentence counted, interruptions survived."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fairseq_moe_prune import stats
from tests.conftest import TEST_SENTENCES, multilingual_args, run_cli

pytestmark = pytest.mark.slow

TASK = "translation_multi_simple_epoch_moe"


def generate_args(corpus, trained, subset, stats_path, *extra):
    return ["fairseq-generate", *multilingual_args(corpus, TASK), "--path", str(trained),
            "--source-lang", "eng_Latn", "--target-lang", "deu_Latn", "--gen-subset", subset,
            "--beam", "2", "--max-len-b", "30", "--required-batch-size-multiple", "1",
            "--moe-stats-out", str(stats_path), *extra]


# README: "Recording, ranking, pruning" block (fairseq-moe-prune stats show)
def test_every_sentence_is_counted_and_stats_show_lists_the_layers(corpus, trained, tmp_path):
    path = tmp_path / "stats.json"
    run_cli(generate_args(corpus, trained, "test", path, "--batch-size", "7"))
    recorded = stats.load(str(path))
    lines = (corpus / "raw" / "test.eng_Latn-deu_Latn.eng_Latn").read_text().splitlines()
    assert len(lines) == TEST_SENTENCES
    assert recorded.pairs["eng_Latn-deu_Latn"].sentences == len(lines)
    shown = run_cli(["fairseq-moe-prune", "stats", "show", str(path)]).stdout
    assert "eng_Latn-deu_Latn: 30 sentences" in shown and "encoder.layers.1.moe_layer" in shown


def test_merge_cli_adds_runs_and_refuses_a_different_model(corpus, trained, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    run_cli(generate_args(corpus, trained, "test", a, "--batch-size", "10"))
    reverse = generate_args(corpus, trained, "test", b, "--batch-size", "10")
    reverse[reverse.index("eng_Latn", reverse.index("--source-lang"))] = "deu_Latn"
    reverse[reverse.index("deu_Latn", reverse.index("--target-lang"))] = "eng_Latn"
    run_cli(reverse)
    run_cli(["fairseq-moe-prune", "stats", "merge", str(tmp_path / "m.json"), str(a), str(b)])
    merged = stats.load(str(tmp_path / "m.json"))
    assert sorted(merged.pairs) == ["deu_Latn-eng_Latn", "eng_Latn-deu_Latn"]
    assert stats.by_language(merged)["deu_Latn"]["encoder.layers.1.moe_layer"].tokens > 0

    other = json.loads(b.read_text())
    other["model"]["gate_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    refused = run_cli(["fairseq-moe-prune", "stats", "merge", str(tmp_path / "x.json"), str(a),
                       str(tmp_path / "other.json")], check=False)
    assert refused.returncode == 1 and "different models" in refused.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_leaves_a_valid_file_of_whole_batches(corpus, trained, tmp_path, signum):
    path = tmp_path / "stats.json"
    process = subprocess.Popen(
        generate_args(corpus, trained, "train", path, "--batch-size", "4", "--moe-stats-flush-seconds", "0"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # Ctrl-C as in a terminal: a shell starts background jobs with SIGINT ignored, which the child inherits
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    seen = 0
    while time.time() < deadline and seen < 40:
        time.sleep(0.2)
        if path.exists():
            seen = stats.load(str(path)).pairs.get("eng_Latn-deu_Latn", stats.PairStats(0, {})).sentences
    process.send_signal(signum)
    assert process.wait(timeout=60) != 0
    recorded = stats.load(str(path)).pairs["eng_Latn-deu_Latn"]
    train_lines = len((corpus / "raw" / "train.eng_Latn-deu_Latn.eng_Latn").read_text().splitlines())
    assert 40 <= recorded.sentences < train_lines
    assert recorded.sentences % 4 == 0  # only finished batches are counted
    assert not list(tmp_path.glob(".tmp-*"))


def test_every_sentence_counts_whatever_the_batch_flags_and_show_prints_coverage(corpus, trained, tmp_path):
    path = tmp_path / "stats.json"
    args = generate_args(corpus, trained, "test", path, "--batch-size", "8")
    args.remove("--required-batch-size-multiple"), args.remove("1")  # fairseq's default 8 drops a last partial batch
    result = run_cli(args)
    assert len([line for line in result.stdout.splitlines() if line.startswith("H-")]) == TEST_SENTENCES
    assert stats.load(str(path)).pairs["eng_Latn-deu_Latn"].sentences == TEST_SENTENCES
    shown = run_cli([sys.executable, "-m", "fairseq_moe_prune.cli", "stats", "show", str(path)]).stdout
    assert f"eng_Latn-deu_Latn: {TEST_SENTENCES} sentences of {TEST_SENTENCES} in test (100.0% covered)" in shown


def test_recording_never_replaces_an_input_and_needs_the_language_list(corpus, trained, tmp_path):
    checkpoint = tmp_path / "model.pt"
    shutil.copyfile(trained, checkpoint)
    before = checkpoint.read_bytes()
    refused = run_cli(generate_args(corpus, checkpoint, "test", checkpoint), check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: --moe-stats-out {checkpoint} exists and is not a statistics file (refusing to replace it)")
    assert checkpoint.read_bytes() == before

    args = generate_args(corpus, checkpoint, "test", tmp_path / "stats.json")
    del args[args.index("--langs"): args.index("--langs") + 2]
    refused = run_cli(args, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "error: --task translation_multi_simple_epoch_moe needs --langs")
    assert not (tmp_path / "stats.json").exists()
