"""A task-level MoE trained by fairseq-train; `fairseq-moe-prune extract` writes sub-networks that translate
exactly as the full model does for their task, the dense one in stock fairseq without --user-dir."""

import re
import sys
from pathlib import Path

import pytest
import torch

from fairseq_moe_prune import cli
from fairseq_moe_prune.checkpoints.safe_load import load_checkpoint
from tests.conftest import run_cli, task_moe_args

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "fairseq_moe_prune.cli"]


@pytest.fixture(scope="module")
def task_trained(corpus, tmp_path_factory) -> Path:
    """A tiny task-MoE: both MoE layers route by task (encoder by source, decoder by target language)."""
    save_dir = tmp_path_factory.mktemp("task_model")
    run_cli(["fairseq-train", *task_moe_args(corpus), "--arch", "moe_transformer_toy", "--share-all-embeddings",
             "--moe-task-routing", "both", "--moe-task", "target",
             "--criterion", "moe_label_smoothed_cross_entropy", "--moe-gate-loss-wt", "0.01",
             "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "0.003", "--lr-scheduler", "inverse_sqrt",
             "--warmup-updates", "10", "--max-tokens", "1500", "--max-update", "20", "--seed", "1",
             "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--disable-validation", "--num-workers", "0"])
    return save_dir / "checkpoint_last.pt"


