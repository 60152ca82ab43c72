"""The main job's report renders confidence intervals and the out-of/into-English split (synthetic sweep)."""

import random
import sys

import numpy as np
from sacrebleu.metrics import CHRF

from fairseq_moe_prune import stats as stats_lib
from fairseq_moe_prune.significance import difference, resample, seed_for
from tests.conftest import PAIRS, REPO

sys.path.insert(0, str(REPO / "examples" / "libreoffice_help"))
from report import write_report  # noqa: E402
from sweep import METHODS, score  # noqa: E402

WORDS = "the a file menu select option insert table cell format choose click dialog window text sheet".split()
LAYERS = ["encoder.layers.1.moe_layer", "decoder.layers.1.moe_layer"]


def noisy(references, keep, seed, longer=0):
    """Each reference word kept with probability ``keep``; ``longer`` words appended to every sentence."""
    rng = random.Random(seed)
    return [" ".join([w if rng.random() < keep else rng.choice(WORDS) for w in ref.split()]
                     + rng.choices(WORDS, k=longer)) for ref in references]


def synthetic_statistics(path):
    rng = np.random.default_rng(0)
    pairs = {}
    for pair in PAIRS:
        layers = {}
        for prefix in LAYERS:
            counts = stats_lib.LayerCounts.zeros(4)
            counts.tokens, counts.top1[:] = 100, rng.multinomial(100, [0.25] * 4)
            counts.top2[:] = counts.top1  # top-1 gating: counts that fit together
            layers[prefix] = counts
        pairs[pair] = stats_lib.PairStats(10, layers)
    stats_lib.save(stats_lib.MoEStats(stats_lib.Fingerprint([(p, 4) for p in LAYERS], "0" * 64, "0" * 64), {}, pairs), str(path))


def run_entry(method, level, hypotheses, references):
    directions = {d: {**score(hypotheses[d], references[d], d.split("-")[1]), "sentences": len(references[d]),
                      "parameters": 1000 - int(level * 500), "hypotheses": hypotheses[d]} for d in PAIRS}
    return {"method": method, "level": level, "pruned_fraction": level, "directions": directions}


def test_report_shows_intervals_and_the_english_split(tmp_path):
    rng = random.Random(0)
    references = {d: [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) for _ in range(25)] for d in PAIRS}
    full = {d: noisy(references[d], 0.8, 1) for d in PAIRS}
    results = {"full": run_entry("full model", 0.0, full, references)}
    for i, method in enumerate(METHODS):
        for level in (0.75, 0.8):
            name = f"{method.metric}-{method.granularity}-{round(level * 100)}"
            if method.name == "importance per language" and level == 0.75:
                hypotheses = full  # the same translations: a change of 0, within noise
            elif method.name == "random":
                # far worse, and into English much longer, as NLLB's pruned model
                hypotheses = {d: noisy(references[d], 0.2, 10 + i, longer=6 if d.endswith("eng_Latn") else 0)
                              for d in PAIRS}
            else:
                hypotheses = {d: noisy(references[d], 0.75, 20 + i + int(level * 100)) for d in PAIRS}
            results[name] = run_entry(method.name, level, hypotheses, references)
    synthetic_statistics(tmp_path / "stats.json")

    path = write_report(tmp_path, results, tmp_path / "stats.json", ["- setup"], references=references, workers=2)
    report = path.read_text()
    lines = report.splitlines()

    assert "95% confidence interval from paired bootstrap resampling" in report
    best75 = next(line for line in lines if line.startswith("- importance per language at 75%"))
    assert "change vs the full model +0.00 [+0.00, +0.00] within noise" in best75
    # the chrF++ table's cell for random at 80% is the interval computed directly from the library
    chrf = CHRF(word_order=2)
    expected = difference(
        [resample(chrf, results["random-global-80"]["directions"][d]["hypotheses"], references[d], seed=seed_for(d))
         for d in PAIRS],
        [resample(chrf, full[d], references[d], seed=seed_for(d)) for d in PAIRS])
    assert expected.high < 0 and not expected.within_noise
    random_row = next(line for line in lines if line.startswith("| random |"))
    assert str(expected) in random_row
    assert next(line for line in lines if line.startswith("- at 80%, importance per language vs random:"))

    split = report[report.index("## Out of English vs into English"):]
    assert "| model | chrF++ out of English | change | chrF++ into English | change |" in split
    assert "| model | BLEU out of English | change | BLEU into English | change |" in split
    random80 = next(line for line in split.splitlines() if line.startswith("| random 80% |"))
    ratio_out, ratio_into = (float(cell) for cell in random80.strip("| ").split(" | ")[-2:])
    assert ratio_into > 1.3 > ratio_out  # the over-generation into English shows
    assert "- importance per language at 80% vs the full model: BLEU out of English" in split
