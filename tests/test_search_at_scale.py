"""At NLLB's size: a pooled calibration view is bounded by a weighted reservoir, and the search's expert
evaluation takes a device (on the CPU, unchanged bit for bit)."""

import json
import re

import pytest
import torch

from fairseq_moe_prune import calibration, cli, reconstruction
from fairseq_moe_prune.calibration import CalibrationError, LayerSample
from fairseq_moe_prune.fingerprint import weights_fingerprint
from fairseq_moe_prune.layout import moe_layers
from fairseq_moe_prune.moe.layer import GateOptions, MoELayer
from fairseq_moe_prune.pruning import PruneOptions, prune
from fairseq_moe_prune.ranking import SelectionError

ALL = GateOptions(second_expert_policy="all", eval_capacity_token_fraction=1.0, use_fp32=True)
RELU = reconstruction.ACTIVATIONS["relu"]
PREFIX = "encoder.layers.3.moe_layer"


def random_sample(tokens: int, seen: int, seed: int, dim: int = 4, experts: int = 3) -> LayerSample:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.rand(tokens, generator=generator, dtype=torch.float64).sort().values
    probs = torch.softmax(torch.randn(tokens, experts, generator=generator), dim=1)
    return LayerSample(torch.randn(tokens, dim, generator=generator), probs,
                       torch.randn(tokens, dim, generator=generator), keys, seen)


def many_pairs(count: int, tokens: int, heavy_every: int = 2):
    """``count`` pairs of ``tokens`` samples; every ``heavy_every``-th saw 50 times as many tokens as it kept."""
    return {f"l{i:03d}_Latn-deu_Latn": {PREFIX: random_sample(tokens, tokens * (50 if i % heavy_every == 0 else 1), i)}
            for i in range(count)}


