"""The reconstruction-loss search: its formula against a really pruned MoE layer, and its search against enumeration."""

import json
import math
import re
import sys

import pytest
import torch

from fairseq_moe_prune import reconstruction, stats
from fairseq_moe_prune.moe.layer import GateOptions, MoELayer
from fairseq_moe_prune.ranking import SelectionError
from tests.conftest import multilingual_args, run_cli

ALL = GateOptions(second_expert_policy="all", eval_capacity_token_fraction=1.0, use_fp32=True)
RELU = reconstruction.ACTIVATIONS["relu"]
ENC_PREFIX, DEC_PREFIX = "encoder.layers.1.moe_layer", "decoder.layers.1.moe_layer"


def random_layer(num_experts: int, dim: int = 8, ffn: int = 16, eom: float = 0.0, seed: int = 0) -> MoELayer:
    generator = torch.Generator().manual_seed(seed)
    layer = MoELayer(dim, ffn, num_experts, ALL, eom=eom).eval()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return layer


def expert_weights(layer: MoELayer):
    return [{name: tensor.detach() for name, tensor in expert.state_dict().items()} for expert in layer.experts]


def calibration_of(layer: MoELayer, tokens: int, seed: int = 1):
    """(X, P, Z) of ``tokens`` random tokens through the layer, as the calibration sampler keeps them."""
    x = torch.randn(tokens, layer.gate.wg.in_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        probs = layer.gate(x, None).probs
        z = layer(x[None])[0][0]
    return x, probs, z


def pruned_layer(layer: MoELayer, kept) -> MoELayer:
    """The layer as checkpoint surgery leaves it: kept experts renumbered, their gate rows only."""
    pruned = MoELayer(layer.gate.wg.in_features, layer.experts[0].fc1.out_features, len(kept), layer.gate.options,
                      eom=layer.eom).eval()
    with torch.no_grad():
        pruned.gate.wg.weight.copy_(layer.gate.wg.weight[kept])
        for new, old in enumerate(kept):
            pruned.experts[new].load_state_dict(layer.experts[old].state_dict())
    return pruned


def problem_of(layer: MoELayer, tokens: int = 300, seed: int = 1):
    x, probs, z = calibration_of(layer, tokens, seed)
    return reconstruction.layer_problem(x, probs, z, torch.ones(tokens), expert_weights(layer), RELU, layer.eom)


@pytest.mark.parametrize("kept", [[0, 2, 5], [1, 3], [4], list(range(6))])
def test_reconstruction_equals_the_really_pruned_layer_and_its_loss(kept):
    layer = random_layer(6, eom=0.2)
    x, probs, z = calibration_of(layer, 50)
    with torch.no_grad():
        real = pruned_layer(layer, kept)(x[None])[0]
    formula = reconstruction.reconstruct(x, probs, expert_weights(layer), kept, RELU, layer.eom)
    assert (formula - real.double()).abs().max() <= 1e-5
    problem = reconstruction.layer_problem(x, probs, z, torch.ones(50), expert_weights(layer), RELU, layer.eom)
    direct = float((z.double() - real.double()).norm())
    assert reconstruction.set_loss(problem, kept) == pytest.approx(direct, rel=1e-6, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_scalable_search_finds_the_enumerated_optimum_on_small_layers(seed):
    # random layers, every budget; at width 4 (the default) beam + swaps miss the optimum in 1 of these 28 cases
    # (by 2%), at width 8 in none
    problem = problem_of(random_layer(8, seed=seed), seed=seed + 10)
    for keep in range(1, 8):
        exact = reconstruction.search(problem, keep)
        scalable = reconstruction.search(problem, keep, exact_limit=0, beam=8)
        assert exact.method == "exact" and scalable.method != "exact"
        assert scalable.kept == exact.kept, (keep, scalable.method)
        assert scalable.loss == pytest.approx(exact.loss)


def test_the_chosen_set_is_never_worse_than_importance_on_the_same_tokens():
    for seed in range(2):
        problem = problem_of(random_layer(16, seed=seed), tokens=200, seed=seed)
        for keep in (3, 8, 12):
            importance = reconstruction.importance_set(problem, keep)
            for beam in (1, 4):
                result = reconstruction.search(problem, keep, exact_limit=0, beam=beam)
                assert result.loss <= reconstruction.set_loss(problem, importance) + 1e-9


def test_greedy_removal_re_evaluates_only_changed_tokens_yet_matches_a_full_evaluation():
    problem = problem_of(random_layer(10, seed=3))
    state = reconstruction.evaluate(problem, torch.ones(10, dtype=torch.bool))
    for expert in (4, 0, 7, 9, 2, 5, 1, 8):
        state = reconstruction.remove(problem, state, expert)
        fresh = reconstruction.evaluate(problem, state.kept)
        assert torch.equal(state.top, fresh.top)
        assert state.total == pytest.approx(fresh.total, rel=1e-12)


def test_keeping_everything_loses_nothing_and_impossible_budgets_are_refused():
    problem = problem_of(random_layer(5))
    assert reconstruction.search(problem, 5).loss < 1e-4 * math.sqrt(float(problem.zz.sum()))
    for keep in (0, 6):
        with pytest.raises(SelectionError, match=f"cannot keep {keep} of 5 experts"):
            reconstruction.search(problem, keep)
    empty = reconstruction.layer_problem(torch.zeros(0, 8), torch.zeros(0, 5), torch.zeros(0, 8), torch.zeros(0),
                                         expert_weights(random_layer(5)), RELU)
    with pytest.raises(SelectionError, match="no calibration tokens"):
        reconstruction.search(empty, 2)


def test_median_beta_splits_the_tokens_in_half():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.7, 0.1, 0.2], [0.2, 0.2, 0.6]])
    ratios = reconstruction.skip_ratios(probs, [0, 1, 2])
    torch.testing.assert_close(ratios, torch.tensor([0.5, 0.8, 2 / 7, 1 / 3], dtype=torch.float64))
    assert reconstruction.median_skip_beta(probs, torch.ones(4), [0, 1, 2]) == pytest.approx(1 / 3)
    # among kept experts 0 and 2 only, the pruned gate's softmax gives other ratios
    torch.testing.assert_close(reconstruction.skip_ratios(probs, [0, 2]),
                               torch.tensor([1 / 6, 0.2, 2 / 7, 1 / 3], dtype=torch.float64))


