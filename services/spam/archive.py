"""What a zip attachment declares, read from its central directory only.

Nothing is ever decompressed: the names inside, the encryption flag and the declared sizes
(whose ratio gives away a zip bomb) are all in the directory at the end of the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAX_ENTRIES = 1000
_EOCD = b"PK\x05\x06"
_CENTRAL = b"PK\x01\x02"


@dataclass(frozen=True)
class ZipSummary:
    """``readable`` is false when no central directory could be found."""

    readable: bool
    entries: int = 0
    encrypted: bool = False
    names: tuple[str, ...] = ()
    compressed: int = 0
    uncompressed: int = 0

    @property
    def ratio(self) -> float:
        return self.uncompressed / max(self.compressed, 1)


def read_zip_directory(data: bytes) -> ZipSummary:
    """Summarise the zip archive in ``data``; never raises, never decompresses."""
    try:
        return _read(data)
    except (struct.error, IndexError, ValueError):
        return ZipSummary(readable=False)


def _read(data: bytes) -> ZipSummary:
    # The end record sits in the last 22 bytes plus at most a 64 KiB comment.
    eocd = data.rfind(_EOCD, max(0, len(data) - 22 - 65535))
    if eocd < 0 or eocd + 22 > len(data):
        return ZipSummary(readable=False)
    _, _, _, _, total, _, offset, _ = struct.unpack("<4s4H2LH", data[eocd : eocd + 22])
    if offset >= len(data):
        # Offsets are relative to the archive's start; a prefix (self-extractor) shifts them.
        return ZipSummary(readable=False)
    pos = offset
    names: list[str] = []
    encrypted = False
    compressed = uncompressed = 0
    count = 0
    while count < min(total, MAX_ENTRIES) and data[pos : pos + 4] == _CENTRAL:
        flags = struct.unpack("<H", data[pos + 8 : pos + 10])[0]
        csize, usize, nlen, elen, clen = struct.unpack("<LLHHH", data[pos + 20 : pos + 34])
        name = data[pos + 46 : pos + 46 + nlen].decode("utf-8" if flags & 0x800 else "cp437", "replace")
        encrypted = encrypted or bool(flags & 0x1)
        compressed += csize
        uncompressed += usize
        if len(names) < 100:
            names.append(name[:200])
        count += 1
        pos += 46 + nlen + elen + clen
    return ZipSummary(
        readable=count > 0 or total == 0,
        entries=count,
        encrypted=encrypted,
        names=tuple(names),
        compressed=compressed,
        uncompressed=uncompressed,
    )
