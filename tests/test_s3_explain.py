"""``asyncbatch explain`` of an object-store job, through the real CLI against a real S3 API
on 127.0.0.1 (moto): what the ledger knows of one object, what the bucket says of it now,
and one line (exit 2) for what cannot be looked at."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from asyncbatch import Batch, TaskContext

from .conftest import cli
from .s3 import CANARY_SECRET, Bucket

REPO = Path(__file__).parent.parent


def explain_cli(bucket: Bucket, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``asyncbatch explain ARGS`` with the bucket's AWS environment."""
    return cli("explain", *args, env=bucket.env, cwd=REPO)


def explain(bucket: Bucket, state: Path, path: str, *extra: str) -> dict[str, Any]:
    out = explain_cli(bucket, path, "--state", state, "--json", *extra)
    assert out.returncode == 0, out.stderr
    assert CANARY_SECRET not in out.stdout + out.stderr
    facts: dict[str, Any] = json.loads(out.stdout)
    return facts


async def test_explain_says_what_the_ledger_and_the_bucket_know_of_an_object(
    bucket: Bucket, state: Path
) -> None:
    for name in ("ok.txt", "bad.txt", ".hidden.txt", "sub/deep.txt"):
        bucket.put(f"in/{name}", b"hello")

    async def handler(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "bad.txt":
            raise ValueError("no good")

    settings = {"source": bucket.url("in/"), "state": state, "settle": 0, "max_attempts": 1}
    await Batch(handler, **settings).run()  # type: ignore[arg-type]
    etag = bucket.put("in/new.txt", b"not yet")
    etag_ok = bucket.client.head_object(Bucket=bucket.name, Key="in/ok.txt")["ETag"]

    done = explain(bucket, state, bucket.url("in/ok.txt"))  # the URL form
    assert (done["verdict"], done["relpath"], done["exists"]) == ("done", "ok.txt", True)
    assert done["path"] == bucket.url("in/ok.txt")
    assert done["object"]["etag"] == etag_ok
    assert done["object"]["size"] == 5
    assert done["item"]["state"] == "done"
    assert done["item"]["key"] == done["key"]
    assert done["rules"] == [
        {"rule": "age", "holds": True, "why": done["rules"][0]["why"]},
    ]
    assert done["rules"][0]["why"].startswith("LastModified ")

    dead = explain(bucket, state, "bad.txt")  # a key relative to the prefix
    assert dead["verdict"] == "dead"
    assert "no good" in dead["message"]
    assert "retry --dead" in dead["message"]

    new = explain(bucket, state, "new.txt")
    assert (new["verdict"], new["item"]) == ("never-seen", None)
    assert new["message"] == "not in the ledger yet (no run registered it): the next run handles it"
    assert new["object"]["etag"] == etag

    waits = explain(bucket, state, "new.txt", "--settle", "3600")
    assert waits["verdict"] == "not-settled"
    assert waits["message"].startswith("not settled yet: uploaded (LastModified) at ")
    assert waits["message"].endswith("(--settle 3600)")

    hidden = explain(bucket, state, ".hidden.txt")
    assert hidden["verdict"] == "skipped"
    assert "hidden name '.hidden.txt'" in hidden["message"]
    deep = explain(bucket, state, "sub/deep.txt")
    assert deep["verdict"] == "skipped"
    assert "not recursive" in deep["message"]
    folder = explain(bucket, state, "sub")
    assert (folder["verdict"], folder["exists"]) == ("skipped", False)
    assert "a key prefix" in folder["message"]

    missing = explain(bucket, state, "nothing.txt")
    assert (missing["verdict"], missing["exists"], missing["object"]) == (
        "never-seen",
        False,
        None,
    )
    assert missing["message"] == "no such object, and the ledger never saw it"

    # The object deleted: answered from the ledger's record of its name.
    bucket.client.delete_object(Bucket=bucket.name, Key="in/ok.txt")
    gone = explain(bucket, state, "ok.txt")
    assert gone["verdict"] == "done"
    assert gone["message"].startswith("no such object now; the ledger's latest record")

    text = explain_cli(bucket, "new.txt", "--state", state)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "new.txt (job 'default'): never-seen"
    assert lines[-2].startswith(f"object: {bucket.url('in/new.txt')}, 7 bytes, last modified ")
    assert lines[-2].endswith(f"ETag {etag}")
    assert bucket.keys() == ["in/.hidden.txt", "in/bad.txt", "in/new.txt", "in/sub/deep.txt"]


async def test_explain_names_an_objects_missing_marker_and_its_archive_copy(
    bucket: Bucket, state: Path
) -> None:
    bucket.put("in/a.csv", b"a")
    bucket.put("in/a.csv.done", b"")
    bucket.put("in/b.csv", b"b")

    async def handler(ctx: TaskContext) -> None:
        pass

    settings = {
        "source": bucket.url("in/"),
        "state": state,
        "settle": 0,
        "ready": ["age", "marker:.done"],
        "on_done": f"move:{bucket.url('archive/')}",
    }
    await Batch(handler, **settings).run()  # type: ignore[arg-type]

    waiting = explain(bucket, state, "b.csv")
    assert waiting["verdict"] == "not-ready"
    assert waiting["message"] == "not ready yet: marker:.done: marker b.csv.done missing"
    assert {r["rule"]: r["holds"] for r in waiting["rules"]} == {
        "age": True,
        "marker:.done": False,
    }

    moved = explain(bucket, state, "a.csv")
    assert moved["verdict"] == "done"
    assert moved["message"].endswith(
        f"; its post-commit action moved it to {bucket.url('archive/a.csv')}"
    )
    assert not explain(bucket, state, "a.csv.done")["exists"]  # it went with its file
    bucket.put("in/b.csv.done", b"")
    marker = explain(bucket, state, "b.csv.done")
    assert marker["verdict"] == "marker"
    assert marker["message"].startswith("a marker of b.csv: markers are never inputs")
    assert explain(bucket, state, "b.csv")["verdict"] == "never-seen"  # ready now


async def test_explain_does_not_take_another_object_of_the_same_size_for_the_archive_copy(
    bucket: Bucket, state: Path
) -> None:
    bucket.put("archive/a.csv", b"X")  # someone else's object, 1 byte
    bucket.put("in/a.csv", b"a")  # 1 byte too

    async def handler(ctx: TaskContext) -> None:
        bucket.client.delete_object(Bucket=bucket.name, Key="in/a.csv")  # gone: never moved

    settings = {
        "source": bucket.url("in/"),
        "state": state,
        "settle": 0,
        "on_done": f"move:{bucket.url('archive/')}",
    }
    await Batch(handler, **settings).run()  # type: ignore[arg-type]
    said = explain(bucket, state, "a.csv")["message"]
    assert "moved it to" not in said, said
    assert said.endswith(
        f"; its object is gone from the source, and {bucket.url('archive/a.csv')} has its size "
        "but another ETag (its copy, if it was uploaded in parts; or another object)"
    ), said


def test_explain_refuses_what_it_cannot_look_at_in_one_line(
    bucket: Bucket, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket.put("in/a.txt", b"a")
    ran = cli(
        "run", "tests.cli_handlers:record", "--source", bucket.url("in/"), "--state", state,
        env={**bucket.env, "AB_LOG": str(tmp_path / "log")}, cwd=REPO,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr

    def refused(path: str, env: dict[str, str] | None = None) -> str:
        out = cli("explain", path, "--state", state, env=env or bucket.env, cwd=REPO)
        assert out.returncode == 2, out.stderr
        assert out.stdout == ""
        (line,) = out.stderr.strip().splitlines()
        assert CANARY_SECRET not in line
        return line

    source = bucket.url("in/")
    assert refused(bucket.url("out/a.txt")) == (
        f"asyncbatch: error: PATH {bucket.url('out/a.txt')!r} is not an object under the "
        f"source {source!r}"
    )
    assert refused("s3://another-bucket/in/a.txt").startswith(
        "asyncbatch: error: PATH 's3://another-bucket/in/a.txt' is not an object under"
    )
    assert "is the source's prefix itself" in refused(bucket.url("in"))
    assert refused("/etc/hostname").startswith(
        "asyncbatch: error: PATH '/etc/hostname' is not an object under the source"
    )

    with monkeypatch.context() as no_credentials:  # the bucket fixture set them here too
        no_keys = {k: v for k, v in bucket.env.items() if "_KEY" not in k}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            no_credentials.delenv(name)
        line = refused("a.txt", env=no_keys)
    assert line.startswith(f"asyncbatch: error: cannot look at the source {source!r}: ")
    assert "403 Forbidden" in line
    assert "credentials" in line

    bucket.client.delete_object(Bucket=bucket.name, Key="in/a.txt")
    bucket.client.delete_bucket(Bucket=bucket.name)
    assert refused("a.txt") == (
        f"asyncbatch: error: cannot look at the source {source!r}: list "
        f"{bucket.url('in/a.txt/')} failed: bucket {bucket.name!r} does not exist "
        "(404 Not Found, NoSuchBucket)"
    )


def test_an_unreachable_store_is_exit_69_for_explain_as_for_run_and_others_need_none(
    bucket: Bucket, state: Path, tmp_path: Path
) -> None:
    # The same unreachable endpoint: run and explain both exit 69 (the service is down, the
    # input may be right); status, history, retry and forget read or change the ledger only,
    # and answer as they do with the store up.
    bucket.put("in/a.txt", b"a")
    ran = cli(
        "run", "tests.cli_handlers:record", "--source", bucket.url("in/"), "--state", state,
        env={**bucket.env, "AB_LOG": str(tmp_path / "log")}, cwd=REPO,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    with socket.socket() as s:  # a port nothing listens on: connections refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = {**bucket.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}

    def with_store(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
        return cli(*args, "--state", state, env=env, cwd=REPO)

    again = with_store(
        down, "run", "tests.cli_handlers:record", "--source", bucket.url("in/"), "--no-progress"
    )
    assert again.returncode == 69, again.stderr
    for path in (bucket.url("in/a.txt"), "a.txt"):
        out = with_store(down, "explain", path)
        assert out.returncode == 69, out.stderr
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith(
            f"asyncbatch: error: cannot look at the source {bucket.url('in/')!r}"
        )
    for command in (("status",), ("history",), ("retry", "a.txt")):
        up, gone = with_store(bucket.env, *command), with_store(down, *command)
        assert (gone.returncode, gone.stdout) == (up.returncode, up.stdout), (up, gone)
    assert with_store(down, "forget", "a.txt", "--yes").returncode == 0
