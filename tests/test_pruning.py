"""Pruning: equivalences that must hold to the last bit, the sharded layout, determinism, errors."""

import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_moe_prune import stats
from fairseq_moe_prune.checkpoints.layouts import open_checkpoint
from fairseq_moe_prune.checkpoints.safe_load import CheckpointError
from fairseq_moe_prune.checkpoints.surgery import (
    prune_checkpoint,
    save_sharded,
    save_single,
)
from fairseq_moe_prune.files import OutputExistsError
from fairseq_moe_prune.layout import MoELayerSpec
from fairseq_moe_prune.pruning import PruneOptions, checkpoint_fingerprint, plan, prune
from fairseq_moe_prune.ranking import SelectionError
from tests.helpers import build_tiny_model, logits, random_batch, save_like_trainer, tiny_checkpoint_with_stats

EXPERTS = 16
ENC, DEC = "encoder.layers.1.moe_layer", "decoder.layers.1.moe_layer"


@pytest.fixture
def recorded(tmp_path):
    """A 16-expert tiny model saved as a checkpoint, and the statistics of one batch through it."""
    torch.manual_seed(0)
    cfg, task, model = build_tiny_model(
        tmp_path / "data", "--moe-expert-count", str(EXPERTS), "--moe-stats-out", str(tmp_path / "stats.json"),
        "--beam", "3", "--max-len-b", "6", task="translation_moe_recording",
    )
    model.eval()
    save_like_trainer(cfg, model, tmp_path / "model.pt")
    generator = task.build_generator([model], cfg.generation)
    src, lengths, _ = random_batch(num_sentences=4, seed=11)
    sample = {"id": torch.arange(4), "net_input": {"src_tokens": src, "src_lengths": lengths}}
    task.inference_step(generator, [model], sample)
    stats.save(task.recorder.snapshot(), str(tmp_path / "stats.json"))
    return tmp_path, task, generator, sample


def load(path: Path):
    [model], _ = checkpoint_utils.load_model_ensemble([str(path)])
    return model.eval()


def generate(task, generator, model, sample):
    with torch.no_grad():
        hypos = generator.generate([model], sample)
    return [[(h["tokens"].tolist(), float(h["score"])) for h in sentence] for sentence in hypos]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_keeping_every_expert_is_bit_identical(recorded):
    tmp_path, task, generator, sample = recorded
    options = PruneOptions(granularity="global", prune_fraction=0.0, ratio="1:1")
    prune(str(tmp_path / "model.pt"), str(tmp_path / "out"), options, stats_path=str(tmp_path / "stats.json"))
    original, pruned = load(tmp_path / "model.pt"), load(tmp_path / "out" / "global.pt")
    batch = random_batch(seed=5)
    assert torch.equal(logits(original, batch), logits(pruned, batch))
    assert generate(task, generator, original, sample) == generate(task, generator, pruned, sample)


def test_pruning_experts_never_chosen_on_an_input_keeps_its_translations(recorded):
    tmp_path, task, generator, sample = recorded
    counts = stats.load(str(tmp_path / "stats.json")).pairs["src-tgt"].layers
    kept = {prefix: [e for e in range(EXPERTS) if counts[prefix].top2[e] > 0] for prefix in (ENC, DEC)}
    assert all(len(ids) < EXPERTS for ids in kept.values())  # something is pruned in each layer
    save_single(prune_checkpoint(open_checkpoint(str(tmp_path / "model.pt")), kept), str(tmp_path / "pruned.pt"))
    pruned = load(tmp_path / "pruned.pt")
    assert [layer.num_experts for layer in pruned.moe_layers()] == [len(kept[ENC]), len(kept[DEC])]
    before = generate(task, generator, load(tmp_path / "model.pt"), sample)
    after = generate(task, generator, pruned, sample)
    assert [[tokens for tokens, _ in s] for s in before] == [[tokens for tokens, _ in s] for s in after]
    for sentence_before, sentence_after in zip(before, after):
        for (_, score_before), (_, score_after) in zip(sentence_before, sentence_after):
            assert score_after == pytest.approx(score_before, abs=1e-5)


