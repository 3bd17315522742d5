"""The listing every hand-written system shares: scandir + one stat per file, sorted.

Order is ``(mtime_ns, relpath)`` ascending, as asyncbatch's scanner orders entries. Hidden names
and anything that is not a regular file are skipped (the generated inboxes hold neither).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

__all__ = ["ScannedFile", "emit", "scan", "source_args"]

#: ``(mtime_ns, relpath, path, size)``
ScannedFile = tuple[int, str, str, int]


def scan(source: str, *, recursive: bool) -> list[ScannedFile]:
    """Every regular, non-hidden file under ``source``, sorted by ``(mtime_ns, relpath)``."""
    found: list[ScannedFile] = []
    stack: list[tuple[str, str]] = [("", source)]
    while stack:
        prefix, directory = stack.pop()
        with os.scandir(directory) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        stack.append((prefix + entry.name + "/", entry.path))
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                found.append((st.st_mtime_ns, prefix + entry.name, entry.path, st.st_size))
    found.sort()
    return found


def source_args(description: str) -> argparse.ArgumentParser:
    """The arguments every system child takes: the inbox, and whether to walk subdirectories."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--source", required=True)
    parser.add_argument("--recursive", action="store_true")
    return parser


def emit(result: dict[str, Any]) -> None:
    """Print the child's result as one JSON line (the driver reads the last stdout line)."""
    result.setdefault("finished_at", time.time())
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
