"""Which task each sentence belongs to, read from the language tokens already in the batch.

Task-level MoE (Kudugunta et al. 2021) routes a sentence by its task instead of by its tokens. NLLB's
recipe puts language tokens in every batch (``--encoder-langtok src --decoder-langtok``); with
``--lang-tok-replacing-bos-eos`` the decoder's first input is the target language token, also at the
first step of beam search, so the decoder's task is known from its first input token at every step.
(Without that flag the decoder starts from ``</s>`` and sees the target language only from its second
position on, too late for the first step.) The encoder sees the source language token, not the target,
so a task-routed encoder routes by source language; the decoder routes by target language or by pair
(the source language then comes from the encoder's output, so beam reordering carries it along).

The tasks are fixed when the model is built for training and saved in its config: ``moe_task_langs``
(the languages, in the order of ``--langs``; language i is task i of the encoder and of a decoder
routed by target) and ``moe_task_pairs`` (the trained pairs; pair k is task k of a decoder routed by
pair). A language is trained as a target (or source) when a trained pair has it there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from fairseq_moe_prune.layout import MoEConfigError, config_value, moe_layers, skip_betas
from fairseq_moe_prune import stats
from fairseq_moe_prune.stats import StatsError

TASK_ROUTING = ("none", "decoder", "both")
TASKS = ("target", "pair")


def lang_token(lang: str) -> str:
    """NLLB's (and fairseq's default ``--lang-tok-style multilingual``) language token."""
    return f"__{lang}__"


def split_list(text: Optional[str]) -> List[str]:
    return [part for part in str(text or "").split(",") if part]


def split_pair(pair: str) -> Tuple[str, str]:
    """``stats.split_pair`` (the one rule for a pair's names), its refusal as a model-config error."""
    try:
        return stats.split_pair(pair)
    except StatsError as error:
        raise MoEConfigError(str(error)) from None


def task_routing(cfg: Any) -> str:
    """``none`` (token routing everywhere), ``decoder`` or ``both``."""
    value = str(config_value(cfg, "moe_task_routing", "none"))
    if value not in TASK_ROUTING:
        raise MoEConfigError(f"moe_task_routing is one of {', '.join(TASK_ROUTING)}, got {value!r}")
    return value


def routes_by_task(cfg: Any, side: str) -> bool:
    """Do the MoE layers of ``side`` route by task?"""
    routing = task_routing(cfg)
    return routing == "both" or (routing == "decoder" and side == "decoder")


@dataclass(frozen=True)
class TaskSpace:
    """The tasks of a task-routed model, from its config alone."""

    langs: List[str]
    pairs: List[str]
    task: str  # the decoder's task: "target" or "pair"

    @classmethod
    def from_config(cls, cfg: Any) -> "TaskSpace":
        task = str(config_value(cfg, "moe_task", "target"))
        if task not in TASKS:
            raise MoEConfigError(f"moe_task is one of {', '.join(TASKS)}, got {task!r}")
        langs, pairs = split_list(config_value(cfg, "moe_task_langs")), split_list(config_value(cfg, "moe_task_pairs"))
        if not langs or not pairs:
            raise MoEConfigError("a task-routed model needs moe_task_langs and moe_task_pairs")
        for pair in pairs:
            for lang in split_pair(pair):
                if lang not in langs:
                    raise MoEConfigError(f"moe_task_pairs: {pair} uses {lang}, which is not in moe_task_langs")
        return cls(langs, pairs, task)

    def num_tasks(self, side: str) -> int:
        """Rows of the side's task embedding."""
        if side == "decoder" and self.task == "pair":
            return len(self.pairs)
        return len(self.langs)

    def trained_sources(self) -> List[str]:
        return sorted({split_pair(pair)[0] for pair in self.pairs})

    def trained_targets(self) -> List[str]:
        return sorted({split_pair(pair)[1] for pair in self.pairs})

    def task_id(self, side: str, source: Optional[str], target: Optional[str]) -> int:
        """The row of the side's task embedding for a translation direction (a language must be known
        and trained in its role; the error says which is missing)."""
        if side == "encoder":
            return self._lang_id(source, "source", self.trained_sources())
        if self.task == "target":
            return self._lang_id(target, "target", self.trained_targets())
        pair = f"{source}-{target}"
        if pair not in self.pairs:
            if source not in self.langs or target not in self.langs:
                unknown = source if source not in self.langs else target
                raise MoEConfigError(f"unknown language {unknown} (the model knows {', '.join(self.langs)})")
            raise MoEConfigError(f"the model was not trained on {pair} (trained pairs: {', '.join(self.pairs)})")
        return self.pairs.index(pair)

    def _lang_id(self, lang: Optional[str], role: str, trained: List[str]) -> int:
        if lang not in self.langs:
            raise MoEConfigError(f"unknown language {lang} (the model knows {', '.join(self.langs)})")
        if lang not in trained:
            raise MoEConfigError(f"the model was not trained with {lang} as a {role} language "
                                 f"(trained {role}s: {', '.join(trained)})")
        return self.langs.index(lang)


def check_skipping(cfg: Any, betas: List[float]) -> None:
    """Dynamic skipping acts where a layer routes by token: a beta for a task-routed layer is refused (it
    would be ignored). ``betas``: one per MoE layer, in layout order."""
    for spec, beta in zip(moe_layers(cfg), betas):
        if beta > 0 and routes_by_task(cfg, spec.side):
            raise MoEConfigError(f"dynamic skipping (moe_skip_betas) acts on token routing; {spec.prefix} "
                                 "routes by task")


def configure(args: Any, task: Any) -> None:
    """Fill in the task fields of a model about to be trained from the training task, and check the flags.

    Called by ``build_model``; a checkpoint's saved fields are kept as they are, so the task ids of a
    trained model never depend on the flags it is later used with.
    """
    if task_routing(args) == "none":
        return
    task_args = getattr(task, "args", None)
    if task_args is None or not hasattr(task, "data_manager"):
        raise MoEConfigError("task routing needs --task translation_multi_simple_epoch(_moe) with language tokens")
    if not getattr(args, "moe_task_langs", None):
        args.moe_task_langs = ",".join(task.langs)
    if not getattr(args, "moe_task_pairs", None):
        args.moe_task_pairs = ",".join(task.lang_pairs)
    if not getattr(task_args, "decoder_langtok", False) or not getattr(task_args, "encoder_langtok", None):
        raise MoEConfigError("task routing reads the languages from the batch: use --encoder-langtok src --decoder-langtok")
    if str(task_args.encoder_langtok) != "src" and (routes_by_task(args, "encoder") or TaskSpace.from_config(args).task == "pair"):
        raise MoEConfigError("task routing reads the source language from the source's language token: use "
                             f"--encoder-langtok src (not {str(task_args.encoder_langtok)[:20]})")
    if not getattr(task_args, "lang_tok_replacing_bos_eos", False):
        raise MoEConfigError("task routing needs the target language token as the decoder's first input: "
                             "add --lang-tok-replacing-bos-eos (to training and translation alike)")
    TaskSpace.from_config(args)  # fail early on inconsistent fields
    check_skipping(args, skip_betas(args))


class TaskLookup(torch.nn.Module):
    """Token ids -> task ids, as non-persistent buffers (computed from the dictionary, not saved)."""

    def __init__(self, space: TaskSpace, dictionary: Any):
        super().__init__()
        token_lang = torch.full((len(dictionary),), -1, dtype=torch.long)
        for i, lang in enumerate(space.langs):
            index = dictionary.index(lang_token(lang))
            if index == dictionary.unk():
                raise MoEConfigError(f"task routing: the dictionary has no language token {lang_token(lang)}")
            token_lang[index] = i
        pair_task = torch.full((len(space.langs), len(space.langs)), -1, dtype=torch.long)
        for k, pair in enumerate(space.pairs):
            source, target = split_pair(pair)
            pair_task[space.langs.index(source), space.langs.index(target)] = k
        self.register_buffer("token_lang", token_lang, persistent=False)
        self.register_buffer("pair_task", pair_task, persistent=False)
        self.task = space.task

    def source_langs(self, src_tokens: Tensor) -> Tensor:
        """(B,) the language of the language token in each source sentence (wherever padding puts it)."""
        langs = self.token_lang[src_tokens].max(dim=1).values
        if bool((langs < 0).any()):
            raise MoEConfigError("task routing: a source sentence has no language token of a known language "
                                 "(translate with the model's --encoder-langtok and --langs)")
        return langs

    def decoder_tasks(self, prev_output_tokens: Tensor, source_langs: Optional[Tensor]) -> Tensor:
        """(B,) the decoder's task of each sentence, from its first input token (the target language token)."""
        targets = self.token_lang[prev_output_tokens[:, 0]]
        if bool((targets < 0).any()):
            raise MoEConfigError("task routing: the decoder's first input is not a target language token "
                                 "(translate with --decoder-langtok --lang-tok-replacing-bos-eos, as in training)")
        if self.task == "target":
            return targets
        if source_langs is None:
            raise MoEConfigError("task routing by pair needs the encoder's output")
        tasks = self.pair_task[source_langs, targets]
        if bool((tasks < 0).any()):
            raise MoEConfigError("task routing: a sentence's language pair is not one the model was trained on")
        return tasks
