"""The operator's answers about single items: explain, items, forget.

``explain`` says why a file was or was not handled, with the scanner's own rules and the
ledger's record; ``items`` lists items with their joblog; ``forget`` deletes chosen items from
the ledger (never a file) so that the next run handles their files again.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import json
import os
import re
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

from .._errors import printable
from .._exceptions import ConfigurationError
from .._identity import Identity, input_hash, item_key
from .._ledger import (
    ITEMS_PAGE,
    STATES,
    ItemFilter,
    ItemInfo,
    JobSettings,
    Ledger,
    RunnerInfo,
    decode_action,
)
from .._pipeline.postactions import keyed_name
from .._procinfo import this_process
from .._ready import (
    MarkerAt,
    Readiness,
    RuleVerdict,
    Stable,
    explain_rules,
    parse_duration,
    parse_rule,
    rule_argument,
)
from .._scanner import PATH_MAX, ScanRules, clamp_ns, content_digest, entry_stat
from .._sources.store import require_obstore
from .._sources.url import ObjectURL, is_object_url
from .common import (
    EXIT_OK,
    job_identity,
    job_settings,
    open_state,
    show_time,
    write_json_list,
)

__all__ = ["COMMANDS", "add_inspect_commands", "item_json", "parse_time"]

#: Some items were refused because live runners hold them (``main.EXIT_UNFINISHED``).
EXIT_HELD = 3
#: How many items a confirmation or a report names one by one.
SHOWN = 20
#: An age before now: a duration with its unit (``parse_duration`` takes a bare number too).
_AGE = re.compile(r"\d+(?:\.\d+)?\s*(s|m|min|h|d|w)")


def parse_time(text: str) -> float:
    """A time on the command line: ISO 8601 (a time without a zone is local) or an age
    before now (``90s``, ``30m``, ``2h``, ``7d``, ``1w``). Raises ``ArgumentTypeError``."""
    age = _AGE.fullmatch(text.strip())
    try:
        if age is not None:
            when = time.time() - parse_duration(text)
        else:
            when = datetime.fromisoformat(text.strip()).timestamp()
        datetime.fromtimestamp(when)  # a time this platform can show (the year 1 to 9999)
        return when
    except (ValueError, OverflowError, OSError):
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: expected ISO 8601 (2026-12-01T10:00, "
            "2026-12-01T10:00:00+00:00) or an age (30m, 2h, 7d)"
        ) from None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.3f}s"
    if seconds < 3600:
        return f"{seconds:.1f}s"
    return f"{seconds / 3600:.2f}h"


def _runner(item: ItemInfo) -> str:
    """Who made the item's latest attempt (or recorded its latest outcome, one that was not an
    attempt: given up on, vanished), as far as the ledger knows."""
    if item.runner is None:
        return "-"
    if item.runner_pid is not None:
        return f"pid {item.runner_pid} on {item.runner_host}"
    return f"runner {item.runner[:12]}"


def item_json(item: ItemInfo) -> dict[str, Any]:
    """An item's record, with its joblog, as ``--json`` prints it."""
    return {
        "key": item.key,
        "relpath": item.relpath,
        "state": item.state,
        "size": item.size,
        "mtime_ns": item.mtime_ns,
        "inode": item.inode,
        "attempts": item.attempts,
        "interrupted": item.interrupted,
        "last_error": item.last_error,
        "created_at": item.created_at,
        "updated_at": item.updated_at,
        "started_at": item.started_at,
        "finished_at": item.finished_at,
        "duration": item.duration,
        "runner": item.runner,
        "runner_pid": item.runner_pid,
        "runner_host": item.runner_host,
        "owner": item.owner,
        "lease_until": item.lease_until,
        "next_attempt_at": item.next_attempt_at,
    }


def source_relpath(source: Path, path: str) -> tuple[str, Path]:
    """The relpath of ``path`` under ``source``, and the file's full path (its directory's
    symlinks resolved, not the file's own). A relative ``path`` is taken from the current
    directory when that lands under the source, or when its first part (``q`` of
    ``q/f.txt``, ``.`` and ``..`` too) is there: it names something there then; else from
    the source (a relpath, as ``items`` shows it). Raises :class:`ConfigurationError` for a
    path outside the source."""
    root = os.path.realpath(source)
    given = Path(path)
    first = path.split(os.sep, 1)[0]
    in_cwd = not given.is_absolute() and bool(first) and os.path.lexists(first)
    if given.is_absolute() or in_cwd:
        tries = [Path.cwd() / given]
    else:
        tries = [Path.cwd() / given, Path(root) / given]
    for candidate in tries:
        absolute = os.path.abspath(candidate)
        full = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
        if os.path.realpath(full) == root:
            raise ConfigurationError(
                f"PATH {path!r} is the source directory itself, not a file under it"
            )
        if os.path.commonpath([root, full]) == root:
            return os.path.relpath(full, root).replace(os.sep, "/"), Path(full)
    outside = f"PATH {path!r} is not a file under the source {str(source)!r}"
    if in_cwd:  # it names what is in the current directory (a file, or one to be there)
        raise ConfigurationError(
            f"{outside}: it is {os.path.abspath(path)!r} (the current directory has {first!r})"
        )
    raise ConfigurationError(outside)


