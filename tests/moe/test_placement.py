"""Offloaded experts and experts placed over devices compute exactly what resident experts compute.

In CI "host" and "device" are both the CPU: the offloaded layer still copies each routed expert into
its device cache and runs the copy; placement over ``cpu:0,cpu:1`` sends tokens through the same
to-device-and-back path as over two GPUs.
"""

import re
import weakref

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_moe_prune.checkpoints import placed
from fairseq_moe_prune.checkpoints.layouts import open_checkpoint
from fairseq_moe_prune.checkpoints.safe_load import CheckpointError
from fairseq_moe_prune.checkpoints.surgery import prune_checkpoint, save_sharded, save_single
from fairseq_moe_prune.moe.placement import (
    LOOKAHEAD,
    HostExperts,
    PlacedExperts,
    PlacementError,
    split_evenly,
    tensor_bytes,
)
from tests.conftest import multilingual_args, run_cli
from tests.helpers import build_tiny_model, logits, random_batch, randomize, save_like_trainer

UNEVEN = ("--encoder-moe-expert-counts", "5", "--decoder-moe-expert-counts", "3")
OFFLOAD = ("--moe-expert-offload", "--moe-offload-cache-experts", "2")
DEVICES = ("--moe-expert-devices", "cpu:0,cpu:1")


def routed(model):
    """Every (layer, token, expert, weight) decision of the next forward, in order."""
    seen = []
    for layer in model.moe_layers():
        layer.observer = lambda record: seen.append(
            (record.dispatch.token_ids.tolist(), record.dispatch.experts.tolist(), record.dispatch.weights.tolist()))
    return seen


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    cfg, task, model = build_tiny_model(data, *UNEVEN)
    randomize(model, seed=3)
    return data, cfg, task, model.eval()


@pytest.mark.parametrize("flags", [OFFLOAD, DEVICES], ids=["offload", "two-cpu-devices"])
def test_logits_routing_and_beam_search_are_bit_identical(plain, flags):
    data, cfg, task, model = plain
    _, _, other = build_tiny_model(data, *UNEVEN, *flags)
    experts = other.encoder.layers[1].moe_layer.experts
    assert isinstance(experts, HostExperts if flags is OFFLOAD else PlacedExperts)
    other.load_state_dict(model.state_dict())
    other.eval()
    batch = random_batch(num_sentences=6, seed=1)  # left-padded sources of different lengths
    seen_plain, seen_other = routed(model), routed(other)
    assert torch.equal(logits(model, batch), logits(other, batch))
    assert seen_plain == seen_other and seen_plain

    assert_same_beam_search(cfg, task, model, other, batch)


def assert_same_beam_search(cfg, task, model, other, batch) -> None:
    """Beam 4 gives the same hypotheses and positional scores, bit for bit, with both models."""
    cfg.generation.beam, cfg.generation.max_len_a, cfg.generation.max_len_b = 4, 0, 8  # a random model rambles
    generator = task.build_generator([model], cfg.generation)
    sample = {"net_input": {"src_tokens": batch[0], "src_lengths": batch[1]}, "id": torch.arange(len(batch[0]))}
    with torch.no_grad():
        hyps_plain = task.inference_step(generator, [model], sample)
        hyps_other = task.inference_step(generator, [other], sample)
    for a, b in zip(hyps_plain, hyps_other):
        assert len(a) == 4
        for x, y in zip(a, b):
            assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["positional_scores"], y["positional_scores"])


def test_offload_copies_only_routed_experts_into_a_bounded_cache(plain):
    data, _, _, model = plain
    _, _, other = build_tiny_model(data, *UNEVEN, "--moe-expert-offload", "--moe-offload-cache-experts", "2")
    other.load_state_dict(model.state_dict())
    # the host copies are the checkpoint's tensors themselves: loading made no copy
    state = model.state_dict()
    host = other.encoder.layers[1].moe_layer.experts[0].fc1.weight
    assert host.data_ptr() == state["encoder.layers.1.moe_layer.experts.0.fc1.weight"].data_ptr()
    logits(other, random_batch(num_sentences=6, seed=1))
    for layer in other.moe_layers():
        stats = layer.placement.stats
        assert 0 < stats.copies and stats.largest <= 2
        assert set(layer.placement.cache) <= set(range(layer.num_experts))
    # fp16 is applied when an expert is copied: the same rounding as converting resident experts
    half_plain, half_other = model.half(), other.half()
    batch = random_batch(num_sentences=6, seed=2)
    try:
        assert other.encoder.layers[1].moe_layer.experts[0].fc1.weight.dtype == torch.float16  # narrowed on the host
        assert torch.equal(logits(half_plain, batch), logits(half_other, batch))
    finally:
        model.float()


