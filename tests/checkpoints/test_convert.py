"""Conversion: HF NllbMoe <-> fairseq compute the same logits; fairseq layouts round-trip bit for bit."""

import argparse
import json
import os
import re
import shutil

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_moe_prune import cli
from fairseq_moe_prune.checkpoints.convert import convert
from fairseq_moe_prune.checkpoints.layouts import open_checkpoint
from fairseq_moe_prune.checkpoints.safe_load import CheckpointError, load_checkpoint
from fairseq_moe_prune.checkpoints.surgery import prune_checkpoint, save_single
from fairseq_moe_prune.files import OutputExistsError, OutputPathError
from tests.helpers import (
    build_tiny_model,
    import_extra,
    pad,
    random_sentences,
    randomize,
    save_like_trainer,
    tiny_hf_model,
    write_dictionaries,
)

transformers = import_extra("transformers")

NLLB_OPTIONS = ("--share-all-embeddings", "--encoder-normalize-before", "--decoder-normalize-before", "--moe-eom", "0.2")
LENGTHS = [7, 4, 9, 5]  # sentences of different lengths: padded batches


def load_fairseq(path, data_dir):
    [model], _ = checkpoint_utils.load_model_ensemble(
        [str(path)], arg_overrides={"data": str(data_dir), "source_lang": "src", "target_lang": "tgt"})
    return model.eval()


def decoder_inputs(seed: int) -> torch.Tensor:
    return torch.stack(random_sentences([6] * len(LENGTHS), seed)).roll(1, dims=1)  # </s> first, as decoding starts


def both_logits(fairseq_model, hf_model, seed: int = 3):
    """Decoder logits of both models on the same padded batch (left-padded for fairseq, right-padded for HF)."""
    sentences = random_sentences(LENGTHS, seed)
    left, _ = pad(sentences, left=True)
    right, mask = pad(sentences, left=False)
    prev = decoder_inputs(seed)
    with torch.no_grad():
        ours = fairseq_model(left, torch.tensor(LENGTHS), prev)[0]
        theirs = hf_model(input_ids=right, attention_mask=mask, decoder_input_ids=prev).logits
    return ours, theirs


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "model"
    model = tiny_hf_model()
    model.save_pretrained(folder, max_shard_size="20KB")  # several shards and an index
    return folder, model


@pytest.fixture
def fairseq_checkpoint(tmp_path):
    """A random tiny fairseq MoE in NLLB's configuration, saved like fairseq-train does."""
    cfg, _, model = build_tiny_model(tmp_path / "data", *NLLB_OPTIONS)
    randomize(model.eval(), seed=1)
    save_like_trainer(cfg, model, tmp_path / "model.pt")
    return tmp_path / "model.pt", model


def test_hf_to_fairseq_gives_the_same_logits(hf_folder, tmp_path):
    folder, hf_model = hf_folder
    convert(str(folder), str(tmp_path / "model.pt"), "single")
    write_dictionaries(tmp_path / "data")
    ours, theirs = both_logits(load_fairseq(tmp_path / "model.pt", tmp_path / "data"), hf_model)
    assert theirs.abs().max() > 1  # not a vacuous comparison
    assert (ours - theirs).abs().max() <= 1e-5


