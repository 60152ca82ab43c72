"""An extracted task-MoE sub-network as Hugging Face's M2M100 and as a CTranslate2 model: the same logits, the
same tokens, the same translations as fairseq; models M2M100 cannot hold are refused in one line."""

import re
import sys
from pathlib import Path

import pytest
import sacrebleu
import sentencepiece
import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary

from fairseq_moe_prune import cli
from fairseq_moe_prune.checkpoints.safe_load import load_checkpoint
from tests.conftest import LANGS, run_cli, task_moe_args
from tests.helpers import USER_DIR, import_extra

pytestmark = pytest.mark.slow
transformers = import_extra("transformers")
ctranslate2 = import_extra("ctranslate2")
CLI = [sys.executable, "-m", "fairseq_moe_prune.cli"]
SOURCE, TARGET = "eng_Latn", "deu_Latn"
LIMIT = 200  # fairseq-generate's default --max-len-b, and the M2M100 generation config's


@pytest.fixture(scope="module")
def prenorm_task_moe(corpus, tmp_path_factory) -> Path:
    """A tiny pre-norm task-MoE (NLLB's layer order, which M2M100 has), trained until most test translations
    end before the length limit (1,200 updates, about 40 s)."""
    save_dir = tmp_path_factory.mktemp("prenorm_task_moe")
    run_cli(["fairseq-train", *task_moe_args(corpus), "--arch", "moe_transformer_toy", "--share-all-embeddings",
             "--encoder-normalize-before", "--decoder-normalize-before", "--moe-task-routing", "both",
             "--moe-task", "target", "--criterion", "moe_label_smoothed_cross_entropy", "--moe-gate-loss-wt", "0.01",
             "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "0.005", "--lr-scheduler", "inverse_sqrt",
             "--warmup-updates", "20", "--max-tokens", "1500", "--max-update", "1200", "--seed", "1",
             "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--disable-validation", "--num-workers", "0"])
    return save_dir / "checkpoint_last.pt"


# README: "Serving a sub-network with Hugging Face or CTranslate2" block (convert --to hf --dict --spm,
# ct2-transformers-converter --quantization int8)
@pytest.fixture(scope="module")
def deployed(corpus, prenorm_task_moe, tmp_path_factory):
    """The eng->deu sub-network, its M2M100 folder (README's deployment block) and CTranslate2 models."""
    folder = tmp_path_factory.mktemp("deployed")
    run_cli([*CLI, "extract", str(prenorm_task_moe), "--task", f"{SOURCE}-{TARGET}", "--out", str(folder / "sub")])
    sub = folder / "sub" / f"{SOURCE}-{TARGET}.pt"
    result = run_cli([*CLI, "convert", str(sub), str(folder / "hf"), "--to", "hf", "--dict",
                      str(corpus / "bin" / "dict.txt"), "--spm", str(corpus / "spm.model")])
    assert "tensorboardX" not in result.stdout + result.stderr
    for name, quantization in (("ct2", "float32"), ("ct2-int8", "int8")):
        run_cli(["ct2-transformers-converter", "--model", str(folder / "hf"), "--output_dir", str(folder / name),
                 "--quantization", quantization])
    return sub, folder


def sources_and_references(corpus):
    pair = f"{SOURCE}-{TARGET}"
    return [(corpus / "raw" / f"test.{pair}.{lang}").read_text(encoding="utf-8").splitlines() for lang in (SOURCE, TARGET)]


def fairseq_dictionary(corpus) -> Dictionary:
    dictionary = Dictionary.load(str(corpus / "bin" / "dict.txt"))
    for lang in LANGS:
        dictionary.add_symbol(f"__{lang}__")
    return dictionary