# -- explain -------------------------------------------------------------------------------------


def _scan_verdict(settings: JobSettings, rel: bytes, full: Path) -> tuple[str | None, Any]:
    """Whether the scan with these settings lists the file: ``(why not, lstat or None)``."""
    source = Path(settings.source)
    why = ScanRules(settings.ignore).hidden_because(rel, recursive=settings.recursive, is_dir=False)
    if why is not None:
        return f"skipped by a rule: {why}", None
    if len(os.fsencode(source)) + len(rel) >= PATH_MAX - 1:
        return f"skipped: its path is longer than the system allows ({PATH_MAX} bytes)", None
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return f"cannot be examined: {e.strerror}", None
    if stat.S_ISLNK(st.st_mode):
        why, st = _followed(settings, source, full)
        if why is not None:
            return why, None
    if stat.S_ISDIR(st.st_mode):
        return "skipped: a directory, not a file", None
    if not stat.S_ISREG(st.st_mode):
        return "skipped: not a regular file (a FIFO, socket or device is never opened)", None
    return None, st


def _followed(settings: JobSettings, source: Path, full: Path) -> tuple[str | None, Any]:
    """For :func:`_scan_verdict`, a symlink: ``(why the scan skips it, None)``, or ``(None,
    its target's stat)``."""
    if not settings.follow_symlinks:
        return "skipped: a symlink (followed only with --follow-symlinks)", None
    root = os.path.realpath(source)
    target = os.path.realpath(full)
    if os.path.commonpath([root, target]) != root:
        return "skipped: a symlink to a file outside the source", None
    try:
        return None, os.stat(full)
    except FileNotFoundError:
        return "skipped: a symlink whose target does not exist", None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "skipped: a symlink loop (its links lead back to themselves)", None
        return f"skipped: a symlink whose target cannot be examined: {e.strerror}", None


