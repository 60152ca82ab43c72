"""A dense fairseq ``transformer`` (an extracted sub-network, or any in NLLB's layout) as Hugging Face's
``M2M100ForConditionalGeneration``, the class NLLB-200's dense models load as.

M2M100 is NLLB's dense network with fewer degrees of freedom: pre-norm layers with a final layer norm
on each side, sinusoidal positions, one embedding shared by encoder, decoder and output, one FFN width
per side. A model outside that is refused with one line naming the form it can go to instead.

The language-token convention the model was trained with goes into the files, not into user code:
- ``--encoder-langtok src`` prepends the source language token (``__src__ x </s>``, NLLB's); with
  ``--lang-tok-replacing-bos-eos`` it replaces the source's ``</s>`` (``x __src__``). The tokenizer's
  post-processor writes either form.
- ``--decoder-langtok``: the decoder starts from ``</s>`` and the target language token is forced next
  (``forced_bos_token_id``), or, with ``--lang-tok-replacing-bos-eos``, the decoder starts from it
  (``decoder_start_token_id``). Both name one direction, so each output is one direction's model.

fairseq's vocabulary is its dictionary (``dict.txt`` plus the language tokens the task adds), not the
SentencePiece model's order: the tokenizer maps SentencePiece pieces to dictionary ids as fairseq does.
FFN units whose output weights are all zero (the padding ``extract`` adds to reach one width per side)
are moved last and each side is cut to its widest layer's count of real units: exact, since such a unit
adds ``act(.) * 0``. An extracted sub-network's widest layers are its folded ones, so its padding stays.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from fairseq.data import Dictionary
from fairseq.data.multilingual.multilingual_utils import augment_dictionary, get_lang_tok

from fairseq_moe_prune.checkpoints.hf import (
    quiet_hydra,
    rename_by,
    renames,
    shared_form_problem,
    transformers_module,
    write_safetensors,
)
from fairseq_moe_prune.checkpoints.layouts import model_config, task_config
from fairseq_moe_prune.checkpoints.safe_load import CheckpointError, first_line
from fairseq_moe_prune.checkpoints.streaming import Entry, materialize
from fairseq_moe_prune.checkpoints.surgery import CheckpointView
from fairseq_moe_prune.files import open_regular
from fairseq_moe_prune.layout import MoEConfigError, config_value, moe_layers

LANGUAGE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
LANG_TOK_STYLES = ("multilingual", "mbart")
SPECIAL_IDS = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}  # fairseq's Dictionary order
SPECIAL_TOKENS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
SPM_NAME = "sentencepiece.model"
MAX_LENGTH = 200  # fairseq-generate's default --max-len-b

# fairseq name -> M2M100 name, in hf.py's template form (its placeholders)
KEY_TABLE: List[Tuple[str, str]] = [
    ("encoder.embed_tokens.weight", "model.shared.weight"),
    ("{side}.layers.{i}.self_attn.{proj}.{p}", "model.{side}.layers.{i}.self_attn.{proj}.{p}"),
    ("{side}.layers.{i}.self_attn_layer_norm.{p}", "model.{side}.layers.{i}.self_attn_layer_norm.{p}"),
    ("decoder.layers.{i}.encoder_attn.{proj}.{p}", "model.decoder.layers.{i}.encoder_attn.{proj}.{p}"),
    ("decoder.layers.{i}.encoder_attn_layer_norm.{p}", "model.decoder.layers.{i}.encoder_attn_layer_norm.{p}"),
    ("{side}.layers.{i}.{fc}.{p}", "model.{side}.layers.{i}.{fc}.{p}"),
    ("{side}.layers.{i}.final_layer_norm.{p}", "model.{side}.layers.{i}.final_layer_norm.{p}"),
    ("{side}.layer_norm.{p}", "model.{side}.layer_norm.{p}"),
]
RENAMES = renames(KEY_TABLE)
# tied to model.shared, or buffers M2M100 computes itself
SKIPPED = re.compile(r"^(decoder\.embed_tokens\.weight|decoder\.output_projection\.weight|"
                     r"(encoder|decoder)\.(version|embed_positions\._float_tensor))$")


class M2M100Error(CheckpointError):
    """The model or its vocabulary cannot be written as M2M100; the message is one line for the user."""


@dataclass(frozen=True)
class Convention:
    """Where the language tokens go, as the fairseq task placed them."""

    source_template: List[str]  # tokens around "$A", the sentence
    decoder_start: str
    forced_bos: Optional[str]

    def describe(self) -> str:
        forced = f", then {self.forced_bos} forced" if self.forced_bos else ""
        return f"source {' '.join(self.source_template)}; decoder starts from {self.decoder_start}{forced}"


def task_value(task: Any, name: str, default: Any = None) -> Any:
    return config_value(task, name, default) if task is not None else default


def check_dense(config: Any) -> None:
    """M2M100 can hold this fairseq model, or a one-line error naming the form it can go to instead."""
    try:
        moe = moe_layers(config)
    except MoEConfigError as error:
        raise M2M100Error(str(error)) from None
    if moe:
        raise M2M100Error(f"the model has {len(moe)} MoE layers and M2M100 is dense: convert it --to hf without "
                          "--dict/--spm/--direction (Hugging Face's NllbMoe), or extract a task-MoE's sub-network first")
    if config_value(config, "encoder_ffn_dims") or config_value(config, "decoder_ffn_dims"):
        raise M2M100Error("M2M100 has one FFN width per side and this model has per-layer widths: extract without "
                          "--per-layer-widths (each side zero-padded to one width), or keep it as a fairseq checkpoint")
    for side in ("encoder", "decoder"):
        if not config_value(config, f"{side}_normalize_before", False):
            raise M2M100Error(f"M2M100 is pre-norm and this model's {side} is post-norm: keep it as a fairseq "
                              "checkpoint (--to single), which ct2-fairseq-converter turns into a CTranslate2 model")
    problem = shared_form_problem(config)
    if problem:
        raise M2M100Error(f"M2M100 {problem}: keep it as a fairseq checkpoint")
    if not config_value(config, "share_all_embeddings", False):
        raise M2M100Error("M2M100 shares one embedding between encoder, decoder and output; this model does not "
                          "(--share-all-embeddings): keep it as a fairseq checkpoint")


def language(value: Any, what: str) -> str:
    if not isinstance(value, str) or not LANGUAGE.match(value):
        raise M2M100Error(f"{what} is not a language name: {repr(value)[:60]}")
    return value


def task_languages(task: Any) -> Optional[List[str]]:
    """The task's ``--langs`` (the order fairseq adds language tokens in), checked; None without any."""
    langs = task_value(task, "langs")
    if langs is None:
        return None
    if isinstance(langs, str):
        langs = langs.split(",")
    if not isinstance(langs, (list, tuple)) or not langs or len(langs) > 10_000:
        raise M2M100Error(f"the checkpoint's task config has no usable langs: {repr(langs)[:60]}")
    return [language(lang, "an entry of the task's langs") for lang in langs]