# README: "Converting" block (fairseq -> Hugging Face; the library call behind convert --to hf --max-shard-size)
def test_fairseq_to_hf_gives_the_same_logits_and_loads_with_from_pretrained(fairseq_checkpoint, tmp_path):
    path, fairseq_model = fairseq_checkpoint
    convert(str(path), str(tmp_path / "hf"), "hf", max_shard_size="50KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf_model = transformers.NllbMoeForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.config.num_experts == 4 and hf_model.config.moe_token_dropout == 0.2
    ours, theirs = both_logits(fairseq_model, hf_model)
    assert theirs.abs().max() > 1
    assert (ours - theirs).abs().max() <= 1e-5


def test_hf_round_trips_through_the_sharded_layout_unchanged(hf_folder, tmp_path):
    folder, hf_model = hf_folder
    convert(str(folder), str(tmp_path / "sharded"), "sharded")
    assert sorted(os.listdir(tmp_path / "sharded")) == ["checkpoint-rank-0.pt", "checkpoint-rank-1.pt",
                                                        "checkpoint-rank-2.pt", "checkpoint-rank-3.pt",
                                                        "checkpoint-shared.pt"]
    convert(str(tmp_path / "sharded" / "checkpoint-shared.pt"), str(tmp_path / "hf"), "hf")
    again = transformers.NllbMoeForConditionalGeneration.from_pretrained(tmp_path / "hf")
    before, after = hf_model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert again.config.to_diff_dict() == hf_model.config.to_diff_dict()


def nllb_release(model, cfg_state, folder):
    """The layout NLLB was released in: a shared file (with optimizer state) and one expert per rank file."""
    folder.mkdir()
    weights = model.state_dict()
    shared = {k: v for k, v in weights.items() if ".experts." not in k}
    torch.save({**cfg_state, "model": shared, "last_optimizer_state": {"step": torch.tensor(7)}},
               folder / "ckpt-shared.pt")
    for rank in range(4):
        head = f".experts.{rank}."
        torch.save({"model": {k.replace(head, ".experts.0."): v for k, v in weights.items() if head in k}},
                   folder / f"ckpt-rank-{rank}.pt")


# README: "Converting" block (NLLB's release -> one fairseq file; the library call behind convert --to single)
def test_sharded_to_single_to_sharded_keeps_every_tensor_and_the_config(fairseq_checkpoint, tmp_path):
    path, model = fairseq_checkpoint
    state = load_checkpoint(str(path))
    nllb_release(model, {k: v for k, v in state.items() if k != "model"}, tmp_path / "release")
    convert(str(tmp_path / "release" / "ckpt-shared.pt"), str(tmp_path / "ckpt.pt"), "single", source_format="sharded")
    single = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert single["model"].keys() == model.state_dict().keys()
    convert(str(tmp_path / "ckpt.pt"), str(tmp_path / "again"), "sharded")  # file names follow the input's
    assert sorted(os.listdir(tmp_path / "again")) == sorted(os.listdir(tmp_path / "release")) != []
    for name in os.listdir(tmp_path / "release"):
        before = load_checkpoint(str(tmp_path / "release" / name))
        after = load_checkpoint(str(tmp_path / "again" / name))
        assert before["model"].keys() == after["model"].keys()
        for key, tensor in before["model"].items():
            assert after["model"][key].dtype == tensor.dtype and torch.equal(after["model"][key], tensor), key
        assert after.get("cfg") == before.get("cfg")
    assert "last_optimizer_state" not in load_checkpoint(str(tmp_path / "again" / "ckpt-shared.pt"))


def test_non_uniform_pruned_model_stays_fairseq_and_uniform_one_converts(fairseq_checkpoint, tmp_path):
    path, _ = fairseq_checkpoint
    checkpoint = open_checkpoint(str(path))
    enc, dec = (spec.prefix for spec in checkpoint.specs)
    save_single(prune_checkpoint(checkpoint, {enc: [0, 2, 3], dec: [1, 3]}), str(tmp_path / "uneven.pt"))
    with pytest.raises(CheckpointError, match="one expert count for all MoE layers; this model has 2, 3"):
        convert(str(tmp_path / "uneven.pt"), str(tmp_path / "hf"), "hf")
    with pytest.raises(CheckpointError, match="same number of experts in every MoE layer"):
        convert(str(tmp_path / "uneven.pt"), str(tmp_path / "sharded"), "sharded")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "sharded").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no staging folder left behind
    convert(str(tmp_path / "uneven.pt"), str(tmp_path / "copy.pt"), "single", fp16=True)
    copy = load_checkpoint(str(tmp_path / "copy.pt"))["model"]
    assert copy[f"{dec}.gate.wg.weight"].dtype == torch.float16 and copy[f"{dec}.gate.wg.weight"].shape[0] == 2

    save_single(prune_checkpoint(checkpoint, {enc: [0, 2, 3], dec: [1, 2, 3]}), str(tmp_path / "even.pt"))
    convert(str(tmp_path / "even.pt"), str(tmp_path / "hf"), "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_experts"] == 3 and os.path.exists(tmp_path / "hf" / "model.safetensors")