# --- end to end: fairseq-generate samples, prune --metric reconstruction --skip-beta, stock fairseq uses the result


PRUNE = [sys.executable, "-m", "fairseq_moe_prune.cli", "prune"]


def generate(corpus, checkpoint, *extra):
    result = run_cli(["fairseq-generate", *multilingual_args(corpus, "translation_multi_simple_epoch_moe"),
                      "--path", str(checkpoint), "--source-lang", "eng_Latn", "--target-lang", "deu_Latn",
                      "--gen-subset", "test", "--beam", "2", "--max-len-b", "30", "--batch-size", "8",
                      "--required-batch-size-multiple", "1", *extra])
    return [line for line in result.stdout.splitlines() if re.match(r"^H-\d+\t", line)]


@pytest.fixture(scope="module")
def calibrated(recorded_test_set):
    """Calibration samples of eng->deu and deu->eng on the test set, in one folder."""
    return recorded_test_set / "calibration"


# README: "Reconstruction loss and dynamic skipping" block (prune --metric reconstruction --skip-beta median, then
# fairseq-generate with skipping on and with --model-overrides "{'moe_skip_betas': None}")
@pytest.mark.slow
def test_pruned_and_skipping_checkpoint_translates_counts_skips_and_fine_tunes(corpus, trained, calibrated, tmp_path):
    out = tmp_path / "pruned"
    result = run_cli([*PRUNE, str(trained), "--calibration", str(calibrated), "--metric", "reconstruction",
                      "--out", str(out), "--keep", "5", "--ratio", "3:2", "--skip-beta", "median"])
    assert "eng_Latn-deu_Latn.pt: kept 5 experts (37.5% pruned)" in result.stdout
    output = json.loads((out / "manifest.json").read_text())["outputs"]["eng_Latn-deu_Latn"]
    betas = [float(beta) for beta in output["skip_betas"].split(",")]
    assert len(betas) == 2 and all(0 < beta < 1 for beta in betas)
    assert set(output["reconstruction_loss"]) == {ENC_PREFIX, DEC_PREFIX}

    checkpoint = out / "eng_Latn-deu_Latn.pt"
    skipping = generate(corpus, checkpoint, "--moe-stats-out", str(tmp_path / "on.json"))
    assert len(skipping) == 30
    on = stats.load(str(tmp_path / "on.json")).pairs["eng_Latn-deu_Latn"].layers
    # beta is the median of w2/w1 over eng's source tokens (these very sentences), so about half are skipped
    assert 0.3 < on[ENC_PREFIX].skipped.sum() / on[ENC_PREFIX].tokens < 0.7
    assert on[DEC_PREFIX].skipped.sum() > 0
    assert all(counts.routed.sum() == 2 * counts.tokens - counts.skipped.sum() for counts in on.values())

    generate(corpus, checkpoint, "--model-overrides", "{'moe_skip_betas': None}", "--moe-stats-out", str(tmp_path / "off.json"))
    off = stats.load(str(tmp_path / "off.json")).pairs["eng_Latn-deu_Latn"].layers
    assert all(counts.skipped.sum() == 0 for counts in off.values())

    train = run_cli(["fairseq-train", *multilingual_args(corpus), "--arch", "moe_transformer_toy",
                     "--share-all-embeddings", "--finetune-from-model", str(checkpoint),
                     "--criterion", "moe_label_smoothed_cross_entropy", "--optimizer", "adam", "--lr", "0.001",
                     "--max-tokens", "1500", "--max-update", "3", "--save-dir", str(tmp_path / "ft"),
                     "--no-epoch-checkpoints", "--disable-validation", "--num-workers", "0",
                     "--encoder-moe-expert-counts", "3", "--decoder-moe-expert-counts", "2",
                     "--moe-skip-betas", output["skip_betas"]])
    assert "num_updates 3" in train.stdout + train.stderr


