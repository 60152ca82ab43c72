"""Save a checkpoint whose expert tensors are read one source file at a time.

``torch.save`` wants every tensor in memory at once, which for a pruned NLLB means gigabytes of
kept experts. We save the structure first with untouched placeholders
(``torch.serialization.skip_data`` leaves each tensor's bytes as a hole of the right size), then
fill each hole from its source,
opening one source file at a time, and finally patch the zip CRCs. The result is an ordinary
torch checkpoint. A source is a torch checkpoint (its ``model`` weights) or a safetensors file.

Input bytes are checked as they are read: each memory-mapped storage of a torch checkpoint is
matched to the zip record it comes from, and its CRC-32 compared with the one the file records,
so corrupted weights are refused rather than copied under a fresh CRC.
"""

from __future__ import annotations

import bisect
import itertools
import os
import pickle
import re
import struct
import sys
import types
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from fairseq_moe_prune.checkpoints import pickle_index
from fairseq_moe_prune.checkpoints.pickle_index import TensorRecord, Unsupported
from fairseq_moe_prune.checkpoints.safe_load import CheckpointError, load_checkpoint
from fairseq_moe_prune.checkpoints.zip_records import data_offset
from fairseq_moe_prune.files import atomic_open


@dataclass(frozen=True)
class SourceTensor:
    """A tensor still in its source file: ``model[key]`` of the checkpoint at ``path``, or ``key`` of a
    safetensors file."""

    path: str
    key: str
    shape: Tuple[int, ...]
    dtype: torch.dtype


Entry = Union[Tensor, SourceTensor]


def stored_dtype(dtype: torch.dtype, cast: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a tensor of ``dtype`` is written in: floating tensors take ``cast`` (--fp16), others keep theirs."""
    return cast if cast is not None and dtype.is_floating_point else dtype


def cast_to_store(tensor: Tensor, cast: Optional[torch.dtype]) -> Tensor:
    """``tensor`` as it is written: in :func:`stored_dtype`, contiguous."""
    return tensor.to(stored_dtype(tensor.dtype, cast)).contiguous()


# the safetensors dtypes a weight may have
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class SafetensorsFile(Mapping[str, Tensor]):
    """The tensors of a safetensors file, each read when asked for (the file is never read whole)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = safe_open(path, framework="pt")
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
        self._keys = set(self._file.keys())

    def source_tensors(self) -> Dict[str, SourceTensor]:
        """A :class:`SourceTensor` for each tensor, in the file's order; only the header is read."""
        entries = {}
        try:
            for key in self._file.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                view = self._file.get_slice(key)
                if view.get_dtype() not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{self.path}: {key} has dtype {view.get_dtype()}")
                entries[key] = SourceTensor(self.path, key, tuple(view.get_shape()), SAFETENSORS_DTYPES[view.get_dtype()])
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({error})") from None
        return entries

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._file.keys())

    def __len__(self) -> int:
        return len(self._keys)


# storage data_ptr -> (file, zip record, CRC-32, the file's (size, mtime)) of the memory-mapped storages of
# loaded checkpoints
RecordCRCs = Dict[int, Tuple[str, str, int, Tuple[int, int]]]
DATA_RECORD = re.compile(r"/data/\d+$")
# records whose CRC-32 matched, so that writing several outputs from one input checks each record once
VERIFIED: Set[Tuple[str, str, Tuple[int, int]]] = set()


