"""Settings once: each setting's name, type, default, bounds, help and flag live in its
BatchConfig field; Batch(...), the command line and the docs follow from it."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from asyncbatch import Batch, ConfigurationError, TaskContext
from asyncbatch._cli.main import build_parser
from asyncbatch._config import BatchConfig
from asyncbatch._settings import Setting

from .conftest import cli


async def nothing(ctx: TaskContext) -> None:
    """A handler."""


def test_every_setting_has_a_help_text_and_a_flag_the_parser_knows() -> None:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    run = sub.choices["run"]
    options = {o for action in run._actions for o in action.option_strings}
    for f in dataclasses.fields(BatchConfig):
        spec = f.metadata.get("setting")
        assert isinstance(spec, Setting), f"{f.name} has no Setting"
        assert spec.help, f"{f.name} has no help text"
        flags = spec.flag_names(f.name)
        assert flags, f"{f.name} has no command-line flag"
        assert set(flags) <= options, f"{f.name}: {flags} not in the run parser"
        assert f"``{f.name}`` [" in (Batch.__doc__ or ""), f"{f.name} missing from Batch's doc"


def test_an_unknown_setting_is_refused_with_the_nearest_name(inbox: Path, state: Path) -> None:
    with pytest.raises(
        ConfigurationError,
        match=re.escape("unknown setting 'concurency' (did you mean 'concurrency'?)"),
    ):
        Batch(nothing, source=inbox, state=state, concurency=4)
    with pytest.raises(ConfigurationError, match="setting 'source' is required"):
        Batch(nothing, state=state)


def test_only_the_flags_given_override_the_settings_defaults(inbox: Path, state: Path) -> None:
    # A flag not given is not passed: the batch's own default holds, not a second copy.
    parsed = build_parser().parse_args(
        ["run", "m:f", "--source", str(inbox), "--state", str(state), "-j", "3", "--no-wait"]
    )
    from asyncbatch._cli.settings import given_settings

    assert given_settings(parsed) == {
        "source": str(inbox),
        "state": str(state),
        "concurrency": 3,
        "wait": False,
    }
    config = Batch(nothing, **given_settings(parsed)).config
    defaults = BatchConfig.from_settings(source=inbox, state=str(state))
    assert dataclasses.replace(defaults, concurrency=3, wait=False) == config


def test_a_bad_flag_value_is_one_line_naming_the_value(inbox: Path, state: Path) -> None:
    result = cli("run", "m:f", "--source", inbox, "--state", state, "-j", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "asyncbatch run: error: argument -j/--concurrency: invalid value '0': expected an "
        "integer from 1 to 10,000"
    ]
