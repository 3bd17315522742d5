"""The floor: one plain process lists, stats, sorts and reads every file; no state at all.

``python -m benchmarks.systems.floor --source DIR [--recursive]``
"""

from __future__ import annotations

import time

from ._scan import emit, scan, source_args


def main() -> None:
    args = source_args(__doc__ or "floor").parse_args()
    started = time.perf_counter()
    files = scan(args.source, recursive=args.recursive)
    scanned = time.perf_counter()
    total = 0
    for _, _, path, _ in files:
        with open(path, "rb") as f:
            total += len(f.read())
    emit(
        {
            "handled": len(files),
            "bytes": total,
            "scan_s": scanned - started,
            "read_s": time.perf_counter() - scanned,
        }
    )


if __name__ == "__main__":
    main()
