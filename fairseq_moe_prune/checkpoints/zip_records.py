"""The records of a zip checkpoint exactly where torch's reader finds them.

torch reads zip checkpoints with miniz, which takes the central directory's offset from the end record
as written. Python's ``zipfile`` instead trusts the directory's size and shifts every offset when the two
disagree (it allows for bytes prepended to an archive), so one file can show ``zipfile`` one directory
and torch another. The pickle checks must read the bytes torch unpickles, so this reader accepts only
archives where every reading agrees:

- the end record is the file's last 22 bytes (torch writes no archive comment); a zip64 end record, where
  there is one, ends exactly where its locator starts and is the one the locator names;
- the central directory as written (offset and size) ends exactly where the (zip64) end record starts, and
  its entries, as many as the end record counts, fill it exactly: no bytes before or after it, no second
  directory;
- no name appears twice, not even in another case (miniz looks names up ignoring case);
- a record's bytes are read at the local header offset as written, whose name must be the directory's.

Anything else is a :class:`ZipRecordsError`.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from typing import Dict

from fairseq_moe_prune.errors import FairseqMoEPruneError

END = b"PK\x05\x06"
END64 = b"PK\x06\x06"
LOCATOR64 = b"PK\x06\x07"
CENTRAL = b"PK\x01\x02"
LOCAL = b"PK\x03\x04"
END_SIZE, LOCATOR64_SIZE, END64_SIZE, CENTRAL_SIZE, LOCAL_SIZE = 22, 20, 56, 46, 30
STORED, DEFLATED = 0, 8
ZIP64_EXTRA = 0x0001
MAX16, MAX32 = 0xFFFF, 0xFFFFFFFF


class ZipRecordsError(FairseqMoEPruneError):
    """The archive is not one that Python's zipfile and torch's reader read alike."""


@dataclass(frozen=True)
class ZipRecord:
    """One record of the central directory (the fields keep ``zipfile.ZipInfo``'s names)."""

    filename: str
    header_offset: int
    compress_type: int
    compress_size: int
    file_size: int
    CRC: int
    flag_bits: int


def _read(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset) if size else b""
    if len(data) != size:
        raise ZipRecordsError("the file ends inside a zip structure (truncated?)")
    return data


def _zip64_fields(extra: bytes, wanted: int) -> list:
    """The first ``wanted`` 8-byte values of the zip64 extra field."""
    position = 0
    while position + 4 <= len(extra):
        kind, size = struct.unpack_from("<HH", extra, position)
        if kind == ZIP64_EXTRA:
            if size < 8 * wanted or position + 4 + size > len(extra):
                raise ZipRecordsError("a zip64 extra field too short for the sizes it stands for")
            return list(struct.unpack_from(f"<{wanted}Q", extra, position + 4))
        position += 4 + size
    raise ZipRecordsError("a record's sizes are in a zip64 field it does not have")


def _directory_bounds(fd: int, file_size: int):
    """(offset, size, entries) of the central directory as the end records state them, and where it must end."""
    end_at = file_size - END_SIZE
    if end_at < 0:
        raise ZipRecordsError("too short to be a zip archive")
    end = _read(fd, END_SIZE, end_at)
    if end[:4] != END:
        raise ZipRecordsError("no end-of-archive record at the end of the file (bytes appended, or a comment)")
    disk, cd_disk, _, entries, cd_size, cd_offset, comment = struct.unpack("<4x4H2LH", end)
    if comment or disk or cd_disk:
        raise ZipRecordsError("an archive comment or a multi-disk archive")
    directory_end = end_at
    locator_at = end_at - LOCATOR64_SIZE
    if locator_at >= 0 and _read(fd, 4, locator_at) == LOCATOR64:
        _, record_at, disks = struct.unpack("<4xLQL", _read(fd, LOCATOR64_SIZE, locator_at))
        record64 = _read(fd, END64_SIZE, record_at) if record_at + END64_SIZE == locator_at else b""
        if record64[:4] != END64 or disks != 1:
            raise ZipRecordsError("the zip64 end record is not where its locator says, just before it")
        size64, _, _, disk, cd_disk, _, entries, cd_size, cd_offset = struct.unpack("<4xQ2H2L4Q", record64)
        if size64 != END64_SIZE - 12 or disk or cd_disk:
            raise ZipRecordsError("a zip64 end record with extensible data or several disks")
        directory_end = record_at
    elif MAX16 in (entries,) or MAX32 in (cd_size, cd_offset):
        raise ZipRecordsError("zip64 values without a zip64 end record")
    if cd_offset + cd_size != directory_end:
        raise ZipRecordsError("the central directory does not end where the end record starts "
                              "(bytes before or after it, or a second directory)")
    return cd_offset, cd_size, entries


def read_directory(fd: int) -> Dict[str, ZipRecord]:
    """Every record of the zip archive open as ``fd``, by name, read as torch reads them (see the module)."""
    file_size = os.fstat(fd).st_size
    cd_offset, cd_size, entries = _directory_bounds(fd, file_size)
    directory = _read(fd, cd_size, cd_offset)
    records: Dict[str, ZipRecord] = {}
    folded = set()
    position = 0
    for _ in range(entries):
        if directory[position:position + 4] != CENTRAL or position + CENTRAL_SIZE > len(directory):
            raise ZipRecordsError("a central directory entry is not where the previous one ends")
        (flags, method, crc, compress_size, size, name_length, extra_length, comment_length, disk,
         header_offset) = struct.unpack_from("<8xHH4xLLLHHHH6xL", directory, position)
        start = position + CENTRAL_SIZE
        position = start + name_length + extra_length + comment_length
        if position > len(directory):
            raise ZipRecordsError("a central directory entry runs past the directory")
        extra = directory[start + name_length:start + name_length + extra_length]
        wide = [value == MAX32 for value in (size, compress_size, header_offset)]
        if any(wide):
            values = iter(_zip64_fields(extra, sum(wide)))
            size, compress_size, header_offset = (next(values) if w else v
                                                  for w, v in zip(wide, (size, compress_size, header_offset)))
        try:
            name = directory[start:start + name_length].decode("utf-8")
        except UnicodeDecodeError:
            raise ZipRecordsError("a record name that is not UTF-8") from None
        if name.lower() in folded:
            raise ZipRecordsError(f"the record name {name[:80]!r} appears twice")
        if flags & 1 or disk or method not in (STORED, DEFLATED):
            raise ZipRecordsError(f"record {name[:80]!r} is encrypted, on another disk or compressed oddly")
        if header_offset + LOCAL_SIZE > cd_offset or header_offset + compress_size > cd_offset:
            raise ZipRecordsError(f"record {name[:80]!r} lies outside the records before the directory")
        folded.add(name.lower())
        records[name] = ZipRecord(name, header_offset, method, compress_size, size, crc, flags)
    if position != len(directory):
        raise ZipRecordsError("the central directory holds more than its entries")
    return records


def data_offset(fd: int, record: ZipRecord) -> int:
    """Where a record's bytes start: after its local header (at the offset as written), whose name must match."""
    header = _read(fd, LOCAL_SIZE, record.header_offset)
    if header[:4] != LOCAL:
        raise ZipRecordsError(f"record {record.filename[:80]!r} has no local header where the directory says")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    if _read(fd, name_length, record.header_offset + LOCAL_SIZE) != record.filename.encode("utf-8"):
        raise ZipRecordsError(f"record {record.filename[:80]!r} has another name in its local header")
    return record.header_offset + LOCAL_SIZE + name_length + extra_length


def read_record(fd: int, record: ZipRecord) -> bytes:
    """A record's bytes (inflated where compressed), its CRC-32 checked."""
    data = _read(fd, record.compress_size, data_offset(fd, record))
    if record.compress_type == DEFLATED:
        try:
            data = zlib.decompressobj(-15).decompress(data, record.file_size + 1)
        except zlib.error:
            raise ZipRecordsError(f"record {record.filename[:80]!r} does not inflate") from None
    if len(data) != record.file_size or zlib.crc32(data) != record.CRC:
        raise ZipRecordsError(f"record {record.filename[:80]!r} has the wrong size or CRC-32 (corrupt?)")
    return data
