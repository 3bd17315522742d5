"""The operator's commands: status, failures, retry, locks, unlock, history.

Read-only commands never create a state file: a missing one is an error (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import printable
from .._exceptions import ConfigurationError
from .._identity import Identity, input_hash
from .._ledger import (
    ITEMS_PAGE,
    LABELS,
    NOT_READY,
    ItemFilter,
    ItemInfo,
    JobSettings,
    Ledger,
    Listing,
    LockInfo,
    RunInfo,
    RunnerInfo,
)
from .._procinfo import holder_is_dead, this_process
from .._report import describe
from .._scanner import clamp_ns
from .common import (
    EXIT_OK,
    console,
    job_identity,
    job_settings,
    open_state,
    show_age,
    show_state,
    show_time,
    write_json_list,
)

if TYPE_CHECKING:
    pass

__all__ = ["COMMANDS", "add_operator_commands"]


def _settings_json(settings: JobSettings | None) -> dict[str, Any] | None:
    if settings is None:
        return None
    return {
        "source": settings.source,
        "recursive": settings.recursive,
        "follow_symlinks": settings.follow_symlinks,
        "ignore": list(settings.ignore),
        "ready": list(settings.ready),
        "settle": settings.settle,
    }


def _lock_json(lock: LockInfo, heartbeat: float | None) -> dict[str, Any]:
    alive = lock.expires_at >= time.time() and not holder_is_dead(lock.holder)
    return {
        "job": lock.job,
        "owner": lock.owner,
        "pid": lock.pid,
        "host": lock.host,
        "acquired_at": lock.acquired_at,
        "expires_at": lock.expires_at,
        "heartbeat_at": heartbeat,
        "alive": alive,
    }


def _runner_json(runner: RunnerInfo) -> dict[str, Any]:
    """A shared runner's record, with whether it is alive as a lock's holder is judged: its
    heartbeat current and its process not known dead (a killed runner keeps its record until
    another runner finds it gone)."""
    return {
        "owner": runner.owner,
        "pid": runner.pid,
        "host": runner.host,
        "heartbeat_at": runner.heartbeat_at,
        "expires_at": runner.expires_at,
        "alive": runner.expires_at >= time.time() and not holder_is_dead(runner.holder),
    }


def _runner_alive(run: RunInfo, runners: list[RunnerInfo]) -> bool | None:
    """Whether the runner of a run that has not recorded its end is alive, judged as
    ``locks`` judges a holder (its record's heartbeat current and its process not known
    dead; a runner without a record is gone); ``None`` for a run that ended."""
    if run.exit_status is not None:
        return None
    record = next((r for r in runners if r.owner == run.owner), None)
    return record is not None and _runner_json(record)["alive"]


def _until(run: RunInfo, runners: list[RunnerInfo]) -> float:
    """Until when a run ran: its end, or, for a run not ended, now while its runner is
    alive, its runner's last heartbeat once it is gone."""
    if run.finished_at is not None:
        return run.finished_at
    record = next((r for r in runners if r.owner == run.owner), None)
    if record is not None and not _runner_alive(run, runners):
        return record.heartbeat_at
    return time.time()


def _counts_saved(run: RunInfo, runners: list[RunnerInfo]) -> bool:
    """Whether the counts a run keeps in its history row are its own: those of its report (it
    ended), or as of a heartbeat. A run that has not ended, or was found killed or lost, before
    its first heartbeat saved none: its row's counts are the zeros it started with, and its
    last heartbeat (its runner's record, or its end) is its start (the same transaction)."""
    if run.exit_status not in (None, "killed", "lost"):
        return True
    beat = run.finished_at
    if run.exit_status is None:
        record = next((r for r in runners if r.owner == run.owner), None)
        beat = None if record is None else record.heartbeat_at
    return beat is not None and beat > run.started_at


def _duration(run: RunInfo, runners: list[RunnerInfo]) -> float | None:
    """How long a run ran (see :func:`_until`); ``None`` when not known: its runner gone (or
    found killed or lost) before its first heartbeat, the last time it was known alive is
    its start."""
    if not _counts_saved(run, runners) and not _runner_alive(run, runners):
        return None
    return _until(run, runners) - run.started_at


def _rate(run: RunInfo, duration: float | None) -> float | None:
    """Items done a second (``None``: the duration is not known)."""
    if duration is None:
        return None
    return run.totals.done / duration if duration > 0 else 0.0