def weights(path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict):
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_input_prunes_to_the_same_tensors_and_round_trips(recorded):
    tmp_path = recorded[0]
    full = open_checkpoint(str(tmp_path / "model.pt"))
    every = {spec.prefix: list(range(spec.num_experts)) for spec in full.specs}
    paths = save_sharded(prune_checkpoint(full, every), str(tmp_path / "ck-shared.pt"))
    assert len(paths) == 1 + EXPERTS
    sharded = open_checkpoint(paths[0])
    assert len(sharded.ranks) == EXPERTS and "experts" not in " ".join(sharded.state["model"])
    assert list(weights(paths[3])) == [f"{ENC}.experts.0.fc1.weight", f"{ENC}.experts.0.fc1.bias",
                                       f"{ENC}.experts.0.fc2.weight", f"{ENC}.experts.0.fc2.bias",
                                       f"{DEC}.experts.0.fc1.weight", f"{DEC}.experts.0.fc1.bias",
                                       f"{DEC}.experts.0.fc2.weight", f"{DEC}.experts.0.fc2.bias"]
    kept = {ENC: [1, 5, 9], DEC: [0, 15]}
    save_single(prune_checkpoint(full, kept), str(tmp_path / "from-single.pt"))
    save_single(prune_checkpoint(sharded, kept), str(tmp_path / "from-shards.pt"))
    assert_same_weights(weights(tmp_path / "from-single.pt"), weights(tmp_path / "from-shards.pt"))
    assert torch.equal(weights(tmp_path / "from-shards.pt")[f"{ENC}.experts.2.fc1.weight"],
                       weights(tmp_path / "model.pt")[f"{ENC}.experts.9.fc1.weight"])
    # sharded -> single -> sharded gives the same files' tensors back
    save_single(prune_checkpoint(sharded, every), str(tmp_path / "single.pt"))
    assert_same_weights(weights(tmp_path / "single.pt"), weights(tmp_path / "model.pt"))
    again = save_sharded(prune_checkpoint(open_checkpoint(str(tmp_path / "single.pt")), every),
                         str(tmp_path / "re-shared.pt"))
    for first, second in zip(paths, again):
        assert_same_weights(weights(first), weights(second))


def test_pruning_twice_gives_byte_identical_files_and_leaves_the_input_alone(recorded):
    tmp_path = recorded[0]
    before = sha256(tmp_path / "model.pt")
    options = PruneOptions(granularity="language", prune_fraction=0.5, ratio="3:1", fp16=True)
    for out in ("a", "b"):
        prune(str(tmp_path / "model.pt"), str(tmp_path / out), options, stats_path=str(tmp_path / "stats.json"))
    for name in ("src-tgt.pt", "experts.json"):
        assert sha256(tmp_path / "a" / name) == sha256(tmp_path / "b" / name)
    with zipfile.ZipFile(tmp_path / "a" / "src-tgt.pt") as archive:
        assert archive.testzip() is None  # every record's CRC matches its bytes
    assert sha256(tmp_path / "model.pt") == before
    state = torch.load(tmp_path / "a" / "src-tgt.pt", weights_only=True)
    assert state["model"][f"{ENC}.gate.wg.weight"].dtype == torch.float16
    assert "last_optimizer_state" not in state
    assert state["cfg"]["model"].encoder_moe_expert_counts == "12"  # 3:1 of 16 kept -> 12 + 4
    assert state["cfg"]["model"].decoder_moe_expert_counts == "4"


def test_uniform_counts_are_written_in_the_plain_nllb_form(recorded):
    tmp_path = recorded[0]
    options = PruneOptions(granularity="pair", keep=16, ratio="1:1")
    prune(str(tmp_path / "model.pt"), str(tmp_path / "out"), options, stats_path=str(tmp_path / "stats.json"))
    config = torch.load(tmp_path / "out" / "src-tgt.pt", weights_only=True)["cfg"]["model"]
    assert config.moe_expert_count == 8
    assert config.encoder_moe_expert_counts is None and config.decoder_moe_expert_counts is None


