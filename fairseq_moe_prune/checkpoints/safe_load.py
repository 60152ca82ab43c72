"""Checkpoints are untrusted input: load them with ``weights_only=True`` and a short allowlist.

torch >= 2.6 already loads with ``weights_only=True``, which refuses the one class that fairseq
pickles into its checkpoints (``argparse.Namespace``, the legacy model config). We allowlist
exactly that, and check every checkpoint statically before loading it, so that a pickle that
names anything else is refused with one line, even under ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.

The static check reads every pickle torch would unpickle, in both formats: each ``*.pkl`` record
of a zip checkpoint, and the five pickles at the head of a legacy (pre-1.6, non-zip) one. Every
global a pickle names (``GLOBAL``, ``INST``, ``STACK_GLOBAL``) must be on the allowlist; a
``STACK_GLOBAL`` whose name is not two plain strings, a copyreg extension, the pre-0.4 tar format
and TorchScript archives are refused outright. A file the check cannot read is refused too.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import pickle
import pickletools
import tarfile
import zipfile
from typing import IO, Any, Callable, Dict, List, Optional, Set

import torch
from torch import _weights_only_unpickler

from fairseq_moe_prune.checkpoints.zip_records import ZipRecordsError, read_directory, read_record
from fairseq_moe_prune.errors import FairseqMoEPruneError

# Every class a checkpoint may name besides torch's own tensors and containers.
SAFE_GLOBALS: List[type] = [argparse.Namespace]


class CheckpointError(FairseqMoEPruneError):
    """A checkpoint cannot be used; the message is one line meant for the user."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint pickles objects outside the allowlist (it could run code when loaded)."""


def first_line(error: BaseException) -> str:
    """torch's loading errors run to many lines; the user gets the first (or the error's type)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def refusal_reason(error: BaseException) -> str:
    """Why torch's weights-only unpickler refused a file, without its advice to load it unsafely."""
    for line in str(error).splitlines():
        line = line.replace("WeightsUnpickler error:", "").strip()
        if line and not any(word in line for word in ("weights_only", "Weights only", "torch.load", "http")):
            return line
    return "it holds objects outside fairseq-moe-prune's allowlist of safe classes"


def install_allowlist() -> None:
    torch.serialization.add_safe_globals(SAFE_GLOBALS)


def allowed_globals() -> Set[str]:
    """Names (``module.qualname``) that torch's weights-only unpickler accepts, ours included."""
    install_allowlist()
    return set(_weights_only_unpickler._get_allowed_globals()) | set(_weights_only_unpickler._get_user_allowed_globals())