#: The duration of a run whose runner was gone before its first heartbeat (see ``_duration``).
_UNKNOWN_DURATION = "duration not known: gone before its first heartbeat"


def _span(duration: float | None, rate: float | None) -> str:
    if duration is None or rate is None:
        return _UNKNOWN_DURATION
    return f"{duration:.1f}s ({rate:.0f}/s)"


def _ended(run: RunInfo, alive: bool | None, saved: bool = True) -> str:
    """How a run ended, in words: its exit status, or whether it is still running (``saved``:
    see :func:`_counts_saved`)."""
    if run.exit_status:
        ended = f"exit {run.exit_status}"
    elif alive:
        ended = "still running"
    else:
        ended = (
            "not running: its runner is gone (its process dead or its heartbeat expired), "
            "its end not recorded yet (the next run records it killed or lost)"
        )
    if run.from_joblog:
        ended += f" ({_COUNTED_HOW if saved else _COUNTED_UNSAVED})"
    return ended


def _item_hash(identity: Identity, item: ItemInfo) -> str:
    if identity == "content":
        return item.key
    return input_hash(identity, os.fsencode(item.relpath), item.size, item.mtime_ns, b"")


# -- status --------------------------------------------------------------------------------------

#: How many names a one-line answer lists.
SHOWN_NAMES = 5

#: How the counts of a live or killed run were made (see ``RunInfo.with_joblog``).
_COUNTED_HOW = (
    "done, dead and vanished from the ledger, what it held leased unfinished;"
    " the rest as of its last heartbeat"
)
#: ... of a run that saved no counts (see ``_counts_saved``).
_COUNTED_UNSAVED = (
    "done, dead and vanished from the ledger, what it held leased unfinished;"
    " the rest not known: no heartbeat saved its counts"
)


#: What the next run does with the files a run left in the source, by count: ``(one, many)``.
#: True of each rule: the next run takes files not registered yet; files not ready yet wait
#: for something (time, looks, a marker, growth); files older than ``max-age`` only get older.
_NEXT_RUN: dict[str, tuple[str, str]] = {
    "unregistered": ("the next run takes it", "the next run takes them"),
    "unsettled": ("taken once it settles", "taken once they settle"),
    "unstable": ("taken once seen unchanged", "taken once seen unchanged"),
    "unmarked": ("waits for its marker, or a newer one", "wait for their markers, or newer ones"),
    "dir_unmarked": (
        "waits for its directory's marker, or a newer one",
        "wait for their directories' markers, or newer ones",
    ),
    "too_small": ("waits until it grows to min-size", "wait until they grow to min-size"),
    "too_old": (
        "never taken unless modified again or the rules change",
        "never taken unless modified again or the rules change",
    ),
}


def _left_in_source(run: RunInfo, saved: bool, alive: bool | None) -> str:
    """What the last run's last scan left in the source: files not registered yet (it was
    stopped or killed before), files not ready yet, by the rule that kept each back, and what
    the next run does with each (takes them, waits for something, or never takes them); not
    known of a run that saved no counts (``saved``: see :func:`_counts_saved`; ``alive``: its
    runner's, see :func:`_runner_alive`)."""
    t = run.totals
    ended = run.exit_status not in (None, "killed", "lost")
    if not saved:
        why = "its first heartbeat has not come yet" if alive else "gone before its first heartbeat"
        return f"left in the source by the last run: not known (it saved no counts: {why})"
    when = "at its end" if ended else "at its last heartbeat"
    parts = []
    for name in ("unregistered", *NOT_READY.values()):
        count = getattr(t, name)
        if count:
            label = LABELS[name]
            if name != "unregistered":
                label = label.removeprefix("file{s} ")
            label = label.replace("{s}", "" if count == 1 else "s")
            fate = _NEXT_RUN[name][count != 1]
            parts.append(f"{count} {label} ({fate})")
    if not parts:
        return f"left in the source by the last run ({when}): nothing it found"
    return f"left in the source by the last run ({when}): {', '.join(parts)}"


@dataclasses.dataclass(frozen=True, slots=True)
class _Status:
    """What ``status`` reads of one job."""

    settings: JobSettings | None
    identity: Identity
    counts: dict[str, int]
    locks: list[dict[str, Any]]
    shared: list[dict[str, Any]]
    last: RunInfo | None
    oldest: float | None
    listing: Listing | None
    runners: list[RunnerInfo]