def tensors_in(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


def record_crcs(path: str, state: Any) -> RecordCRCs:
    """Which zip record of ``path`` each memory-mapped storage of ``state`` (loaded from it) holds, with its CRC.

    torch maps the whole file once, so storage addresses and record offsets differ by one constant.
    When they cannot be matched (not memory-mapped, odd layout) every record is checked now instead.
    """
    if not zipfile.is_zipfile(path):
        return {}  # the legacy format records no CRCs
    with open(path, "rb") as f:
        offsets, _ = _record_offsets(f.fileno())
    with zipfile.ZipFile(path) as archive:
        crcs = {info.filename: info.CRC for info in archive.infolist()}
    records = sorted((data, name) for name, (_, data, size) in offsets.items() if DATA_RECORD.search(name) and size)
    storages = sorted({t.untyped_storage().data_ptr() for t in tensors_in(state) if t.untyped_storage().nbytes()})
    base = storages[0] - records[0][0] if storages and records else 0
    if len(storages) == len(records) and all(ptr - data == base for ptr, (data, _) in zip(storages, records)):
        stat = os.stat(path)
        version = (stat.st_size, stat.st_mtime_ns)
        return {ptr: (path, name, crcs[name], version) for ptr, (_, name) in zip(storages, records)}
    check_all_records(path)
    return {}


def load_mapped(path: str, read_ahead: bool = False) -> Tuple[Any, RecordCRCs]:
    """A checkpoint loaded as :func:`safe_load.load_checkpoint` loads it (memory-mapped), with its
    :func:`record_crcs`; read by :mod:`pickle_index` where it can, by torch otherwise. With ``read_ahead``
    (a file that will be read whole) the kernel is asked to read all of it now."""
    if read_ahead and hasattr(os, "posix_fadvise") and os.path.isfile(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
    try:
        state, views, version = pickle_index.read_mapped(path)
    except Unsupported:
        state = load_checkpoint(path)
        return state, record_crcs(path, state)
    return state, {view.data_ptr(): (path, info.filename, info.CRC, version)
                   for view, info in views.values() if info.file_size}


def meta_weights(path: str) -> Mapping[str, Any]:
    """The ``model`` entries of a checkpoint, each with its ``shape`` and ``dtype``, no tensor bytes read."""
    try:
        return pickle_index.read_index(path).state["model"]
    except Unsupported:
        return load_checkpoint(path, meta=True)["model"]


def check_all_records(path: str) -> None:
    """Read every record of a zip checkpoint once, comparing CRCs (zipfile does, at each record's end)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as record:
                    while record.read(1 << 24):
                        pass
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{path}: corrupt ({error})") from None


def check_crc(data: Union[Tensor, torch.UntypedStorage], records: RecordCRCs, checked: Set[int]) -> None:
    """If ``data``'s storage was read from a checkpoint file, its bytes must have the CRC-32 the file records."""
    storage = data.untyped_storage() if isinstance(data, Tensor) else data
    ptr = storage.data_ptr()
    if ptr in records and ptr not in checked:
        path, name, crc, version = records[ptr]
        verify_record(path, name, crc, version, _storage_bytes(storage))
        checked.add(ptr)


def verify_record(path: str, name: str, crc: int, version: Tuple[int, int], data) -> None:
    """A record's bytes must have the CRC-32 its zip entry records; each version of a file is checked once."""
    if (path, name, version) not in VERIFIED:
        if zlib.crc32(data) != crc:
            raise CheckpointError(f"{path}: record {name} is corrupt (its bytes do not match their CRC-32)")
        VERIFIED.add((path, name, version))


def _storage_bytes(storage: torch.UntypedStorage) -> memoryview:
    return memoryview(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())


class CheckpointSource(Mapping[str, Tensor]):
    """The (memory-mapped) weights of a torch checkpoint; each one's CRC-32 is checked when it is taken."""

    def __init__(self, path: str):
        state = load_checkpoint(path)
        self.weights = state["model"]
        self.records = record_crcs(path, state)
        self.checked: Set[int] = set()

    def __getitem__(self, key: str) -> Tensor:
        tensor = self.weights[key]
        check_crc(tensor, self.records, self.checked)
        return tensor

    def __contains__(self, key: object) -> bool:
        return key in self.weights

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


HEADER_EXTRA = 128  # room for a local header's extra field (torch's pads each record's bytes to 64)


class CheckpointRecords(Mapping[str, Tensor]):
    """The ``model`` tensors of a torch checkpoint, each read from its own zip record when asked for.

    Only the pickle and the zip's central directory are read up front (the pickle by :mod:`pickle_index`,
    each tensor a :class:`TensorRecord` naming its record; or, for a pickle it does not cover, by torch on
    the meta device, where each storage knows the offset of its bytes in the file); a tensor asked for is
    read with one ``pread`` of exactly its record's bytes and checked against the record's CRC-32, so the
    records nobody asks for are never touched. Anything else (the legacy format, a big-endian file, a
    tensor that is part of a larger record) is read through :class:`CheckpointSource`.
    """

    def __init__(self, path: str):
        self.path = path
        self.mapped: Optional[CheckpointSource] = None
        self.records: List[zipfile.ZipInfo] = []
        self.little_endian = False
        self.index: Optional[pickle_index.CheckpointIndex] = None
        self.crcs: Dict[str, int] = {}  # key -> CRC-32 of the tensors read whole from their records (checked)
        try:  # the pickle read by pickle_index: each tensor a TensorRecord
            self.index = pickle_index.read_index(path)
            self.meta = self.index.state["model"]
        except Unsupported:  # the pickle read by torch, tensors on the meta device
            self.meta = load_checkpoint(path, meta=True)["model"]
        if self.index is None and sys.byteorder == "little" and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                self.records = sorted(archive.infolist(), key=lambda info: info.header_offset)
                orders = [info for info in self.records if info.filename.endswith("/byteorder")]
                self.little_endian = not orders or archive.read(orders[0]).strip() == b"little"
        self.starts = [info.header_offset for info in self.records]
        stat = os.stat(path)
        self.version = (stat.st_size, stat.st_mtime_ns)
        self.fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # no read-ahead: it would read the neighbouring (pruned) records too
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None

    def record(self, meta: Tensor) -> Optional[zipfile.ZipInfo]:
        """The zip record that holds exactly ``meta``'s bytes, if one does."""
        offset = getattr(meta.untyped_storage(), "_checkpoint_offset", None)
        if offset is None or not self.little_endian or not meta.is_contiguous() or meta.storage_offset():
            return None
        index = bisect.bisect_left(self.starts, offset) - 1  # the last record whose header precedes the bytes
        if index < 0 or self.records[index].file_size != meta.numel() * meta.element_size() \
                or self.records[index].compress_type != zipfile.ZIP_STORED:
            return None
        return self.records[index]

    def __getitem__(self, key: str) -> Tensor:
        meta = self.meta[key]
        if isinstance(meta, TensorRecord):
            return self.read_record(key, meta)
        info = self.record(meta)
        if info is None:
            if self.mapped is None:
                self.mapped = CheckpointSource(self.path)
            return self.mapped[key]
        return self.read_checked(key, meta.shape, meta.dtype, info, meta.untyped_storage()._checkpoint_offset,
                                 self.version)

    def prefetch(self, keys: List[str]) -> None:
        """Ask the kernel to start reading these tensors' records (local header and bytes) now, all at once."""
        if self.index is None or not hasattr(os, "posix_fadvise"):
            return
        for key in keys:
            meta = self.meta.get(key)
            if isinstance(meta, TensorRecord) and meta.is_whole_storage():
                try:
                    info = self.index.record(meta)
                except Unsupported:
                    continue
                header = 30 + len(info.filename.encode()) + HEADER_EXTRA
                os.posix_fadvise(self.fd, info.header_offset, header + info.file_size, os.POSIX_FADV_WILLNEED)

    def read_record(self, key: str, meta: TensorRecord) -> Tensor:
        """A tensor that pickle_index found: one pread of its record, its CRC-32 checked."""
        try:
            if not meta.is_whole_storage():
                raise Unsupported(f"{key} is part of a larger record")
            info = self.index.record(meta)
        except Unsupported:
            if self.mapped is None:
                self.mapped = CheckpointSource(self.path)
            return self.mapped[key]
        tensor = self.read_checked(key, meta.shape, meta.dtype, info, data_offset(self.fd, info),
                                   self.index.version)
        self.crcs[key] = info.CRC
        return tensor

    def read_checked(self, key: str, shape, dtype: torch.dtype, info: zipfile.ZipInfo, offset: int,
                     version: Tuple[int, int]) -> Tensor:
        """One pread of a stored record's bytes at ``offset`` into a new tensor, its CRC-32 checked."""
        tensor = torch.empty(shape, dtype=dtype)
        if info.file_size == 0:
            return tensor
        data = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        if os.preadv(self.fd, [data], offset) != len(data):
            raise CheckpointError(f"{self.path}: {key} runs past the end of the file (truncated?)")
        verify_record(self.path, info.filename, info.CRC, version, data)
        return tensor

    def __contains__(self, key: object) -> bool:
        return key in self.meta

    def __iter__(self) -> Iterator[str]:
        return iter(self.meta)

    def __len__(self) -> int:
        return len(self.meta)


def open_source(path: str) -> Mapping[str, Tensor]:
    """The tensors that :class:`SourceTensor` entries of ``path`` name, read one by one when asked for."""
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    return CheckpointRecords(path)


def source_tensor(entry: SourceTensor, source: Mapping[str, Tensor]) -> Tensor:
    """The tensor ``entry`` names in its opened source, checked against the shape and dtype expected of it."""
    if entry.key not in source:
        raise CheckpointError(f"{entry.path}: missing {entry.key} (truncated or mismatched shard?)")
    tensor = source[entry.key]
    if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
        raise CheckpointError(f"{entry.path}: {entry.key} has shape {tuple(tensor.shape)} {tensor.dtype}, "
                              f"not {entry.shape} {entry.dtype} like the same tensor elsewhere")
    return tensor


def materialize(model: Mapping[str, Entry], records: Optional[RecordCRCs] = None) -> Dict[str, Tensor]:
    """Every entry as a tensor, opening each source file once; the caller bounds how much that is.

    Tensors read from a loaded checkpoint are checked against ``records`` (see :func:`record_crcs`).
    """
    tensors = {key: entry for key, entry in model.items() if isinstance(entry, Tensor)}
    checked: Set[int] = set()
    for tensor in tensors.values():
        check_crc(tensor, records or {}, checked)
    sources = sorted(((key, entry) for key, entry in model.items() if isinstance(entry, SourceTensor)),
                     key=lambda item: item[1].path)
    for path, group in itertools.groupby(sources, key=lambda item: item[1].path):
        source = open_source(path)
        for key, entry in group:
            tensors[key] = source_tensor(entry, source)
        del source
    return {key: tensors[key] for key in model}


def _storage_identity(tensor: Tensor) -> Tuple:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def _placeholders(model: Mapping[str, Entry], dtype: Optional[torch.dtype]) -> Tuple[Dict[str, Tensor], List[Tuple[str, Entry]]]:
    """Placeholders standing in for ``model``, and the order torch will write their storages in.

    A placeholder is an uninitialised tensor: its pages are never touched, so it costs address
    space, not memory. Entries that are one tensor (tied embeddings) share one placeholder.
    """
    placeholders: Dict[str, Tensor] = {}
    records: List[Tuple[str, Entry]] = []  # one per placeholder
    seen: Dict[Tuple, Tensor] = {}
    for key, entry in model.items():
        identity = ("src", entry.path, entry.key) if isinstance(entry, SourceTensor) else _storage_identity(entry)
        if identity not in seen:
            seen[identity] = torch.empty(tuple(entry.shape), dtype=stored_dtype(entry.dtype, dtype))
            records.append((key, entry))
        placeholders[key] = seen[identity]
    return placeholders, records


def _record_offsets(fd: int) -> Tuple[Dict[str, Tuple[int, int, int]], int]:
    """name -> (local header offset, data offset, size) of every zip record, and the central dir start."""
    with zipfile.ZipFile(os.fdopen(os.dup(fd), "rb")) as archive:
        offsets = {}
        for info in archive.infolist():
            header = os.pread(fd, 30, info.header_offset)
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            offsets[info.filename] = (info.header_offset, info.header_offset + 30 + name_length + extra_length,
                                      info.file_size)
        return offsets, archive.start_dir


def _patch_crcs(fd: int, crcs: Mapping[str, int], offsets: Mapping[str, Tuple[int, int, int]], start_dir: int) -> None:
    """Write the CRC-32 of each filled record into its local header and its central directory entry."""
    position = start_dir
    while True:
        header = os.pread(fd, 46, position)
        if header[:4] != b"PK\x01\x02":
            break
        name_length, extra_length, comment_length = struct.unpack("<HHH", header[28:34])
        name = os.pread(fd, name_length, position + 46).decode()
        if name in crcs:
            packed = struct.pack("<I", crcs[name])
            os.pwrite(fd, packed, position + 16)
            os.pwrite(fd, packed, offsets[name][0] + 14)
        position += 46 + name_length + extra_length + comment_length


def _as_bytes(tensor: Tensor, dtype: Optional[torch.dtype]) -> memoryview:
    return memoryview(cast_to_store(tensor, dtype).view(torch.uint8).reshape(-1).numpy())


def _storage_key_recorder(keys: Dict[str, Any]):
    """A pickle module for ``torch.save`` that notes which storage each record key was given to."""

    class Pickler(pickle.Pickler):
        def __init_subclass__(cls, **kwargs):
            # torch.save subclasses our Pickler with its own persistent_id; wrap that one
            super().__init_subclass__(**kwargs)
            assign_key = cls.persistent_id

            def persistent_id(self, obj):
                pid = assign_key(self, obj)
                if isinstance(pid, tuple) and pid and pid[0] == "storage":
                    keys[pid[2]] = obj._untyped_storage if isinstance(obj, torch.storage.TypedStorage) else obj
                return pid

            cls.persistent_id = persistent_id

    return types.SimpleNamespace(Pickler=Pickler, __name__="pickle")


def save_streaming(state: Mapping[str, Any], model: Mapping[str, Entry], path: str,
                   dtype: Optional[torch.dtype] = None, input_crcs: Optional[RecordCRCs] = None) -> None:
    """Write ``{**state, "model": model}`` to ``path`` atomically; floating tensors cast to ``dtype``.

    Tensors read from a loaded checkpoint are checked against ``input_crcs`` (see :func:`record_crcs`).
    """
    checked: Set[int] = set()
    placeholders, records = _placeholders(model, dtype)
    entries = {placeholders[key].untyped_storage().data_ptr(): entry for key, entry in records}
    storages: Dict[str, Any] = {}  # record key -> the storage torch wrote (as a hole) under it
    with atomic_open(path) as f:
        with torch.serialization.skip_data():
            torch.save({**state, "model": placeholders}, f, pickle_module=_storage_key_recorder(storages))
        f.flush()
        fd = f.fileno()
        offsets, start_dir = _record_offsets(fd)
        prefix = next(name for name in offsets if name.endswith("/data.pkl"))[: -len("data.pkl")]
        # what goes in each hole: a model entry, or the bytes of a tensor elsewhere in the state
        fills = [(f"{prefix}data/{key}", entries.get(storage.data_ptr(), storage))
                 for key, storage in storages.items() if storage.nbytes() > 0]
        crcs: Dict[str, int] = {}
        # grouped by source file: one source file is read at a time, while a second thread opens the next one
        # (reads and checks its pickle) and asks the kernel to read ahead the records it will give
        fills.sort(key=lambda fill: _source_path(fill[1]))
        groups = [(path, list(group)) for path, group in itertools.groupby(fills, key=lambda fill: _source_path(fill[1]))]
        with ThreadPoolExecutor(max_workers=1) as opener:
            upcoming = opener.submit(_open_prefetched, *groups[0]) if groups else None
            for number, (source_path, group) in enumerate(groups):
                source = upcoming.result()
                if number + 1 < len(groups):
                    upcoming = opener.submit(_open_prefetched, *groups[number + 1])
                _fill_group(fd, group, source, offsets, dtype, input_crcs, checked, crcs)
                del source
        _patch_crcs(fd, crcs, offsets, start_dir)


def _fill_group(fd: int, group: List[Tuple[str, Any]], source: Optional[Mapping[str, Tensor]],
                offsets: Mapping[str, Tuple[int, int, int]], dtype: Optional[torch.dtype],
                input_crcs: Optional[RecordCRCs], checked: Set[int], crcs: Dict[str, int]) -> None:
    """Write the bytes of each fill of one source file into its hole, noting its CRC-32."""
    for name, entry in group:
        if not isinstance(entry, SourceTensor):
            check_crc(entry, input_crcs or {}, checked)
        data = _fill_bytes(entry, source, dtype)
        _, data_offset, size = offsets[name]
        if len(data) != size:
            raise CheckpointError(f"internal error: {name} needs {size} bytes, got {len(data)}")
        os.pwrite(fd, data, data_offset)
        copied = _copied_crc(entry, source, dtype)
        crcs[name] = zlib.crc32(data) if copied is None else copied


def _open_prefetched(path: str, group: List[Tuple[str, Any]]) -> Optional[Mapping[str, Tensor]]:
    """The source file of a group of fills, the kernel asked to start reading the records they need."""
    if not path:
        return None
    source = open_source(path)
    if isinstance(source, CheckpointRecords):
        source.prefetch([entry.key for _, entry in group])
    return source


def _fill_bytes(entry: Any, source: Optional[Mapping[str, Tensor]], dtype: Optional[torch.dtype]) -> memoryview:
    if isinstance(entry, torch.UntypedStorage):  # a tensor of the state outside "model", as it is
        return _storage_bytes(entry)
    if isinstance(entry, SourceTensor):
        return _as_bytes(source_tensor(entry, source), dtype)
    return _as_bytes(entry, dtype)


def _copied_crc(entry: Any, source: Optional[Mapping[str, Tensor]], dtype: Optional[torch.dtype]) -> Optional[int]:
    """The CRC-32 of a source tensor written as it was read: its record's, already checked when it was read."""
    if isinstance(entry, SourceTensor) and isinstance(source, CheckpointRecords) \
            and stored_dtype(entry.dtype, dtype) == entry.dtype:
        return source.crcs.get(entry.key)
    return None


def _source_path(entry: Entry) -> str:
    return entry.path if isinstance(entry, SourceTensor) else ""