def vocabulary(dict_path: str, task: Any, langs: Optional[List[str]], rows: int) -> Tuple[Dictionary, str]:
    """fairseq's dictionary as the task builds it: ``dict.txt`` and the tokens of ``langs`` (the task's, from
    :func:`task_languages`); ``rows`` must match."""
    dictionary = Dictionary()
    try:
        with open_regular(dict_path) as f:
            dictionary.add_from_file(f)
    except (ValueError, RuntimeError, UnicodeDecodeError) as error:
        raise M2M100Error(f"{dict_path}: not a fairseq dictionary ({first_line(error)[:120]})") from None
    style = task_value(task, "lang_tok_style", "multilingual")
    if style not in LANG_TOK_STYLES:
        raise M2M100Error(f"the task's lang_tok_style {repr(style)[:30]} is not one of {', '.join(LANG_TOK_STYLES)}")
    specs = task_value(task, "langtoks_specs", ["main"])
    if langs is not None:
        if list(specs) != ["main"] or task_value(task, "extra_data") is not None:
            raise M2M100Error("only the task's main language tokens are supported (langtoks_specs main, no extra_data)")
        augment_dictionary(dictionary, langs, style, ["main"], None)
    if len(dictionary) != rows:
        raise M2M100Error(f"{dict_path} and the task's languages give {len(dictionary)} symbols, but the model's "
                          f"embedding has {rows} rows: not the dictionary the model was trained with")
    return dictionary, style


def convention(task: Any, langs: Optional[List[str]], style: str, direction: Optional[str]) -> Convention:
    """The source layout and the decoder's first tokens for ``direction`` (SRC-TGT), as the task places them."""
    encoder_langtok = task_value(task, "encoder_langtok")
    decoder_langtok = bool(task_value(task, "decoder_langtok", False))
    replacing = bool(task_value(task, "lang_tok_replacing_bos_eos", False))
    if encoder_langtok not in (None, "src", "tgt"):
        raise M2M100Error(f"the task's encoder_langtok {repr(encoder_langtok)[:30]} is not src, tgt or none")
    if direction is None:
        source, target = task_value(task, "source_lang"), task_value(task, "target_lang")
        if (encoder_langtok or decoder_langtok) and (source is None or target is None):
            raise M2M100Error("the model places language tokens: name the direction it translates, --direction SRC-TGT")
    else:
        source, target = direction.split("-", 1) if "-" in direction else (None, None)
        if source is None:
            raise M2M100Error(f"--direction {direction[:40]}: not SRC-TGT")
    for lang in (source, target):
        if lang is not None and langs is not None and language(lang, "the direction's language") not in langs:
            shown = ", ".join(langs[:8]) + (", ..." if len(langs) > 8 else "")
            raise M2M100Error(f"{lang} is not one of the model's languages ({shown})")
    source_token = get_lang_tok(source if encoder_langtok == "src" else target, style) if encoder_langtok else None
    target_token = get_lang_tok(target, style) if decoder_langtok else None
    if source_token is None:
        template = ["$A", "</s>"]
    else:
        template = ["$A", source_token] if replacing else [source_token, "$A", "</s>"]
    if replacing and target_token:
        return Convention(template, target_token, None)
    return Convention(template, "</s>", target_token)