async def _status_of(args: argparse.Namespace) -> _Status:
    """Read what ``status`` shows (one ledger, opened for reading)."""
    ledger = await open_state(args)
    try:
        runners = await ledger.runners(args.job)
        beats = {r.owner: r.heartbeat_at for r in runners}
        runs = await ledger.runs(args.job, limit=1)
        locks = [lock for lock in await ledger.locks() if lock.job == args.job]
        return _Status(
            settings=await job_settings(args, ledger),
            identity=await job_identity(ledger, args.job),
            counts=await ledger.counts(args.job),
            locks=[_lock_json(lock, beats.get(lock.owner)) for lock in locks],
            shared=[_runner_json(r) for r in runners if r.shared],
            last=runs[0] if runs else None,
            oldest=await ledger.oldest_waiting(args.job),
            listing=await ledger.listing(args.job),
            runners=runners,
        )
    finally:
        await ledger.close()


def _status_json(args: argparse.Namespace, st: _Status) -> dict[str, Any]:
    last_run = None
    if (last := st.last) is not None:
        last_run = {
            "started_at": last.started_at,
            "finished_at": last.finished_at,
            **dataclasses.asdict(last.totals),
            "rate": _rate(last, _duration(last, st.runners)),
            "exit_status": last.exit_status,
            "runner_alive": _runner_alive(last, st.runners),
            "counts_saved": _counts_saved(last, st.runners),
        }
    return {
        "job": args.job,
        "state": show_state(args.state),
        "settings": _settings_json(st.settings),
        "identity": st.identity,
        "counts": st.counts,
        "total": sum(st.counts.values()),
        "locks": st.locks,
        "shared_runners": st.shared,
        "last_run": last_run,
        "oldest_waiting_since": st.oldest,
        "listing": _listing_json(st),
    }


def _listing_json(st: _Status) -> dict[str, Any] | None:
    """The listing role of runners sharing the job: who holds it, since when, and the last
    complete listing (``None``: no shared runner ever listed)."""
    role = st.listing
    if role is None:
        return None
    holder = next((r for r in st.runners if r.owner == role.owner), None)
    # A holder known dead holds nothing: the next shared runner takes the role at once.
    held = (
        holder is not None
        and role.lease_until is not None
        and role.lease_until >= time.time()
        and not holder_is_dead(holder.holder)
    )
    return {
        "pid": holder.pid if held and holder else None,
        "host": holder.host if held and holder else None,
        "since": role.since if held else None,
        "lease_until": role.lease_until if held else None,
        "generation": role.generation,
        "complete": role.complete,
        "listed_at": role.listed_at,
        "listed_files": role.listed_files,
    }


def _status_lines(st: _Status) -> list[str]:
    """What ``status`` says below its table of counts, a line each."""
    lines = []
    if st.settings is None:
        lines.append("source: not recorded yet (the job's next run records it)")
    else:
        lines.append(
            f"source: {st.settings.source} ({st.settings.rules()}; identity: {st.identity})"
        )
    lines += _last_run_lines(st.last, st.runners)
    if st.counts["vanished"]:
        lines.append(
            f"vanished: {st.counts['vanished']} item(s) whose file was gone, or changed, when "
            "its turn came (a changed file's new version is a new item); 'asyncbatch forget "
            "--vanished' clears their rows"
        )
    lines.append(f"oldest waiting item: {show_time(st.oldest) if st.oldest else 'none'}")
    if not st.locks:
        lines.append("lock: none")
    for lock in st.locks:
        lines.append(
            f"lock: held by pid {lock['pid']} on {lock['host']} since "
            f"{show_time(lock['acquired_at'])}, heartbeat {show_age(lock['heartbeat_at'])}"
            f"{'' if lock['alive'] else ' (STALE: holder gone or heartbeat expired)'}"
        )
    for runner in st.shared:
        lines.append(
            f"shared runner: pid {runner['pid']} on {runner['host']}, heartbeat "
            f"{show_age(runner['heartbeat_at'])}"
            f"{'' if runner['alive'] else ' (STALE: runner gone or heartbeat expired)'}"
        )
    if (listing := _listing_json(st)) is not None:
        lines.append(_listing_line(listing))
    return lines


