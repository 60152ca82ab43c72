"""The in-process translator gives fairseq-generate's output, sentence for sentence."""

import re

import pytest

from fairseq_moe_prune.evaluation import Translator
from tests.conftest import TEST_SENTENCES, multilingual_args, run_cli

GENERATE = ["--gen-subset", "test", "--beam", "3", "--max-tokens", "400", "--max-len-b", "20",
            "--remove-bpe", "sentencepiece", "--seed", "1"]


def tiny_moe_parameters(vocabulary: int) -> int:
    """moe_transformer_toy's parameter count from its shapes, with one embedding shared by all three uses:
    2+2 post-norm layers of width 32 and FFN 64, layers 1 MoE with 4 experts and a bias-free gate."""
    dim, ffn, experts = 32, 64, 4
    attention = 4 * (dim * dim + dim)  # q, k, v, out projections with biases
    norm = 2 * dim
    dense = dim * ffn + ffn + ffn * dim + dim
    moe = experts * dense + dim * experts
    encoder = (attention + norm + dense + norm) + (attention + norm + moe + norm)
    decoder = (2 * attention + 2 * norm + dense + norm) + (2 * attention + 2 * norm + moe + norm)
    return vocabulary * dim + encoder + decoder  # positions are sinusoidal: no parameters


@pytest.mark.slow
def test_translator_matches_fairseq_generate(corpus, trained):
    result = run_cli(["fairseq-generate", *multilingual_args(corpus), "--path", str(trained),
                      "--source-lang", "deu_Latn", "--target-lang", "eng_Latn",
                      "--required-batch-size-multiple", "1", *GENERATE])
    expected = {int(m.group(1)): m.group(2) for m in re.finditer(r"^D-(\d+)\t[^\t]*\t(.*)$", result.stdout, re.M)}
    assert len(expected) == TEST_SENTENCES

    translator = Translator([*multilingual_args(corpus), *GENERATE])
    first = translator.translate(str(trained), "deu_Latn", "eng_Latn")
    assert first.hypotheses == [expected[i] for i in range(TEST_SENTENCES)]
    _, task = translator.setup("deu_Latn", "eng_Latn")
    assert first.parameters == tiny_moe_parameters(len(task.source_dictionary))
    assert first.parameters == sum(p.numel() for p in translator.load(str(trained), "deu_Latn", "eng_Latn").parameters())

    # The model loaded for deu->eng is reused for eng->fra; one loaded for eng->fra translates the same.
    reused = translator.translate(str(trained), "eng_Latn", "fra_Latn")
    model = translator.load(str(trained), "eng_Latn", "fra_Latn")
    assert model is translator.load(str(trained), "deu_Latn", "eng_Latn")
    fresh = Translator([*multilingual_args(corpus), *GENERATE]).translate(str(trained), "eng_Latn", "fra_Latn")
    assert reused.hypotheses == fresh.hypotheses
    # Another direction in between must leave the first one's task as it was (fairseq's own
    # post-processing adds every unseen output word to the target dictionary).
    assert translator.translate(str(trained), "deu_Latn", "eng_Latn").hypotheses == first.hypotheses
