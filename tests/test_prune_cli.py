"""fairseq-moe-prune prune on a trained model; stock fairseq-generate and fairseq-train use the result."""

import json
import re

import pytest

from fairseq_moe_prune import cli
from fairseq_moe_prune.checkpoints.convert import convert
from tests.conftest import multilingual_args, run_cli
from tests.helpers import tiny_checkpoint_with_stats

pytestmark = pytest.mark.slow


# README: "Recording, ranking, pruning" block (fairseq-moe-prune stats merge)
@pytest.fixture(scope="module")
def recorded_stats(recorded_test_set, tmp_path_factory):
    """Statistics of eng->deu and deu->eng on the test set, merged."""
    folder = tmp_path_factory.mktemp("stats")
    run_cli(["fairseq-moe-prune", "stats", "merge", str(folder / "all.json"),
             str(recorded_test_set / "eng_Latn-deu_Latn.json"),
             str(recorded_test_set / "deu_Latn-eng_Latn.json")])
    return folder / "all.json"


def generate(corpus, checkpoint, *extra):
    result = run_cli(["fairseq-generate", *multilingual_args(corpus), "--path", str(checkpoint),
                      "--source-lang", "eng_Latn", "--target-lang", "deu_Latn", "--gen-subset", "test",
                      "--beam", "3", "--max-len-b", "30", "--batch-size", "8", "--required-batch-size-multiple", "1",
                      *extra])
    return [line for line in result.stdout.splitlines() if re.match(r"^[HP]-\d+\t", line)]


def test_keeping_all_experts_gives_the_same_generation_output(corpus, trained, recorded_stats, tmp_path):
    run_cli(["fairseq-moe-prune", "prune", str(trained), "--stats", str(recorded_stats), "--out", str(tmp_path / "all"),
             "--granularity", "global", "--prune-fraction", "0", "--ratio", "1:1"])
    assert generate(corpus, trained) == generate(corpus, tmp_path / "all" / "global.pt")


# README: "Recording, ranking, pruning" block (steps 2-3: prune --granularity language, then stock fairseq-generate;
# the budget fits the toy model's 4 experts per layer, where 80% at 3:1 cannot)
def test_per_language_pruned_model_with_uneven_layers_translates_and_fine_tunes(corpus, trained, recorded_stats, tmp_path):
    out = tmp_path / "pruned"
    result = run_cli(["fairseq-moe-prune", "prune", str(trained), "--stats", str(recorded_stats), "--out", str(out),
                      "--granularity", "language", "--keep", "5", "--ratio", "3:2"])
    assert "eng_Latn-deu_Latn.pt: kept 5 experts (37.5% pruned)" in result.stdout
    info = run_cli(["fairseq-moe-prune", "info", str(out / "eng_Latn-deu_Latn.pt")]).stdout
    assert re.search(r"encoder.layers.1.moe_layer\s+3 experts", info)
    assert re.search(r"decoder.layers.1.moe_layer\s+2 experts", info)
    lines = generate(corpus, out / "eng_Latn-deu_Latn.pt")
    assert len([line for line in lines if line.startswith("H-")]) == 30

    train = run_cli(["fairseq-train", *multilingual_args(corpus), "--arch", "moe_transformer_toy",
                     "--share-all-embeddings", "--finetune-from-model", str(out / "eng_Latn-deu_Latn.pt"),
                     "--criterion", "moe_label_smoothed_cross_entropy", "--optimizer", "adam", "--lr", "0.001",
                     "--max-tokens", "1500", "--max-update", "3", "--save-dir", str(tmp_path / "ft"),
                     "--no-epoch-checkpoints", "--disable-validation", "--num-workers", "0",
                     "--encoder-moe-expert-counts", "3", "--decoder-moe-expert-counts", "2"])
    assert "num_updates 3" in train.stdout + train.stderr
    info = run_cli(["fairseq-moe-prune", "info", str(tmp_path / "ft" / "checkpoint_last.pt")]).stdout
    assert "2 MoE layers, 5 experts" in info


