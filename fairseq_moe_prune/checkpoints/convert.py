"""Convert between NLLB's expert-sharded layout, one fairseq file and Hugging Face's NllbMoe.

Every route goes through one form in between, a fairseq checkpoint to write (config and weights,
experts still in their files), so there is one reader and one writer per format. Memory stays
bounded as in pruning: fairseq outputs are written tensor by tensor (``save_streaming``), an HF
output holds one safetensors shard at a time, and inputs are memory-mapped or read lazily.
"""

from __future__ import annotations

import os
from typing import List, Optional

from fairseq_moe_prune.checkpoints import FORMATS
from fairseq_moe_prune.checkpoints.hf import parse_size, read_hf, write_hf
from fairseq_moe_prune.checkpoints.layouts import SHARED_SUFFIX, checkpoint_files, model_config, open_checkpoint
from fairseq_moe_prune.checkpoints.m2m100 import write_m2m100
from fairseq_moe_prune.checkpoints.safe_load import CheckpointError
from fairseq_moe_prune.checkpoints.surgery import CheckpointView, save_sharded, save_single, view_checkpoint
from fairseq_moe_prune.files import check_output, input_files, staged_directory
from fairseq_moe_prune.layout import moe_layers


def detect_format(path: str) -> str:
    """An HF model is a folder, a sharded fairseq checkpoint is named by its ``X-shared.pt``."""
    if os.path.isdir(path):
        return "hf"
    return "sharded" if path.endswith(SHARED_SUFFIX) else "single"


def read(path: str, source_format: str, dense: bool) -> CheckpointView:
    """Any input as a whole fairseq checkpoint to write (the optimizer state is dropped); a dense model
    (no MoE layers) only where ``dense`` allows it."""
    if source_format == "hf":
        return read_hf(path)
    return view_checkpoint(open_checkpoint(path, dense))


def output_stem(path: str, source_format: str) -> str:
    """File names of a sharded output follow the input's: ``X-shared.pt`` -> ``X``, ``model.pt`` -> ``model``."""
    if source_format == "hf":
        return "checkpoint"
    name = os.path.basename(path)
    return name[: -len(SHARED_SUFFIX)] if source_format == "sharded" else os.path.splitext(name)[0]


def convert(src: str, out: str, target: str, source_format: Optional[str] = None, fp16: bool = False,
            force: bool = False, max_shard_size: str = "5GB", dict_path: Optional[str] = None,
            spm_path: Optional[str] = None, direction: Optional[str] = None) -> List[str]:
    """Write ``src`` to ``out`` in the ``target`` format; returns the paths written.

    ``single`` writes the file ``out``; ``sharded`` (``X-shared.pt`` and ``X-rank-N.pt``) and ``hf``
    create the folder ``out``. Either appears whole or not at all, and replaces an existing ``out``
    only with ``force``. ``hf`` writes an MoE model as NllbMoe and a dense one as M2M100, which needs the
    fairseq dictionary (``dict_path``) and takes a SentencePiece model for its tokenizer and the direction
    where the checkpoint does not name it (see checkpoints/m2m100.py).
    """
    detected = detect_format(src)
    if source_format is not None and source_format != detected:
        raise CheckpointError(f"{src} is a {detected} checkpoint, not {source_format} (an HF model is a folder, "
                              f"a sharded one is given by its X{SHARED_SUFFIX})")
    if target not in FORMATS:
        raise CheckpointError(f"unknown format {target!r} (one of {', '.join(FORMATS)})")
    m2m100_inputs = [path for path in (dict_path, spm_path) if path is not None]
    if (m2m100_inputs or direction) and target != "hf":
        raise CheckpointError("--dict, --spm and --direction are for --to hf (a dense model as M2M100)")
    check_output(out, (input_files(src) if detected == "hf" else checkpoint_files(src)) + m2m100_inputs, force)
    if target == "hf":
        parse_size(max_shard_size)  # now, not after reading the input
    if target == "single" and os.path.isdir(out):
        raise CheckpointError(f"{out} is a folder; a single-file checkpoint needs a file name")

    checkpoint = read(src, detected, dense=target != "sharded")
    if target == "single":
        save_single(checkpoint, out, fp16)
        return [out]
    with staged_directory(out, force) as staging:
        if target == "sharded":
            save_sharded(checkpoint, os.path.join(staging, output_stem(src, detected) + SHARED_SUFFIX), fp16)
        elif not moe_layers(model_config(checkpoint.state)) or m2m100_inputs or direction:
            write_m2m100(checkpoint, staging, dict_path, spm_path, direction, fp16, max_shard_size)
        else:
            write_hf(checkpoint, staging, fp16, max_shard_size)
    return [os.path.join(out, name) for name in sorted(os.listdir(out))]
