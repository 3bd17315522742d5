"""Idempotent effects: atomic writes, repeatable moves, post-commit archive and delete."""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncbatch import (
    Batch,
    ConfigurationError,
    EffectError,
    LockLostError,
    TaskContext,
    atomic_write,
    idempotent_move,
    remove_stale_temp_files,
)
from asyncbatch._effects import files as effect_files
from asyncbatch._effects.files import ABANDONED_AFTER, TEMP_PREFIX, _temp_name, write_under
from asyncbatch._ledger.actions import decode_action, decode_move, encode_action, encode_move
from asyncbatch._ledger.postgres import PostgresLedger
from asyncbatch._ledger.sqlite import SQLiteLedger
from asyncbatch._pipeline.postactions import PostActions, keyed_name
from asyncbatch._pipeline.workers import TAKEN_OVER
from asyncbatch._procinfo import ProcessIdentity, this_process

from .conftest import ledger_rows, make_files, rows, state_counts, take_over_lease
from .s3 import Bucket


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- atomic_write ----------------------------------------------------------------------------


async def test_atomic_write_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "report.bin"
    versions = [bytes([65 + i]) * (1 << 20) for i in range(4)]
    await atomic_write(target, versions[0])
    bad: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            if data not in versions:
                bad.append(len(data))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(40):
            await atomic_write(target, versions[i % 4])
    finally:
        stop.set()
        thread.join()

    assert bad == []
    assert [p.name for p in tmp_path.iterdir()] == ["report.bin"], "no temp file left"


async def test_atomic_write_str_and_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.txt"
    with pytest.raises(FileNotFoundError):
        await atomic_write(target, "x")
    await atomic_write(target, "héllo", make_parents=True)
    assert target.read_text(encoding="utf-8") == "héllo"


async def test_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    me = this_process()
    dead = ProcessIdentity(me.host, dead_pid(), me.pid_start)
    stale = _temp_name(tmp_path / "out.csv", dead)
    stale.write_text("half a file")
    live = _temp_name(tmp_path / "other.csv", me)
    live.write_text("being written right now")
    (tmp_path / "sub").mkdir()
    deeper = _temp_name(tmp_path / "sub" / "x", dead)
    deeper.write_text("x")
    (tmp_path / "keep.csv").write_text("a real output")

    removed = await remove_stale_temp_files(tmp_path)

    assert removed == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["keep.csv", live.name, "sub"])
    assert stale.name.startswith(TEMP_PREFIX)