def _listing_line(listing: dict[str, Any]) -> str:
    """Who lists the source for the runners sharing the job, and the last listing."""
    if listing["pid"] is None:
        who = "lister: none now (the next shared runner lists)"
    else:
        who = (
            f"lister: pid {listing['pid']} on {listing['host']} since {show_time(listing['since'])}"
        )
    if not listing["complete"]:
        return f"{who}; no listing complete yet"
    return (
        f"{who}; last listing (#{listing['complete']}) at {show_time(listing['listed_at'])}: "
        f"{listing['listed_files']} files"
    )


def _last_run_lines(last: RunInfo | None, runners: list[RunnerInfo]) -> list[str]:
    if last is None:
        return ["last run: never"]
    duration = _duration(last, runners)
    saved, alive = _counts_saved(last, runners), _runner_alive(last, runners)
    return [
        f"last run: {show_time(last.started_at)}, {describe(last.totals)}; "
        f"{_span(duration, _rate(last, duration))}; {_ended(last, alive, saved)}",
        _left_in_source(last, saved, alive),
    ]


async def status(args: argparse.Namespace) -> int:
    """``asyncbatch status``: counts by state, last run, oldest waiting item, lock holder."""
    st = await _status_of(args)
    if args.json:
        print(json.dumps(_status_json(args, st), indent=2))
        return EXIT_OK
    from rich.table import Table
    from rich.text import Text

    # Text, not a str: rich would take a job's or a path's brackets for markup ("[/a]" fails).
    title = Text(printable(f"job {args.job!r} in {show_state(args.state)}"))
    table = Table(title=title, show_header=True)
    for state in st.counts:
        table.add_column(state, justify="right")
    table.add_row(*(str(n) for n in st.counts.values()))
    screen = console()
    screen.print(table)
    for line in _status_lines(st):
        screen.print(printable(line), markup=False)
    return EXIT_OK


# -- failures and retry --------------------------------------------------------------------------


#: Characters of an error ``failures`` shows in its table (``--json``: all of it).
ERROR_SHOWN = 300


def _failure_json(identity: Identity, item: ItemInfo) -> dict[str, Any]:
    """A failed or dead item as ``failures --json`` prints it."""
    return {
        "key": item.key,
        "relpath": item.relpath,
        "state": item.state,
        "attempts": item.attempts,
        "error": (item.last_error or "").splitlines()[0] if item.last_error else "",
        "input_hash": _item_hash(identity, item),
        "updated_at": item.updated_at,
        # The joblog of the latest attempt (see `asyncbatch items`).
        "started_at": item.started_at,
        "finished_at": item.finished_at,
        "duration": item.duration,
        "runner_pid": item.runner_pid,
        "runner_host": item.runner_host,
    }


