"""Checking a backup file in one streamed pass: gzip integrity (CRC, length, truncation), its sha256, and that it is
a complete pg_dump (header, "dump complete" trailer, tables), without ever reading it whole into memory.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from tasks.backup_store import CHUNK

DUMP_HEADER = b"--\n-- PostgreSQL database dump"
DUMP_TRAILER = b"-- PostgreSQL database dump complete"
_OUT_MAX = 1 << 20  # decompressed bytes per step: memory stays flat whatever the compression ratio
_TAIL = 512
_CREATE_TABLE = b"\nCREATE TABLE "


@dataclass
class StreamCheck:
    """What a streamed pass over a backup file found. ``problems`` are (kind, message); empty means intact."""

    compressed_bytes: int = 0
    uncompressed_bytes: int = 0
    sha256: str = ""
    tables_in_dump: int = 0
    head: bytes = b""
    tail: bytes = b""
    seconds: float = 0.0
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class GunzipStream:
    """Incremental gzip decoding with bounded output per step (zlib does the work, CRC and length included).

    Hand-written around ``zlib.decompressobj`` because ``gzip.GzipFile`` cannot tell a truncated stream from a
    corrupt one in its errors and reads ahead unboundedly; here each failure keeps its own clear reason.
    """

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=31)
        self._between = False  # a member ended: the next bytes must start another member (or nothing)
        self._pending = b""  # 1 byte that may be the start of the next member's magic
        self.members = 0
        self.fed = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Yield decompressed pieces of at most 1 MiB; raises zlib.error (corrupt) or ValueError (trailing data)."""
        self.fed += len(data)
        buf = self._pending + data
        self._pending = b""
        while buf:
            if self._between:
                if len(buf) < 2:
                    self._pending = buf
                    return
                if not buf.startswith(b"\x1f\x8b"):
                    raise ValueError(f"{len(buf)} bytes of trailing data after the gzip stream")
                self._d, self._between = zlib.decompressobj(wbits=31), False
            out = self._d.decompress(buf, _OUT_MAX)
            if out:
                yield out
            if self._d.eof:
                self.members += 1
                self._between = True
                buf = self._d.unused_data
            else:
                buf = self._d.unconsumed_tail

    def drain(self) -> Iterator[bytes]:
        """Decompressed bytes still buffered inside zlib after the last input."""
        while not self._between:
            out = self._d.decompress(b"", _OUT_MAX)
            if not out:
                return
            yield out
            if self._d.eof:
                self.members += 1
                self._between = True

    @property
    def trailing(self) -> int:
        return len(self._pending)

    @property
    def complete(self) -> bool:
        """Every member ended and nothing is left over."""
        return self._between and self.members > 0 and not self._pending


def check_stream(fh: IO[bytes], expected_sha256: str | None = None) -> StreamCheck:
    """Stream a backup once: sha256 of the file, gzip integrity (CRC, length, truncation), dump header/trailer."""
    started = time.perf_counter()
    res = StreamCheck()
    sha = hashlib.sha256()
    gz = GunzipStream()
    carry = b""
    chunks = _hashed_chunks(fh, sha, res)
    try:
        for chunk in chunks:
            for out in gz.feed(chunk):
                _observe(res, out, carry)
                carry = out[-(len(_CREATE_TABLE) - 1):]
        for out in gz.drain():
            _observe(res, out, carry)
            carry = out[-(len(_CREATE_TABLE) - 1):]
    except zlib.error as exc:
        res.problems.append(("corrupted", f"corrupted: gzip stream broken at or before byte {gz.fed}: "
                                          f"{str(exc).split(': ', 1)[-1]}"))
        _exhaust(chunks)
    except ValueError as exc:
        res.problems.append(("corrupted", f"corrupted: {exc}"))
        _exhaust(chunks)
    res.sha256 = sha.hexdigest()
    if not res.problems:
        if res.compressed_bytes == 0:
            res.problems.append(("empty", "empty: the file has 0 bytes"))
        elif gz.members and gz.trailing:
            res.problems.append(("corrupted", f"corrupted: {gz.trailing} byte(s) of trailing data after the gzip "
                                              "stream"))
        elif not gz.complete:
            res.problems.append(("truncated", f"truncated: the gzip stream ends early (file is "
                                              f"{res.compressed_bytes} bytes, no end-of-stream marker)"))
        elif res.uncompressed_bytes == 0:
            res.problems.append(("empty", "empty: a valid gzip file that contains nothing"))
        elif not res.head.startswith(DUMP_HEADER):
            res.problems.append(("not-a-dump", "not a pg_dump plain SQL dump (no 'PostgreSQL database dump' header)"))
        elif DUMP_TRAILER not in res.tail:
            res.problems.append(("dump-incomplete", "dump incomplete: gzip is intact but pg_dump did not finish "
                                                    "(no 'dump complete' trailer)"))
        elif res.tables_in_dump == 0:
            res.problems.append(("empty", "empty: the dump contains no tables"))
    if expected_sha256 is not None and res.sha256 != expected_sha256:
        res.problems.append(("checksum-mismatch", f"checksum mismatch: file sha256 {res.sha256[:16]}…, "
                                                  f"checksum file says {expected_sha256[:16]}…"))
    res.seconds = time.perf_counter() - started
    return res


def _observe(res: StreamCheck, out: bytes, carry: bytes) -> None:
    if len(res.head) < 64:
        res.head += out[: 64 - len(res.head)]
    res.uncompressed_bytes += len(out)
    res.tail = (res.tail + out)[-_TAIL:] if len(out) < _TAIL else out[-_TAIL:]
    res.tables_in_dump += (carry + out).count(_CREATE_TABLE)


def _hashed_chunks(fh: IO[bytes], sha: hashlib._Hash, res: StreamCheck) -> Iterator[bytes]:
    """The file in 1 MiB chunks, each hashed and counted as it is read."""
    while chunk := fh.read(CHUNK):
        sha.update(chunk)
        res.compressed_bytes += len(chunk)
        yield chunk


def _exhaust(chunks: Iterator[bytes]) -> None:
    """Keep hashing after a decode error so the checksum comparison still says whether the file changed."""
    for _ in chunks:
        pass
