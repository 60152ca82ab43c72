"""An extracted sub-network served outside fairseq: its M2M100 folder (``convert --to hf``, see
checkpoints/m2m100.py) translated by Hugging Face's ``generate`` or by CTranslate2, batched and timed as
:class:`evaluation.Translator` times fairseq, so that the three can be compared side by side.

Batches are fairseq's: sentences sorted by length, at most ``max_tokens`` padded source tokens each, and
a batch's hypotheses at most ``max_len_a * its longest source + max_len_b`` tokens (fairseq-generate's
``--max-len-a/--max-len-b``, which also counts the padded batch's source length).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from fairseq_moe_prune.errors import FairseqMoEPruneError
from fairseq_moe_prune.files import open_regular


class DeployError(FairseqMoEPruneError):
    """A deployment target cannot be built or run; the message is one line for the user."""


@dataclass
class Output:
    hypotheses: List[str]  # detokenized, in input order
    seconds: float  # tokenizing, translating and detokenizing, model loading excluded


def batches(lengths: Sequence[int], max_tokens: int) -> List[List[int]]:
    """Indices sorted by length (longest first), cut into batches of at most ``max_tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: List[List[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def to_ctranslate2(hf_folder: str, out: str, quantization: str = "int8") -> str:
    """CTranslate2's own converter (``ct2-transformers-converter``) on an M2M100 folder; ``out`` must not exist."""
    # optional extra (deploy): ctranslate2
    import ctranslate2

    try:
        return ctranslate2.converters.TransformersConverter(hf_folder).convert(out, quantization=quantization)
    except (ValueError, RuntimeError, OSError) as error:
        raise DeployError(f"{hf_folder}: CTranslate2 cannot convert it ({str(error).splitlines()[0][:160]})") from None


class Engine:
    """The tokenizer and language-token convention of an M2M100 folder, which both engines translate with."""

    def __init__(self, hf_folder: str, threads: int):
        # optional extra (hf): transformers
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(hf_folder)
        with open_regular(os.path.join(hf_folder, "generation_config.json")) as f:
            generation = json.load(f)
        forced = generation.get("forced_bos_token_id")
        self.target_prefix: Optional[List[str]] = [self.tokenizer.convert_ids_to_tokens(forced)] if forced is not None else None
        self.threads = threads


class HFEngine(Engine):
    """``M2M100ForConditionalGeneration.generate`` with the folder's generation config, in fairseq's batches."""

    def __init__(self, hf_folder: str, threads: int):
        super().__init__(hf_folder, threads)
        # optional extra (hf): transformers
        import transformers

        self.model = transformers.M2M100ForConditionalGeneration.from_pretrained(hf_folder).eval()

    def translate(self, sentences: Sequence[str], beam: int, max_tokens: int = 4000, max_len_a: float = 0.0,
                  max_len_b: int = 200) -> Output:
        torch.set_num_threads(self.threads)
        start = time.perf_counter()
        encoded = [self.tokenizer(text)["input_ids"] for text in sentences]
        hypotheses: List[str] = [""] * len(sentences)
        extra = 1 if self.target_prefix else 0  # the forced target language token is not a hypothesis token
        for batch in batches([len(ids) for ids in encoded], max_tokens):
            limit = int(max_len_a * len(encoded[batch[0]]) + max_len_b)
            inputs = self.tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
            with torch.no_grad():
                generated = self.model.generate(**inputs, num_beams=beam, max_new_tokens=limit + 1 + extra)
            for i, text in zip(batch, self.tokenizer.batch_decode(generated, skip_special_tokens=True)):
                hypotheses[i] = text
        return Output(hypotheses, time.perf_counter() - start)


class CTranslate2Engine(Engine):
    """A CTranslate2 model converted from the folder (``to_ctranslate2``), on the CPU as CTranslate2 runs best
    there: ``threads`` batches of at most ``batch_sentences`` translated in parallel, one thread each (one batch
    over two threads measured 4-10x slower on 2 cores: scripts/bench_deploy.py)."""

    def __init__(self, hf_folder: str, ct2_folder: str, threads: int, batch_sentences: int = 16):
        super().__init__(hf_folder, threads)
        # optional extra (deploy): ctranslate2
        import ctranslate2

        self.translator = ctranslate2.Translator(ct2_folder, device="cpu", inter_threads=threads, intra_threads=1)
        self.batch_sentences = batch_sentences

    def translate(self, sentences: Sequence[str], beam: int, max_tokens: int = 4000, max_len_a: float = 0.0,
                  max_len_b: int = 200) -> Output:
        """CTranslate2 sorts and batches itself; a hypothesis longer than its sentence's own limit is cut there
        (fairseq's forced </s>, per sentence rather than per padded batch)."""
        start = time.perf_counter()
        tokens = [self.tokenizer.convert_ids_to_tokens(self.tokenizer(text)["input_ids"]) for text in sentences]
        limits = [int(max_len_a * len(t) + max_len_b) for t in tokens]
        extra = 1 if self.target_prefix else 0  # the forced target language token
        results = self.translator.translate_batch(
            tokens, target_prefix=[self.target_prefix] * len(tokens) if self.target_prefix else None, beam_size=beam,
            max_decoding_length=max(limits, default=1) + extra, min_decoding_length=1 + extra,  # fairseq's --min-len 1
            max_batch_size=self.batch_sentences)
        special = set(self.tokenizer.all_special_tokens)
        hypotheses = [self.tokenizer.convert_tokens_to_string([t for t in result.hypotheses[0][:limit + extra]
                                                               if t not in special])
                      for result, limit in zip(results, limits)]
        return Output(hypotheses, time.perf_counter() - start)
