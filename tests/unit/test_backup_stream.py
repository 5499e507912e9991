"""The streamed backup check on real gzip files: every way a file can be broken has its own reason."""

from __future__ import annotations

import gzip
import hashlib
import io
import random

import pytest

from tasks.backup_checks import GunzipStream, check_stream

DUMP = (b"--\n-- PostgreSQL database dump\n--\n\nSET statement_timeout = 0;\n\n"
        + b"".join(b"\nCREATE TABLE public.t%d (id int);\n" % i for i in range(3))
        + b"COPY public.t0 (id) FROM stdin;\n" + b"".join(b"%d\n" % i for i in range(200_000)) + b"\\.\n\n"
        + b"--\n-- PostgreSQL database dump complete\n--\n\n")


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def kinds(blob: bytes, expected_sha: str | None = None) -> list[str]:
    return [k for k, _ in check_stream(io.BytesIO(blob), expected_sha).problems]


def test_a_good_dump_passes_with_its_checksum() -> None:
    blob = gz(DUMP)
    res = check_stream(io.BytesIO(blob), hashlib.sha256(blob).hexdigest())
    assert res.ok, res.problems
    assert res.uncompressed_bytes == len(DUMP) and res.tables_in_dump == 3
    assert res.sha256 == hashlib.sha256(blob).hexdigest()


@pytest.mark.parametrize("keep", [10, 1000, 0.5, -8, -4, -1])
def test_truncated_anywhere_is_truncated(keep: float) -> None:
    blob = gz(DUMP)
    cut = int(len(blob) * keep) if isinstance(keep, float) else (keep if keep > 0 else len(blob) + keep)
    found = kinds(blob[:cut])
    assert found and found[0] in {"truncated", "corrupted"}, found
    if keep in (0.5, 1000):
        assert found == ["truncated"]


def test_flipped_bytes_are_corrupted() -> None:
    blob = bytearray(gz(DUMP))
    rng = random.Random(5)
    for i in rng.sample(range(100, len(blob) - 100), 20):
        blob[i] ^= 0xFF
    assert kinds(bytes(blob))[0] == "corrupted"


def test_crc_mismatch_is_corrupted() -> None:
    blob = bytearray(gz(DUMP))
    blob[-6] ^= 0x01  # the CRC32 in the trailer
    assert kinds(bytes(blob)) == ["corrupted"]


def test_empty_file_and_empty_stream_and_no_tables() -> None:
    assert kinds(b"") == ["empty"]
    assert kinds(gz(b"")) == ["empty"]
    assert kinds(gz(b"--\n-- PostgreSQL database dump\n--\n-- PostgreSQL database dump complete\n")) == ["empty"]


def test_not_a_dump_and_unfinished_dump() -> None:
    assert kinds(gz(b"hello world\n" * 100)) == ["not-a-dump"]
    assert kinds(gz(DUMP[: len(DUMP) // 2])) == ["dump-incomplete"]


def test_trailing_garbage_is_corrupted_but_a_second_member_is_fine() -> None:
    assert kinds(gz(DUMP) + b"garbage!") == ["corrupted"]
    assert kinds(gz(DUMP) + b"\x1f") == ["corrupted"]
    half = len(DUMP) // 2
    assert kinds(gz(DUMP[:half]) + gz(DUMP[half:])) == []


def test_checksum_mismatch_is_reported_even_when_gzip_is_fine() -> None:
    assert kinds(gz(DUMP), "0" * 64) == ["checksum-mismatch"]


def test_output_per_step_is_bounded() -> None:
    """Highly compressible input (zeros) must not decompress into one huge buffer."""
    stream = GunzipStream()
    blob = gz(b"\0" * (64 << 20))
    biggest = max(len(out) for out in stream.feed(blob))
    assert biggest <= 1 << 20


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 4096])
def test_member_boundaries_and_trailing_bytes_in_any_chunking(chunk: int) -> None:
    """A second gzip member split anywhere across reads is fine; one stray byte after the end is not."""
    half = 5000
    small = DUMP[:half]
    blob = gz(small) + gz(DUMP[half:20000])
    for data, complete in ((blob, True), (blob + b"\x1f", False)):
        stream = GunzipStream()
        out = b"".join(o for i in range(0, len(data), chunk) for o in stream.feed(data[i:i + chunk]))
        out += b"".join(stream.drain())
        assert out == DUMP[:20000]
        assert stream.complete is complete