def generate(corpus, checkpoint, user_dir=True, source="eng_Latn", target="deu_Latn"):
    """{sentence id: (hypothesis, score, positional scores)} of fairseq-generate, beam 4, padded batches of 7."""
    args = task_moe_args(corpus)
    if not user_dir:
        at = args.index("--user-dir")
        args = args[:at] + args[at + 2:]
    result = run_cli(["fairseq-generate", *args, "--path", str(checkpoint), "--source-lang", source,
                      "--target-lang", target, "--gen-subset", "test", "--beam", "4", "--batch-size", "7",
                      "--required-batch-size-multiple", "1", "--max-len-b", "10"], cwd="/")
    hypotheses = {int(i): (text, float(score)) for i, score, text in re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", result.stdout, re.M)}
    positional = {int(i): [float(v) for v in values.split()] for i, values in re.findall(r"^P-(\d+)\t(.*)$", result.stdout, re.M)}
    return {i: (text, score, positional[i]) for i, (text, score) in hypotheses.items()}


def assert_same_translations(full, extracted):
    assert sorted(full) == sorted(extracted) and len(full) == 30
    for i, (text, score, positional) in full.items():
        assert extracted[i][0] == text
        assert abs(extracted[i][1] - score) <= 1e-5
        assert len(extracted[i][2]) == len(positional)
        # fairseq prints positional scores with 4 decimals: equal up to that rounding
        assert max(abs(a - b) for a, b in zip(extracted[i][2], positional)) <= 1.01e-4


# README: "Task-level MoE and sub-network extraction" block (fairseq-train --moe-task-routing both in the task_trained
# fixture, extract, stock fairseq-generate without --user-dir)
def test_dense_subnetwork_loads_in_stock_fairseq_and_translates_like_the_task_moe(corpus, task_trained, tmp_path):
    out = tmp_path / "sub"
    result = run_cli([*CLI, "extract", str(task_trained), "--task", "eng_Latn-deu_Latn,eng_Latn-fra_Latn",
                      "--out", str(out)])
    assert "tensorboardX" not in result.stdout + result.stderr  # no third-party noise (test_quiet_start.py)
    state = load_checkpoint(str(out / "eng_Latn-deu_Latn.pt"))
    model = state["cfg"]["model"]
    assert isinstance(model, dict) and model["_name"] == "transformer" and model["encoder_ffn_embed_dim"] == 128
    assert not any("moe" in key for key in state["model"])
    manifest = (out / "manifest.json").read_text()
    layers = [re.findall(r'"experts": \[\s*(\d+),\s*(\d+)\s*\],\s*"factors": \[\s*([\d.]+)', manifest)]
    assert len(layers[0]) == 4 and layers[0][:2] != layers[0][2:]  # per task: its own experts or weights
    assert_same_translations(generate(corpus, task_trained), generate(corpus, out / "eng_Latn-deu_Latn.pt", user_dir=False))
    assert cli.main(["extract", str(task_trained), "--task", "eng_Latn-deu_Latn", "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "eng_Latn-deu_Latn.pt").read_bytes() == (out / "eng_Latn-deu_Latn.pt").read_bytes()


@pytest.fixture(scope="module")
def pair_routed(task_trained, tmp_path_factory) -> Path:
    """The same weights with a token-routed encoder and a decoder routed by language pair (its own task
    embedding over the 4 trained pairs, random): the extracted model keeps the encoder's MoE layer."""
    state = torch.load(task_trained, weights_only=False)
    config = state["cfg"]["model"]
    config.moe_task_routing, config.moe_task = "decoder", "pair"
    del state["model"]["encoder.moe_task_embed.weight"]
    state["model"]["decoder.moe_task_embed.weight"] = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("pair") / "pair.pt"
    torch.save(state, path)
    return path


def test_decoder_routed_by_pair_keeps_the_token_routed_encoder_and_translates_alike(corpus, pair_routed, tmp_path):
    run_cli([*CLI, "extract", str(pair_routed), "--task", "deu_Latn-eng_Latn", "--out", str(tmp_path / "padded")])
    padded = load_checkpoint(str(tmp_path / "padded" / "deu_Latn-eng_Latn.pt"))["model"]
    assert padded["decoder.layers.0.fc1.weight"].shape == padded["decoder.layers.1.fc1.weight"].shape == (128, 32)
    run_cli([*CLI, "extract", str(pair_routed), "--task", "deu_Latn-eng_Latn", "--out", str(tmp_path / "sub"),
             "--per-layer-widths"])
    state = load_checkpoint(str(tmp_path / "sub" / "deu_Latn-eng_Latn.pt"))
    assert "encoder.layers.1.moe_layer.experts.3.fc1.weight" in state["model"]  # the token-routed encoder MoE
    assert state["model"]["decoder.layers.0.fc1.weight"].shape == (64, 32)  # each decoder layer at its own width
    assert state["model"]["decoder.layers.1.fc1.weight"].shape == (128, 32)  # two experts folded
    assert state["cfg"]["model"].decoder_ffn_dims == "64,128"
    full = generate(corpus, pair_routed, source="deu_Latn", target="eng_Latn")
    assert_same_translations(full, generate(corpus, tmp_path / "sub" / "deu_Latn-eng_Latn.pt", source="deu_Latn",
                                            target="eng_Latn"))


@pytest.mark.parametrize("case, message", [
    ("token", "the model routes by token"),
    ("unknown", "unknown language xyz_Latn"),
    ("untrained", "the model was not trained on deu_Latn-fra_Latn"),
    ("lang-for-pair", "name the task as SRC-TGT"),
])
def test_extract_refuses_in_one_line(case, message, trained, pair_routed, tmp_path, capsys):
    checkpoint, task = {"token": (trained, "deu_Latn"), "unknown": (pair_routed, "eng_Latn-xyz_Latn"),
                        "untrained": (pair_routed, "deu_Latn-fra_Latn"), "lang-for-pair": (pair_routed, "deu_Latn")}[case]
    code = cli.main(["extract", str(checkpoint), "--task", task, "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(error) == 1 and message in error[0], error
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_skipping_betas_on_task_routed_layers_are_refused_in_one_line(corpus, task_trained):
    """Dynamic skipping acts on token routing: a task-MoE given betas says so instead of ignoring them."""
    result = run_cli(["fairseq-generate", *task_moe_args(corpus), "--path", str(task_trained), "--source-lang", "eng_Latn",
                      "--target-lang", "deu_Latn", "--gen-subset", "test", "--beam", "2",
                      "--model-overrides", "{'moe_skip_betas': '0.3,0'}"], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "encoder.layers.1.moe_layer routes by task" in last