def test_refusals_are_one_line_errors_and_leave_no_output(fairseq_checkpoint, hf_folder, tmp_path):
    path, _ = fairseq_checkpoint
    cfg, _, post_norm = build_tiny_model(tmp_path / "data2", "--share-all-embeddings")
    save_like_trainer(cfg, post_norm, tmp_path / "post_norm.pt")
    with pytest.raises(CheckpointError, match="needs --encoder-normalize-before"):
        convert(str(tmp_path / "post_norm.pt"), str(tmp_path / "hf"), "hf")
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="exists"):
        convert(str(path), str(tmp_path / "exists"), "hf")
    with pytest.raises(OutputPathError, match="overlap"):
        convert(str(path), str(tmp_path), "sharded", force=True)
    with pytest.raises(CheckpointError, match="is a hf checkpoint, not single"):
        convert(str(hf_folder[0]), str(tmp_path / "x.pt"), "single", source_format="single")
    assert not (tmp_path / "hf").exists()
    assert isinstance(load_checkpoint(str(path))["cfg"]["model"], argparse.Namespace)  # input untouched, readable


def test_a_skipping_model_is_refused_rather_than_converted_without_its_betas(tmp_path):
    cfg, _, skipping = build_tiny_model(tmp_path / "data", *NLLB_OPTIONS, "--moe-skip-betas", "0.3,0")
    save_like_trainer(cfg, skipping, tmp_path / "skipping.pt")
    with pytest.raises(CheckpointError, match="no dynamic expert skipping"):  # HF's config has no field for them
        convert(str(tmp_path / "skipping.pt"), str(tmp_path / "hf"), "hf")
    assert not (tmp_path / "hf").exists()


def hf_copy_with_config(hf_folder, folder, **changes):
    """A copy of the tiny HF model whose config.json has ``changes``."""
    shutil.copytree(hf_folder[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_config_values_never_reach_a_command_line(hf_folder, tmp_path, capsys):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    marker = tmp_path / "pwned"
    (plugin / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    folder = hf_copy_with_config(hf_folder, tmp_path / "hf", second_expert_policy=f"--user-dir={plugin}")
    assert cli.main(["convert", str(folder), str(tmp_path / "model.pt"), "--to", "single"]) == 1
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("fairseq-moe-prune: error: config.json: second_expert_policy must be one of all, "
                            "sampling, random, got '--user-dir=")
    assert not marker.exists() and not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("changes, message", [
    ({"d_model": "16"}, "d_model must be a whole number >= 1"),
    ({"encoder_layers": True}, "encoder_layers must be a whole number >= 1"),
    ({"dropout": float("nan")}, "dropout must be a number"),
    ({"num_experts": 2.0}, "num_experts must be a whole number >= 1"),
    ({"router_ignore_padding_tokens": "no"}, "router_ignore_padding_tokens must be true or false"),
    ({"activation_function": "--cpu"}, "activation_function must be one of relu, gelu"),
])
def test_every_config_value_is_checked(hf_folder, tmp_path, capsys, changes, message):
    folder = hf_copy_with_config(hf_folder, tmp_path / "hf", **changes)
    assert cli.main(["convert", str(folder), str(tmp_path / "model.pt"), "--to", "single"]) == 1
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "model.pt").exists()


def test_info_describes_a_hugging_face_folder(hf_folder, capsys):
    assert cli.main(["info", str(hf_folder[0])]) == 0
    out = capsys.readouterr().out
    assert "Hugging Face NllbMoe model, 2 MoE layers, 8 experts" in out
    assert re.search(r"decoder.layers.1.moe_layer\s+4 experts  ffn 32  dim 16", out)


def test_hf_to_fairseq_prints_no_hydra_warnings(hf_folder, tmp_path, capfd):
    assert cli.main(["convert", str(hf_folder[0]), str(tmp_path / "model.pt"), "--to", "single"]) == 0
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out.strip() == f"wrote {tmp_path / 'model.pt'}"


def test_safetensors_files_get_the_usual_permissions(fairseq_checkpoint, tmp_path):
    path, _ = fairseq_checkpoint
    mask = os.umask(0o022)
    try:
        convert(str(path), str(tmp_path / "hf"), "hf", max_shard_size="50KB")
    finally:
        os.umask(mask)
    modes = {name: os.stat(tmp_path / "hf" / name).st_mode & 0o777 for name in os.listdir(tmp_path / "hf")}
    assert any(name.endswith(".safetensors") for name in modes) and set(modes.values()) == {0o644}, modes