@pytest.mark.slow
def test_prune_mistakes_give_one_line_exit_1_and_write_nothing(trained, calibrated, tmp_path):
    pruned = tmp_path / "other"
    run_cli([*PRUNE, str(trained), "--calibration", str(calibrated), "--metric", "reconstruction",
             "--out", str(pruned), "--keep", "4", "--ratio", "1:1", "--granularity", "global"])
    cases = [
        ([str(pruned / "global.pt"), "--metric", "reconstruction", "--keep", "2"], "come from another model"),
        ([str(trained), "--metric", "reconstruction", "--prune-fraction", "0.5", "--ratio", "1:1", "--granularity",
          "pair", "--directions", "fra_Latn-eng_Latn"], "fra_Latn-eng_Latn is not in the calibration samples"),
        ([str(trained), "--metric", "reconstruction", "--prune-fraction", "0.5", "--selection", "threshold"],
         "--metric reconstruction chooses a fixed number per layer"),
        ([str(trained), "--prune-fraction", "0", "--skip-beta", "0.1,0.2,0.3", "--metric", "reconstruction"],
         "--skip-beta lists 3 betas but the model has 2 MoE layers"),
    ]
    for extra, message in cases:
        result = run_cli([*PRUNE, "--calibration", str(calibrated), "--out", str(tmp_path / "x"), *extra], check=False)
        assert result.returncode == 1, extra
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()