def ffn_units(model: Mapping[str, Entry], records: Any, layer: str) -> Tuple[Dict[str, torch.Tensor], int]:
    """A layer's FFN with its all-zero output units moved last, and how many real units it has."""
    ffn = materialize({name: model[f"{layer}.{name}"] for name in ("fc1.weight", "fc1.bias", "fc2.weight")}, records)
    real = (ffn["fc2.weight"] != 0).any(dim=0)
    order = torch.cat([real.nonzero().flatten(), (~real).nonzero().flatten()])
    return {"fc1.weight": ffn["fc1.weight"][order], "fc1.bias": ffn["fc1.bias"][order],
            "fc2.weight": ffn["fc2.weight"][:, order]}, int(real.sum())


def m2m100_weights(checkpoint: CheckpointView, config: Any) -> Tuple[Dict[str, Entry], Dict[str, int], int]:
    """M2M100-named weights, each side's FFNs cut to the widest layer's real units; the widths, units dropped."""
    model: Dict[str, Entry] = {}
    for key, entry in checkpoint.model.items():
        if SKIPPED.match(key):
            continue
        name = rename_by(RENAMES, key)
        if name is None:
            raise M2M100Error(f"{key} has no counterpart in Hugging Face's M2M100")
        model[name] = entry
    widths, dropped = {}, 0
    for side in ("encoder", "decoder"):
        layers = [f"{side}.layers.{i}" for i in range(int(config_value(config, f"{side}_layers")))]
        cut = {layer: ffn_units(checkpoint.model, checkpoint.records, layer) for layer in layers}
        widths[side] = max([1] + [units for _, units in cut.values()])
        for layer, (ffn, _) in cut.items():
            dropped += int(ffn["fc1.bias"].shape[0]) - widths[side]
            model[f"model.{layer}.fc1.weight"] = ffn["fc1.weight"][: widths[side]].contiguous()
            model[f"model.{layer}.fc1.bias"] = ffn["fc1.bias"][: widths[side]].contiguous()
            model[f"model.{layer}.fc2.weight"] = ffn["fc2.weight"][:, : widths[side]].contiguous()
    return model, widths, dropped


def m2m100_config(config: Any, vocab: int, widths: Mapping[str, int], ids: Mapping[str, Any], dtype: torch.dtype) -> Any:
    fields = dict(
        vocab_size=vocab,
        d_model=config_value(config, "encoder_embed_dim"),
        encoder_layers=config_value(config, "encoder_layers"),
        decoder_layers=config_value(config, "decoder_layers"),
        encoder_ffn_dim=widths["encoder"],
        decoder_ffn_dim=widths["decoder"],
        encoder_attention_heads=config_value(config, "encoder_attention_heads"),
        decoder_attention_heads=config_value(config, "decoder_attention_heads"),
        activation_function=config_value(config, "activation_fn", "relu"),
        dropout=config_value(config, "dropout", 0.1),
        attention_dropout=config_value(config, "attention_dropout", 0.0),
        activation_dropout=config_value(config, "activation_dropout", 0.0),
        encoder_layerdrop=config_value(config, "encoder_layerdrop", 0.0),
        decoder_layerdrop=config_value(config, "decoder_layerdrop", 0.0),
        max_position_embeddings=max(config_value(config, "max_source_positions", 1024),
                                    config_value(config, "max_target_positions", 1024)),
        scale_embedding=not config_value(config, "no_scale_embedding", False),
        tie_word_embeddings=True,
        architectures=["M2M100ForConditionalGeneration"],
        torch_dtype=str(dtype).replace("torch.", ""),
        **SPECIAL_IDS,
        **ids,
    )
    return transformers_module().M2M100Config(**fields)


