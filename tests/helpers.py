"""Tiny models for tests: built through fairseq's own parser, task and registry, in seconds."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import List, Sequence, Tuple

import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from omegaconf import OmegaConf

from fairseq_moe_prune import USER_DIR  # noqa: F401  (importing the package registers the plugin)

SYMBOLS = [f"w{i}" for i in range(40)]
# Set by scripts/test.sh (README's test command, CI), which installs every extra: there a missing extra
# fails the tests that need it instead of skipping them.
REQUIRE_EXTRAS = "FAIRSEQ_MOE_PRUNE_REQUIRE_EXTRAS"


def import_extra(module: str):
    """An optional dependency's module; skips the calling test file when it is missing, unless
    ``FAIRSEQ_MOE_PRUNE_REQUIRE_EXTRAS=1``, where the ImportError fails it."""
    if os.environ.get(REQUIRE_EXTRAS) == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


def write_dictionaries(data_dir: Path, src: str = "src", tgt: str = "tgt") -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    for lang in (src, tgt):
        (data_dir / f"dict.{lang}.txt").write_text("".join(f"{s} 1\n" for s in SYMBOLS))


def build_tiny_model(data_dir: Path, *extra_args: str, arch: str = "moe_transformer_toy",
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


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Weights of order ``std`` and layer norms around 1, so that logits are of order 1.

    Default initialisations (std 0.02) give near-zero logits and near-uniform gates, which would
    make a comparison between two implementations vacuous.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            mean = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            parameter.copy_(mean + std * torch.randn(parameter.shape, generator=generator))


def tiny_hf_model(seed: int = 0):
    """A random Hugging Face NllbMoe over the tests' dictionary: 2+2 layers of width 16, 4 experts in layers 1."""
    import transformers

    config = transformers.NllbMoeConfig(
        vocab_size=4 + len(SYMBOLS), d_model=16, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, num_experts=4,
        encoder_sparse_step=2, decoder_sparse_step=2, max_position_embeddings=64,
    )
    model = transformers.NllbMoeForConditionalGeneration(config).eval()
    randomize(model, seed)
    with torch.no_grad():
        model.model.shared.weight[2] *= 8  # a likelier </s>, so that beam search ends before the length limit
    return model


def random_sentences(lengths: Sequence[int], seed: int = 0) -> List[torch.Tensor]:
    """Token ids of the tests' dictionary, each sentence ending with </s> (2)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(4, 4 + len(SYMBOLS), (n - 1,), generator=generator), torch.tensor([2])])
            for n in lengths]


def pad(sentences: Sequence[torch.Tensor], left: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens padded with 1, mask of real tokens): fairseq pads sources on the left, Hugging Face on the right."""
    width = max(len(s) for s in sentences)
    tokens = torch.full((len(sentences), width), 1)
    mask = torch.zeros(len(sentences), width, dtype=torch.long)
    for i, sentence in enumerate(sentences):
        columns = slice(width - len(sentence), width) if left else slice(0, len(sentence))
        tokens[i, columns] = sentence
        mask[i, columns] = 1
    return tokens, mask


def tiny_checkpoint_with_stats(folder: Path, pairs: Sequence[str] = ("src-tgt", "tgt-src")) -> Tuple[Path, Path]:
    """A tiny MoE checkpoint (4 experts in encoder and decoder layer 1) and a statistics file for it.

    The counts are made up (expert e is first choice of e + 1 tokens), enough to rank and prune by.
    """
    import numpy as np

    from fairseq_moe_prune import stats
    from fairseq_moe_prune.fingerprint import model_fingerprint

    cfg, _, model = build_tiny_model(folder / "data")
    save_like_trainer(cfg, model, folder / "model.pt")
    fingerprint = model_fingerprint(model)
    recorded = stats.MoEStats(fingerprint, {"beam": 1}, {})
    for pair in pairs:
        layers = {}
        for prefix, experts in fingerprint.layers:
            top1 = np.arange(1, experts + 1, dtype=np.int64)
            layers[prefix] = stats.LayerCounts(int(top1.sum()), top1, 2 * top1, top1 * 2**31, top1 * 2**31,
                                               top1 * 2**30, top1, top1, top1 * 2**20)
        recorded.pairs[pair] = stats.PairStats(3, layers)
    stats.save(stats.identify_runs(recorded, "valid", 3), str(folder / "stats.json"))
    return folder / "model.pt", folder / "stats.json"
