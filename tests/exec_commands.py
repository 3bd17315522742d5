"""The commands the ``--exec`` tests run: ``python tests/exec_commands.py MODE [ARGS...]``.

Every mode first appends one JSON line to ``$AB_RECORD`` (when set): its arguments and its
``ASYNCBATCH_*`` variables, as hex of their bytes (a non-UTF-8 name round-trips), and its pid.

- ``record``: exit 0.
- ``fail-first``: exit 1 in attempt 1 (``$ASYNCBATCH_ATTEMPT``), 0 after.
- ``fail CODE [STDERR_BYTES]``: write lines to stderr (a numbered line per 100 bytes, about
  STDERR_BYTES in all, 20 by default), then exit CODE.
- ``hang [grandchild]``: note its pid (and its grandchild's, a ``sleep 1000`` it starts) as a
  file in ``$AB_PIDS``, then wait for a signal: SIGTERM ends it (the default action).
- ``hang-for NAME PATH``: ``hang`` when PATH's name is NAME, else exit 0.
- ``trap``: note its pid in ``$AB_PIDS``; on SIGINT or SIGTERM, write the signal's number to
  ``$AB_PIDS/signal.<pid>`` and exit 0.
- ``deaf``: note its pid in ``$AB_PIDS``; on SIGINT or SIGTERM, note ``signal.<pid>.<number>``
  and go on sleeping (only SIGKILL ends it).
- ``echo``: write ``out:NAME`` to stdout and ``err:NAME`` to stderr, exit 0.
- ``gate NAME PATH``: when PATH's name is NAME, note its pid in ``$AB_PIDS`` and wait until
  the FIFO ``$AB_PIDS/gate`` (made by the test) is opened for writing and closed, then exit
  0; for any other PATH, exit 0 if it is a file with the bytes ``make_files`` gave it (its
  name first), else 3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType


def _record(args: list[str]) -> None:
    target = os.environ.get("AB_RECORD")
    if not target:
        return
    line = json.dumps(
        {
            "argv": [os.fsencode(a).hex() for a in args],
            "env": {
                k.decode(): v.hex() for k, v in os.environb.items() if k.startswith(b"ASYNCBATCH_")
            },
            "pid": os.getpid(),
        }
    )
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode() + b"\n")  # one write: lines of concurrent commands never mix
    finally:
        os.close(fd)


def _note(name: str, text: str = "") -> None:
    """Write ``$AB_PIDS/name`` atomically (a test waits for it to appear)."""
    pids = Path(os.environ["AB_PIDS"])
    tmp = pids / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, pids / name)


def _pause_forever() -> None:
    while True:
        signal.pause()


def main(argv: list[str]) -> int:
    mode, *args = argv
    _record(args)
    if mode == "record":
        return 0
    if mode == "fail-first":
        return 1 if os.environ["ASYNCBATCH_ATTEMPT"] == "1" else 0
    if mode == "fail":
        size = int(args[1]) if len(args) > 1 and args[1].isdigit() else 20
        for i in range(max(1, size // 100)):
            sys.stderr.write(f"line {i:04d} {'.' * 89}\n"[: min(size, 100)])
        sys.stderr.flush()
        return int(args[0])
    if mode == "hang-for":
        if os.path.basename(args[1]) != args[0]:
            return 0
        mode, args = "hang", args[2:]
    if mode == "hang":
        me = os.getpid()
        if args[:1] == ["grandchild"]:
            grandchild = subprocess.Popen(["sleep", "1000"])
            _note(f"pid.{me}", f"{me} {grandchild.pid}")
        else:
            _note(f"pid.{me}", f"{me}")
        _pause_forever()
    if mode == "trap":

        def finish(signum: int, frame: FrameType | None) -> None:
            _note(f"signal.{os.getpid()}", str(signum))
            sys.exit(0)

        signal.signal(signal.SIGINT, finish)
        signal.signal(signal.SIGTERM, finish)
        _note(f"pid.{os.getpid()}", str(os.getpid()))
        _pause_forever()
    if mode == "deaf":

        def carry_on(signum: int, frame: FrameType | None) -> None:
            _note(f"signal.{os.getpid()}.{signum}", str(signum))

        signal.signal(signal.SIGINT, carry_on)
        signal.signal(signal.SIGTERM, carry_on)
        _note(f"pid.{os.getpid()}", str(os.getpid()))
        while True:
            time.sleep(1000)
    if mode == "gate":
        name, path = args
        if os.path.basename(path) == name:
            _note(f"pid.{os.getpid()}", str(os.getpid()))
            with open(Path(os.environ["AB_PIDS"]) / "gate", "rb") as gate:
                gate.read()  # until the test's writer closes it
            return 0
        try:
            made = Path(path).stem.encode() + b"\n"  # what make_files wrote first
            return 0 if Path(path).read_bytes().startswith(made) else 3
        except OSError:
            return 3
    if mode == "echo":
        name = os.path.basename(args[0]) if args else ""
        print(f"out:{name}")
        print(f"err:{name}", file=sys.stderr)
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
