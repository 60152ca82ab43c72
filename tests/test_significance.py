"""The intervals come from sacrebleu's own paired bootstrap: same resamples, same scores, same p-value."""

import os
import random

import numpy as np
import pytest
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest, _compute_p_value, estimate_ci

from fairseq_moe_prune.significance import SEED, Interval, difference, resample, seed_for

WORDS = "the a file menu select option insert table cell format choose click dialog window text sheet".split()


def sentences(count: int, seed: int) -> list:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 15))) for _ in range(count)]


def noisy(references: list, keep: float, seed: int) -> list:
    """Each word of the references kept with probability ``keep``, else replaced by a random word."""
    rng = random.Random(seed)
    return [" ".join(w if rng.random() < keep else rng.choice(WORDS) for w in ref.split()) for ref in references]


@pytest.mark.parametrize("metric", [CHRF(word_order=2), BLEU(tokenize="13a")], ids=["chrF++", "BLEU"])
def test_resamples_are_those_of_sacrebleus_paired_bootstrap(metric):
    references = sentences(40, 0)
    baseline, system = noisy(references, 0.6, 1), noisy(references, 0.7, 2)
    assert "SACREBLEU_SEED" not in os.environ  # PairedTest below uses sacrebleu's default seed, as we do
    _, results = PairedTest([("baseline", baseline), ("system", system)], {"m": metric}, [references],
                            test_type="bs", n_samples=1000)()
    name = next(key for key in results if key != "System")
    theirs_baseline, theirs_system = results[name]

    ours_baseline = resample(metric, baseline, references, 1000, SEED)
    ours_system = resample(metric, system, references, 1000, SEED)
    assert "SACREBLEU_SEED" not in os.environ
    # each system's score, and the mean and 95% half-width sacrebleu estimates from its resamples
    assert ours_baseline.score == theirs_baseline.score
    assert ours_system.score == theirs_system.score
    assert estimate_ci(ours_baseline.samples) == (theirs_baseline.mean, theirs_baseline.ci)
    assert estimate_ci(ours_system.samples) == (theirs_system.mean, theirs_system.ci)
    # the p-value of sacrebleu's paired test, recomputed from our resamples: they are paired as in sacrebleu
    paired = np.abs(ours_system.samples - ours_baseline.samples)
    observed = abs(theirs_system.score - theirs_baseline.score)
    assert _compute_p_value(paired - paired.mean(), observed) == theirs_system.p_value

    # the interval of the difference: its half-width is sacrebleu's estimate_ci of the paired differences
    interval = difference([ours_system], [ours_baseline])
    assert interval.difference == pytest.approx(theirs_system.score - theirs_baseline.score)
    assert (interval.high - interval.low) / 2 == pytest.approx(estimate_ci(ours_system.samples - ours_baseline.samples)[1])
    assert interval.low < interval.difference < interval.high


def test_noise_and_signal_are_told_apart():
    chrf = CHRF(word_order=2)
    references = sentences(60, 3)
    good, bad = noisy(references, 0.95, 4), noisy(references, 0.3, 5)
    same = difference([resample(chrf, good, references)], [resample(chrf, good, references)])
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0) and same.within_noise
    assert str(same) == "+0.00 [+0.00, +0.00] within noise"
    better = difference([resample(chrf, good, references)], [resample(chrf, bad, references)])
    assert better.difference > 20 and better.low > 0 and not better.within_noise
    assert "within noise" not in str(better)
    assert str(Interval(0.0012, 0.0004, 0.0021)) == "+0.0012 [+0.0004, +0.0021]"  # not "+0.00 [+0.00, +0.00]"
    assert str(Interval(-0.5, -1.25, 0.3)) == "-0.50 [-1.25, +0.30] within noise"
    # two systems of the same quality, different in every sentence: the interval straddles 0
    one, other = noisy(references, 0.8, 6), noisy(references, 0.8, 7)
    slight = difference([resample(chrf, one, references)], [resample(chrf, other, references)])
    assert slight.difference != 0 and slight.low < 0 < slight.high and slight.within_noise


def test_the_mean_over_test_sets_pairs_each_set_with_its_own_seed():
    chrf = CHRF(word_order=2)
    sets = {name: sentences(30, i) for i, name in enumerate(["eng-deu", "deu-eng"])}
    a = [resample(chrf, noisy(refs, 0.8, 10), refs, seed=seed_for(name)) for name, refs in sets.items()]
    b = [resample(chrf, noisy(refs, 0.5, 11), refs, seed=seed_for(name)) for name, refs in sets.items()]
    interval = difference(a, b)
    assert interval.difference == pytest.approx(np.mean([x.score - y.score for x, y in zip(a, b)]))
    per_resample = (a[0].samples - b[0].samples + a[1].samples - b[1].samples) / 2
    assert (interval.low, interval.high) == pytest.approx((np.sort(per_resample)[25], np.sort(per_resample)[974]))
    assert seed_for("eng-deu") != seed_for("deu-eng")
    with pytest.raises(ValueError):
        difference(a, b[:1])