async def failures(args: argparse.Namespace) -> int:
    """``asyncbatch failures``: failed and dead items with their last error, the most recently
    changed first (then by key); ``--json`` writes them out as they are read, a page at a
    time (see ``Ledger.iter_items``). The table is made whole first (its columns are sized to
    what they hold): ``--limit`` bounds it."""
    ledger = await open_state(args)
    try:
        identity = await job_identity(ledger, args.job)
        which = ItemFilter(states=("failed", "dead"), limit=args.limit)
        found = ledger.iter_items(args.job, which, page=args.page)
        if args.json:
            await write_json_list(_failure_json(identity, item) async for item in found)
            print()
            return EXIT_OK
        rows = [_failure_json(identity, item) async for item in found]
    finally:
        await ledger.close()
    if not rows:
        print(f"job {args.job!r}: no failed or dead items")
        return EXIT_OK
    from rich.table import Table
    from rich.text import Text

    # Short cells never wrap; the relpath and the error share what is left of the width. The
    # key and the input hash are in --json (`retry` takes the relpath as well as the key).
    # Names, errors and the job's name are Text, never markup: "[red]a.csv" is that name, and
    # an error naming "[/data/in]" is shown, not taken for a closing tag. Their control
    # characters are shown escaped: a file's name or a command's stderr never drives the
    # terminal.
    table = Table(title=Text(printable(f"failed and dead items of job {args.job!r}")))
    table.add_column("when", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("attempts", no_wrap=True, justify="right")
    table.add_column("relpath", overflow="fold", ratio=1, min_width=12)
    table.add_column("error", overflow="fold", ratio=2, min_width=20)
    for r in rows:
        error = r["error"]
        if len(error) > ERROR_SHOWN:  # a command's stderr tail is one line of up to 4 KiB
            error = error[:ERROR_SHOWN] + "\N{HORIZONTAL ELLIPSIS} (whole in --json)"
        table.add_row(
            show_time(r["updated_at"]),
            r["state"],
            str(r["attempts"]),
            Text(printable(r["relpath"])),
            Text(printable(error)),
        )
    console().print(table)
    return EXIT_OK


async def retry(args: argparse.Namespace) -> int:
    """``asyncbatch retry``: put failed (and with --dead, dead) items back to pending.

    A dead item whose file was fixed in place since (identity ``stat``: its size or mtime
    changed) is not put back: its new version is a new item, which the next run handles, and
    the old record is cleared (``forget``), rather than left to vanish when it is tried.
    Without names, the dead items are looked at a page at a time, and those cleared are
    forgotten a page a transaction, before one statement puts every failed and dead item
    left back: a crash mid-way leaves some cleared and none put back (``retry`` again does
    the rest)."""
    ledger = await open_state(args, writes=True)
    try:
        named = await _named_items(args, ledger)
        keys = None if named is None else [i.key for i in named if i.state in _retryable(args)]
        found = _DeadFiles()
        if args.dead:
            await _dead_files(args, ledger, named, found)
        if found.changed and keys is not None:
            gone = set(found.changed_keys)
            keys = [key for key in keys if key not in gone]
        changed = await ledger.retry(args.job, keys, dead=args.dead) if keys != [] else 0
        if args.dead:
            dead = 0
        elif named is not None:  # the dead items of the names given, left as they are
            dead = sum(item.state == "dead" for item in named)
        else:
            dead = (await ledger.counts(args.job)).get("dead", 0)
    finally:
        await ledger.close()
    print(_retried(changed, args.dead, dead, found))
    return EXIT_OK


def _retryable(args: argparse.Namespace) -> tuple[str, ...]:
    """The states ``retry`` puts back: failed, and with ``--dead`` dead too."""
    return ("failed", "dead") if args.dead else ("failed",)


async def _named_items(args: argparse.Namespace, ledger: Ledger) -> list[ItemInfo] | None:
    """Every item the names ``retry`` was given name (``None``: no names, every retryable
    item): a relpath names each version of its file the ledger holds, and ``retry`` puts
    back those it can, as it does without names. Raises :class:`ConfigurationError` for an
    unknown name, or one that names no retryable item."""
    if not args.items:
        return None
    named: dict[str, ItemInfo] = {}
    for name in args.items:
        found = await ledger.find_items(args.job, name)
        if not found:
            raise ConfigurationError(f"unknown item {name!r} in job {args.job!r}")
        if not any(item.state in _retryable(args) for item in found):
            states = {item.state for item in found}
            state = "dead" if "dead" in states else found[0].state
            hint = "; add --dead to retry dead items" if state == "dead" else ""
            raise ConfigurationError(
                f"item {name!r} of job {args.job!r} is {state}, not failed: nothing to retry{hint}"
            )
        named.update((item.key, item) for item in found)
    return list(named.values())


@dataclasses.dataclass(slots=True)
class _DeadFiles:
    """What ``retry --dead`` found of the dead items' files: how many were changed in place
    since (cleared, not put back) and how many are not in the source, with the first few of
    each (the keys of those changed: of named items only, a bounded number)."""

    changed: int = 0
    away: int = 0
    changed_first: list[ItemInfo] = dataclasses.field(default_factory=list)
    away_first: list[ItemInfo] = dataclasses.field(default_factory=list)
    changed_keys: list[str] = dataclasses.field(default_factory=list)

    def saw_changed(self, item: ItemInfo) -> None:
        """Count a dead item whose file changed in place since."""
        self.changed += 1
        if len(self.changed_first) < SHOWN_NAMES:
            self.changed_first.append(item)

    def saw_away(self, item: ItemInfo) -> None:
        """Count a dead item whose file is not in the source."""
        self.away += 1
        if len(self.away_first) < SHOWN_NAMES:
            self.away_first.append(item)


async def _dead_files(
    args: argparse.Namespace, ledger: Ledger, named: list[ItemInfo] | None, found: _DeadFiles
) -> None:
    """Of the dead items (of ``named``; ``None``: all, read a page at a time): clear (forget)
    those whose file was changed in place since (with identity ``stat``, relpath, size and
    mtime, the file there now is another item), a page a transaction, and count those whose
    file is not in the source at all (moved away by ``--on-dead``, or deleted: put back, they
    vanish at the next run unless the file is put back first), into ``found``."""
    settings = await job_settings(args, ledger)
    if settings is None or str(settings.source).startswith("s3://"):
        return
    stat_identity = await job_identity(ledger, args.job) == "stat"
    if named is not None:
        page = [item for item in named if item.state == "dead"]
        found.changed_keys = _look_at(Path(settings.source), page, stat_identity, found)
        if found.changed_keys:
            await ledger.forget(args.job, keys=sorted(found.changed_keys))
        return
    page = []
    dead = ItemFilter(states=("dead",), limit=None)
    async for item in ledger.iter_items(args.job, dead, page=args.page):
        page.append(item)
        if len(page) == args.page:
            await _clear_changed(args, ledger, settings, page, stat_identity, found)
            page = []
    await _clear_changed(args, ledger, settings, page, stat_identity, found)


async def _clear_changed(
    args: argparse.Namespace,
    ledger: Ledger,
    settings: JobSettings,
    page: list[ItemInfo],
    stat_identity: bool,
    found: _DeadFiles,
) -> None:
    """Look at a page of dead items' files; forget those changed since (one transaction)."""
    changed = _look_at(Path(settings.source), page, stat_identity, found)
    if changed:
        await ledger.forget(args.job, keys=sorted(changed))


def _look_at(
    source: Path, dead: list[ItemInfo], stat_identity: bool, found: _DeadFiles
) -> list[str]:
    """Count the dead items whose file changed in place or is away; the keys of the first."""
    changed = []
    for item in dead:
        try:
            st = os.stat(source / item.relpath, follow_symlinks=False)
        except FileNotFoundError:
            found.saw_away(item)
            continue
        except OSError:
            continue
        if stat_identity and (st.st_size, clamp_ns(st.st_mtime_ns)) != (item.size, item.mtime_ns):
            found.saw_changed(item)
            changed.append(item.key)
    return changed


def _retried(changed: int, dead_too: bool, dead_left: int, found: _DeadFiles) -> str:
    """What ``retry`` did, in words."""
    which = "failed or dead" if dead_too else "failed"
    text = f"{changed} {which} item{'s' if changed != 1 else ''} put back to pending"
    if changed:
        text += ": the next run (or a live watch) handles them"
    if dead_left:
        text += (
            f"; {dead_left} dead item{'s' if dead_left != 1 else ''} left as "
            f"{'they are' if dead_left != 1 else 'it is'}: add --dead to retry dead items too"
        )
    if found.changed:
        names = ", ".join(repr(item.relpath) for item in found.changed_first)
        more = f" and {found.changed - SHOWN_NAMES} more" if found.changed > SHOWN_NAMES else ""
        text += (
            f"; {found.changed} dead item{'s' if found.changed != 1 else ''} whose file "
            f"changed since ({names}{more}) cleared: the new version of a file is a new item, "
            "which the next run handles"
        )
    if found.away:
        names = ", ".join(repr(item.relpath) for item in found.away_first)
        more = f" and {found.away - SHOWN_NAMES} more" if found.away > SHOWN_NAMES else ""
        text += (
            f"; {found.away} of them ({names}{more}) {'have' if found.away != 1 else 'has'} no "
            "file in the source now (moved away by --on-dead, or deleted): put each back "
            "first, or the next run finds it vanished"
        )
    return text


# -- locks ---------------------------------------------------------------------------------------


async def locks(args: argparse.Namespace) -> int:
    """``asyncbatch locks``: every job lock, with whether its holder is alive."""
    ledger = await open_state(args, job=False)
    try:
        rows = []
        for lock in await ledger.locks():
            beats = {r.owner: r.heartbeat_at for r in await ledger.runners(lock.job)}
            rows.append(_lock_json(lock, beats.get(lock.owner)))
    finally:
        await ledger.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no job locks")
        return EXIT_OK
    for r in rows:
        print(
            f"{r['job']}: pid {r['pid']} on {r['host']} since {show_time(r['acquired_at'])}, "
            f"heartbeat {show_age(r['heartbeat_at'])}, {'alive' if r['alive'] else 'STALE'}"
        )
    return EXIT_OK


async def unlock(args: argparse.Namespace) -> int:
    """``asyncbatch unlock JOB``: remove a stale job lock (a live one only with --force)."""
    ledger = await open_state(args, job=False, writes=True)
    try:
        held = [lock for lock in await ledger.locks() if lock.job == args.lock_job]
        if not held:
            raise ConfigurationError(
                f"job {args.lock_job!r} has no lock in {show_state(args.state)!r}"
            )
        lock = held[0]
        me = this_process()
        live = lock.expires_at >= time.time() and not holder_is_dead(lock.holder, me=me)
        if live and not args.force:
            here = lock.host == me.host
            raise ConfigurationError(
                f"job {args.lock_job!r} is locked by pid {lock.pid} on {lock.host!r}, which "
                f"{'is alive' if here else 'may be alive (other host, heartbeat current)'}; "
                "pass --force to remove the lock anyway"
            )
        removed = await ledger.force_unlock(args.lock_job, lock.owner)
    finally:
        await ledger.close()
    print(
        f"removed the {'live' if live else 'stale'} lock of job {args.lock_job!r} "
        f"(pid {lock.pid} on {lock.host})"
        if removed
        else f"the lock of job {args.lock_job!r} changed meanwhile; nothing removed"
    )
    return EXIT_OK


# -- history -------------------------------------------------------------------------------------


async def history(args: argparse.Namespace) -> int:
    """``asyncbatch history``: one line per run."""
    ledger = await open_state(args)
    try:
        runs = await ledger.runs(args.job, args.limit)
        runners = await ledger.runners(args.job)
    finally:
        await ledger.close()
    if args.json:
        rows = [
            {k: v for k, v in dataclasses.asdict(r).items() if k != "totals"}
            | {"runner_alive": _runner_alive(r, runners), "counts_saved": _counts_saved(r, runners)}
            | dataclasses.asdict(r.totals)
            for r in runs
        ]
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not runs:
        print(f"job {args.job!r}: no runs")
    for r in reversed(runs):
        duration = _duration(r, runners)
        ended = _ended(r, _runner_alive(r, runners), _counts_saved(r, runners))
        changed = f"; changed the scan rules: {r.settings_changed}" if r.settings_changed else ""
        end = "?" if duration is None else show_time(r.finished_at)
        took = _UNKNOWN_DURATION if duration is None else f"{duration:.1f}s"
        print(
            f"#{r.id} {show_time(r.started_at)} -> {end} ({took}) "
            f"{r.mode} by pid {r.pid} on {r.host}: {describe(r.totals)}; {ended}{changed}"
        )
    return EXIT_OK


# -- wiring --------------------------------------------------------------------------------------

Command = Callable[[argparse.Namespace], Awaitable[int]]


COMMANDS: dict[str, Command] = {
    "status": status,
    "failures": failures,
    "retry": retry,
    "locks": locks,
    "unlock": unlock,
    "history": history,
}


def add_operator_commands(
    sub: Any,
    add_state: Callable[..., None],
    add_source: Callable[..., None],
    positive_int: Callable[[str], Any],
) -> None:
    """Add the operator subcommands to the CLI's subparsers (``add_source``: an optional
    ``--source``, checked against the job's: see :func:`job_settings`)."""
    p = sub.add_parser("status", help="counts by state, last run, lock holder, source")
    add_state(p)
    add_source(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("failures", help="failed and dead items with their last error")
    add_state(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=positive_int, default=50)
    p.add_argument(  # tests read in small pages: several of them
        "--page", type=positive_int, default=ITEMS_PAGE, help=argparse.SUPPRESS
    )

    p = sub.add_parser("retry", help="put failed (and --dead) items back to pending")
    add_state(p)
    p.add_argument("--dead", action="store_true", help="dead items too")
    p.add_argument("items", nargs="*", metavar="KEY|RELPATH")
    p.add_argument(  # tests read in small pages: several of them
        "--page", type=positive_int, default=ITEMS_PAGE, help=argparse.SUPPRESS
    )

    p = sub.add_parser("locks", help="show the job locks")
    add_state(p, job=False)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("unlock", help="remove a stale job lock")
    p.add_argument("lock_job", metavar="JOB")
    add_state(p, job=False)
    p.add_argument("--force", action="store_true", help="remove even a live holder's lock")

    p = sub.add_parser("history", help="one line per run")
    add_state(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=positive_int, default=50)
