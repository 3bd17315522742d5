"""The AWS shared files' profile (``~/.aws/credentials``, ``~/.aws/config``): read as the AWS
tools read them, after the environment, against moto on 127.0.0.1; a profile that cannot be
used is refused in one line that shows no secret."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from asyncbatch import Batch, ConfigurationError, TaskContext
from asyncbatch._sources.profile import aws_profile

from .conftest import cli
from .s3 import CANARY_SECRET, Bucket

CREDENTIALS = f"""\
[default]
aws_access_key_id = AKIADEFAULT
aws_secret_access_key = default-secret

[partner]
aws_access_key_id = AKIATESTCANARY
aws_secret_access_key = {CANARY_SECRET}
aws_session_token = a-token
"""


def files(tmp_path: Path, config: str, credentials: str = CREDENTIALS) -> dict[str, str]:
    (tmp_path / "credentials").write_text(credentials)
    (tmp_path / "config").write_text(config)
    return {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "config"),
    }


def test_the_named_profile_gives_credentials_region_and_endpoint(tmp_path: Path) -> None:
    env = files(tmp_path, "[profile partner]\nregion = eu-west-3\nendpoint_url = http://h:9\n")
    got = aws_profile({**env, "AWS_PROFILE": "partner"}, tmp_path)
    assert got == {
        "access_key_id": "AKIATESTCANARY",
        "secret_access_key": CANARY_SECRET,
        "session_token": "a-token",
        "region": "eu-west-3",
        "endpoint": "http://h:9",
    }
    assert aws_profile(env, tmp_path) == {
        "access_key_id": "AKIADEFAULT",
        "secret_access_key": "default-secret",
    }


def test_the_environment_comes_before_the_profile(tmp_path: Path) -> None:
    env = files(tmp_path, "[default]\nregion = eu-west-3\nendpoint_url = http://h:9\n")
    env |= {"AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_REGION": "us-east-2"}
    env["AWS_ENDPOINT_URL"] = "http://env:1"
    assert aws_profile(env, tmp_path) == {}


def test_no_files_and_no_profile_named_give_nothing(tmp_path: Path) -> None:
    assert aws_profile({}, tmp_path) == {}


@pytest.mark.parametrize(
    ("config", "env", "said"),
    [
        ("", {"AWS_PROFILE": "nope"}, "AWS profile 'nope' (AWS_PROFILE) is in neither"),
        (
            "[profile sso]\nsso_session = corp\n",
            {"AWS_PROFILE": "sso"},
            "AWS profile 'sso' gets its credentials through sso_session",
        ),
        ("[default\nregion = x\n", {}, "does not parse"),
    ],
)
def test_a_profile_that_cannot_be_used_is_refused_in_one_line(
    tmp_path: Path, config: str, env: dict[str, str], said: str
) -> None:
    env |= files(tmp_path, config)
    with pytest.raises(ConfigurationError, match=re.escape(said)) as caught:
        aws_profile(env, tmp_path)
    assert "\n" not in str(caught.value)
    assert CANARY_SECRET not in str(caught.value)


async def test_a_run_takes_its_credentials_and_endpoint_from_the_profile(
    bucket: Bucket, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket.put("in/a.txt", b"a")
    endpoint = bucket.env["AWS_ENDPOINT_URL"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name)
    config = f"[profile partner]\nregion = us-east-1\nendpoint_url = {endpoint}\n"
    for name, value in (files(tmp_path, config) | {"AWS_PROFILE": "partner"}).items():
        monkeypatch.setenv(name, value)
    read: list[bytes] = []

    async def handler(ctx: TaskContext) -> None:
        read.append(await ctx.read_bytes())

    report = await Batch(handler, source=bucket.url("in/"), state=state, settle=0).run()
    assert (report.done, read) == (1, [b"a"])


def test_the_cli_refuses_a_missing_profile_with_exit_2(
    bucket: Bucket, state: Path, tmp_path: Path
) -> None:
    env = {**bucket.env, "AWS_PROFILE": "nope", "HOME": str(tmp_path)}
    out = cli(
        "run", "tests.cli_handlers:record", "--source", bucket.url("in/"), "--state", str(state),
        env=env,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "asyncbatch: error: AWS profile 'nope' (AWS_PROFILE) is in neither "
        f"{tmp_path}/.aws/credentials nor {tmp_path}/.aws/config"
    ]


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "notaurl", "http://", " http://h:9"])
def test_an_endpoint_the_client_cannot_use_is_refused_with_exit_2(
    bucket: Bucket, state: Path, endpoint: str
) -> None:
    # obstore panics (a Rust backtrace, then "RustPanic: rust future panicked") at its first
    # request on such an endpoint: it is refused at the start, naming the variable
    env = {**bucket.env, "AWS_ENDPOINT_URL": endpoint, "RUST_BACKTRACE": "1"}
    out = cli(
        "run", "tests.cli_handlers:record", "--source", bucket.url("in/"), "--state", str(state),
        env=env,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"asyncbatch: error: AWS_ENDPOINT_URL has value {endpoint!r}: expected an http:// or "
        "https:// URL with a host (http://127.0.0.1:9000)"
    ]


def test_a_setting_the_client_refuses_is_exit_2_before_any_item(
    bucket: Bucket, state: Path, inbox: Path
) -> None:
    (inbox / "a.txt").write_bytes(b"a")
    env = {**bucket.env, "AWS_ALLOW_HTTP": "maybe"}
    for source, extra in ((bucket.url("in/"), ()), (str(inbox), ("--output-dir", bucket.url()))):
        out = cli(
            "run", "tests.cli_handlers:write_copy", "--source", source, "--state", str(state),
            "--max-attempts", "1", *extra, env=env,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines() == [
            "asyncbatch: error: the S3 client's settings (the AWS_* environment, the AWS "
            'profile) are refused: Generic Config error: failed to parse "maybe" as boolean '
            "(set by AWS_ALLOW_HTTP)"
        ]
        assert CANARY_SECRET not in out.stderr
    assert not bucket.keys()  # nothing written, and no item was made dead for it
