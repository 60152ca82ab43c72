"""Tiny models for tests: built through fairseq's own parser, task and registry, in seconds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Tuple

import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from omegaconf import OmegaConf

import fairseq_moe_prune  # noqa: F401  (registers the plugin)

USER_DIR = os.path.dirname(os.path.abspath(fairseq_moe_prune.__file__))
SYMBOLS = [f"w{i}" for i in range(40)]


def write_dictionaries(data_dir: Path, src: str = "src", tgt: str = "tgt") -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    for lang in (src, tgt):
        (data_dir / f"dict.{lang}.txt").write_text("".join(f"{s} 1\n" for s in SYMBOLS))


def build_tiny_model(data_dir: Path, *extra_args: str, arch: str = "moe_transformer_tiny",
                     task: str = "translation"):
    """(cfg, task, model) for a translation task on a dictionary-only data dir.

    The config also holds generation options, so ``task.build_generator`` works on it.
    """
    write_dictionaries(data_dir)
    parser = options.get_training_parser()
    options.add_generation_args(parser)
    args = options.parse_args_and_arch(
        parser,
        [str(data_dir), "--task", task, "-s", "src", "-t", "tgt", "--arch", arch,
         "--user-dir", USER_DIR, *extra_args],
    )
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return cfg, task, model


def save_like_trainer(cfg, model, path: Path) -> None:
    """Write a checkpoint with the layout fairseq's Trainer.state_dict() gives it."""
    state = {
        "args": None,
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model.state_dict(),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "MoELabelSmoothedCrossEntropy", "optimizer_name": "Adam",
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "task_state": {},
        "extra_state": {},
        "last_optimizer_state": None,
    }
    torch.save(state, path)


def random_batch(num_sentences: int = 3, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source tokens with left padding (fairseq's default), lengths and shifted targets."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (num_sentences,), generator=generator)
    lengths[0] = 8
    src = torch.full((num_sentences, 8), 1)  # pad = 1
    for i, length in enumerate(lengths.tolist()):
        src[i, 8 - length:] = torch.randint(4, 4 + len(SYMBOLS), (length,), generator=generator)
        src[i, -1] = 2  # eos
    prev = torch.randint(4, 4 + len(SYMBOLS), (num_sentences, 6), generator=generator)
    prev[:, 0] = 2
    return src, lengths, prev


def logits(model, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(*batch)[0]
