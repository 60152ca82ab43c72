"""Read the structure of a zip checkpoint without torch's unpickler: which record holds each tensor.

torch's weights-only unpickler is pure Python and builds a tensor for every storage; reading the
pickles of a sharded NLLB (the shared part and a hundred rank files) that way costs seconds. Here
the pickle is first checked statically exactly as :mod:`safe_load` checks every checkpoint (the
opcode scan and the allowlist), then read by the C unpickler with ``find_class`` restricted to the
few names a fairseq state holds: ``collections.OrderedDict``, ``argparse.Namespace``, the typed
storage classes (for their dtype only) and ``torch._utils._rebuild_tensor_v2``, which becomes
:class:`TensorRecord`, a description of the tensor (its storage's record, offset, shape, stride).
Nothing else can be named, so nothing from the file becomes code. A checkpoint this reader does
not cover (the legacy format, a big-endian file, any other allowed class) raises
:class:`Unsupported`, and the caller reads it through torch as before.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import re
import sys
from dataclasses import dataclass, fields
from typing import IO, Any, Dict, Tuple

import torch

from fairseq_moe_prune.checkpoints.safe_load import (
    CheckpointError,
    check_names,
    check_nesting,
    first_line,
    pickle_globals,
)
from fairseq_moe_prune.checkpoints.zip_records import (
    STORED,
    ZipRecord,
    ZipRecordsError,
    data_offset,
    read_directory,
    read_record,
)

# the typed storage classes torch pickles as each storage's type, by name; only their dtype is used
STORAGE_DTYPES: Dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
STORAGE_KEY = re.compile(r"^[0-9A-Za-z_]{1,64}$")  # torch's keys are numbers; a key names a zip record


class Unsupported(Exception):
    """This reader does not cover the checkpoint (it is not wrong): read it through torch."""


class LoadedNamespace(argparse.Namespace):
    """An ``argparse.Namespace`` while it is unpickled: it takes its attributes as torch's unpickler gives them.

    The C unpickler's BUILD would intern the attribute names, and an interned name is another object than the
    pickle's own string, which the state, written again, would then spell out instead of referring to.
    """

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise Unsupported("a Namespace with state that is not a dict")
        self.__dict__.update(state)
        self.__class__ = argparse.Namespace


class Unbuildable:
    """A record the unpickler makes whose fields no pickle may set.

    ``frozen=True`` guards ``setattr`` only: the C unpickler's BUILD writes a state straight into the
    ``__dict__`` of an object without ``__setstate__``. Here ``__setstate__`` refuses, and ``__reduce__``
    rebuilds a record from its fields (copying or pickling one never needs a state).
    """

    def __setstate__(self, state: Any) -> None:
        raise CheckpointError("refusing to load: its pickle sets the fields of a tensor or storage description "
                              "(BUILD), which no checkpoint torch writes does")

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return type(self), tuple(getattr(self, field.name) for field in fields(self))


@dataclass(frozen=True)
class StorageType(Unbuildable):
    dtype: torch.dtype


@dataclass(frozen=True)
class StorageRecord(Unbuildable):
    """One storage: the zip record ``data/<key>`` holding ``numel`` elements of ``dtype``."""

    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRecord(Unbuildable):
    """A tensor as its pickle describes it, with no bytes read."""

    storage: StorageRecord
    offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    def is_whole_storage(self) -> bool:
        """The tensor is its storage, in order: its bytes are exactly its record's."""
        expected, step = [], 1
        for size in reversed(self.shape):
            expected.append(step)
            step *= size
        contiguous = all(size == 1 or s == e for size, s, e in zip(self.shape, self.stride, reversed(expected)))
        return self.offset == 0 and contiguous and self.numel() == self.storage.numel


def _int_tuple(value: Any) -> Tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise Unsupported("a tensor's size or stride is not a tuple of whole numbers")
    return value


class StructureUnpickler(pickle.Unpickler):
    """The C unpickler, able to name only a fairseq state's classes; tensors become :class:`TensorRecord`."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: Dict[str, StorageRecord] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "argparse" and name == "Namespace":
            return LoadedNamespace
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self.rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(STORAGE_DTYPES[name])
        raise Unsupported(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> StorageRecord:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
                and isinstance(pid[2], str) and STORAGE_KEY.match(pid[2]) and type(pid[4]) is int and pid[4] >= 0):
            raise Unsupported("a persistent id that is not a storage")
        _, storage_type, key, _, numel = pid
        if key not in self.storages:
            self.storages[key] = StorageRecord(key, storage_type.dtype, numel)
        storage = self.storages[key]
        if storage.dtype != storage_type.dtype or storage.numel != numel:
            raise Unsupported(f"storage {key} is named with two types")
        return storage

    def rebuild_tensor(self, storage: Any, offset: Any, shape: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, metadata: Any = None) -> TensorRecord:
        if not isinstance(storage, StorageRecord) or type(offset) is not int or offset < 0 or requires_grad is not False \
                or backward_hooks or metadata:
            raise Unsupported("a tensor with gradients, hooks or metadata")
        return TensorRecord(storage, offset, _int_tuple(shape), _int_tuple(stride))


class MappedUnpickler(StructureUnpickler):
    """Tensors as ``torch.load(mmap=True)`` makes them: views of the file, memory-mapped once, at their records."""

    def __init__(self, data: bytes, path: str, fd: int, prefix: str, records: Dict[str, ZipRecord], size: int):
        super().__init__(data)
        self.fd, self.prefix, self.records, self.size = fd, prefix, records, size
        self.base = torch.UntypedStorage.from_file(path, False, size)  # private: the input is never written
        self.views: Dict[str, Tuple[torch.UntypedStorage, ZipRecord]] = {}

    def rebuild_tensor(self, *args: Any) -> torch.Tensor:
        record = super().rebuild_tensor(*args)
        key = record.storage.key
        if key not in self.views:
            info = stored_record(self.records, self.prefix, record.storage, self.size)
            start = data_offset(self.fd, info)
            if start + info.file_size > self.size:
                raise Unsupported(f"record {info.filename} runs past the end of the file")
            self.views[key] = (self.base[start:start + info.file_size], info)
        try:
            return torch.empty((0,), dtype=record.dtype).set_(self.views[key][0], record.offset, record.shape,
                                                               record.stride)
        except RuntimeError as error:  # out of its storage's bounds: torch says how
            raise Unsupported(first_line(error)) from None


@dataclass
class CheckpointIndex:
    """A zip checkpoint's unpickled structure (tensors as :class:`TensorRecord`) and where its records are."""

    path: str
    state: Any
    prefix: str  # the folder of the records inside the zip, "archive/" or the like
    records: Dict[str, ZipRecord]  # every zip record by name
    version: Tuple[int, int]  # the file's (size, mtime) when read

    def record(self, tensor: TensorRecord) -> ZipRecord:
        return stored_record(self.records, self.prefix, tensor.storage, self.version[0])