def test_a_view_over_its_bound_is_a_deterministic_weighted_reservoir_that_keeps_the_total_weight():
    pairs = many_pairs(20, 30)
    samples = [layers[PREFIX] for _, layers in sorted(pairs.items())]
    seen = sum(sample.seen for sample in samples)

    # within the bound nothing changes: every token, in order, weighing seen / kept
    whole = calibration.pool(samples, limit=600)
    assert whole.size == 600 and torch.equal(whole.inputs, torch.cat([s.inputs for s in samples]))
    assert float(whole.weights.sum()) == pytest.approx(seen, rel=1e-12)

    bounded = calibration.pool(samples, limit=100)
    assert bounded.size == 100 and bounded.inputs.shape == (100, 4) and bounded.probs.shape == (100, 3)
    assert float(bounded.weights.sum()) == pytest.approx(seen, rel=1e-12)
    again = calibration.pool(samples, limit=100)
    for name in ("inputs", "probs", "outputs", "weights"):
        assert getattr(again, name).numpy().tobytes() == getattr(bounded, name).numpy().tobytes()

    # kept rows are whole tokens of the view (input, softmax and output of the same token), in the view's order
    rows = [int(torch.nonzero((whole.inputs == row).all(dim=1)).squeeze()) for row in bounded.inputs]
    assert rows == sorted(rows) and len(set(rows)) == 100
    assert torch.equal(whole.probs[rows], bounded.probs) and torch.equal(whole.outputs[rows], bounded.outputs)

    # weighted: heavy pairs stand for 50 times the tokens, so they take most places and the weights estimate
    # each group's share of the view
    heavy = torch.tensor([row // 30 % 2 == 0 for row in rows])
    assert int(heavy.sum()) > 80
    true_share = float(whole.weights[::30].reshape(-1, 2)[:, 0].sum() * 30) / seen
    assert float(bounded.weights[heavy].sum()) / seen == pytest.approx(true_share, abs=0.05)

    # view() applies the bound; the default is the stated constant
    data = calibration.Calibration(None, {"tokens": 30}, pairs)
    pooled, _ = calibration.view(data, "global", "global", PREFIX, 100)
    assert torch.equal(pooled.weights, bounded.weights)
    assert calibration.view(data, "global", "global", PREFIX)[0].size == min(600, calibration.POOL_TOKENS)
    with pytest.raises(CalibrationError, match="at least 1"):
        calibration.pool(samples, limit=0)


def random_layer(num_experts: int, dim: int = 8, ffn: int = 16, seed: int = 0) -> MoELayer:
    generator = torch.Generator().manual_seed(seed)
    layer = MoELayer(dim, ffn, num_experts, ALL, eom=0.2).eval()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return layer


def test_search_device_cpu_gives_the_same_problem_bit_for_bit_and_unusable_devices_are_refused():
    layer = random_layer(6)
    x = torch.randn(70, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs, z = layer.gate(x, None).probs, layer(x[None])[0][0]
    experts = [{name: tensor.detach() for name, tensor in expert.state_dict().items()} for expert in layer.experts]
    plain = reconstruction.layer_problem(x, probs, z, torch.ones(70), experts, RELU, 0.2)
    on_cpu = reconstruction.layer_problem(x, probs, z, torch.ones(70), experts, RELU, 0.2,
                                          reconstruction.search_device("cpu"))
    for name in ("order", "rank", "probs", "zz", "zy", "gram", "weights"):
        assert getattr(plain, name).numpy().tobytes() == getattr(on_cpu, name).numpy().tobytes()
    # and the inner products are those of the experts' outputs, computed independently here
    y = torch.stack([expert(x) for expert in layer.experts], dim=1).double() * 0.8
    assert torch.allclose(on_cpu.gram, y @ y.transpose(1, 2), rtol=1e-5, atol=1e-8)
    for name, message in [("meta", "only cpu and cuda"), ("no such", "is not a device name")]:
        with pytest.raises(SelectionError, match=message):
            reconstruction.search_device(name)
    if torch.cuda.device_count() < 8:
        with pytest.raises(SelectionError, match=re.escape("cuda:7 does not exist")):
            reconstruction.search_device("cuda:7")


def write_toy(folder, experts: int = 6, dim: int = 8, ffn: int = 16, tokens: int = 40, directions: int = 6):
    """A random checkpoint with NLLB's layout (12 MoE layers) and calibration samples of ``directions`` pairs."""
    config = {"_name": "moe_transformer", "arch": "moe_transformer", "encoder_layers": 24, "decoder_layers": 24,
              "moe_freq": 4, "moe_expert_count": experts, "activation_fn": "relu", "moe_eom": 0.2,
              "moe_gating_use_fp32": True, "moe_second_expert_policy": "all", "moe_eval_capacity_token_fraction": 1.0}
    specs = moe_layers(config)
    weights, gates, experts_of, pairs = {}, [], [], {f"l{i:02d}_Latn-eng_Latn": {} for i in range(directions)}
    for index, spec in enumerate(specs):
        layer = random_layer(experts, dim, ffn, seed=index)
        for name, tensor in layer.state_dict().items():
            weights[f"{spec.prefix}.{name}"] = tensor.clone()
        gates.append(layer.gate.wg.weight.detach())
        experts_of.extend((spec.prefix, e, dict(expert.named_parameters())) for e, expert in enumerate(layer.experts))
        for number, pair in enumerate(pairs):
            x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(100 * index + number))
            keys = torch.rand(tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(number)).sort().values
            with torch.no_grad():
                pairs[pair][spec.prefix] = LayerSample(x, layer.gate(x, None).probs, layer(x[None])[0][0], keys,
                                                       tokens * (1 + number))
    torch.save({"cfg": {"model": config}, "args": None, "model": weights, "optimizer_history": [], "extra_state": {},
                "last_optimizer_state": None}, folder / "model.pt")
    settings = {"beam": 1, "decoder_tokens": "hypothesis", "eval_capacity_token_fraction": 1.0, "tokens": tokens}
    calibration.save(calibration.Calibration(weights_fingerprint(gates, experts_of, specs), settings, pairs),
                     str(folder / "calibration.safetensors"))


def test_prune_judges_each_layer_on_at_most_the_pool_bound_deterministically(tmp_path, monkeypatch):
    write_toy(tmp_path)
    sizes = []
    original = reconstruction.layer_problem

    def recording(inputs, *args, **kwargs):
        sizes.append(int(inputs.shape[0]))
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(reconstruction, "layer_problem", recording)
    options = PruneOptions(metric="reconstruction", granularity="global", prune_fraction=0.5, ratio="1:1",
                           calibration_pool_tokens=100, search_device="cpu", skip_beta="median")
    manifests = [prune(str(tmp_path / "model.pt"), str(tmp_path / f"out{i}"), options,
                       calibration_path=str(tmp_path / "calibration.safetensors")) for i in range(2)]
    assert sizes == [100] * 24  # 6 pairs x 40 tokens = 240 per layer, bounded; twice 12 layers
    assert (tmp_path / "out0" / "manifest.json").read_text().replace("out0", "") == \
        (tmp_path / "out1" / "manifest.json").read_text().replace("out1", "")
    assert manifests[0]["options"]["calibration_pool_tokens"] == 100

    # the same through the command line, where cpu as the search device changes nothing
    monkeypatch.setattr(reconstruction, "layer_problem", original)
    code = cli.main(["prune", str(tmp_path / "model.pt"), "--calibration", str(tmp_path / "calibration.safetensors"),
                     "--metric", "reconstruction", "--granularity", "global", "--prune-fraction", "0.5", "--ratio",
                     "1:1", "--calibration-pool-tokens", "100", "--search-device", "cpu", "--skip-beta", "median",
                     "--out", str(tmp_path / "cli")])
    assert code == 0
    written = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert written["outputs"] == manifests[0]["outputs"]


@pytest.mark.parametrize("flags, message", [
    (["--calibration-pool-tokens", "0"], "--calibration-pool-tokens must be a whole number of at least 1, got 0"),
    (["--search-device", "meta"], "--search-device: meta: only cpu and cuda devices are supported"),
    (["--search-device", "cuda:9"], "--search-device: cuda:9 does not exist"),
])
def test_prune_refuses_unusable_search_options_in_one_line_before_reading_anything(tmp_path, capsys, flags, message):
    if "cuda:9" in flags and torch.cuda.device_count() > 9:
        pytest.skip("this machine has the device")
    code = cli.main(["prune", str(tmp_path / "absent.pt"), "--calibration", str(tmp_path / "absent"), "--metric",
                     "reconstruction", "--prune-fraction", "0.5", "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 1 and err.strip().splitlines() == [f"fairseq-moe-prune: error: {err.strip().split('error: ', 1)[1]}"]
    assert message in err and not (tmp_path / "out").exists()