def test_user_mistakes_are_refused_and_leave_nothing_behind(recorded):
    tmp_path, task, *_ = recorded
    model, stats_path, out = str(tmp_path / "model.pt"), str(tmp_path / "stats.json"), str(tmp_path / "out")
    half = PruneOptions(granularity="pair", prune_fraction=0.5, ratio="1:1")
    with pytest.raises(SelectionError, match=r"in \[0, 1\)"):
        prune(model, out, PruneOptions(prune_fraction=1.5), stats_path=stats_path)
    with pytest.raises(SelectionError, match="eng_Latn-deu_Latn is not in the statistics"):
        prune(model, out, PruneOptions(granularity="pair", prune_fraction=0.5, directions=["eng_Latn-deu_Latn"]),
              stats_path=stats_path)
    with pytest.raises(SelectionError, match="language xx has no statistics as a source"):
        prune(model, out, PruneOptions(prune_fraction=0.5, directions=["xx-tgt"], ratio="1:1"), stats_path=stats_path)

    other = stats.load(stats_path)
    other.fingerprint.gate_sha256 = "0" * 64
    stats.save(other, str(tmp_path / "other.json"))
    with pytest.raises(stats.StatsError, match="another model"):
        prune(model, out, half, stats_path=str(tmp_path / "other.json"))

    cfg, _, dense = build_tiny_model(tmp_path / "dense-data", "--moe-freq", "0")
    save_like_trainer(cfg, dense, tmp_path / "dense.pt")
    with pytest.raises(CheckpointError, match="no MoE layers"):
        prune(str(tmp_path / "dense.pt"), out, half, stats_path=stats_path)
    assert not os.path.exists(out) and not list(tmp_path.glob(".staging-*"))

    prune(model, out, half, stats_path=stats_path)
    with pytest.raises(OutputExistsError, match="exists"):
        prune(model, out, half, stats_path=stats_path)
    manifest = prune(model, out, PruneOptions(granularity="pair", prune_fraction=0.25, ratio="1:1"),
                     stats_path=stats_path, force=True)
    assert manifest["outputs"]["src-tgt"]["pruned_fraction"] == 0.25
    assert [s.num_experts for s in open_checkpoint(out + "/src-tgt.pt").specs] == [12, 12]


def test_missing_and_truncated_shards_are_named(recorded):
    tmp_path = recorded[0]
    full = open_checkpoint(str(tmp_path / "model.pt"))
    every = {spec.prefix: list(range(spec.num_experts)) for spec in full.specs}
    paths = save_sharded(prune_checkpoint(full, every), str(tmp_path / "ck-shared.pt"))
    data = Path(paths[3]).read_bytes()
    Path(paths[3]).write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="ck-rank-2.pt"):
        save_single(prune_checkpoint(open_checkpoint(paths[0]), every), str(tmp_path / "out.pt"))
    assert not (tmp_path / "out.pt").exists() and not list(tmp_path.glob(".tmp-*"))
    os.unlink(paths[5])
    with pytest.raises(CheckpointError, match="missing shard .*ck-rank-4.pt"):
        open_checkpoint(paths[0])


def test_a_gate_of_no_moe_layer_is_a_one_line_error(tmp_path):
    """Surgery slices each MoE layer's gate: a gate weight of a layer the config has no MoE layer for is named."""
    model_path, _ = tiny_checkpoint_with_stats(tmp_path)
    checkpoint = open_checkpoint(str(model_path))
    stray = "encoder.layers.0.moe_layer.gate.wg.weight"
    checkpoint.state["model"][stray] = torch.zeros(4, 8)
    every = {spec.prefix: list(range(spec.num_experts)) for spec in checkpoint.specs}
    with pytest.raises(CheckpointError, match=f"{stray} is the gate of no MoE layer of the model config"):
        prune_checkpoint(checkpoint, every)


def test_the_library_refuses_options_that_do_not_go_together(tmp_path):
    """prune() itself, not only the command line, refuses a threshold with fixed selection (before reading)."""
    model, stats_path, out = str(tmp_path / "model.pt"), str(tmp_path / "stats.json"), str(tmp_path / "out")
    with pytest.raises(SelectionError, match="--threshold goes with --selection threshold"):
        prune(model, out, PruneOptions(keep=4, threshold=0.5), stats_path=stats_path)
    with pytest.raises(SelectionError, match="give a budget"):
        prune(model, out, PruneOptions(), stats_path=stats_path)
    with pytest.raises(SelectionError, match="give --stats, --calibration"):
        prune(model, out, PruneOptions(keep=4))
    with pytest.raises(SelectionError, match="--beam must be at least 1"):
        prune(model, out, PruneOptions(keep=4, beam=0), stats_path=stats_path)
    assert not os.listdir(tmp_path)


