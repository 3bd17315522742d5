"""Outputs under the longest names a filesystem takes (255 bytes), in any script."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from asyncbatch import atomic_write


@pytest.mark.parametrize("name", ["é" * 127 + "x", "€" * 85, "x" * 255])
async def test_an_output_under_a_255_byte_name_of_multibyte_characters_is_written(
    name: str, tmp_path: Path
) -> None:
    # Regression: the temp file's name was cut to 200 characters, not bytes: 324 bytes for
    # 127 two-byte characters, and every write under such a name failed ENAMETOOLONG.
    assert len(os.fsencode(name)) == 255
    await atomic_write(tmp_path / name, b"data")
    assert (tmp_path / name).read_bytes() == b"data"
    assert os.listdir(tmp_path) == [name]
