"""Item keys and input hashes are stored in ledgers: their format must never drift."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from asyncbatch._identity import input_hash, item_key


def test_known_vectors() -> None:
    rel, size, mtime = b"in/f0001234.csv", 128, 1_795_666_388_251_392_000
    material = b"\x00".join([b"stat", b"in/f0001234.csv", b"128", str(mtime).encode()])
    stat_hash = hashlib.sha256(material).hexdigest()
    assert input_hash("stat", rel, size, mtime, b"") == stat_hash
    assert item_key("stat", stat_hash, mtime) == f"1795666388251392000-{stat_hash[:24]}"
    path_hash = hashlib.sha256(b"path\x00in/f0001234.csv").hexdigest()
    assert input_hash("path", rel, size, mtime, b"") == path_hash
    assert item_key("path", path_hash, mtime) == path_hash[:32]
    digest = hashlib.sha256(b"content").digest()
    assert input_hash("content", rel, size, mtime, digest) == digest.hex()
    assert item_key("content", digest.hex(), mtime) == digest.hex()


@given(st.integers(-(2**62), 2**62), st.integers(-(2**62), 2**62))
def test_stat_keys_sort_by_mtime(a: int, b: int) -> None:
    ka = item_key("stat", "a" * 64, a)
    kb = item_key("stat", "a" * 64, b)
    assert len(ka) == len(kb) == 44
    if max(a, 0) < max(b, 0):
        assert ka < kb