def test_statistics_of_a_model_with_the_same_gates_but_other_experts_are_refused(recorded, tmp_path):
    """The fingerprint covers what the metrics and the search depend on: gates and experts alike; the recorder's
    (built model) and the checkpoint's (single file and expert-sharded) agree."""
    model_path, stats_path = str(recorded[0] / "model.pt"), str(recorded[0] / "stats.json")
    checkpoint = open_checkpoint(model_path)
    recorded_fingerprint = stats.load(stats_path).fingerprint
    assert checkpoint_fingerprint(checkpoint) == recorded_fingerprint
    every = {spec.prefix: list(range(spec.num_experts)) for spec in checkpoint.specs}
    save_sharded(prune_checkpoint(checkpoint, every), str(tmp_path / "split-shared.pt"))
    assert checkpoint_fingerprint(open_checkpoint(str(tmp_path / "split-shared.pt"))) == recorded_fingerprint

    state = torch.load(model_path, weights_only=False)
    state["model"][f"{DEC}.experts.3.fc1.weight"] *= 2  # other experts, the same gates
    torch.save(state, tmp_path / "other-experts.pt")
    other = checkpoint_fingerprint(open_checkpoint(str(tmp_path / "other-experts.pt")))
    assert other.gate_sha256 == recorded_fingerprint.gate_sha256 and other.experts_sha256 != recorded_fingerprint.experts_sha256
    with pytest.raises(stats.StatsError, match="another model .MoE layers, gate or expert weights differ"):
        prune(str(tmp_path / "other-experts.pt"), str(tmp_path / "out"), PruneOptions(prune_fraction=0.5, ratio="1:1"),
              stats_path=stats_path)
    assert not (tmp_path / "out").exists()


ENC_LAYER, DEC_LAYER = "encoder.layers.1.moe_layer", "decoder.layers.1.moe_layer"


def two_language_stats():
    """Hand-made statistics of two directions into English over one encoder and one decoder layer of 4
    experts: German sources prefer experts 0 and 1, French ones 2 and 3; pooled, expert 3 is first."""
    from tests.test_ranking import counts

    encoder = {"deu_Latn": [40, 30, 0, 20], "fra_Latn": [0, 0, 40, 35]}
    pairs = {f"{language}-eng_Latn": stats.PairStats(3, {ENC_LAYER: counts(top1, [0.5] * 4, [0.25] * 4),
                                                         DEC_LAYER: counts([10, 20, 30, 40], [0.5] * 4, [0.25] * 4)})
             for language, top1 in encoder.items()}
    specs = [MoELayerSpec("encoder", 1, 4), MoELayerSpec("decoder", 1, 4)]
    return stats.MoEStats(stats.Fingerprint([(s.prefix, 4) for s in specs], "0" * 64, "0" * 64), {}, pairs), specs


def test_shared_experts_are_the_pooled_statistics_best_in_every_languages_set():
    statistics, specs = two_language_stats()
    _, alone = plan(statistics, specs, PruneOptions(metric="activity", keep=4, ratio="1:1"))
    assert alone["deu_Latn"].kept == {ENC_LAYER: [0, 1]} and alone["fra_Latn"].kept == {ENC_LAYER: [2, 3]}
    _, shared = plan(statistics, specs, PruneOptions(metric="activity", keep=4, ratio="1:1", shared=1))
    # pooled, encoder expert 3 leads (55 first choices): German keeps it in place of its second best (1)
    assert shared["deu_Latn"].kept == {ENC_LAYER: [0, 3]} and shared["fra_Latn"].kept == {ENC_LAYER: [2, 3]}
    assert shared["eng_Latn"].kept == alone["eng_Latn"].kept == {DEC_LAYER: [2, 3]}
    with pytest.raises(SelectionError, match="--shared applies to --granularity language"):
        plan(statistics, specs, PruneOptions(metric="activity", keep=4, ratio="1:1", shared=1, granularity="global"))
