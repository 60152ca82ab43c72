"""Calibration samples: the recorded tokens' real MoE inputs, gate softmax and outputs; bounded, seeded, mergeable."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from fairseq_moe_prune import calibration, reconstruction
from fairseq_moe_prune.recording import Recorder
from tests.helpers import build_tiny_model, random_batch, randomize
from tests.test_recording import PAD, REPO, gate_inputs, sample_for

ENC, DEC = "encoder.layers.1.moe_layer", "decoder.layers.1.moe_layer"


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A tiny model and a translation_moe_recording task with --moe-calibration-out: (task, model, generator)."""
    folder = tmp_path_factory.mktemp("calibration")
    torch.manual_seed(0)
    cfg, task, model = build_tiny_model(
        folder / "data", "--moe-calibration-out", str(folder / "out"), "--moe-calibration-tokens", "12", "--beam", "3",
        "--moe-expert-count", "6", "--max-len-b", "7", task="translation_moe_recording",
    )
    model.eval()
    generator = task.build_generator([model], cfg.generation)
    return task, model, generator


def restart(task, model, tokens: int, seed: int) -> None:
    """A fresh recorder and sampler, as a new fairseq-generate run with these options would have."""
    task.recorder = Recorder(model, task.recorder.settings)
    settings = dict(task.recorder.settings, tokens=tokens)
    task.recorder.calibration = calibration.CalibrationSampler(task.recorder.specs, task.recorder.fingerprint,
                                                               settings, seed)


def run_batches(recording, tokens: int, seed: int, batches=(1, 2, 3)):
    task, model, generator = recording
    restart(task, model, tokens, seed)
    for batch in batches:
        task.inference_step(generator, [model], sample_for(*random_batch(num_sentences=4, seed=batch)))
    return task.recorder.calibration.snapshot()


def test_samples_are_real_tokens_of_the_run_with_their_gate_softmax_and_layer_output(recording):
    task, model, generator = recording  # the hook attached the sampler: --moe-calibration-tokens 12
    assert task.recorder.calibration.capacity == 12
    src, lengths, prev = random_batch(num_sentences=4, seed=1)
    task.inference_step(generator, [model], sample_for(src, lengths, prev))
    sample = task.recorder.calibration.snapshot().pairs["src-tgt"]
    assert task.stats_writer is None  # calibration alone: no statistics file

    encoder = sample[ENC]
    assert encoder.seen == int(src.ne(PAD).sum()) > 12 and encoder.size == 12
    assert torch.equal(encoder.keys, encoder.keys.sort().values)
    gates = gate_inputs(model, lambda: model.encoder(src, src_lengths=lengths))
    inputs, logits = gates[ENC]
    real = src.ne(PAD).reshape(-1)
    layer = model.get_submodule(ENC)
    for x, p, z in zip(encoder.inputs, encoder.probs, encoder.outputs):
        matches = [i for i in range(len(inputs)) if real[i] and torch.equal(inputs[i], x)]
        assert len(matches) == 1  # a real (not padding) token of this batch
        torch.testing.assert_close(p, torch.softmax(logits[matches[0]].float(), dim=0))
        with torch.no_grad():
            torch.testing.assert_close(z, layer(x[None, None])[0][0, 0], rtol=1e-5, atol=1e-6)
    # decoder tokens are the counted ones: the statistics would count the same number
    assert sample[DEC].seen == task.recorder.snapshot().pairs["src-tgt"].layers[DEC].tokens > 0