async def test_temp_files_of_writers_on_other_hosts_are_left_alone(tmp_path: Path) -> None:
    # An output directory shared by several hosts: another host's pid means nothing here.
    me = this_process()
    elsewhere = _temp_name(tmp_path / "a.csv", ProcessIdentity("host-b", dead_pid(), None))
    elsewhere.write_text("host-b is writing this")
    other_ns = _temp_name(
        tmp_path / "b.csv", ProcessIdentity(f"{me.host}/pidns:12345", dead_pid(), None)
    )
    other_ns.write_text("so is a container of this host's name")
    ours = _temp_name(tmp_path / "c.csv", ProcessIdentity(me.host, dead_pid(), me.pid_start))
    ours.write_text("left by a writer of this host that is gone")

    assert await remove_stale_temp_files(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([elsewhere.name, other_ns.name])


async def test_temp_files_no_run_can_check_are_removed_once_abandoned(tmp_path: Path) -> None:
    # A container started again has another host name or pid namespace: no run is ever on
    # "that host" again to remove what its killed writer left. Untouched for ``older_than``
    # seconds, such a file is abandoned; one written to meanwhile is not, nor is a live
    # writer's of this host, however old.
    me = this_process()
    day = 24 * 3600
    old_ns = _temp_name(tmp_path / "a.csv", ProcessIdentity(f"{me.host}/pidns:12345", 1, None))
    old_ns.write_text("left by a container's runner, killed two days ago")
    os.utime(old_ns, (time.time() - 2 * day, time.time() - 2 * day))
    recent = _temp_name(tmp_path / "b.csv", ProcessIdentity("host-b", 1, None))
    recent.write_text("host-b writes this now")
    mine = _temp_name(tmp_path / "c.csv", me)
    mine.write_text("this process writes this")
    os.utime(mine, (time.time() - 2 * day, time.time() - 2 * day))

    assert await remove_stale_temp_files(tmp_path, older_than=day) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([recent.name, mine.name])
    with pytest.raises(ValueError, match="older_than"):
        await remove_stale_temp_files(tmp_path, older_than=-1)


async def test_a_run_removes_what_a_killed_container_left_a_day_ago(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    left = _temp_name(out / "f.csv", ProcessIdentity("container-1f2e/pidns:4026532", 1, None))
    left.write_text("half an output")
    os.utime(left, (time.time() - ABANDONED_AFTER - 60,) * 2)
    kept = _temp_name(out / "g.csv", ProcessIdentity("container-9a8b/pidns:4026533", 1, None))
    kept.write_text("another container writes this now")
    make_files(inbox, 1)

    async def handle(ctx: TaskContext) -> None:
        pass

    report = await Batch(handle, source=inbox, state=state, settle=0, output_dir=out).run()

    assert report.ok
    assert sorted(p.name for p in out.iterdir()) == [kept.name]


async def test_a_killed_writer_leaves_a_temp_that_the_next_batch_cleans(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = (
        f"import os, sys; sys.path.insert(0, {str(Path(__file__).parent.parent)!r})\n"
        "from asyncbatch._effects.files import _temp_name, _write_new, _write_all\n"
        "from asyncbatch._procinfo import this_process\n"
        "from pathlib import Path\n"
        f"tmp = _temp_name(Path({str(out)!r}) / 'result.csv', this_process())\n"
        "_write_new(tmp, _write_all(b'partial'))\n"
        "os.kill(os.getpid(), 9)\n"
    )
    await anyio.run_process([sys.executable, "-c", script], check=False)
    assert [p.name.startswith(TEMP_PREFIX) for p in out.iterdir()] == [True]
    make_files(inbox, 1)

    async def handle(ctx: TaskContext) -> None:
        await ctx.write_output("result.csv", b"complete")

    await Batch(handle, source=inbox, state=state, output_dir=out, settle=0).run()

    assert [p.name for p in out.iterdir()] == ["result.csv"]
    assert (out / "result.csv").read_bytes() == b"complete"


async def test_write_output_refuses_paths_outside_the_output_dir(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 1)
    errors: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        for bad in ("../escape.txt", "/etc/passwd", ""):
            try:
                await ctx.write_output(bad, b"x")
            except ConfigurationError as e:
                errors.append(str(e))

    out = tmp_path / "out"
    out.mkdir()
    await Batch(handle, source=inbox, state=state, output_dir=out, settle=0).run()
    assert len(errors) == 3
    assert not (tmp_path / "escape.txt").exists()


# -- idempotent_move ---------------------------------------------------------------------------


async def test_move_then_repeat_is_a_no_op(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.csv", tmp_path / "archive.csv"
    src.write_text("data")
    assert await idempotent_move(src, dst) is True
    assert await idempotent_move(src, dst) is False
    assert dst.read_text() == "data"
    assert not src.exists()


async def test_move_interrupted_after_the_link_finishes_on_repeat(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.csv", tmp_path / "done" / "a.csv"
    dst.parent.mkdir()
    src.write_text("data")
    os.link(src, dst)  # the state a crash between link and unlink leaves

    assert await idempotent_move(src, dst) is False
    assert not src.exists()
    assert dst.read_text() == "data"


async def test_move_never_overwrites_a_different_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.csv", tmp_path / "b.csv"
    src.write_text("new")
    dst.write_text("someone else's")
    with pytest.raises(EffectError, match="a different file is already there"):
        await idempotent_move(src, dst)
    assert src.read_text() == "new"
    assert dst.read_text() == "someone else's"


async def test_move_onto_itself_keeps_the_file(tmp_path: Path) -> None:
    src = tmp_path / "a.csv"
    src.write_text("data")
    alias = tmp_path / "." / "a.csv"
    assert await idempotent_move(src, alias) is False
    assert src.read_text() == "data"


async def test_move_with_neither_side_present_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await idempotent_move(tmp_path / "x", tmp_path / "y")


def other_filesystem(tmp_path: Path) -> Path | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        return Path(os.environ.get("AB_SHM", str(shm)))
    return None


async def test_move_across_filesystems(tmp_path: Path) -> None:
    other = other_filesystem(tmp_path)
    if other is None:
        pytest.skip("no second filesystem (/dev/shm) here; the forced-EXDEV test covers it")
    target_dir = other / f"asyncbatch-test-{os.getpid()}-{time.monotonic_ns()}"
    target_dir.mkdir()
    try:
        src, dst = tmp_path / "a.csv", target_dir / "a.csv"
        src.write_bytes(b"x" * 3_000_000)
        os.utime(src, (1_000_000_000, 1_000_000_000))
        assert await idempotent_move(src, dst) is True
        assert not src.exists()
        assert dst.stat().st_size == 3_000_000
        assert dst.stat().st_mtime == 1_000_000_000
        assert [p.name for p in target_dir.iterdir()] == ["a.csv"]
    finally:
        for p in target_dir.iterdir():
            p.unlink()
        target_dir.rmdir()


async def test_forced_exdev_move_interrupted_at_every_step_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = tmp_path / "in" / "a.csv", tmp_path / "out" / "a.csv"
    src.parent.mkdir()
    dst.parent.mkdir()
    real_link = os.link

    def link(a: os.PathLike[str], b: os.PathLike[str]) -> None:
        if Path(a) == src:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(a, b)

    monkeypatch.setattr(os, "link", link)

    # 1. Interrupted during the copy: a temp file of a dead writer sits in the target dir.
    src.write_text("payload")
    dead = ProcessIdentity(this_process().host, dead_pid(), this_process().pid_start)
    _temp_name(dst, dead).write_text("pay")
    assert await idempotent_move(src, dst) is True
    assert await remove_stale_temp_files(dst.parent) == 1
    assert dst.read_text() == "payload"
    assert not src.exists()

    # 2. Interrupted after the copy was in place, before the source was removed.
    dst.unlink()
    src.write_text("payload")
    dst.write_text("payload")
    assert await idempotent_move(src, dst) is False
    assert not src.exists()

    # 3. Interrupted after the source was removed.
    assert await idempotent_move(src, dst) is False
    assert dst.read_text() == "payload"


# -- post-commit actions ----------------------------------------------------------------------


async def test_on_done_move_archives_after_the_commit(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox / "2024", 3)
    archive = tmp_path / "archive"
    archive.mkdir()

    async def handle(ctx: TaskContext) -> None:
        await ctx.read_bytes()

    report = await Batch(
        handle, source=inbox, state=state, on_done=f"move:{archive}", recursive=True, settle=0
    ).run()

    assert report.done == 3
    assert sorted(p.name for p in (archive / "2024").iterdir()) == [
        "f00000.txt",
        "f00001.txt",
        "f00002.txt",
    ]
    assert list((inbox / "2024").iterdir()) == []


async def test_post_actions_cut_off_by_a_crash_are_finished_without_rerunning(
    inbox: Path, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_files(inbox, 5)
    archive = tmp_path / "archive"
    archive.mkdir()
    calls: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        calls.append(ctx.entry.relpath)

    async def crash(self: PostActions, post: object) -> str:
        raise OSError("simulated crash between the commit and the move")

    with monkeypatch.context() as m:
        m.setattr(PostActions, "_perform", crash)
        await Batch(handle, source=inbox, state=state, on_done=f"move:{archive}", settle=0).run()
    assert len(list(inbox.iterdir())) == 5, "committed, but not moved yet"
    assert state_counts(state) == {"done": 5}

    report = await Batch(handle, source=inbox, state=state, on_done="keep", settle=0).run()

    assert len(calls) == 5, "the handler did not run again"
    assert report.done == 0
    assert list(inbox.iterdir()) == []
    assert len(list(archive.iterdir())) == 5


async def test_on_done_delete_spares_a_newer_version(inbox: Path, state: Path) -> None:
    first, second = make_files(inbox, 2)

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == first.name:
            # A newer version lands under the same name while we work on the old one.
            replacement = inbox / "new.tmp"
            replacement.write_text("newer")
            os.replace(replacement, first)

    await Batch(handle, source=inbox, state=state, on_done="delete", concurrency=1, settle=0).run()

    assert not second.exists()
    assert first.read_text() == "newer"


async def test_archive_name_clash_keeps_both(inbox: Path, state: Path, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "daily.csv").write_text("yesterday")
    (inbox / "daily.csv").write_text("today")
    os.utime(inbox / "daily.csv", (time.time() - 10,) * 2)

    async def handle(ctx: TaskContext) -> None:
        pass

    await Batch(handle, source=inbox, state=state, on_done=f"move:{archive}", settle=0).run()

    (key,) = [k for (k,) in rows(state, "SELECT key FROM items")]
    assert (archive / "daily.csv").read_text() == "yesterday"
    assert (archive / keyed_name("daily.csv", key)).read_text() == "today"


async def test_on_dead_moves_dead_inputs(inbox: Path, state: Path, tmp_path: Path) -> None:
    make_files(inbox, 2)
    quarantine = tmp_path / "quarantine"
    quarantine.mkdir()

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "f00001.txt":
            raise ValueError("bad")

    await Batch(
        handle, source=inbox, state=state, max_attempts=1, on_dead=f"move:{quarantine}", settle=0
    ).run()

    assert [p.name for p in quarantine.iterdir()] == ["f00001.txt"]
    assert [p.name for p in inbox.iterdir()] == ["f00000.txt"]


@pytest.mark.parametrize(
    ("recursive", "where", "refused"),
    [
        (False, ".", True),  # the source directory itself: the file is scanned again
        (False, "done", False),  # a subdirectory a flat scan never lists
        (True, "done", True),  # ... which a recursive scan does list
        (True, ".done", False),  # hidden: never listed
    ],
)
async def test_ctx_move_refuses_a_destination_the_scan_would_pick_up(
    inbox: Path, state: Path, recursive: bool, where: str, refused: bool
) -> None:
    make_files(inbox, 1)
    (inbox / where).mkdir(exist_ok=True)
    errors: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        try:
            await ctx.move(inbox / where / "moved.txt")
        except EffectError as e:
            errors.append(str(e))
            raise

    report = await Batch(
        handle, source=inbox, state=state, recursive=recursive, max_attempts=1, settle=0
    ).run()

    if refused:
        assert (report.dead, report.done) == (1, 0)
        assert "a scan would take the moved file for a new input" in errors[0]
        assert (inbox / "f00000.txt").exists()  # nothing moved
    else:
        assert (report.done, errors) == (1, [])
        assert (inbox / where / "moved.txt").exists()


async def test_ctx_move_survives_a_crash_before_the_commit(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 1)
    done_dir = tmp_path / "processed"
    done_dir.mkdir()
    seen: list[tuple[int, str]] = []
    moved = anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        seen.append((ctx.attempt, str(ctx.entry.path)))
        await ctx.move(done_dir)
        if ctx.attempt == 1:
            moved.set()
            await anyio.sleep(3600)  # the run is cancelled here, after the move

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(Batch(handle, source=inbox, state=state, settle=0).run)
            await moved.wait()
            tg.cancel_scope.cancel()
    report = await Batch(handle, source=inbox, state=state, settle=0).run()

    assert report.done == 1
    assert report.vanished == 0
    assert [a for a, _ in seen] == [1, 2]
    assert seen[1][1] == str(done_dir / "f00000.txt")
    assert [p.name for p in done_dir.iterdir()] == ["f00000.txt"]


async def test_ctx_move_twice_takes_the_input_on_from_where_the_first_move_put_it(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    # The second move of an attempt moved the source path again, which the first had
    # emptied: FileNotFoundError, and the retry looked for the input where the ledger said
    # (the second destination): vanished, the file left in the first one, never handled.
    make_files(inbox, 1)
    staging, final = tmp_path / "staging", tmp_path / "final"
    staging.mkdir()
    final.mkdir()
    paths: list[Path] = []

    async def handle(ctx: TaskContext) -> None:
        paths.append(await ctx.move(staging))
        assert ctx.entry.path == staging / "f00000.txt"
        paths.append(await ctx.move(final))
        assert ctx.entry.path == final / "f00000.txt"
        assert await ctx.read_bytes() == b"f00000\n".ljust(16, b".")

    report = await Batch(handle, source=inbox, state=state, max_attempts=1, settle=0).run()

    assert (report.done, report.dead, report.vanished) == (1, 0, 0)
    assert paths == [staging / "f00000.txt", final / "f00000.txt"]
    assert list(staging.iterdir()) == []
    assert [p.name for p in final.iterdir()] == ["f00000.txt"]
    assert state_counts(state)["done"] == 1


def test_archive_inside_the_scanned_tree_is_refused(inbox: Path, state: Path) -> None:
    async def handle(ctx: TaskContext) -> None:
        pass

    (inbox / "done").mkdir()
    with pytest.raises(ConfigurationError, match="inside the scanned source"):
        Batch(
            handle,
            source=inbox,
            state=state,
            recursive=True,
            on_done=f"move:{inbox / 'done'}",
            settle=0,
        )
    Batch(
        handle,
        source=inbox,
        state=state,
        recursive=True,
        ignore=["done"],
        on_done=f"move:{inbox / 'done'}",
        settle=0,
    )
    Batch(
        handle, source=inbox, state=state, on_done=f"move:{inbox / 'done'}", settle=0
    )  # not recursive
    with pytest.raises(ConfigurationError, match="no such directory"):
        Batch(handle, source=inbox, state=state, on_done=f"move:{inbox / 'nope'}", settle=0)


async def test_non_utf8_names_through_moves_archives_and_errors(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    names = [b"caf\xe9-moved.csv", b"caf\xe9-archived.csv", b"caf\xe9-broken.csv"]
    for name in names:
        raw = os.fsencode(inbox) + b"/" + name
        with open(raw, "wb") as f:
            f.write(name)
        os.utime(raw, (time.time() - 30,) * 2)
    moved, archive = tmp_path / "moved", tmp_path / "archive"
    moved.mkdir()
    archive.mkdir()

    async def handle(ctx: TaskContext) -> None:
        name = os.fsencode(ctx.entry.relpath)
        assert await ctx.read_bytes() == name
        if b"moved" in name:
            await ctx.move(moved)
        if b"broken" in name:
            raise ValueError(f"cannot parse {ctx.entry.relpath}")

    report = await Batch(
        handle, source=inbox, state=state, on_done=f"move:{archive}", max_attempts=1, settle=0
    ).run()

    assert (report.done, report.dead) == (2, 1)
    assert os.listdir(os.fsencode(moved)) == [b"caf\xe9-moved.csv"]
    assert os.listdir(os.fsencode(archive)) == [b"caf\xe9-archived.csv"]
    ((error,),) = rows(state, "SELECT last_error FROM items WHERE state = 'dead'")
    assert error == "ValueError: cannot parse caf\\udce9-broken.csv"


@given(st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b))
def test_stored_actions_round_trip_any_path(raw: bytes) -> None:
    path = os.fsdecode(b"/archive/" + raw)
    for kind in ("move", "moved"):
        assert decode_action(encode_action(kind, path)) == (kind, path)
        encode_action(kind, path).encode("utf-8")  # always storable as text
    assert decode_action(encode_action("delete")) == ("delete", None)
    # A chain of moves: where the input is, and where it goes.
    staging = os.fsdecode(b"/staging/\xff" + raw)
    chain = encode_move(path, staging)
    chain.encode("utf-8")
    assert decode_move(chain) == (staging, path)
    assert decode_action(chain) == ("moved", path)
    assert decode_move(encode_move(path)) == decode_move(encode_move(path, path)) == (path,)
    assert decode_move(encode_action("move", path)) == decode_move(None) == ()


async def test_an_archive_on_another_filesystem_is_cleaned_of_stale_temp_files(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    other = other_filesystem(tmp_path)
    if other is None:
        pytest.skip("no second filesystem (/dev/shm) here")
    archive = other / f"asyncbatch-archive-{os.getpid()}-{time.monotonic_ns()}"
    archive.mkdir()
    try:
        dead = ProcessIdentity(this_process().host, dead_pid(), this_process().pid_start)
        stale = _temp_name(archive / "f00000.txt", dead)
        stale.write_text("half a copy")  # a cross-device move killed mid-copy
        make_files(inbox, 2)

        async def handle(ctx: TaskContext) -> None:
            pass

        await Batch(handle, source=inbox, state=state, on_done=f"move:{archive}", settle=0).run()

        assert sorted(p.name for p in archive.iterdir()) == ["f00000.txt", "f00001.txt"]
    finally:
        for p in archive.iterdir():
            p.unlink()
        archive.rmdir()


async def test_a_failed_post_commit_action_is_reported(
    inbox: Path, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_files(inbox, 3)
    archive = tmp_path / "archive"
    archive.mkdir()

    async def handle(ctx: TaskContext) -> None:
        pass

    async def fail(self: PostActions, post: object) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PostActions, "_perform", fail)
    report = await Batch(
        handle, source=inbox, state=state, on_done=f"move:{archive}", settle=0
    ).run()

    # The items are done (their work is recorded), but the run is not ok: files that should
    # have been archived are still in the inbox (the next run retries the action).
    assert (report.done, report.post_failed, report.ok) == (3, 3, False)
    assert report.exit_status == "failed"
    assert "3 post-commit actions failed" in str(report)
    # The history says what failed: "exit failed" alone read as dead items.
    assert rows(state, "SELECT exit_status FROM runs") == [
        ("failed (3 post-commit actions failed)",)
    ]
    monkeypatch.undo()
    again = await Batch(
        handle, source=inbox, state=state, on_done=f"move:{archive}", settle=0
    ).run()
    assert (again.done_before, again.post_failed, again.ok) == (3, 0, True)
    assert sorted(p.name for p in archive.iterdir()) == ["f00000.txt", "f00001.txt", "f00002.txt"]


async def test_an_archive_move_never_follows_a_symlinked_directory_out_of_the_archive(
    inbox: Path, state: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (inbox / "sub").mkdir()
    make_files(inbox / "sub", 1)
    archive, elsewhere = tmp_path / "archive", tmp_path / "elsewhere"
    archive.mkdir()
    elsewhere.mkdir()
    (archive / "sub").symlink_to(elsewhere)

    async def handle(ctx: TaskContext) -> None:
        await ctx.read_bytes()

    with caplog.at_level(logging.WARNING, "asyncbatch"):
        report = await Batch(
            handle, source=inbox, state=state, recursive=True, on_done=f"move:{archive}", settle=0
        ).run()

    assert (report.done, report.post_failed, report.ok) == (1, 1, False)
    assert list(elsewhere.iterdir()) == []
    assert [p.name for p in (inbox / "sub").iterdir()] == ["f00000.txt"]  # left where it was
    assert "'sub' in its path is a symbolic link" in caplog.text


# -- regressions of issue 14 ---------------------------------------------------------------------


def _write_settled(path: Path, data: bytes, age: float = 60.0) -> None:
    path.write_bytes(data)
    os.utime(path, (time.time() - age,) * 2)


@pytest.mark.parametrize("on_done", ["delete", "move"])
async def test_a_newer_file_under_a_done_name_is_never_deleted_or_archived_unhandled(
    inbox: Path, state: Path, tmp_path: Path, on_done: str
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    action = "delete" if on_done == "delete" else f"move:{archive}"
    handled: list[bytes] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(await ctx.read_bytes())

    report = inbox / "report.csv"
    _write_settled(report, b"v1")
    await Batch(handle, source=inbox, state=state, identity="path", on_done=action, settle=0).run()
    assert not report.exists()
    # A different v2 under the done name, its mtime a minute in the past: identity "path"
    # handles each name once, so v2 is not handled, and must then be left where it is.
    _write_settled(report, b"version 2")
    await Batch(handle, source=inbox, state=state, identity="path", on_done=action, settle=0).run()

    assert handled == [b"v1"]
    assert report.read_bytes() == b"version 2"
    assert [p.read_bytes() for p in archive.iterdir()] == ([b"v1"] if on_done == "move" else [])


async def test_content_identity_never_deletes_another_name_with_the_same_bytes(
    inbox: Path, state: Path
) -> None:
    async def handle(ctx: TaskContext) -> None:
        pass

    _write_settled(inbox / "a.csv", b"same bytes")
    await Batch(
        handle, source=inbox, state=state, identity="content", on_done="delete", settle=0
    ).run()
    _write_settled(inbox / "b.csv", b"same bytes")
    report = await Batch(
        handle, source=inbox, state=state, identity="content", on_done="delete", settle=0
    ).run()

    assert report.done == 0
    assert [p.name for p in inbox.iterdir()] == ["b.csv"]


async def test_path_identity_records_the_file_it_handled_for_the_post_action(
    inbox: Path, state: Path
) -> None:
    first, report = inbox / "a.csv", inbox / "report.csv"
    _write_settled(first, b"first", age=120)
    _write_settled(report, b"v1")
    handled: list[bytes] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(await ctx.read_bytes())
        if ctx.entry.relpath == "a.csv":
            # report.csv is scanned and leased already; rewrite it before its turn.
            _write_settled(inbox / "new.tmp", b"version 2, longer")
            os.replace(inbox / "new.tmp", report)

    await Batch(handle, source=inbox, state=state, identity="path", concurrency=1, settle=0).run()

    # "path" handles the name as it is when opened; the ledger keeps that file's size, mtime
    # and inode, which a post-commit action of a later run checks before touching the file.
    assert handled == [b"first", b"version 2, longer"]
    st = report.stat()
    assert rows(
        state, "SELECT size, mtime_ns, inode FROM items WHERE relpath = ?", (b"report.csv",)
    ) == [(st.st_size, st.st_mtime_ns, st.st_ino)]


async def test_write_output_never_follows_a_symlink_inside_the_output_dir(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 1)
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "link").symlink_to(Path("..") / "outside")
    errors: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        await ctx.write_output("nested/deeper/ok.txt", b"fine")
        try:
            await ctx.write_output("link/escaped.txt", b"x")
        except EffectError as e:
            errors.append(str(e))

    report = await Batch(handle, source=inbox, state=state, output_dir=out, settle=0).run()

    assert report.done == 1
    assert list(outside.iterdir()) == []
    assert (out / "nested" / "deeper" / "ok.txt").read_bytes() == b"fine"
    assert errors == [
        "cannot write 'link/escaped.txt': 'link' in its path is a symbolic link or not a "
        "directory; asyncbatch writes only inside the directory it was given"
    ]


async def test_write_output_without_an_output_dir_stops_the_run(inbox: Path, state: Path) -> None:
    make_files(inbox, 3)
    calls: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        calls.append(ctx.key)
        await ctx.write_output("x.txt", b"x")

    with pytest.raises(
        ConfigurationError,
        match=r"^ctx.write_output needs an output directory: --output-dir DIR "
        r"\(Batch\(output_dir=...\)\)$",
    ):
        await Batch(handle, source=inbox, state=state, concurrency=1, settle=0).run()
    assert len(calls) == 1, "not retried as a transient failure"
    assert state_counts(state) == {"pending": 3}


# -- effects of a runner stalled past its lease: the ledger is asked before they are refused --

#: The shortest lease asyncbatch accepts (its local deadline is 2.7 s); a stall of
#: ``STALL`` seconds runs past it, and past the ledger's lease too.
LEASE, STALL = 3.0, 3.5


class _StallsThenActs:
    """A handler whose first call for ``f00001.txt`` stalls the whole event loop past the
    lease (a blocking sleep: no heartbeat runs, as in a runner SIGSTOPped in its handler),
    then calls ``meanwhile`` (what happened while it was stalled: another runner took the
    lease over, say), then makes its effect (``effect``: "write" writes ``late/NAME``,
    "move" moves the input into ``archive``; an ``s3://`` ``out`` is written with a PUT).
    Every other call writes ``NAME`` (``call N``: the Nth call for it), or moves its input."""

    stalled = "f00001.txt"

    def __init__(self, effect: str, archive: Path, meanwhile: Callable[[], object]) -> None:
        self.effect, self.archive, self.meanwhile = effect, archive, meanwhile
        self.refused: list[LockLostError] = []
        self.attempts: list[tuple[str, int]] = []
        self.stalled_once = False

    async def __call__(self, ctx: TaskContext) -> None:
        name = ctx.entry.relpath
        self.attempts.append((name, ctx.attempt))
        late = name == self.stalled and not self.stalled_once
        if late:
            self.stalled_once = True
            time.sleep(STALL)  # noqa: ASYNC251 - the event loop stalls past the lease
            self.meanwhile()
        try:
            if self.effect == "move":
                await ctx.move(self.archive)
            else:
                calls = sum(called == name for called, _ in self.attempts)
                await ctx.write_output(f"late/{name}" if late else name, f"call {calls}")
        except LockLostError as e:
            self.refused.append(e)
            raise


def _stalled_batch(
    handler: Callable[[TaskContext], Awaitable[None]],
    inbox: Path,
    state: str,
    out: Path | str,
    **options: Any,
) -> Batch:
    make_files(inbox, 3)
    return Batch(
        handler,
        source=inbox,
        state=state,
        output_dir=out,
        settle=0,
        concurrency=1,
        lease=LEASE,
        backoff=0.01,
        **options,
    )


@pytest.mark.parametrize("effect", ["write", "move"])
async def test_an_effect_after_a_stall_past_the_lease_that_nobody_took_over_is_made(
    inbox: Path, any_state: str, tmp_path: Path, effect: str
) -> None:
    # Regression: after a stall (or a SIGSTOP) past its lease, ctx.write_output and ctx.move
    # refused at once (LockLostError) on the local deadline alone, though nobody had taken the
    # lease over and the heartbeat would renew it a moment later: with max_attempts=1 the file
    # was dead, exit 1, for a lone runner. The ledger is asked first now: renewed, the effect
    # is made and the item is done in its first attempt.
    out, archive = tmp_path / "out", tmp_path / "archive"
    out.mkdir()
    archive.mkdir()
    handler = _StallsThenActs(effect, archive, meanwhile=lambda: None)
    batch = _stalled_batch(handler, inbox, any_state, out, max_attempts=1)

    with anyio.fail_after(60):  # a bound on a hang, not a wait
        report = await batch.run()

    assert handler.refused == []
    assert (report.done, report.dead, report.failed, report.lost) == (3, 0, 0, 0), report
    assert handler.attempts.count((handler.stalled, 1)) == 1, handler.attempts
    name = handler.stalled
    where = f"'{name}'::bytea" if any_state.startswith("postgresql") else f"CAST('{name}' AS BLOB)"
    query = f"SELECT state, attempts, interrupted, last_error FROM items WHERE relpath = {where}"
    assert [tuple(row) for row in ledger_rows(any_state, query)] == [("done", 1, 0, None)]
    if effect == "write":
        assert (out / "late" / handler.stalled).read_text() == "call 1"
        assert sorted(p.name for p in out.iterdir()) == ["f00000.txt", "f00002.txt", "late"]
    else:
        assert sorted(os.listdir(archive)) == [f"f{i:05d}.txt" for i in range(3)]
        assert os.listdir(inbox) == []


@pytest.mark.parametrize("effect", ["write", "move"])
async def test_an_effect_after_a_stall_past_the_lease_taken_over_meanwhile_is_refused(
    inbox: Path, any_state: str, tmp_path: Path, effect: str, caplog: pytest.LogCaptureFixture
) -> None:
    # While the runner was stalled, another runner took the lease over: asked, the ledger
    # says so, and the late effect is refused (LockLostError): nothing written, nothing
    # moved. The item comes back to this runner later (the other's lease runs out at once,
    # see take_over_lease), whose next call makes the effect.
    out, archive = tmp_path / "out", tmp_path / "archive"
    out.mkdir()
    archive.mkdir()

    def take_over() -> None:
        take_over_lease(any_state, _StallsThenActs.stalled)

    handler = _StallsThenActs(effect, archive, meanwhile=take_over)
    batch = _stalled_batch(handler, inbox, any_state, out)

    with anyio.fail_after(60), caplog.at_level(logging.WARNING, "asyncbatch"):  # (a bound)
        report = await batch.run()

    assert len(handler.refused) == 1, handler.refused
    # Its attempt was cut short by the takeover (as the watchdog says it), not failed.
    said = [
        r.getMessage() for r in caplog.records if f"'{handler.stalled}': attempt" in r.getMessage()
    ]
    assert said == [f"'{handler.stalled}': attempt 1 cut short: {TAKEN_OVER}"], said
    assert "the output was not written" in str(handler.refused[0]) or effect == "move"
    assert "another runner holds it" in str(handler.refused[0])
    # Taken back later (a new lease: its first attempt was cut short, not failed), and done.
    assert handler.attempts.count((handler.stalled, 1)) == 2, handler.attempts
    assert (report.done, report.dead, report.failed, report.lost) == (3, 0, 0, 1), report
    assert not (out / "late").exists()  # the refused write left nothing, not even a temp
    if effect == "write":
        assert (out / handler.stalled).read_text() == "call 2"
        assert sorted(p.name for p in out.iterdir()) == [f"f{i:05d}.txt" for i in range(3)]
    else:
        assert sorted(os.listdir(archive)) == [f"f{i:05d}.txt" for i in range(3)]


class _SlowHeartbeats:
    """The ledger's heartbeats (both ledgers'), once ``hold()`` was called, held until
    ``answer()``: a ledger slow to answer (a loaded machine, a busy PostgreSQL)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held = False
        self.answered = anyio.Event()
        for cls in (SQLiteLedger, PostgresLedger):
            monkeypatch.setattr(cls, "heartbeat", self._held(cls.heartbeat))

    def _held(self, beat: Callable[..., Any]) -> Callable[..., Any]:
        async def heartbeat(ledger: Any, *args: Any) -> Any:
            if self.held:
                await self.answered.wait()
            return await beat(ledger, *args)

        return heartbeat

    def hold(self) -> None:
        self.held = True

    def answer(self) -> None:
        self.answered.set()


@pytest.mark.parametrize("stopped_by", ["effect", "watchdog"])
async def test_a_takeover_the_ledger_tells_late_still_cuts_the_attempt_short(
    inbox: Path,
    any_state: str,
    tmp_path: Path,
    stopped_by: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression (a flaky CI run under load): after a stall past the lease, with the lease
    # taken over meanwhile, the ledger's answer came later than the renewal patience (0.15 s
    # at --lease 3): the effect was refused, or the watchdog stopped the handler, as it must,
    # but the attempt was then recorded "failed: LockLostError" (or "the lease ran out")
    # before the answer came. The outcome now waits for the answer: cut short, taken over.
    slow = _SlowHeartbeats(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    stalled: list[int] = []

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == _StallsThenActs.stalled and not stalled:
            stalled.append(ctx.attempt)
            time.sleep(STALL)  # noqa: ASYNC251 - the event loop stalls past the lease
            take_over_lease(any_state, _StallsThenActs.stalled)
            slow.hold()
            try:
                if stopped_by == "effect":
                    await ctx.write_output(f"late/{ctx.entry.relpath}", "late")
                else:
                    await anyio.sleep_forever()  # the watchdog stops it
            finally:
                slow.answer()  # refused (or stopped) before the ledger answered
        await ctx.write_output(ctx.entry.relpath, "done")

    batch = _stalled_batch(handle, inbox, any_state, out)
    with anyio.fail_after(60), caplog.at_level(logging.WARNING, "asyncbatch"):  # (a bound)
        report = await batch.run()

    said = [
        r.getMessage()
        for r in caplog.records
        if f"'{_StallsThenActs.stalled}': attempt" in r.getMessage()
    ]
    assert said == [f"'{_StallsThenActs.stalled}': attempt 1 cut short: {TAKEN_OVER}"], said
    assert (report.done, report.dead, report.failed, report.lost) == (3, 0, 0, 1), report
    assert not (out / "late").exists()
    assert sorted(p.name for p in out.iterdir()) == [f"f{i:05d}.txt" for i in range(3)]


@pytest.mark.parametrize("taken_over", [False, True])
async def test_an_s3_output_after_a_stall_past_the_lease_asks_the_ledger_first(
    inbox: Path, state: Path, bucket: Bucket, taken_over: bool
) -> None:
    # The same fence for a write_output to an s3:// output prefix (one PUT): after a stall
    # that nobody used to take the lease over, the PUT is made; taken over, none is.
    handler = _StallsThenActs(
        "write",
        inbox,
        meanwhile=lambda: (
            take_over_lease(str(state), _StallsThenActs.stalled) if taken_over else None
        ),
    )
    batch = _stalled_batch(handler, inbox, str(state), bucket.url("out/"))

    with anyio.fail_after(60):  # a bound on a hang, not a wait
        report = await batch.run()

    late = bucket.get(f"out/late/{handler.stalled}")
    if taken_over:
        assert len(handler.refused) == 1
        assert late is None
        assert bucket.get(f"out/{handler.stalled}") == b"call 2"
        assert (report.done, report.lost) == (3, 1), report
    else:
        assert handler.refused == []
        assert late == b"call 1"
        assert (report.done, report.dead, report.failed, report.lost) == (3, 0, 0, 0), report


@pytest.mark.parametrize("fails_at", ["write", "open"])
async def test_a_write_that_fails_names_the_file_written_not_its_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails_at: str
) -> None:
    # Regression (QA): a full disk failed write_output with "[Errno 28] No space left on
    # device" (os.write names no file), and a refused open named the hidden temp file
    # ('.asyncbatch-tmp-...-f9.txt.out'), not the output the user asked for.
    real_open = os.open

    def refused_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(TEMP_PREFIX):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args, **kwargs)

    def no_space(data: bytes) -> Callable[[int], None]:
        def fill(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return fill

    if fails_at == "write":
        monkeypatch.setattr(effect_files, "_write_all", no_space)
    else:
        monkeypatch.setattr(os, "open", refused_open)
    out = tmp_path / "out"
    out.mkdir()

    async def plain() -> None:
        await atomic_write(out / "a.txt", b"x")

    async def under() -> None:
        await write_under(out, Path("sub/b.txt"), b"x")

    for write, shown in [(plain, out / "a.txt"), (under, out / "sub" / "b.txt")]:
        with pytest.raises(OSError, match=re.escape(repr(str(shown)))) as raised:
            await write()
        assert TEMP_PREFIX not in str(raised.value)
    assert sorted(p.name for p in out.rglob("*")) == ["sub"]  # no temp file left