# opcodes that push a string; those that leave the stack as it is; the memo's readers and writers
STRING_OPS = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}
NEUTRAL_OPS = {"PROTO", "FRAME", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def pickle_globals(stream: IO[bytes]) -> Set[str]:
    """Every global one pickle (read from ``stream`` up to its STOP) names, without unpickling it.

    ``STACK_GLOBAL`` takes its name from the two values on top of the stack: we follow string pushes
    and the memo, and anything we cannot follow becomes a name that no allowlist holds.
    """
    names: Set[str] = set()
    memo: Dict[int, Optional[str]] = {}
    pushed: List[Optional[str]] = []  # what the ops pushed, None where not a known string
    for opcode, arg, _ in pickletools.genops(stream):
        op = opcode.name
        if op in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            names.add(f"{module}.{name}")
        elif op == "STACK_GLOBAL":
            module, name = pushed if len(pushed) == 2 else (None, None)
            names.add(f"{module}.{name}" if isinstance(module, str) and isinstance(name, str)
                      else "<a global named by computed values>")
        elif op.startswith("EXT"):
            names.add(f"<copyreg extension {arg}>")
        if op in PUT_OPS:
            memo[arg] = pushed[-1] if pushed else None
        elif op == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        if op in STRING_OPS:
            pushed.append(arg if isinstance(arg, str) else None)
        elif op in GET_OPS:
            pushed.append(memo.get(arg))
        elif op not in NEUTRAL_OPS:
            pushed.append(None)
        del pushed[:-2]
    return names


LEGACY_PICKLES = 5  # magic number, protocol version, system info, the checkpoint, its storage keys


def names_in_checkpoint(path: str) -> Set[str]:
    """Every global the pickles of a torch checkpoint (zip or legacy format) name.

    A zip checkpoint's pickles are read where torch's reader finds them (:mod:`zip_records`), not where
    Python's zipfile would: the scan sees exactly the bytes torch unpickles.
    """
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch's own test of the format
        if is_zip:
            names: Set[str] = set()
            records = read_directory(f.fileno())
            pickles = [record for name, record in records.items() if name.lower().endswith(".pkl")]
            if any(record.filename.lower().endswith("constants.pkl") for record in pickles):
                names.add("<a TorchScript archive>")  # torch.jit.load's, not pickle's
            for record in pickles:
                names |= pickle_globals(io.BytesIO(read_record(f.fileno(), record)))
            return names
    if tarfile.is_tarfile(path):
        return {"<the pre-0.4 tar checkpoint format>"}
    names = set()
    with open(path, "rb") as f:
        for _ in range(LEGACY_PICKLES):
            names |= pickle_globals(f)
    return names


def unsafe_globals(path: str) -> List[str]:
    """Classes and functions the pickles in ``path`` name that the allowlist does not cover.

    Raises :class:`CheckpointError` when the pickles cannot be read (truncated, corrupt, not a checkpoint).
    """
    try:
        names = names_in_checkpoint(path)
    except (ValueError, EOFError, OSError, UnicodeDecodeError, ZipRecordsError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({first_line(error)})") from None
    return sorted(names - allowed_globals())


def check_checkpoint(path: str) -> None:
    """Raise a :class:`CheckpointError` unless ``path`` is a checkpoint we are willing to unpickle."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    check_names(path, unsafe_globals(path))


MAX_NESTING = 100  # containers within containers: a fairseq state has fewer than 10; pickling recurses per level


def check_nesting(state: Any, path: str) -> None:
    """Refuse a loaded state nested deeper than :data:`MAX_NESTING` (writing it again, or walking it, would
    exhaust Python's recursion limit); the walk itself is iterative."""
    stack = [(state, 0)]
    seen: Set[int] = set()
    while stack:
        value, depth = stack.pop()
        if depth > MAX_NESTING:
            raise CheckpointError(f"{path}: not a fairseq checkpoint (its contents are nested more than "
                                  f"{MAX_NESTING} deep)")
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, argparse.Namespace):
            stack.extend((item, depth + 1) for item in vars(value).values())


def check_names(path: str, names: Set[str]) -> None:
    """Raise an :class:`UnsafeCheckpointError` if the pickles of ``path`` name anything off the allowlist."""
    bad = sorted(set(names) - allowed_globals())
    if bad:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: it pickles {', '.join(sorted(set(bad)))}, "
            "which is not on fairseq-moe-prune's allowlist of safe classes"
        )


def load_checkpoint(path: str, mmap: bool = True, meta: bool = False) -> Dict[str, Any]:
    """Load a checkpoint onto the CPU safely; tensors stay memory-mapped when possible.

    With ``meta`` only the pickle is read: tensors come on the meta device, and each one's storage
    carries ``_checkpoint_offset``, where its bytes start in the file.
    """
    check_checkpoint(path)
    try:
        if meta:
            state = torch.load(path, map_location="meta", weights_only=True)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        check_nesting(state, path)
        return state
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(f"{path}: refusing to load: {refusal_reason(error)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        if mmap and "mmap" in str(error) and not zipfile.is_zipfile(path):
            return load_checkpoint(path, mmap=False)  # the pre-1.6 format cannot be memory-mapped
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({first_line(error)})") from None


def guard_fairseq_loading(load_elsewhere: Optional[Callable[[str, Any], Optional[Dict[str, Any]]]] = None) -> None:
    """Make stock fairseq CLIs refuse unsafe checkpoints with one line instead of a traceback.

    fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` is the one function through which
    ``fairseq-generate``, ``-interactive`` and ``-train`` read checkpoints; we check the file first.
    ``load_elsewhere(path, arg_overrides)``, given by the caller (the package's registration hands down the
    loader of offloaded or placed models, ``checkpoints.placed``), loads the checkpoints it takes and returns
    None for the others, which fairseq's own function then loads: this module decides only whether bytes may
    be unpickled, never where experts go.
    """
    # start-up speed: called by the registration, once fairseq is imported; prune and convert load without fairseq
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
        if load_elsewhere is not None:
            try:
                state = load_elsewhere(path, args[0] if args else kwargs.get("arg_overrides"))
            except FairseqMoEPruneError as error:  # CheckpointError, MoEConfigError, PlacementError
                raise SystemExit(f"error: {error}") from None
            if state is not None:
                return state
        try:
            return original(path, *args, **kwargs)
        except pickle.UnpicklingError as error:
            raise SystemExit(f"error: {path}: refusing to load: {refusal_reason(error)}") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as error:
            raise SystemExit(f"error: {path}: not a readable fairseq checkpoint ({first_line(error)})") from None

    load_checkpoint_to_cpu._moe_prune_guarded = True  # type: ignore[attr-defined]
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