def test_cli_mistakes_give_one_line_and_exit_1(trained, recorded_stats, tmp_path):
    cases = [
        (["--prune-fraction", "1.2"], "fraction to prune must be in [0, 1)",
         "the fraction to prune must be in [0, 1), got 1.2"),
        (["--prune-fraction", "0.5", "--granularity", "pair", "--directions", "fra_Latn-eng_Latn"],
         "fra_Latn-eng_Latn is not in the statistics",
         "language pair fra_Latn-eng_Latn is not in the statistics (has deu_Latn-eng_Latn, eng_Latn-deu_Latn)"),
        (["--prune-fraction", "0.5", "--directions", "eng_Latn-fra_Latn"], "fra_Latn has no statistics as a target",
         "language fra_Latn has no statistics as a target (needed for eng_Latn-fra_Latn)"),
    ]
    for extra, message, line in cases:
        result = run_cli(["fairseq-moe-prune", "prune", str(trained), "--stats", str(recorded_stats),
                          "--out", str(tmp_path / "x"), "--ratio", "1:1", *extra], check=False)
        assert result.returncode == 1, extra
        assert result.stderr.splitlines() == [f"fairseq-moe-prune: error: {line}"]
        assert message in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.fixture
def tiny(tmp_path):
    """A tiny checkpoint (4 + 4 experts) and statistics for it, built in-process."""
    return tiny_checkpoint_with_stats(tmp_path / "in")


def prune_args(checkpoint, stats_path, out, *extra):
    return ["prune", str(checkpoint), "--stats", str(stats_path), "--out", str(out), "--prune-fraction", "0.5",
            "--ratio", "1:1", *extra]


def test_prune_never_writes_over_an_input_even_with_force(tiny, tmp_path, capsys):
    checkpoint, stats_path = tiny
    convert(str(checkpoint), str(tmp_path / "sharded"), "sharded")
    shared = tmp_path / "sharded" / "model-shared.pt"
    before = {path: path.read_bytes() for path in [checkpoint, stats_path, *(tmp_path / "sharded").iterdir()]}
    for source, out in [(checkpoint, checkpoint), (checkpoint, checkpoint.parent), (checkpoint, stats_path),
                        (checkpoint, tmp_path), (shared, tmp_path / "sharded"), (shared, shared)]:
        assert cli.main(prune_args(source, stats_path, out, "--force")) == 1
        assert capsys.readouterr().err.strip().splitlines() == [
            f"fairseq-moe-prune: error: {out} and the input {source if out != stats_path else stats_path} overlap "
            "(inputs are never modified)"]
    assert {path: path.read_bytes() for path in before} == before


def test_names_from_a_statistics_file_never_leave_the_output_folder(tiny, tmp_path, capsys):
    checkpoint, stats_path = tiny
    data = json.loads(stats_path.read_text())
    data["pairs"]["./../../x-tgt"] = data["pairs"].pop("src-tgt")
    (tmp_path / "evil.json").write_text(json.dumps(data))
    out = tmp_path / "a" / "b" / "out"
    assert cli.main(prune_args(checkpoint, tmp_path / "evil.json", out)) == 1
    assert "is not a language name" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not list(tmp_path.rglob("x-tgt*"))
    assert cli.main(prune_args(checkpoint, stats_path, out, "--directions", "src-../tgt")) == 1
    assert "is not a language name" in capsys.readouterr().err


def test_prune_output_names_and_what_an_impossible_budget_needs(tiny, tmp_path, capsys):
    checkpoint, stats_path = tiny
    assert cli.main(prune_args(checkpoint, stats_path, f"{tmp_path / 'pruned'}/")) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'pruned' / 'src-tgt.pt'}: kept 4 experts (50.0% pruned)" in out and "//" not in out
    assert cli.main(["prune", str(checkpoint), "--stats", str(stats_path), "--out", str(tmp_path / "x"),
                     "--keep", "5", "--ratio", "3:1"]) == 1
    assert capsys.readouterr().err.strip() == (
        "fairseq-moe-prune: error: the budget leaves 1 experts in decoder.layers.1.moe_layer; at least 2 are needed: "
        "with --ratio 3:1 keep at least 8 of 8 (--keep 8 or --prune-fraction 0), or use --ratio 1:1 for this budget")


def test_statistics_without_pairs_are_refused(tiny, tmp_path, capsys):
    checkpoint, stats_path = tiny
    data = json.loads(stats_path.read_text())
    data.update(pairs={}, runs=[])
    (tmp_path / "empty.json").write_text(json.dumps(data))
    assert cli.main(prune_args(checkpoint, tmp_path / "empty.json", tmp_path / "out")) == 1
    assert "holds no language pairs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
