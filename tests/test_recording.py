"""Recording through the task's generation hook equals a brute-force recount from plain forwards."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fairseq_moe_prune import stats
from fairseq_moe_prune.stats import PROB_SCALE
from tests.helpers import build_tiny_model, random_batch

PAD, EOS = 1, 2
REPO = Path(__file__).resolve().parent.parent


def recording_task(tmp_path: Path, *extra: str):
    torch.manual_seed(0)
    cfg, task, model = build_tiny_model(
        tmp_path / "data", "--moe-stats-out", str(tmp_path / "stats.json"), "--beam", "3",
        "--moe-expert-count", "6", "--max-len-b", "7", *extra, task="translation_moe_recording",
    )
    model.eval()
    with torch.no_grad():  # make EOS likely enough that hypotheses end at different lengths
        model.decoder.output_projection.weight[EOS] *= 3
    generator = task.build_generator([model], cfg.generation)
    return task, model, generator


def sample_for(src, lengths, prev):
    return {"id": torch.arange(len(src)), "nsentences": len(src),
            "net_input": {"src_tokens": src, "src_lengths": lengths, "prev_output_tokens": prev}}


def gate_inputs(model, run):
    """Run ``run()`` and return, per MoE layer prefix, the gate's (inputs, logits)."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if name.endswith("moe_layer.gate.wg"):
            prefix = name[: -len(".gate.wg")]
            hooks.append(module.register_forward_hook(
                lambda m, inputs, out, p=prefix: seen.setdefault(p, []).append((inputs[0], out))))
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return {prefix: tuple(torch.cat(part) for part in zip(*calls)) for prefix, calls in seen.items()}


def brute_force_counts(layer, inputs: torch.Tensor, logits: torch.Tensor, padding: torch.Tensor):
    """Count like methods.md says, one token at a time, over real tokens only."""
    probs = torch.softmax(logits.float(), dim=1).numpy()
    num_experts = probs.shape[1]
    counts = {name: np.zeros(num_experts, dtype=np.int64) for name in stats.COUNT_FIELDS}
    reap = np.zeros(num_experts)
    tokens = 0
    for x, p, is_pad in zip(inputs, probs, padding.tolist()):
        if is_pad:
            continue
        tokens += 1
        order = sorted(range(num_experts), key=lambda e: (-p[e], e))
        weights = np.array([p[order[0]], p[order[1]]]) / (p[order[0]] + p[order[1]])
        for expert, weight in zip(order[:2], weights):
            counts["routed"][expert] += 1
            with torch.no_grad():
                reap[expert] += weight * float(layer.experts[expert](x).norm())
        fixed = np.round(p.astype(np.float64) * PROB_SCALE).astype(np.int64)
        counts["top1"][order[0]] += 1
        counts["top2"][order[0]] += 1
        counts["top2"][order[1]] += 1
        counts["prob_sum"] += fixed
        counts["prob_first_sum"][order[0]] += fixed[order[0]]
        counts["prob_second_sum"][order[1]] += fixed[order[1]]
        for rank, expert in enumerate(order):
            counts["rank_sum"][expert] += rank
    return tokens, counts, reap


