"""Which filesystem a path lives on, so a SQLite state on a network filesystem can be refused.

SQLite's WAL mode keeps its index in shared memory, which works only between processes of one
host: on NFS, SMB or similar, two hosts would corrupt the ledger. Detection reads
``/proc/self/mountinfo`` (Linux); elsewhere nothing is detected and the docs carry the warning.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["NETWORK_FILESYSTEMS", "filesystem_type", "network_filesystem"]

NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "fuse.sshfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.glusterfs",
        "fuse.cephfs",
        "davfs",
        "fuse.rclone",
    }
)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal \\ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_type(path: str | os.PathLike[str]) -> str | None:
    """The type of the filesystem holding ``path`` (``"ext4"``, ``"nfs4"`` ...), or ``None``."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return None
    target = os.path.realpath(Path(path))
    best, best_type = -1, None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount_point = _unescape(fields[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > best:
            best, best_type = len(mount_point), right.split()[0]
    return best_type


def network_filesystem(path: str | os.PathLike[str]) -> str | None:
    """The network filesystem type holding ``path``, or ``None`` when it is local (or unknown)."""
    kind = filesystem_type(path)
    return kind if kind in NETWORK_FILESYSTEMS else None