def fairseq_generate(corpus, checkpoint, beam):
    """{sentence id: hypothesis pieces} of stock fairseq-generate (no --user-dir), fairseq's default length limit."""
    args = task_moe_args(corpus)
    at = args.index("--user-dir")
    result = run_cli(["fairseq-generate", *args[:at], *args[at + 2:], "--path", str(checkpoint), "--source-lang", SOURCE,
                      "--target-lang", TARGET, "--gen-subset", "test", "--beam", str(beam), "--batch-size", "7",
                      "--required-batch-size-multiple", "1"], cwd="/")
    return {int(i): text.split() for i, text in re.findall(r"^H-(\d+)\t\S+\t(.*)$", result.stdout, re.M)}


def test_m2m100_gives_fairseqs_tokens_logits_and_beam_search(corpus, deployed):
    sub, folder = deployed
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "hf")
    model = transformers.M2M100ForConditionalGeneration.from_pretrained(folder / "hf").eval()
    assert model.generation_config.decoder_start_token_id == tokenizer.convert_tokens_to_ids(f"__{TARGET}__")
    sources, references = sources_and_references(corpus)
    # the tokenizer: SentencePiece pieces to fairseq's ids, the source's </s> replaced by its language token
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(corpus / "spm.model"))
    dictionary = fairseq_dictionary(corpus)
    for text in sources:
        expected = [dictionary.index(p) for p in pieces.encode(text, out_type=str)] + [dictionary.index(f"__{SOURCE}__")]
        assert tokenizer(text)["input_ids"] == expected

    # logits: teacher-forced reference translations, fairseq's model against M2M100
    fairseq_model = checkpoint_utils.load_model_ensemble([str(sub)], arg_overrides={"data": str(corpus / "bin")})[0][0]
    worst = 0.0
    for text, reference in zip(sources, references):
        source = torch.tensor([tokenizer(text)["input_ids"]])
        target = torch.tensor([[dictionary.index(f"__{TARGET}__")] +
                               [dictionary.index(p) for p in pieces.encode(reference, out_type=str)]])
        with torch.no_grad():
            ours = fairseq_model.eval()(source, torch.tensor([source.shape[1]]), target)[0]
            theirs = model(input_ids=source, decoder_input_ids=target).logits
        worst = max(worst, (ours - theirs).abs().max().item())
    assert worst <= 1e-5

    # beam 4 in padded batches, the generation config as written: fairseq-generate's hypotheses. Where one search
    # runs into the 200-token limit (an undertrained model repeating itself) the two differ in which hypotheses
    # they finish at the forced </s>; every other sentence is the same.
    expected = fairseq_generate(corpus, sub, beam=4)
    batch = tokenizer(sources, return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = model.generate(**batch)
    hypotheses = [tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=True) for ids in generated.tolist()]
    different = [i for i in range(len(sources)) if hypotheses[i] != expected[i]]
    assert all(LIMIT in (len(hypotheses[i]), len(expected[i])) for i in different)
    assert len(different) <= len(sources) // 10


def test_ctranslate2_float32_and_int8_translate_as_fairseq(corpus, deployed):
    sub, folder = deployed
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "hf")
    sources, references = sources_and_references(corpus)
    tokens = [tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]) for text in sources]
    expected = fairseq_generate(corpus, sub, beam=1)
    detokenized = {}
    for name in ("ct2", "ct2-int8"):
        translator = ctranslate2.Translator(str(folder / name), device="cpu", intra_threads=1)
        results = translator.translate_batch(tokens, beam_size=1, max_decoding_length=LIMIT)
        hypotheses = [result.hypotheses[0] for result in results]
        if name == "ct2":  # greedy float32: fairseq's hypotheses on at least 95% of sentences
            assert sum(hypotheses[i] == expected[i] for i in range(len(sources))) >= 0.95 * len(sources)
        detokenized[name] = [tokenizer.convert_tokens_to_string(h) for h in hypotheses]
    fairseq_text = [tokenizer.convert_tokens_to_string(expected[i]) for i in range(len(sources))]
    chrf = {name: sacrebleu.corpus_chrf(texts, [references], word_order=2).score
            for name, texts in {"fairseq": fairseq_text, **detokenized}.items()}
    assert abs(chrf["ct2-int8"] - chrf["fairseq"]) <= 0.5, chrf