def assert_layer_equal(recorded: stats.LayerCounts, expected):
    tokens, counts, reap = expected
    assert recorded.tokens == tokens
    for name in stats.COUNT_FIELDS:
        if name != "reap_sum":
            np.testing.assert_array_equal(getattr(recorded, name), counts[name], err_msg=name)
    # expert outputs of a batch and of one token differ in the last float bits
    np.testing.assert_allclose(recorded.reap_sum / stats.REAP_SCALE, reap, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("decoder_tokens", ["hypothesis", "reference"])
def test_recorded_counts_equal_a_brute_force_recount(tmp_path, decoder_tokens):
    task, model, generator = recording_task(tmp_path, "--moe-stats-decoder", decoder_tokens)
    src, lengths, prev = random_batch(num_sentences=5, seed=7)  # left-padded sources of 3..8 tokens
    hypos = task.inference_step(generator, [model], sample_for(src, lengths, prev))
    recorded = task.recorder.snapshot().pairs["src-tgt"]
    assert recorded.sentences == 5

    if decoder_tokens == "hypothesis":
        best = [h[0]["tokens"] for h in hypos]
        assert len({len(t) for t in best}) > 1  # hypotheses of different lengths: the pass pads
        prev = torch.full((5, max(len(t) for t in best)), PAD)
        for i, tokens in enumerate(best):
            prev[i, 0] = EOS
            prev[i, 1: len(tokens)] = tokens[:-1]
    else:
        prev[2, 4:] = PAD
        task.recorder.committed.clear(), task.recorder.sentences.clear()
        task.inference_step(generator, [model], sample_for(src, lengths, prev))
        recorded = task.recorder.snapshot().pairs["src-tgt"]

    def plain_forward():
        encoder_out = model.encoder(src, src_lengths=lengths)
        model.decoder(prev, encoder_out=encoder_out, features_only=True)

    gates = gate_inputs(model, plain_forward)
    for side, tokens in (("encoder", src), ("decoder", prev)):
        prefix = f"{side}.layers.1.moe_layer"
        layer = model.get_submodule(prefix)
        assert_layer_equal(recorded.layers[prefix], brute_force_counts(layer, *gates[prefix], tokens.eq(PAD).reshape(-1)))
    assert recorded.layers["encoder.layers.1.moe_layer"].tokens == int(src.ne(PAD).sum())


def test_models_with_uneven_layers_are_recorded(tmp_path):
    task, model, generator = recording_task(tmp_path, "--encoder-moe-expert-counts", "5", "--decoder-moe-expert-counts", "3")
    task.inference_step(generator, [model], sample_for(*random_batch()))
    layers = task.recorder.snapshot().pairs["src-tgt"].layers
    assert [layers[p].num_experts for p in ("encoder.layers.1.moe_layer", "decoder.layers.1.moe_layer")] == [5, 3]
    assert layers["decoder.layers.1.moe_layer"].top1.sum() == layers["decoder.layers.1.moe_layer"].tokens > 0


def test_merging_two_halves_gives_the_bytes_of_one_run(tmp_path):
    batches = [random_batch(num_sentences=3, seed=seed) for seed in (1, 2, 3, 4)]
    paths = []
    for name, chosen in (("all", batches), ("first", batches[:2]), ("second", batches[2:])):
        task, model, generator = recording_task(tmp_path / name)
        for src, lengths, prev in chosen:
            task.inference_step(generator, [model], sample_for(src, lengths, prev))
        stats.save(task.recorder.snapshot(), str(tmp_path / f"{name}.json"))
        paths.append(tmp_path / f"{name}.json")
    merged = stats.merge([stats.load(str(paths[1])), stats.load(str(paths[2]))])
    stats.save(merged, str(tmp_path / "merged.json"))
    assert (tmp_path / "merged.json").read_bytes() == paths[0].read_bytes()
    assert merged.pairs["src-tgt"].sentences == 12


def test_merge_refuses_statistics_of_another_model(tmp_path):
    task, model, generator = recording_task(tmp_path / "a")
    task.inference_step(generator, [model], sample_for(*random_batch()))
    first = task.recorder.snapshot()
    with torch.no_grad():
        model.encoder.layers[1].moe_layer.gate.wg.weight.add_(0.01)
    other = type(task.recorder)(model, first.settings).snapshot()
    with pytest.raises(stats.StatsError, match="different models"):
        stats.merge([first, other])


def test_per_language_view_takes_encoder_from_source_and_decoder_from_target(tmp_path):
    task, model, generator = recording_task(tmp_path)
    task.inference_step(generator, [model], sample_for(*random_batch()))
    one = task.recorder.snapshot().pairs["src-tgt"]
    combined = stats.MoEStats(task.recorder.fingerprint, {}, {"aa-bb": one, "bb-aa": one, "aa-cc": one})
    view = stats.by_language(combined)
    enc, dec = "encoder.layers.1.moe_layer", "decoder.layers.1.moe_layer"
    assert view["aa"][enc].tokens == 2 * one.layers[enc].tokens and view["aa"][dec].tokens == one.layers[dec].tokens
    assert view["cc"][dec].tokens == one.layers[dec].tokens and enc not in view["cc"]


def test_the_encoder_runs_once_per_batch_and_the_model_is_left_as_it_was(tmp_path):
    task, model, generator = recording_task(tmp_path)
    calls = []
    original = model.encoder.forward

    def counting_forward(*args, **kwargs):  # an instance override the hook must neither remove nor bypass
        calls.append(1)
        return original(*args, **kwargs)

    model.encoder.forward = counting_forward
    task.inference_step(generator, [model], sample_for(*random_batch()))
    assert calls == [1]  # the decoder pass reuses the generator's encoder output
    assert model.encoder.forward is counting_forward
    assert task.recorder.snapshot().pairs["src-tgt"].layers["decoder.layers.1.moe_layer"].tokens > 0


def test_a_new_generator_takes_back_the_exit_and_sigterm_handlers_of_the_last(tmp_path):
    import signal

    from fairseq_moe_prune.tasks.recording_hook import exit_on_sigterm

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        task, model, generator = recording_task(tmp_path)
        first = task.stats_writer
        assert signal.getsignal(signal.SIGTERM) is exit_on_sigterm
        task.build_generator([model], argparse.Namespace(beam=3))
        assert task.stats_writer is not first and signal.getsignal(signal.SIGTERM) is exit_on_sigterm
        task.close_recording()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


# A task that builds a second generator: at exit only the second recording's writer writes the file
# (the first one's atexit handler, run last, used to overwrite it with the first recording's counts).
SECOND_GENERATOR = """
import argparse, sys
from pathlib import Path
from tests.test_recording import random_batch, recording_task, sample_for
task, model, generator = recording_task(Path(sys.argv[1]))
task.inference_step(generator, [model], sample_for(*random_batch()))
task.build_generator([model], argparse.Namespace(beam=3))
"""


@pytest.mark.slow
def test_only_the_last_generators_recording_is_written_at_exit(tmp_path):
    subprocess.run([sys.executable, "-c", SECOND_GENERATOR, str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert stats.load(str(tmp_path / "stats.json")).pairs == {}


def test_the_decoder_pass_stops_at_the_last_moe_layer_and_counts_as_a_full_forward(tmp_path):
    task, model, generator = recording_task(tmp_path, "--decoder-layers", "3")  # MoE in layer 1 of 0..2
    src, lengths, prev = random_batch(num_sentences=5, seed=7)
    steps = []  # the time length of each input to decoder layer 2 (time, batch, dim): 1 per generation step
    handle = model.decoder.layers[2].register_forward_hook(lambda module, inputs, output: steps.append(inputs[0].shape[0]))
    hypos = task.inference_step(generator, [model], sample_for(src, lengths, prev))
    handle.remove()
    assert steps and set(steps) == {1}  # the teacher-forced pass never reached layer 2
    recorded = task.recorder.snapshot().pairs["src-tgt"]
    best = [h[0]["tokens"] for h in hypos]
    prev = torch.full((5, max(len(t) for t in best)), PAD)
    for i, tokens in enumerate(best):
        prev[i, 0] = EOS
        prev[i, 1: len(tokens)] = tokens[:-1]

    def plain_forward():
        model.decoder(prev, encoder_out=model.encoder(src, src_lengths=lengths), features_only=True)

    gates = gate_inputs(model, plain_forward)
    prefix = "decoder.layers.1.moe_layer"
    assert_layer_equal(recorded.layers[prefix],
                       brute_force_counts(model.get_submodule(prefix), *gates[prefix], prev.eq(PAD).reshape(-1)))


@pytest.mark.parametrize("task_name", ["translation_moe_recording", "translation_multi_simple_epoch_moe"])
def test_the_decoder_pass_reuses_the_generators_encoder_output(tmp_path, task_name):
    """One encoder forward per batch: the pass takes what the generator computed (fairseq's
    translation_multi_simple_epoch drops the generator class it is given, so the task swaps the ensemble in)."""
    extra = ["--langs", "src,tgt", "--lang-pairs", "src-tgt"] if task_name.startswith("translation_multi") else []
    torch.manual_seed(0)
    cfg, task, model = build_tiny_model(tmp_path / "data", "--moe-stats-out", str(tmp_path / "stats.json"),
                                        "--beam", "3", "--max-len-b", "7", *extra, task=task_name)
    model.eval()
    generator = task.build_generator([model], cfg.generation)
    calls = []
    # the generator calls the encoder's forward_torchscript, not the module: count its first layer's calls
    handle = model.encoder.layers[0].register_forward_hook(lambda module, inputs, output: calls.append(1))
    task.inference_step(generator, [model], sample_for(*random_batch()))
    handle.remove()
    assert len(calls) == 1
    assert task.recorder.snapshot().pairs["src-tgt"].layers["decoder.layers.1.moe_layer"].tokens > 0
