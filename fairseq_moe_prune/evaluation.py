"""Translate a test set in this process exactly as ``fairseq-generate`` does, for many checkpoints.

A pruning sweep evaluates dozens of pruned checkpoints on every direction. Starting
``fairseq-generate`` for each would spend most of the time importing fairseq, so this module runs
generate.py's own steps in a live process: parse the same arguments, set up the task, load the
checkpoint through fairseq's loader with that task, batch every sentence (none dropped), run the
task's inference step and post-process the best hypothesis. A test checks that the output equals
fairseq-generate's ``D-`` lines.
"""

from __future__ import annotations

import ast
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch
from fairseq import checkpoint_utils, options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq_cli.generate import get_symbols_to_strip_from_output


@dataclass
class Translation:
    hypotheses: List[str]  # detokenized best hypothesis of each sentence, in input order
    sentences: int
    parameters: int  # of the model that translated, e.g. after pruning
    seconds: float  # generation time, excluding task setup and checkpoint loading


class Translator:
    """fairseq-generate's steps, with the task and test data of each direction set up only once.

    ``generate_args`` are fairseq-generate's arguments without ``--path`` and the languages.
    The last model loaded is kept while its file is unchanged: a multilingual model is the same
    whichever direction's task builds it (the tasks share one dictionary), so a sweep translating
    every direction with one checkpoint loads it once.
    """

    def __init__(self, generate_args: Sequence[str]):
        self.generate_args = list(generate_args)
        self.directions: Dict[Tuple[str, str], Tuple[Any, Any]] = {}  # (source, target) -> (cfg, task)
        self.loaded: Tuple[Any, torch.nn.Module] | None = None  # ((path, mtime, size), model)

    def setup(self, source: str, target: str) -> Tuple[Any, Any]:
        if (source, target) not in self.directions:
            parser = options.get_generation_parser()
            args = options.parse_args_and_arch(
                parser, [*self.generate_args, "--source-lang", source, "--target-lang", target]
            )
            cfg = convert_namespace_to_omegaconf(args)
            task = tasks.setup_task(cfg.task)
            task.load_dataset(cfg.dataset.gen_subset, task_cfg=cfg.task)
            self.directions[(source, target)] = (cfg, task)
        return self.directions[(source, target)]

    def load(self, checkpoint: str, source: str, target: str) -> torch.nn.Module:
        """The model, built by fairseq's loader with the direction's task and ``--model-overrides``."""
        cfg, task = self.setup(source, target)
        stat = os.stat(checkpoint)
        key = (os.path.abspath(checkpoint), stat.st_mtime_ns, stat.st_size)
        if self.loaded is None or self.loaded[0] != key:
            self.loaded = None  # free the previous model before loading the next
            overrides = ast.literal_eval(cfg.common_eval.model_overrides)
            models, _ = checkpoint_utils.load_model_ensemble([checkpoint], arg_overrides=overrides, task=task)
            model = models[0].eval()
            if cfg.common.fp16:
                model.half()
            self.loaded = (key, model.cuda() if self.use_cuda(cfg) else model)
        return self.loaded[1]

    @staticmethod
    def use_cuda(cfg: Any) -> bool:
        return torch.cuda.is_available() and not cfg.common.cpu

    def translate(self, checkpoint: str, source: str, target: str) -> Translation:
        """The best hypothesis of every sentence of ``--gen-subset`` in one direction."""
        cfg, task = self.setup(source, target)
        utils.set_torch_seed(cfg.common.seed)
        models = [self.load(checkpoint, source, target)]
        dataset = task.dataset(cfg.dataset.gen_subset)
        batches = task.get_batch_iterator(
            dataset=dataset,
            max_tokens=cfg.dataset.max_tokens,
            max_sentences=cfg.dataset.batch_size,
            max_positions=utils.resolve_max_positions(task.max_positions(), *[m.max_positions() for m in models]),
            ignore_invalid_inputs=cfg.dataset.skip_invalid_size_inputs_valid_test,
            required_batch_size_multiple=1,
            seed=cfg.common.seed,
            num_workers=0,
            disable_iterator_cache=True,
        ).next_epoch_itr(shuffle=False)
        generator = task.build_generator(models, cfg.generation)
        tokenizer, bpe = task.build_tokenizer(cfg.tokenizer), task.build_bpe(cfg.bpe)
        strip = get_symbols_to_strip_from_output(generator)

        hypotheses = {}
        start = time.perf_counter()
        with torch.no_grad():
            for sample in batches:
                if "net_input" not in sample:
                    continue
                if self.use_cuda(cfg):
                    sample = utils.move_to_cuda(sample)
                outputs = task.inference_step(generator, models, sample)
                for i, sample_id in enumerate(sample["id"].tolist()):
                    # fairseq-generate's post_process_prediction, less its re-encoding of the text,
                    # which adds unseen words to the task's dictionary (harmless only in a one-shot run)
                    text = task.target_dictionary.string(
                        outputs[i][0]["tokens"].int().cpu(), cfg.common_eval.post_process,
                        extra_symbols_to_ignore=strip,
                    )
                    if bpe is not None:
                        text = bpe.decode(text)
                    if tokenizer is not None:
                        text = tokenizer.decode(text)
                    hypotheses[sample_id] = text
        seconds = time.perf_counter() - start
        if len(hypotheses) != len(dataset):
            raise RuntimeError(f"{len(hypotheses)} hypotheses for {len(dataset)} sentences of {source}-{target}")
        parameters = sum(p.numel() for p in models[0].parameters())
        return Translation([hypotheses[i] for i in range(len(dataset))], len(dataset), parameters, seconds)