def stored_record(records: Dict[str, ZipRecord], prefix: str, storage: StorageRecord, file_size: int) -> ZipRecord:
    """The zip record of a storage, stored uncompressed, of the storage's size and inside the file."""
    info = records.get(f"{prefix}data/{storage.key}")
    nbytes = storage.numel * storage.dtype.itemsize
    if info is None or info.compress_type != STORED or info.file_size != nbytes \
            or info.header_offset + nbytes > file_size:
        raise Unsupported(f"storage {storage.key} has no stored record of {nbytes} bytes")
    return info


def read_pickle(path: str, f: IO[bytes]) -> Tuple[bytes, str, Dict[str, ZipRecord]]:
    """The checked pickle of the zip checkpoint open as ``f``, its records' folder and its records.

    The records are read where torch's reader finds them (:mod:`zip_records`). The checks are
    :func:`safe_load.check_checkpoint`'s: an unreadable file is a :class:`CheckpointError`, a pickle naming
    anything off the allowlist an :class:`~safe_load.UnsafeCheckpointError`.
    """
    if sys.byteorder != "little":
        raise Unsupported("a big-endian machine")
    if f.read(4) != b"PK\x03\x04":
        raise Unsupported("not a zip checkpoint")
    fd = f.fileno()
    try:
        records = read_directory(fd)
        if min((info.header_offset for info in records.values()), default=0) != 0:
            raise Unsupported("bytes before the first record")
        pickles = [name for name in records if name.lower().endswith(".pkl")]
        if len(pickles) != 1 or not pickles[0].endswith("/data.pkl") or pickles[0].count("/") != 1:
            raise Unsupported("other pickles than data.pkl")  # TorchScript, or odd: safe_load decides
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in records and read_record(fd, records[f"{prefix}byteorder"]).strip() != b"little":
            raise Unsupported("a big-endian checkpoint")
        if records[pickles[0]].compress_type != STORED:
            raise Unsupported("a compressed pickle")
        data = read_record(fd, records[pickles[0]])  # its CRC-32 is checked
        names = pickle_globals(io.BytesIO(data))
    except (ValueError, EOFError, OSError, UnicodeDecodeError, ZipRecordsError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({first_line(error)})") \
            from None
    check_names(path, names)
    return data, prefix, records


def unpickle(unpickler: StructureUnpickler, path: str) -> Any:
    try:
        state = unpickler.load()
        plain_namespaces(state)
    except Unsupported:
        raise
    except CheckpointError as error:  # a forged record (see Unbuildable)
        raise CheckpointError(f"{path}: {error}") from None
    except Exception as error:  # the scan accepted it, yet the C unpickler cannot read it: let torch say why
        raise Unsupported(first_line(error)) from None
    check_nesting(state, path)
    return state


def read_index(path: str) -> CheckpointIndex:
    """Check and read a zip checkpoint's pickle; :class:`Unsupported` where torch must read it instead."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        data, prefix, records = read_pickle(path, f)
    state = unpickle(StructureUnpickler(data), path)
    return CheckpointIndex(path, state, prefix, records, (stat.st_size, stat.st_mtime_ns))


def read_mapped(path: str) -> Tuple[Any, Dict[str, Tuple[torch.UntypedStorage, ZipRecord]], Tuple[int, int]]:
    """A checkpoint as ``torch.load(path, mmap=True, weights_only=True)`` loads it; with each storage's record
    and the file's (size, mtime). :class:`Unsupported` where torch must read it instead."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        data, prefix, records = read_pickle(path, f)
        unpickler = MappedUnpickler(data, path, f.fileno(), prefix, records, stat.st_size)
        state = unpickle(unpickler, path)
    return state, unpickler.views, (stat.st_size, stat.st_mtime_ns)


def plain_namespaces(value: Any) -> None:
    """Turn every :class:`LoadedNamespace` inside an unpickled structure (one without attributes: never built)
    into an ``argparse.Namespace``."""
    seen = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, argparse.Namespace):
            if type(item) is LoadedNamespace:
                item.__class__ = argparse.Namespace
            stack.extend(vars(item).values())
