"""Generated inboxes of N small files, reused across runs when their marker matches.

An inbox is ``WORK/inboxes/<name>/``; its marker ``WORK/inboxes/<name>.ready`` (outside the
scanned tree) is written only after every file exists, so an interrupted generation is redone.
Every file's mtime lies a day in the past (all settled), one microsecond apart in file order.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .systems._scan import scan

__all__ = ["InboxSpec", "discard_inbox", "ensure_inbox", "parse_spec", "warm_up"]

#: Bump when the generated content or layout changes: older inboxes are then regenerated.
FORMAT_VERSION = 1
FILE_BYTES = 128
BLOCK_BYTES = 4096


@dataclass(frozen=True, slots=True, order=True)
class InboxSpec:
    """``n`` files, flat (``subdirs == 0``) or spread evenly over ``subdirs`` directories."""

    n: int
    subdirs: int = 0

    @property
    def name(self) -> str:
        return f"flat-{self.n}" if not self.subdirs else f"sub{self.subdirs}-{self.n}"

    @property
    def label(self) -> str:
        where = "flat" if not self.subdirs else f"over {self.subdirs:,} subdirectories"
        return f"N = {self.n:,} ({where})"

    @property
    def recursive(self) -> bool:
        return self.subdirs > 0

    @property
    def spec_text(self) -> str:
        return str(self.n) if not self.subdirs else f"{self.n}/{self.subdirs}"


def parse_spec(text: str) -> InboxSpec:
    """``"100000"`` (flat) or ``"1000000/1000"`` (1,000,000 files over 1,000 subdirectories)."""
    count, _, subdirs = text.strip().replace("_", "").partition("/")
    spec = InboxSpec(int(count), int(subdirs) if subdirs else 0)
    if spec.n < 1 or spec.subdirs < 0:
        raise ValueError(f"bad size {text!r}: expected N or N/SUBDIRS with N >= 1")
    return spec


def _content(i: int) -> bytes:
    head = f"id,name,value\n{i},item-{i:07d},{(i * 7919) % 100_000}\n".encode()
    return head + b"#" * (FILE_BYTES - len(head) - 1) + b"\n"


def _marker(spec: InboxSpec) -> dict[str, int]:
    return {"version": FORMAT_VERSION, "n": spec.n, "subdirs": spec.subdirs, "bytes": FILE_BYTES}


def _check_space(parent: Path, spec: InboxSpec) -> None:
    st = os.statvfs(parent)
    need_inodes = spec.n + spec.subdirs + 16
    need_bytes = spec.n * BLOCK_BYTES + (64 << 20)
    if st.f_favail and st.f_favail < need_inodes:
        raise OSError(f"{parent}: {st.f_favail:,} free inodes, {spec.label} needs {need_inodes:,}")
    if st.f_bavail * st.f_frsize < need_bytes:
        free = st.f_bavail * st.f_frsize / 2**30
        raise OSError(f"{parent}: {free:.1f} GiB free, {spec.label} needs {need_bytes / 2**30:.1f}")


def _generate(root: Path, spec: InboxSpec) -> None:
    root.mkdir(parents=True)
    dirs = [str(root)]
    if spec.subdirs:
        dirs = [str(root / f"d{j:04d}") for j in range(spec.subdirs)]
        for d in dirs:
            os.mkdir(d)
    base_ns = (int(time.time()) - 86_400) * 1_000_000_000
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    report_every = max(spec.n // 10, 100_000)
    started = time.monotonic()
    for i in range(spec.n):
        path = f"{dirs[i % len(dirs)]}/f{i:07d}.csv"
        fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, _content(i))
            mtime = base_ns + i * 1_000
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)
        if i and i % report_every == 0:
            print(f"    ... {i:,} files ({time.monotonic() - started:.0f} s)", flush=True)


def ensure_inbox(work: Path, spec: InboxSpec) -> tuple[Path, bool]:
    """The inbox for ``spec`` under ``work``, generated unless a matching one exists.

    Returns ``(path, reused)``.
    """
    inboxes = work / "inboxes"
    inboxes.mkdir(parents=True, exist_ok=True)
    root = inboxes / spec.name
    marker = inboxes / f"{spec.name}.ready"
    try:
        if json.loads(marker.read_text()) == _marker(spec) and root.is_dir():
            return root, True
    except (OSError, ValueError):
        pass
    marker.unlink(missing_ok=True)
    if root.exists():
        shutil.rmtree(root)
    _check_space(inboxes, spec)
    _generate(root, spec)
    marker.write_text(json.dumps(_marker(spec)) + "\n")
    return root, False


def discard_inbox(work: Path, spec: InboxSpec) -> None:
    """Forget a generated inbox (its marker first), e.g. one whose file count is wrong."""
    (work / "inboxes" / f"{spec.name}.ready").unlink(missing_ok=True)
    shutil.rmtree(work / "inboxes" / spec.name, ignore_errors=True)


def warm_up(root: Path, spec: InboxSpec) -> tuple[int, float]:
    """One listing (scandir + stat) and one read of every file, so all systems see a warm cache.

    Returns ``(files, seconds)``.
    """
    started = time.perf_counter()
    files = scan(str(root), recursive=spec.recursive)
    for _, _, path, _ in files:
        with open(path, "rb") as f:
            f.read()
    return len(files), time.perf_counter() - started