def test_sampling_is_bounded_deterministic_under_seed_and_written_whole(recording, tmp_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        runs[name] = run_batches(recording, 10, seed, batches=(1, 2))
        calibration.save(runs[name], str(tmp_path / f"{name}.safetensors"))
    assert all(s.size == 10 and s.seen > 20 for s in runs["a"].pairs["src-tgt"].values())
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert not torch.equal(runs["a"].pairs["src-tgt"][ENC].inputs, runs["c"].pairs["src-tgt"][ENC].inputs)
    loaded = calibration.load(str(tmp_path / "a.safetensors"))
    assert torch.equal(loaded.pairs["src-tgt"][DEC].outputs, runs["a"].pairs["src-tgt"][DEC].outputs)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_merging_keeps_the_smallest_keys_of_both_runs_and_adds_what_they_saw(recording):
    first = run_batches(recording, 8, 1, batches=(1, 2))
    second = run_batches(recording, 8, 5, batches=(3, 4))
    merged = calibration.merge([first, second])
    for prefix in (ENC, DEC):
        a, b, m = first.pairs["src-tgt"][prefix], second.pairs["src-tgt"][prefix], merged.pairs["src-tgt"][prefix]
        assert m.seen == a.seen + b.seen and m.size == 8
        assert torch.equal(m.keys, torch.cat([a.keys, b.keys]).sort().values[:8])
    other = type(first)(first.fingerprint, dict(first.settings, tokens=9), first.pairs)
    with pytest.raises(calibration.CalibrationError, match="different settings: tokens"):
        calibration.merge([first, other])


def test_hostile_files_are_refused_with_one_line(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(calibration.CalibrationError, match="not a readable calibration file"):
        calibration.load(str(tmp_path / "junk.safetensors"))
    with pytest.raises(calibration.CalibrationError, match="no such calibration file"):
        calibration.load(str(tmp_path / "missing.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(calibration.CalibrationError, match="no calibration files"):
        calibration.load(str(tmp_path / "empty"))


# A run with --moe-calibration-out alone, stopped by SIGTERM after one batch (as Slurm stops a job at its limit).
CALIBRATION_THEN_SIGTERM = """
import os, signal, sys
from pathlib import Path
import torch
from tests.helpers import build_tiny_model, random_batch
from tests.test_recording import sample_for
folder = Path(sys.argv[1])
torch.manual_seed(0)
cfg, task, model = build_tiny_model(folder / "data", "--moe-calibration-out", str(folder / "out"), "--beam", "3",
                                    "--moe-expert-count", "6", "--max-len-b", "7", task="translation_moe_recording")
model.eval()
generator = task.build_generator([model], cfg.generation)
task.inference_step(generator, [model], sample_for(*random_batch()))
os.kill(os.getpid(), signal.SIGTERM)
"""


@pytest.mark.slow
def test_sigterm_keeps_the_finished_batches_samples_without_a_statistics_file(tmp_path):
    result = subprocess.run([sys.executable, "-c", CALIBRATION_THEN_SIGTERM, str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    (written,) = (tmp_path / "out").glob("src-tgt.seed-*.safetensors")  # one file per run
    samples = calibration.load(str(written)).pairs["src-tgt"]
    assert samples[DEC].seen > 0 and samples[DEC].size > 0 and samples[ENC].size > 0


def test_outputs_are_the_no_drop_argmax_output_the_search_assumes_whatever_the_live_routing(tmp_path):
    """With NLLB's defaults (second expert sampled, eval capacity 0.25) the live output holds routing the pruned
    layer never does; the sample keeps the layer's output under argmax top-2 without capacity dropping, so that
    the full expert set reconstructs it (loss 0 at S = all experts)."""
    torch.manual_seed(0)
    cfg, task, model = build_tiny_model(
        tmp_path / "data", "--moe-calibration-out", str(tmp_path / "out"), "--moe-calibration-tokens", "16",
        "--moe-second-expert-policy", "sampling", "--moe-eval-capacity-token-fraction", "0.25", "--moe-eom", "0.1",
        "--beam", "2", "--max-len-b", "5", task="translation_moe_recording",
    )
    randomize(model, seed=3)
    model.eval()
    generator = task.build_generator([model], cfg.generation)
    task.inference_step(generator, [model], sample_for(*random_batch(num_sentences=4, seed=2)))
    snapshot = task.recorder.calibration.snapshot()
    assert snapshot.settings["outputs"] == calibration.TARGET_OUTPUTS
    for prefix, sample in snapshot.pairs["src-tgt"].items():
        layer = model.get_submodule(prefix)
        experts = [dict(expert.named_parameters()) for expert in layer.experts]
        assumed = reconstruction.reconstruct(sample.inputs, sample.probs, experts, range(len(experts)),
                                             reconstruction.activation(cfg.model.activation_fn), layer.eom)
        assert sample.size > 0
        torch.testing.assert_close(sample.outputs.double(), assumed, rtol=1e-5, atol=1e-5)
    task.close_recording()