class StandInPin:
    """Page-locking as the tests can run it without a GPU: a copy, whose bytes are counted while alive."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self.calls = 0

    def __call__(self, tensor):
        copy = tensor.clone()
        size = copy.numel() * copy.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        self.calls += 1
        weakref.finalize(copy, self.released, size)
        return copy

    def released(self, size):
        self.live -= size


def resident_and_offloaded(folder, seed, cache=2):
    """A fresh random model and an offloaded one loaded from it (the module's ``plain`` model has been cast)."""
    cfg, task, model = build_tiny_model(folder, *UNEVEN)
    randomize(model, seed=seed)
    _, _, other = build_tiny_model(folder, *UNEVEN, "--moe-expert-offload", "--moe-offload-cache-experts", str(cache))
    other.load_state_dict(model.state_dict())
    return cfg, task, model.eval(), other.eval()


def test_offload_page_locks_only_a_staging_ring_and_generation_stays_bit_identical(tmp_path):
    cfg, task, model, other = resident_and_offloaded(tmp_path, seed=3)
    pin = StandInPin()
    for layer in other.moe_layers():
        layer.placement.pin = pin  # one counter over the whole model
    batch = random_batch(num_sentences=6, seed=1)
    assert torch.equal(logits(model, batch), logits(other, batch))
    assert_same_beam_search(cfg, task, model, other, batch)

    # every copy went through the ring, and never more than the expert computing and the one copied ahead
    # were page-locked at once over the whole model (the host experts themselves never are)
    expert = max(tensor_bytes(dict(e.named_parameters())) for layer in other.moe_layers() for e in layer.experts)
    cache = cfg.model.moe_offload_cache_experts
    copies = sum(layer.placement.stats.copies for layer in other.moe_layers())
    assert copies > 0 and pin.calls == 4 * copies  # fc1/fc2 weight and bias of each copied expert
    assert expert < pin.peak <= (LOOKAHEAD + 1) * expert <= (cache + LOOKAHEAD) * expert
    assert pin.live == 0  # each layer drains its ring when its forward ends
    assert all(layer.placement.staging.peak_bytes <= (LOOKAHEAD + 1) * expert for layer in other.moe_layers())


def test_load_state_dict_after_a_forward_replaces_the_cached_copies(tmp_path):
    _, _, model, other = resident_and_offloaded(tmp_path, seed=3, cache=5)  # every expert stays cached
    batch = random_batch(num_sentences=6, seed=1)
    assert torch.equal(logits(model, batch), logits(other, batch))
    assert all(len(layer.placement.cache) >= 2 for layer in other.moe_layers())
    _, _, changed = build_tiny_model(tmp_path, *UNEVEN)
    randomize(changed, seed=11)
    other.load_state_dict(changed.state_dict())
    expected = logits(changed, batch)
    assert not torch.equal(expected, logits(model, batch))
    assert torch.equal(logits(other, batch), expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_copy_stream_follows_the_model_to_another_gpu(tmp_path):
    _, _, model, other = resident_and_offloaded(tmp_path, seed=3)
    batch = random_batch(num_sentences=6, seed=1)
    expected = logits(model, batch)
    for device in ("cuda:0", "cuda:1"):
        other.to(device)
        got = logits(other, [t.to(device) for t in batch])
        assert torch.allclose(got.cpu(), expected, atol=1e-5)  # GPU kernels round differently from the CPU's
        for layer in other.moe_layers():
            assert layer.placement.copy_stream.device == torch.device(device)
            assert layer.placement.staging.held_bytes == 0
        assert not any(p.is_pinned() for layer in other.moe_layers() for p in layer.experts.parameters())


def test_experts_split_evenly_over_devices():
    cpu = [torch.device("cpu", i) for i in range(3)]
    assert split_evenly(5, tuple(cpu[:2])) == [cpu[0]] * 3 + [cpu[1]] * 2
    assert split_evenly(3, tuple(cpu)) == cpu


@pytest.mark.parametrize("flags, message", [
    (("--moe-expert-offload", "--moe-offload-cache-experts", "1"), "must be at least 2"),
    (("--moe-expert-devices", "cpu,cuda:7"), "device cuda:7 does not exist"),
    (("--moe-expert-devices", "cpu:0,cpu:1,cpu:2,cpu:3"), "decoder.layers.1.moe_layer has 3 experts, fewer than the 4"),
    (("--moe-expert-devices", "gpu0"), "is not a device name"),
    (("--moe-expert-offload", "--moe-expert-devices", "cpu"), "cannot be combined"),
])
def test_unusable_placements_are_refused_with_one_line(tmp_path, flags, message):
    with pytest.raises(PlacementError, match=re.escape(message)) as error:
        build_tiny_model(tmp_path, *UNEVEN, *flags)
    assert "\n" not in str(error.value)


def test_sharded_release_loads_memory_mapped_into_offloaded_experts(plain, tmp_path):
    data = plain[0]
    cfg, _, uniform = build_tiny_model(data)  # the sharded layout needs equal counts: 4 and 4
    randomize(uniform, seed=4)
    save_like_trainer(cfg, uniform, tmp_path / "full.pt")
    checkpoint = open_checkpoint(str(tmp_path / "full.pt"))
    kept = {spec.prefix: list(range(spec.num_experts)) for spec in checkpoint.specs}
    save_sharded(prune_checkpoint(checkpoint, kept), str(tmp_path / "x-shared.pt"))

    # fairseq's own loader, as fairseq-generate calls it, given the release's shared file
    [offloaded], _ = checkpoint_utils.load_model_ensemble([str(tmp_path / "x-shared.pt")],
                                                          arg_overrides={"moe_expert_offload": True})
    assert isinstance(offloaded.decoder.layers[1].moe_layer.experts, HostExperts)
    batch = random_batch(num_sentences=4, seed=5)
    assert torch.equal(logits(uniform, batch), logits(offloaded, batch))
    state = placed.load_checkpoint_to_cpu(str(tmp_path / "x-shared.pt"), {"moe_expert_offload": True})

    # a config that counts other experts than the files hold is refused in one line
    with pytest.raises(CheckpointError, match="3 experts in the config but 4 gate rows"):
        placed.load_checkpoint_to_cpu(str(tmp_path / "x-shared.pt"), {"moe_expert_offload": True,
                                                                     "encoder_moe_expert_counts": "3"})
    model_state = dict(state["model"])
    del model_state["decoder.layers.1.moe_layer.experts.2.fc2.bias"]
    with pytest.raises(CheckpointError, match="missing decoder.layers.1.moe_layer.experts.2.fc2.bias"):
        placed.check_experts("x", model_state, checkpoint.specs)


# ---- stock fairseq-generate -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned(trained, tmp_path_factory):
    """The trained model pruned to 3 encoder and 2 decoder experts (per-layer counts in its config)."""
    checkpoint = open_checkpoint(str(trained))
    kept = {"encoder.layers.1.moe_layer": [0, 2, 3], "decoder.layers.1.moe_layer": [1, 3]}
    path = tmp_path_factory.mktemp("pruned") / "pruned.pt"
    save_single(prune_checkpoint(checkpoint, kept), str(path))
    return path


def generate(corpus, checkpoint, stats_path, overrides=None, check=True):
    command = ["fairseq-generate", *multilingual_args(corpus, "translation_multi_simple_epoch_moe"),
               "--path", str(checkpoint), "--source-lang", "eng_Latn", "--target-lang", "deu_Latn",
               "--gen-subset", "test", "--beam", "4", "--max-len-b", "30", "--batch-size", "7",
               "--required-batch-size-multiple", "1", "--moe-stats-out", str(stats_path)]
    if overrides:
        command += ["--model-overrides", overrides]
    return run_cli(command, check=check)


def hypotheses(result):
    return [line for line in result.stdout.splitlines() if re.match(r"^[HPD]-\d+\t", line)]


# README: "The full model on one GPU: experts offloaded" block (fairseq-generate --model-overrides moe_expert_offload)
@pytest.mark.slow
def test_fairseq_generate_offloaded_and_placed_equal_the_plain_model(corpus, pruned, tmp_path):
    plain = generate(corpus, pruned, tmp_path / "plain.json")
    offload = generate(corpus, pruned, tmp_path / "offload.json",
                       "{'moe_expert_offload': True, 'moe_offload_cache_experts': 2}")
    devices = generate(corpus, pruned, tmp_path / "devices.json", "{'moe_expert_devices': 'cpu:0,cpu:1'}")
    assert len(hypotheses(plain)) == 3 * 30
    assert hypotheses(offload) == hypotheses(plain) and hypotheses(devices) == hypotheses(plain)
    expected = (tmp_path / "plain.json").read_bytes()
    assert (tmp_path / "offload.json").read_bytes() == expected
    assert (tmp_path / "devices.json").read_bytes() == expected


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    ("{'moe_expert_offload': True, 'moe_offload_cache_experts': 1}", "moe_offload_cache_experts must be at least 2"),
    ("{'moe_expert_devices': 'cuda:0,cuda:1'}", "moe_expert_devices: device cuda:0 does not exist"),
    ("{'moe_expert_offload': True, 'encoder_moe_expert_counts': '4'}",
     "encoder.layers.1.moe_layer has 4 experts in the config but 3 gate rows"),
])
def test_fairseq_generate_refuses_in_one_line(corpus, pruned, tmp_path, overrides, message):
    if "cuda" in overrides and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the devices")
    result = generate(corpus, pruned, tmp_path / "s.json", overrides, check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "Traceback" not in result.stderr