def _file_key(
    settings: JobSettings, identity: Identity, rel: bytes, st: Any
) -> tuple[str | None, str | None]:
    """The item key and input hash the scan would give this file (``None`` when the content
    cannot be read for identity ``"content"``)."""
    digest = b""
    if identity == "content":
        fd = os.open(settings.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            found = content_digest(
                fd, rel, st.st_size, st.st_mtime_ns, follow_symlinks=settings.follow_symlinks
            )
        except OSError:
            found = None  # cannot be read: no key (the facts say so)
        finally:
            os.close(fd)
        if found is None:
            return None, None
        digest = found
    ihash = input_hash(identity, rel, st.st_size, st.st_mtime_ns, digest)
    return item_key(identity, ihash, st.st_mtime_ns), ihash


def _lease_holder(item: ItemInfo, runners: dict[str, RunnerInfo]) -> str:
    runner = runners.get(item.owner or "")
    if runner is not None:
        return f"pid {runner.pid} on {runner.host}"
    if item.owner is not None and item.owner == item.runner:
        return _runner(item)
    return f"runner {(item.owner or '?')[:12]}"


def _holder_gone(item: ItemInfo, runners: dict[str, RunnerInfo], now: float) -> str | None:
    """Why the runner holding the item's lease is known gone (``None``: it is not), as
    ``locks`` (STALE) and a run's reaping of gone runners judge it: its process (on this
    host) is dead, or its heartbeat expired. A holder with no runner record is not judged."""
    runner = runners.get(item.owner or "")
    if runner is None or runner.alive(now, this_process()):
        return None
    if runner.expires_at < now:
        return f"its heartbeat expired at {show_time(runner.expires_at)}"
    return "its process is dead"


def _lease_verdict(item: ItemInfo, runners: dict[str, RunnerInfo], now: float) -> tuple[str, str]:
    """``leased`` while a live runner holds the item, else ``lease-expired``."""
    holder = _lease_holder(item, runners)
    until = show_time(item.lease_until)
    if item.lease_until is None or item.lease_until < now:
        return "lease-expired", (
            f"was leased by {holder} until {until}; that lease expired, so the next run takes "
            "the item over"
        )
    gone = _holder_gone(item, runners, now)
    if gone is not None:
        return "lease-expired", (
            f"was leased by {holder} until {until}, but that runner is gone ({gone}), so the "
            "next run takes the item over at once"
        )
    return "leased", f"leased by {holder} until {until}"


def _stat_of(path: Path, *, follow_symlinks: bool = False) -> tuple[int, int, int] | None:
    """``(size, mtime_ns, inode)`` of ``path`` as the ledger records them (a symlink the job
    follows: of what it leads to); ``None``: gone (a link left leading nowhere too)."""
    try:
        st = entry_stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        return None
    return None if st is None else (st.st_size, clamp_ns(st.st_mtime_ns), st.st_ino)


def _archived_copy(item: ItemInfo, archive: Path) -> Path | None:
    """Where a move to ``archive`` put the item's file, if its copy is there (same size and
    mtime: a move keeps them): under the keyed name a clash gives it, or its relpath."""
    plain = archive / item.relpath
    for path in (plain.with_name(keyed_name(plain.name, item.key)), plain):
        with contextlib.suppress(OSError):
            if (_stat_of(path) or (-1, -1, -1))[:2] == (item.size, item.mtime_ns):
                return path
    return None


#: What became of a finished item's post-commit action, as a tail of its sentence.
PostSaid = Callable[[ItemInfo], str]


def _post_action_said(item: ItemInfo, *, source: Path, follow_symlinks: bool) -> str:
    """What became of a finished item's post-commit action, for its sentence.

    The ledger keeps the action an item asked for (``post_action``) after it is carried out,
    and records no completion (a run carries it out whenever it finds the handled file still
    in the source): the source tells. It is still to be finished only while the file it
    handled (same size, mtime and inode) is there; a newer file under the name is left alone.
    """
    assert item.post_action is not None
    kind, directory = decode_action(item.post_action)
    what = f"move to {directory}" if kind == "move" else kind
    try:
        now = _stat_of(source / item.relpath, follow_symlinks=follow_symlinks)
    except OSError as e:
        return f"; whether its post-commit action ({what}) is finished cannot be told: {e.strerror}"
    if now == (item.size, item.mtime_ns, item.inode):
        return f"; its post-commit action ({what}) is still to be finished: its file is still there"
    if now is not None:
        return (
            f"; another file has its name now (a newer version, or a copy), which its "
            f"post-commit action ({what}) leaves alone"
        )
    if kind == "move" and directory:
        moved = _archived_copy(item, Path(directory))
        if moved is not None:
            return f"; its post-commit action moved it to {moved}"
        return f"; its file is gone from the source, and {directory} holds no copy of it"
    return f"; its file is gone from the source (its post-commit action: {what})"


#: The verdicts :func:`describe_item` gives: an item's record told.
_OF_RECORDS = frozenset(
    ("done", "failed", "dead", "leased", "lease-expired", "waiting", "vanished")
)


def describe_item(
    item: ItemInfo,
    runners: dict[str, RunnerInfo],
    now: float,
    source: Path,
    *,
    follow_symlinks: bool = False,
    post_said: PostSaid | None = None,
) -> tuple[str, str]:
    """``(verdict, sentence)`` for an item's record (``source``: the job's directory, where
    a finished item's post-commit action is looked up; ``follow_symlinks``: the job's, how a
    symlink's name is judged there; ``post_said``: what became of the action instead, for
    an object-store source)."""
    if post_said is None:
        post_said = functools.partial(
            _post_action_said, source=source, follow_symlinks=follow_symlinks
        )
    error = (item.last_error or "").splitlines()[0] if item.last_error else "no error recorded"
    took = f", took {_duration(item.duration)}" if item.duration is not None else ""
    if item.state == "done":
        when = item.finished_at if item.finished_at is not None else item.updated_at
        text = f"done at {show_time(when)} by {_runner(item)} in attempt {item.attempts}{took}"
        if item.post_action is not None:
            text += post_said(item)
        return "done", text
    if item.state == "failed":
        return "failed", (
            f"failed in attempt {item.attempts} at {show_time(item.finished_at)} by "
            f"{_runner(item)}: {error}; the next attempt is due at "
            f"{show_time(item.next_attempt_at)}"
        )
    if item.state == "dead":
        cut = f" ({item.interrupted} cut short by its runner's death or stop)"
        attempts = f"{item.attempts} attempt{'s' if item.attempts != 1 else ''}"
        # Its --on-dead action (a move to a quarantine, say): where the file is now.
        post = "" if item.post_action is None else post_said(item)
        return "dead", (
            f"dead after {attempts}{cut if item.interrupted else ''}, at "
            f"{show_time(item.finished_at)} by {_runner(item)}: {error}{post}; 'asyncbatch "
            "retry --dead' puts it back"
        )
    if item.state == "running":
        return _lease_verdict(item, runners, now)
    if item.state == "pending":
        return "waiting", (
            "waiting in the ledger (pending: its runner stopped or died during it, or it was "
            "retried): the next run that finds its file settled handles it"
        )
    # Not an attempt: the runner is the one that found the file gone (no start, no duration).
    return "vanished", (
        f"vanished at {show_time(item.updated_at)}, found so by {_runner(item)}: {error}"
    )


def _unsettled(st: os.stat_result, settle: float, now: float, clock: float) -> str | None:
    """Why a file is not settled yet (its mtime or its ctime is less than ``settle`` seconds
    before ``now``, or in the future), and from when it will be; ``None`` if it is settled.
    In the future: later than ``clock``, this host's clock read after the stat (a file
    written since ``now`` was read is not ahead of the clock)."""
    mtime, ctime = st.st_mtime_ns / 1e9, st.st_ctime_ns / 1e9
    changed = max(mtime, ctime)
    settles_at = changed + settle
    if settles_at <= now:
        return None
    what = "modified (mtime)" if mtime >= ctime else "written to (ctime; its mtime says earlier)"
    if changed > clock:
        return (
            f"not settled yet: {what} at {show_time(changed)}, in the future by this host's "
            f"clock; settled from {show_time(settles_at)} (--settle {settle:g})"
        )
    return (
        f"not settled yet: {what} at {show_time(changed)}, {clock - changed:.1f}s ago; "
        f"settled from {show_time(settles_at)} (--settle {settle:g})"
    )


async def _explain_settings(args: argparse.Namespace, ledger: Ledger) -> JobSettings:
    """The source, scan and readiness rules ``explain`` answers with: the job's, as its runs
    recorded them, each replaced by the option given (a "what if"; another ``--source`` is
    refused).

    Raises :class:`ConfigurationError` when the job has no recorded source and none is given,
    or the source is neither a directory nor an ``s3://`` prefix (obstore installed).
    """
    recorded = await job_settings(args, ledger)  # a --source given is the job's, if recorded
    if recorded is None:
        if args.source is None:
            raise ConfigurationError(
                f"job {args.job!r} has no recorded source yet (its runs predate the record; "
                "its next run makes it): give --source"
            )
        recorded = JobSettings(source=args.source)
    if is_object_url(recorded.source):
        ObjectURL.parse("source", recorded.source)  # a recorded one is; a --source given too
        require_obstore("source", recorded.source)
        if args.follow_symlinks:
            raise ConfigurationError.bad_value(
                "follow_symlinks", True, "an s3:// source has no symlinks"
            )
    elif not Path(recorded.source).is_dir():
        raise ConfigurationError.bad_value("source", recorded.source, "no such directory")
    return JobSettings(
        source=recorded.source,
        recursive=recorded.recursive if args.recursive is None else args.recursive,
        follow_symlinks=(
            recorded.follow_symlinks if args.follow_symlinks is None else args.follow_symlinks
        ),
        ignore=recorded.ignore if args.ignore is None else tuple(args.ignore),
        ready=recorded.ready if args.ready is None else tuple(str(r) for r in args.ready),
        settle=recorded.settle if args.settle is None else args.settle,
    )


def readiness(settings: JobSettings) -> Readiness:
    """The recorded rules, compiled (a rule this version does not know is refused)."""
    return Readiness([parse_rule(rule) for rule in settings.ready], settings.settle)


#: A look at the file (or object) again: its stat now, ``None`` once it is gone.
LookAgain = Callable[[], Awaitable[os.stat_result | None]]


def _stat_again(full: Path) -> LookAgain:
    """:data:`LookAgain` of a file: ``os.stat``."""

    async def look() -> os.stat_result | None:
        try:
            return os.stat(full)
        except OSError:
            return None

    return look


async def stable_verdict(ready: Readiness, st: os.stat_result, again: LookAgain) -> RuleVerdict:
    """``stable:N``: look at the file again (``again``), ``settle`` seconds apart, as a run
    does."""
    rule, looks = f"stable:{ready.looks}", ready.looks

    def signature(s: os.stat_result) -> tuple[int, int, int, int]:
        return (s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino)

    first = signature(st)
    for look in range(2, looks + 1):
        await anyio.sleep(ready.settle)
        found = await again()
        if found is None:
            return RuleVerdict(rule, False, f"gone at look {look} of {looks}")
        now = signature(found)
        if now != first:
            return RuleVerdict(
                rule, False, f"seen unchanged {look - 1} of {looks} looks: changed since"
            )
    apart = f", {ready.settle:g} s apart" if looks > 1 else ""
    return RuleVerdict(rule, True, f"seen unchanged {looks} of {looks} looks{apart}")


async def rule_verdicts(
    ready: Readiness,
    settings: JobSettings,
    rel: bytes,
    st: os.stat_result,
    *,
    known: bool,
    again: LookAgain,
    marker_at: MarkerAt | None = None,
) -> list[RuleVerdict]:
    """Each rule and whether it holds for the file; ``stable:N``'s looks are taken (waiting
    ``settle`` seconds between them, each by ``again``) unless the ledger has this version of
    the file (``known``: a run looked at it). ``marker_at``: the markers' times, for a source
    that is not a directory (see :func:`~asyncbatch._ready.explain_rules`)."""
    verdicts = explain_rules(
        ready,
        settings.source,
        rel,
        st,
        time.time_ns(),
        follow_symlinks=settings.follow_symlinks,
        marker_at=marker_at,
    )
    if any(isinstance(r, Stable) for r in ready.rules):
        if known:
            why = "the ledger has this version of the file (its run looked at it)"
            verdicts.append(RuleVerdict(f"stable:{ready.looks}", True, why))
        else:
            verdicts.append(await stable_verdict(ready, st, again))
    return verdicts


def not_ready(verdicts: list[RuleVerdict], unsettled: str | None) -> tuple[str, str] | None:
    """``(verdict, message)`` for a file some rule keeps back, or ``None``: ``not-settled``
    when only ``age`` does (``unsettled``: when it will be settled), else ``not-ready``
    naming each."""
    failing = [v for v in verdicts if not v.holds]
    if not failing:
        return None
    if [v.rule for v in failing] == ["age"]:
        return "not-settled", unsettled or failing[0].why
    left = any(v.rule.startswith("max-age") for v in failing)
    head = "left alone" if left and len(failing) == 1 else "not ready yet"
    return "not-ready", f"{head}: " + "; ".join(f"{v.rule}: {v.why}" for v in failing)


def marker_of(ready: Readiness, rel: bytes) -> str | None:
    """What a marker is, in words, when the file ``rel`` is one (else ``None``)."""
    parent, _, name = rel.rpartition(b"/")
    if not ready.marks(name):
        return None
    if name in ready.dir_names:
        where = os.fsdecode(parent) or "the source"
        return (
            f"a marker (dir-marker:{os.fsdecode(name)}) of {where} and its files: markers "
            "are never inputs; it follows their post-commit action"
        )
    files = [os.fsdecode(parent + b"/" + f if parent else f) for f in ready.marked(name)]
    return (
        f"a marker of {', '.join(files)}: markers are never inputs; it follows its file's "
        "post-commit action"
    )


def verdict_of(
    facts: dict[str, Any],
    current: ItemInfo | None,
    others: list[ItemInfo],
    runners: dict[str, RunnerInfo],
    now: float,
    post_said: PostSaid | None = None,
) -> tuple[str, str]:
    """``explain``'s verdict and message, from what it found (see :func:`_explain_facts`;
    ``post_said``: see :func:`describe_item`)."""
    source, follow = Path(facts["source"]), bool(facts["follow_symlinks"])
    told = functools.partial(
        describe_item, source=source, follow_symlinks=follow, post_said=post_said
    )
    if facts["skipped"] is not None:
        skipped: str = facts["skipped"]
        verdict = "unreadable" if skipped.startswith("cannot be examined") else "skipped"
        return verdict, skipped
    if facts["marker"] is not None:
        return "marker", facts["marker"]
    if not facts["exists"]:
        if others:
            verdict, said = told(others[0], runners, now)
            latest = f"the ledger's latest record of the name: {said}"
            return verdict, f"no such {facts['what']} now; {latest}"
        return "never-seen", f"no such {facts['what']}, and the ledger never saw it"
    if current is not None:
        verdict, said = told(current, runners, now)
        if current.relpath != facts["relpath"]:  # identity content: the same bytes elsewhere
            said = (
                f"the same item as {current.relpath!r} (the same file to the job's identity, "
                f"{facts['identity']}), whose record follows: {said}"
            )
        return verdict, said
    if facts["not_ready"] is not None:
        found: tuple[str, str] = facts["not_ready"]
        return found
    if facts["key"] is None:
        return "unreadable", (
            "its content cannot be read (identity 'content' keys a file by its bytes)"
        )
    # (Not "seen by no run": a run stopped before it registered what it found counts the file
    # among its "not registered yet", and the ledger never heard of it.)
    message = "not in the ledger yet (no run registered it): the next run handles it"
    if others:
        message = (
            f"this version of the {facts['what']} is not in the ledger yet (no run registered "
            f"it; the next run handles it); the ledger has {len(others)} other item(s) under the "
            "name"
        )
    return "never-seen", message


async def records_of(
    ledger: Ledger, job: str, relpath: str, key: str | None
) -> tuple[ItemInfo | None, list[ItemInfo], dict[str, RunnerInfo]]:
    """The ledger's record of the version whose item key is ``key`` (``None``: none), its
    other records under the name ``relpath`` (the latest first), and the job's runners."""
    found = {item.key: item for item in await ledger.find_items(job, relpath)}
    if key is not None and key not in found:
        found.update((item.key, item) for item in await ledger.find_items(job, key))
    current = found.pop(key, None) if key is not None else None
    others = sorted(found.values(), key=lambda item: item.updated_at, reverse=True)
    return current, others, {r.owner: r for r in await ledger.runners(job)}


async def _explain_facts(args: argparse.Namespace, ledger: Ledger) -> dict[str, Any]:
    """Everything ``explain`` says about the file, as a dictionary (``--json``)."""
    settings = await _explain_settings(args, ledger)
    identity = await job_identity(ledger, args.job)
    if args.identity is not None and args.identity != identity:
        raise ConfigurationError(
            f"job {args.job!r} uses identity={identity!r}, not {args.identity!r}: its runs "
            "key the file by that"
        )
    if is_object_url(settings.source):
        from .explain_objects import object_facts  # obstore: only for an object-store job

        return await object_facts(args, ledger, settings, identity)
    if is_object_url(args.path):
        raise ConfigurationError(
            f"PATH {args.path!r} is not a file under the source {settings.source!r}"
        )
    ready = readiness(settings)
    rel_text, full = source_relpath(Path(settings.source), args.path)
    rel = os.fsencode(rel_text)
    now = time.time()
    skipped, st = _scan_verdict(settings, rel, full)
    marker = marker_of(ready, rel) if os.path.isfile(full) else None
    if marker is not None:
        skipped, st = None, None  # a marker, even where its name is one the scan skips
    key = ihash = None
    if st is not None and marker is None:
        key, ihash = _file_key(settings, identity, rel, st)
    current, others, runners = await records_of(ledger, args.job, rel_text, key)
    verdicts: list[RuleVerdict] = []
    if st is not None and marker is None:
        known, again = current is not None, _stat_again(full)
        verdicts = await rule_verdicts(ready, settings, rel, st, known=known, again=again)
    facts: dict[str, Any] = {
        "what": "file",
        "source": settings.source,
        "relpath": rel_text,
        "identity": identity,
        "follow_symlinks": settings.follow_symlinks,
        "skipped": skipped,
        "marker": marker,
        "exists": os.path.lexists(full),
        "key": key,
        "not_ready": None
        if st is None
        else not_ready(verdicts, _unsettled(st, settings.settle, now, time.time())),
    }
    verdict, message = verdict_of(facts, current, others, runners, now)
    if st is not None and marker is None and not os.access(full, os.R_OK):
        message += "; note: this user cannot read the file (a runner that cannot either fails)"
    return {
        "path": str(full),
        "relpath": rel_text,
        **answer_fields(args, settings, verdict, message, verdicts),
        "exists": facts["exists"],
        "file": None
        if st is None
        else {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino},
        "identity": identity,
        "key": key,
        "input_hash": ihash,
        "item": None if current is None else item_json(current),
        "other_items": [item_json(item) for item in others],
    }


def answer_fields(
    args: argparse.Namespace,
    settings: JobSettings,
    verdict: str,
    message: str,
    verdicts: list[RuleVerdict],
) -> dict[str, Any]:
    """The fields of ``explain --json`` a file's and an object's answers share: the job and
    its scan rules, the verdict, and each rule's."""
    return {
        "job": args.job,
        "source": settings.source,
        "recursive": settings.recursive,
        "follow_symlinks": settings.follow_symlinks,
        "ignore": list(settings.ignore),
        "ready": list(settings.ready),
        "settle": settings.settle,
        "verdict": verdict,
        "message": message,
        "rules": [{"rule": v.rule, "holds": v.holds, "why": v.why} for v in verdicts],
    }


async def explain(args: argparse.Namespace) -> int:
    """``asyncbatch explain PATH``: why this file was or was not handled."""
    ledger = await open_state(args)
    try:
        facts = await _explain_facts(args, ledger)
    finally:
        await ledger.close()
    if args.json:
        print(json.dumps(facts, indent=2))
        return EXIT_OK
    lines = [f"{facts['relpath']} (job {facts['job']!r}): {facts['verdict']}", facts["message"]]
    for rule in facts["rules"]:
        lines.append(
            f"rule {rule['rule']}: {'holds' if rule['holds'] else 'does not hold'} ({rule['why']})"
        )
    if facts.get("object") is not None:
        o = facts["object"]
        lines.append(
            f"object: {o['url']}, {o['size']} bytes, last modified "
            f"{show_time(o['mtime_ns'] / 1e9)}, ETag {o['etag']}"
        )
    elif facts["file"] is not None:
        f = facts["file"]
        lines.append(
            f"file: {f['size']} bytes, modified {show_time(f['mtime_ns'] / 1e9)}, "
            f"inode {f['inode']}"
        )
    if facts["key"] is not None:
        lines.append(
            f"identity {facts['identity']}: key {facts['key']}, input hash {facts['input_hash']}"
        )
    item, others = facts["item"], facts["other_items"]
    if item is None and not facts["exists"] and others and facts["verdict"] in _OF_RECORDS:
        item, others = others[0], others[1:]  # the latest record: the one the verdict told
    if item is not None:
        lines.append(_joblog_line(item))
    for other in others[:SHOWN]:
        lines.append(f"other item under the name: {other['state']}, {_joblog_line(other)}")
    # A name (or a stored error) may hold control characters: shown escaped, one line each.
    print("\n".join(printable(line) for line in lines))
    return EXIT_OK


def _joblog_line(item: dict[str, Any]) -> str:
    return (
        f"joblog: attempts {item['attempts']}, started {show_time(item['started_at'])}, finished "
        f"{show_time(item['finished_at'])}, took {_duration(item['duration'])}, key {item['key']}"
    )


# -- items ---------------------------------------------------------------------------------------


def _filter(args: argparse.Namespace, *, limit: int | None) -> ItemFilter:
    return ItemFilter(
        states=tuple(dict.fromkeys(args.states or ())),
        glob=args.glob,
        time=args.time,
        after=args.since,
        before=args.until,
        limit=limit,
    )


def _lists_pending(which: ItemFilter) -> bool:
    """Whether a listing by ``which`` would show pending items (a queued file is one)."""
    return not which.states or "pending" in which.states


async def items(args: argparse.Namespace) -> int:
    """``asyncbatch items``: the job's items with their joblog, filtered: read from the ledger
    a page at a time and written out as they come (see ``Ledger.iter_items``)."""
    ledger = await open_state(args)
    try:
        await job_settings(args, ledger)  # an explicit --source must be the job's
        which = _filter(args, limit=args.limit)
        queued = await ledger.queued_files(args.job) if _lists_pending(which) else 0
        found = ledger.iter_items(args.job, which, page=args.page)
        if args.json:
            await write_json_list(item_json(item) async for item in found)
            print()
        else:
            total = await ledger.count_items(args.job, _filter(args, limit=None))
            if total == 0:
                print(f"job {args.job!r}: no items match")
            else:
                await _print_items(args.job, found, total, args.limit)
    finally:
        await ledger.close()
    if queued:  # status counts them pending: say why they are not listed (stderr: --json)
        print(
            f"and {queued} listed files queued for the runners sharing the job, not taken yet: "
            "pending, with no item row until a runner takes one",
            file=sys.stderr if args.json else sys.stdout,
        )
    return EXIT_OK


async def _print_items(job: str, found: AsyncIterator[ItemInfo], total: int, limit: int) -> None:
    """One line an item (grep-able, never cut to the terminal's width); the rest is in --json.
    ``total``: how many items match, ``limit`` aside."""
    shown = f"{total}" if total <= limit else f"{limit} of {total} (--limit)"
    print(f"items of job {job!r}: {shown}, the most recently changed first")
    print(f"{'state':<8} {'att':>3}  {'started':<19}  {'took':>8}  {'runner':<24}  relpath")
    async for item in found:
        print(
            f"{item.state:<8} {item.attempts:>3}  {show_time(item.started_at):<19}  "
            f"{_duration(item.duration):>8}  {_runner(item):<24}  {printable(item.relpath)}"
        )


# -- forget --------------------------------------------------------------------------------------


async def _chosen(args: argparse.Namespace, ledger: Ledger) -> list[ItemInfo]:
    """The items the PATH/KEY arguments name; a name the ledger holds no item by is an error
    (never seen, or forgotten already: by ``forget``, or by ``retry --dead`` for a file that
    changed since: the ledger keeps no trace of a key to tell these apart)."""
    chosen: dict[str, ItemInfo] = {}
    for name in args.items:
        lookup = name
        if args.source is not None:
            lookup = source_relpath(Path(args.source), name)[0]
        found = await ledger.find_items(args.job, lookup)
        if not found:
            raise ConfigurationError(
                f"{name!r}: the ledger holds no item of job {args.job!r} by this name or key "
                "(never seen, or already forgotten); nothing forgotten"
            )
        chosen.update((item.key, item) for item in found)
    return list(chosen.values())


def _confirm(count: int, shown: list[ItemInfo], yes: bool) -> bool:
    """Ask on a terminal before forgetting; refuse without one (and without ``--yes``)."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise ConfigurationError(
            f"forget: would forget {count} item(s); confirm on a terminal, or pass --yes"
        )
    print(f"{count} item(s) will be forgotten; the next run handles their files again:")
    for item in shown[:SHOWN]:
        print(f"  {printable(item.relpath)} ({item.state}, key {item.key})")
    if count > SHOWN:
        print(f"  ... and {count - SHOWN} more")
    try:
        answer = input(f"Forget these {count} item(s)? [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def _forget_filter(args: argparse.Namespace) -> ItemFilter | None:
    """The items ``forget --done-before`` or ``--vanished`` chooses (``None``: named ones)."""
    if args.vanished:
        return ItemFilter(states=("vanished",), limit=None)
    if args.done_before is not None:
        return ItemFilter(states=("done",), time="finished", before=args.done_before, limit=None)
    return None


@dataclasses.dataclass(slots=True)
class _Forgot:
    """What ``forget`` did, as it tells it: how many items it forgot, the first of them, and
    those it refused (a live lease holds them: only named items can be)."""

    count: int = 0
    first: list[ItemInfo] = dataclasses.field(default_factory=list)
    refused: tuple[ItemInfo, ...] = ()

    def add(self, gone: Iterable[ItemInfo]) -> Iterator[ItemInfo]:
        """Count ``gone`` (keeping the first :data:`SHOWN`), passing each on."""
        for item in gone:
            self.count += 1
            if len(self.first) < SHOWN:
                self.first.append(item)
            yield item


async def _forgotten(
    args: argparse.Namespace, ledger: Ledger, chosen: list[ItemInfo], told: _Forgot
) -> AsyncIterator[ItemInfo]:
    """Forget what ``forget`` was told to, yielding each item forgotten once its transaction
    committed: named items in one transaction; ``--done-before`` and ``--vanished`` a chunk
    of ``--page`` items a transaction (see ``Ledger.forget_chunks``)."""
    if args.items:
        result = await ledger.forget(args.job, keys=[item.key for item in chosen])
        told.refused = result.refused
        for item in told.add(result.forgotten):
            yield item
        return
    chunks = ledger.forget_chunks(args.job, done_before=args.done_before, chunk=args.page)
    async for found in chunks:
        for item in told.add(found.forgotten):
            yield item


async def forget(args: argparse.Namespace) -> int:
    """``asyncbatch forget PATH... | --done-before T | --vanished``: delete items from the
    ledger."""
    if bool(args.items) + (args.done_before is not None) + args.vanished != 1:
        raise ConfigurationError(
            "forget: give PATH/KEY arguments, --done-before T or --vanished (one of them)"
        )
    ledger = await open_state(args, writes=True)
    told = _Forgot()
    try:
        await job_settings(args, ledger)  # an explicit --source must be the job's
        which = _forget_filter(args)
        if which is None:
            chosen = await _chosen(args, ledger)
            count = len(chosen)
        else:
            count = await ledger.count_items(args.job, which)
            chosen = await ledger.list_items(args.job, dataclasses.replace(which, limit=SHOWN))
        if count == 0:
            what = "vanished" if args.vanished else f"done before {show_time(args.done_before)}"
            print(f"job {args.job!r}: no items {what}; nothing forgotten")
            return EXIT_OK
        if not _confirm(count, chosen, args.yes):
            print("not confirmed; nothing forgotten")
            return EXIT_OK
        gone = _forgotten(args, ledger, chosen, told)
        if args.json:
            sys.stdout.write('{\n  "forgotten": ')
            await write_json_list((item_json(item) async for item in gone), depth=1)
            refused = json.dumps([item_json(item) for item in told.refused], indent=2)
            print(',\n  "refused": ' + refused.replace("\n", "\n  ") + "\n}")
            return EXIT_HELD if told.refused else EXIT_OK
        async for _ in gone:
            pass
    finally:
        await ledger.close()
    _print_forgot(args.job, told)
    return EXIT_HELD if told.refused else EXIT_OK


def _print_forgot(job: str, told: _Forgot) -> None:
    """What ``forget`` did, in words."""
    print(
        f"forgot {told.count} item(s) of job {job!r} (no file was touched; the next run "
        "handles their files again)"
    )
    for item in told.first:
        print(f"  {printable(item.relpath)} (was {item.state})")
    if told.count > SHOWN:
        print(f"  ... and {told.count - SHOWN} more")
    if told.refused:
        print(
            f"refused {len(told.refused)} item(s) leased by a runner whose lease has not "
            "expired (left as they were; forget them once it is done):"
        )
        for item in told.refused[:SHOWN]:
            holder = _lease_holder(item, {})
            until = show_time(item.lease_until)
            print(f"  {printable(item.relpath)} (leased by {holder} until {until})")


# -- wiring --------------------------------------------------------------------------------------


COMMANDS = {"explain": explain, "items": items, "forget": forget}


def add_inspect_commands(
    sub: Any,
    add_state: Callable[..., None],
    add_source: Callable[..., None],
    positive_int: Callable[[str], Any],
    non_negative_float: Callable[[str], Any],
) -> None:
    """Add explain, items and forget to the CLI's subparsers (``add_source``: an optional
    ``--source``, checked against the job's)."""
    p = sub.add_parser("explain", help="why a file (or object) was or was not handled")
    p.add_argument(
        "path",
        metavar="PATH",
        help="the file (under the job's source). A relative PATH is taken from the current "
        "directory when it lands under the source from there, or when the current directory "
        "has its first part (q of q/f.txt; ./PATH, ../PATH always): outside the source, that is "
        "an error; else from the source (a relpath, as 'items' shows it). For an s3:// job, "
        "the object: s3://BUCKET/KEY, or its key under the source's prefix",
    )
    add_source(p)
    add_state(p)
    p.add_argument(
        "--settle",
        type=non_negative_float,
        default=None,
        help="seconds (default: the job's latest run's)",
    )
    p.add_argument(
        "--ready",
        action="append",
        type=rule_argument,
        default=None,
        metavar="RULE",
        help="a readiness rule (repeatable; default: the job's, as its runs recorded them)",
    )
    p.add_argument(
        "--ignore",
        action="append",
        default=None,
        help="glob to skip (repeatable; default: the job's, as its runs recorded them)",
    )
    p.add_argument(
        "--recursive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the scan walks subdirectories (default: the job's)",
    )
    p.add_argument(
        "--follow-symlinks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the scan follows symlinks inside the source (default: the job's)",
    )
    p.add_argument(
        "--identity",
        choices=["stat", "path", "content"],
        default=None,
        help="checked against the job's (default: the job's)",
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("items", help="list items with their joblog")
    add_state(p)
    add_source(p)
    # --state names the ledger, as on every command.
    p.add_argument(
        "--in-state",
        dest="states",
        action="append",
        choices=STATES,
        help="items in this state (repeatable)",
    )
    p.add_argument("--glob", default=None, help="shell pattern on the whole relpath")
    p.add_argument("--since", type=parse_time, default=None, help="changed at or after T")
    p.add_argument("--until", type=parse_time, default=None, help="changed before T")
    p.add_argument(
        "--time",
        choices=["updated", "finished"],
        default="updated",
        help="what --since/--until bound: the last change, or the latest outcome",
    )
    p.add_argument("--limit", type=positive_int, default=100, help="(100)")
    p.add_argument("--json", action="store_true")
    p.add_argument(  # tests read in small pages: several of them
        "--page", type=positive_int, default=ITEMS_PAGE, help=argparse.SUPPRESS
    )

    p = sub.add_parser("forget", help="delete items from the ledger: their files are redone")
    add_state(p)
    p.add_argument("items", nargs="*", metavar="PATH|KEY")
    p.add_argument("--done-before", type=parse_time, default=None, help="done items before T")
    p.add_argument(
        "--vanished",
        action="store_true",
        help="every vanished item (its file gone, or changed: a new version is a new item)",
    )
    p.add_argument(
        "--source",
        default=None,
        help="take PATHs as files under this directory (it must be the job's)",
    )
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--json", action="store_true")
    p.add_argument(  # tests read in small pages: several of them
        "--page", type=positive_int, default=ITEMS_PAGE, help=argparse.SUPPRESS
    )
