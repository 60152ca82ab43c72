"""Checkpoints are untrusted input: load them with ``weights_only=True`` and a short allowlist.

torch >= 2.6 already loads with ``weights_only=True``, which refuses the one class that fairseq
pickles into its checkpoints (``argparse.Namespace``, the legacy model config). We allowlist
exactly that, and check every checkpoint statically before loading it, so that a pickle that
names anything else is refused with one line, even under ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import zipfile
from typing import Any, Callable, Dict, List

import torch

# Every class a checkpoint may name besides torch's own tensors and containers.
SAFE_GLOBALS: List[type] = [argparse.Namespace]


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message is one line meant for the user."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint pickles objects outside the allowlist (it could run code when loaded)."""


def first_line(error: BaseException) -> str:
    """torch's loading errors run to many lines; the user gets the first (or the error's type)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def install_allowlist() -> None:
    torch.serialization.add_safe_globals(SAFE_GLOBALS)


def unsafe_globals(path: str) -> List[str]:
    """Classes and functions the pickle in ``path`` names that the allowlist does not cover."""
    install_allowlist()
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (RuntimeError, ValueError, OSError, zipfile.BadZipFile):
        # truncated, or the pre-1.6 format: torch.load below fails or (weights_only) still guards it
        return []


def check_checkpoint(path: str) -> None:
    """Raise a :class:`CheckpointError` unless ``path`` is a checkpoint we are willing to unpickle."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    bad = unsafe_globals(path)
    if bad:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: it pickles {', '.join(sorted(set(bad)))}, "
            "which is not on fairseq-moe-prune's allowlist of safe classes"
        )


def load_checkpoint(path: str, mmap: bool = True) -> Dict[str, Any]:
    """Load a checkpoint onto the CPU safely; tensors stay memory-mapped when possible."""
    check_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(f"{path}: refusing to load: {first_line(error)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        if mmap and "mmap" in str(error) and not zipfile.is_zipfile(path):
            return load_checkpoint(path, mmap=False)  # the pre-1.6 format cannot be memory-mapped
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({first_line(error)})") from None


def guard_fairseq_loading() -> None:
    """Make stock fairseq CLIs refuse unsafe checkpoints with one line instead of a traceback.

    fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` is the one function through which
    ``fairseq-generate``, ``-interactive`` and ``-train`` read checkpoints; we check the file first.
    """
    from fairseq import checkpoint_utils

    original: Callable = checkpoint_utils.load_checkpoint_to_cpu
    if getattr(original, "_moe_prune_guarded", False):
        return

    @functools.wraps(original)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        if os.path.exists(path):
            try:
                check_checkpoint(path)
            except CheckpointError as error:
                raise SystemExit(f"error: {error}") from None
        try:
            return original(path, *args, **kwargs)
        except pickle.UnpicklingError as error:
            raise SystemExit(f"error: {path}: refusing to load: {first_line(error)}") from None

    load_checkpoint_to_cpu._moe_prune_guarded = True  # type: ignore[attr-defined]
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