def test_stock_ctranslate2_fairseq_converter_reads_our_checkpoints(corpus, trained, recorded_test_set, prenorm_task_moe,
                                                                   tmp_path):
    """CTranslate2's own fairseq converter reads what we write: a pruned MoE (its config a Namespace, as
    fairseq-train writes it, allowed by our --user-dir) up to its refusal of MoE models, and a sub-network
    extracted with --namespace-config up to its refusal of --lang-tok-replacing-bos-eos, the task-MoE's flag."""
    run_cli([*CLI, "prune", str(trained), "--stats", str(recorded_test_set / f"{SOURCE}-{TARGET}.json"),
             "--out", str(tmp_path / "pruned"), "--granularity", "global", "--prune-fraction", "0.5", "--ratio", "1:1"])
    common = ["--data_dir", str(corpus / "bin"), "--user_dir", USER_DIR, "--output_dir", str(tmp_path / "ct2")]
    result = run_cli(["ct2-fairseq-converter", "--model_path", str(tmp_path / "pruned" / "global.pt"), *common], check=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith(  # then a set, in any order
        "- Model 'moe_transformer' used by architecture 'moe_transformer_toy' is not supported (supported models are:")
    run_cli([*CLI, "extract", str(prenorm_task_moe), "--task", f"{SOURCE}-{TARGET}", "--out", str(tmp_path / "sub"),
             "--namespace-config"])
    result = run_cli(["ct2-fairseq-converter", "--model_path", str(tmp_path / "sub" / f"{SOURCE}-{TARGET}.pt"),
                      *common], check=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == "- Option --lang-tok-replacing-bos-eos is not supported"


def rewritten(state, path: Path, **model_fields) -> Path:
    state = dict(state, cfg=dict(state["cfg"], model=dict(state["cfg"]["model"], **model_fields)))
    torch.save(state, path)
    return path


@pytest.mark.parametrize("case, message", [
    ("moe", "the model has 2 MoE layers and M2M100 is dense: convert it --to hf without --dict/--spm/--direction"),
    ("per-layer", "M2M100 has one FFN width per side and this model has per-layer widths: extract without "
                  "--per-layer-widths"),
    ("post-norm", "M2M100 is pre-norm and this model's encoder is post-norm: keep it as a fairseq checkpoint"),
    ("no-dict", "M2M100's vocabulary is fairseq's dictionary: name it with --dict"),
    ("wrong-dict", "symbols, but the model's embedding has"),
    ("direction", "xxx_Latn is not one of the model's languages (eng_Latn, deu_Latn, fra_Latn)"),
])
def test_what_m2m100_cannot_hold_is_refused_in_one_line(case, message, corpus, trained, prenorm_task_moe, deployed,
                                                         tmp_path, capsys):
    sub, _ = deployed
    state = load_checkpoint(str(sub))
    dictionary = str(corpus / "bin" / "dict.txt")
    args = {"moe": [str(trained), "--dict", dictionary],
            "post-norm": [str(rewritten(state, tmp_path / "post.pt", encoder_normalize_before=False)), "--dict", dictionary],
            "no-dict": [str(sub)],
            "wrong-dict": [str(sub), "--dict", str(tmp_path / "small.txt")],
            "direction": [str(sub), "--dict", dictionary, "--direction", "deu_Latn-xxx_Latn"]}.get(case)
    if case == "per-layer":
        assert cli.main(["extract", str(prenorm_task_moe), "--task", f"{SOURCE}-{TARGET}", "--out",
                         str(tmp_path / "per"), "--per-layer-widths"]) == 0
        args = [str(tmp_path / "per" / f"{SOURCE}-{TARGET}.pt"), "--dict", dictionary]
    (tmp_path / "small.txt").write_text("a 1\nb 1\n")
    capsys.readouterr()
    assert cli.main(["convert", args[0], str(tmp_path / "out"), "--to", "hf", *args[1:]]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