def generation_config(config: Any) -> Any:
    """fairseq-generate's search in HF's terms: beam 4 (NLLB's), scores normalised by length, stop once 4
    hypotheses end, no </s> as the first token (fairseq's --min-len 1), never <pad>, and at most 200
    tokens before a forced </s> (fairseq's default --max-len-b)."""
    return transformers_module().GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, forced_bos_token_id=config.forced_bos_token_id,
        bos_token_id=SPECIAL_IDS["bos_token_id"], pad_token_id=SPECIAL_IDS["pad_token_id"],
        eos_token_id=SPECIAL_IDS["eos_token_id"], num_beams=4, early_stopping=True, length_penalty=1.0,
        max_new_tokens=MAX_LENGTH + 1, forced_eos_token_id=SPECIAL_IDS["eos_token_id"], min_new_tokens=1,
        suppress_tokens=[SPECIAL_IDS["pad_token_id"]])


def write_tokenizer(folder: str, spm_path: str, dictionary: Dictionary, rule: Convention,
                    language_tokens: List[str]) -> None:
    """The SentencePiece model and a fast tokenizer over fairseq's dictionary ids with the source layout;
    ``language_tokens`` (in the dictionary, from the task's langs) are special."""
    transformers = transformers_module()
    # optional extra (hf): tokenizers comes with transformers; SpmConverter reads SentencePiece's protobuf
    from tokenizers import decoders, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    class Converter(SpmConverter):
        handle_byte_fallback = True

        def vocab(self, proto: Any) -> List[Tuple[str, float]]:
            scores = {piece.piece: piece.score for piece in proto.pieces}
            return [(symbol, scores.get(symbol, 0.0)) for symbol in dictionary.symbols]

        def unk_id(self, proto: Any) -> int:
            return dictionary.unk()

        def decoder(self, replacement: str, add_prefix_space: bool) -> Any:
            return decoders.Sequence([decoders.Replace(replacement, " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])

        def post_processor(self) -> Any:
            specials = sorted({token for token in rule.source_template if token != "$A"})
            return processors.TemplateProcessing(single=" ".join(rule.source_template),
                                                 special_tokens=[(t, dictionary.index(t)) for t in specials])

    class Original:  # what SpmConverter reads of a slow tokenizer
        vocab_file = spm_path
        add_prefix_space = True

    try:
        with quiet_hydra():  # the byte-fallback warning does not apply: handled above
            converter = Converter(Original())
            if converter.proto.trainer_spec.model_type != 1:
                raise M2M100Error(f"{spm_path}: only unigram SentencePiece models get a tokenizer here "
                                  "(write the model without --spm)")
            backend = converter.converted()
    except M2M100Error:
        raise
    except Exception as error:  # protobuf's DecodeError and friends: the file is not a SentencePiece model
        raise M2M100Error(f"{spm_path}: not a SentencePiece model ({first_line(error)[:120]})") from None
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=language_tokens,
                                                     model_max_length=MAX_LENGTH * 5,
                                                     model_input_names=["input_ids", "attention_mask"], **SPECIAL_TOKENS)
    tokenizer.save_pretrained(folder)
    shutil.copyfile(spm_path, os.path.join(folder, SPM_NAME))


def write_m2m100(checkpoint: CheckpointView, folder: str, dict_path: Optional[str], spm_path: Optional[str] = None,
                 direction: Optional[str] = None, fp16: bool = False, max_shard_size: str = "5GB") -> Dict[str, Any]:
    """Write a dense fairseq checkpoint into ``folder`` (new and empty) as an M2M100 model: config.json,
    generation_config.json, safetensors, and with ``spm_path`` the tokenizer. Returns what was done."""
    if dict_path is None:
        raise M2M100Error("M2M100's vocabulary is fairseq's dictionary: name it with --dict (the data folder's dict.txt)")
    config = model_config(checkpoint.state)
    check_dense(config)
    task = task_config(checkpoint.state)
    embedding = checkpoint.model["encoder.embed_tokens.weight"]
    langs = task_languages(task)
    dictionary, style = vocabulary(dict_path, task, langs, int(embedding.shape[0]))
    rule = convention(task, langs, style, direction)
    model, widths, dropped = m2m100_weights(checkpoint, config)
    ids = {"decoder_start_token_id": dictionary.index(rule.decoder_start),
           "forced_bos_token_id": dictionary.index(rule.forced_bos) if rule.forced_bos else None}
    dtype = torch.float16 if fp16 else None
    hf = m2m100_config(config, len(dictionary), widths, ids, dtype or embedding.dtype)
    if spm_path is not None:
        write_tokenizer(folder, spm_path, dictionary, rule, [get_lang_tok(lang, style) for lang in langs or []])
    hf.save_pretrained(folder)
    generation_config(hf).save_pretrained(folder)
    write_safetensors(model, folder, checkpoint.records, dtype, max_shard_size)
    done = {"architecture": "M2M100ForConditionalGeneration", "convention": rule.describe(),
            "ffn_widths": widths, "zero_units_dropped": dropped, "tokenizer": spm_path is not None}
    with open(os.path.join(folder, "conversion.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(done, indent=1, sort_keys=True) + "\n")
    return done
