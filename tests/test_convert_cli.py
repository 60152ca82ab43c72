"""fairseq-moe-prune convert: an HF model translates the same through stock fairseq-generate as through HF."""

import math
import re

import pytest
import torch
from fairseq.data import Dictionary

from tests.conftest import run_cli
from tests.helpers import (
    SYMBOLS,
    USER_DIR,
    import_extra,
    pad,
    random_sentences,
    tiny_hf_model,
    write_dictionaries,
)

pytestmark = pytest.mark.slow
import_extra("transformers")

LENGTHS = [7, 4, 9, 5, 3, 8]
MAX_NEW = 30  # tokens before </s>


def fairseq_hypotheses(output: str, dictionary: Dictionary):
    """Sentence id -> (token ids without </s>, score in nats) from fairseq-generate's H lines."""
    hypotheses = {}
    for sentence, score, text in re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", output, flags=re.MULTILINE):
        hypotheses[int(sentence)] = ([dictionary.index(symbol) for symbol in text.split()],
                                     float(score) * math.log(2))  # fairseq prints base 2
    return hypotheses


# README: "Converting" block (fairseq-moe-prune convert nllb-moe-hf/ nllb-moe.pt --to single)
def test_converted_hf_model_beam_searches_the_same_in_fairseq_generate(tmp_path):
    hf_model = tiny_hf_model(seed=1)
    hf_model.save_pretrained(tmp_path / "hf")
    run_cli(["fairseq-moe-prune", "convert", str(tmp_path / "hf"), str(tmp_path / "model.pt"), "--to", "single"])

    sentences = random_sentences(LENGTHS, seed=5)
    data = tmp_path / "data"
    write_dictionaries(data)
    for lang in ("src", "tgt"):  # raw text; fairseq appends </s> like the HF inputs below
        (data / f"test.src-tgt.{lang}").write_text(
            "".join(" ".join(SYMBOLS[i - 4] for i in s[:-1].tolist()) + "\n" for s in sentences))
    result = run_cli(["fairseq-generate", str(data), "--user-dir", USER_DIR, "--path", str(tmp_path / "model.pt"),
                      "--task", "translation", "-s", "src", "-t", "tgt", "--dataset-impl", "raw",
                      "--gen-subset", "test", "--beam", "4", "--lenpen", "1", "--max-len-a", "0",
                      "--max-len-b", str(MAX_NEW), "--batch-size", "4", "--required-batch-size-multiple", "1"])
    ours = fairseq_hypotheses(result.stdout, Dictionary.load(str(data / "dict.tgt.txt")))

    # The same search in HF: decoding starts from </s>, never yields <pad>, and cannot end before one
    # token (fairseq's --min-len 1); early_stopping=True stops a sentence at 4 finished hypotheses as
    # fairseq does. At the length limit the two differ (fairseq forces </s>, HF stops without it), so
    # the model is one whose hypotheses all end earlier, which is asserted.
    tokens, mask = pad(sentences, left=False)
    with torch.no_grad():
        out = hf_model.generate(input_ids=tokens, attention_mask=mask, num_beams=4, max_length=MAX_NEW + 2,
                                length_penalty=1.0, early_stopping=True, min_new_tokens=1, suppress_tokens=[1],
                                do_sample=False, output_scores=True, return_dict_in_generate=True)
    theirs = {}
    for i, (sequence, score) in enumerate(zip(out.sequences.tolist(), out.sequences_scores.tolist())):
        assert sequence[0] == 2
        generated = sequence[1:sequence.index(2, 1)]  # raises if a hypothesis reached the limit without </s>
        assert len(generated) < MAX_NEW
        theirs[i] = (generated, score)

    assert sorted(ours) == list(range(len(sentences)))
    assert [ours[i][0] for i in range(len(sentences))] == [theirs[i][0] for i in range(len(sentences))]
    assert all(abs(ours[i][1] - theirs[i][1]) < 1e-4 for i in range(len(sentences)))
    assert len({tuple(tokens) for tokens, _ in theirs.values()}) > 1  # not one output for every input


def test_convert_errors_are_one_line(tmp_path):
    (tmp_path / "out").mkdir()
    result = run_cli(["fairseq-moe-prune", "convert", str(tmp_path / "missing.pt"), str(tmp_path / "out"),
                      "--to", "hf"], check=False)
    assert result.returncode == 1
    message = f"fairseq-moe-prune: error: {tmp_path / 'out'} exists (use --force to replace it)"
    assert result.stderr.strip().splitlines() == [message]
