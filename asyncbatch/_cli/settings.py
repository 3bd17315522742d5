"""``asyncbatch run``'s options for the batch's settings, derived from ``BatchConfig``.

Each setting's flag, parser, help text and default come from its field (see
:mod:`asyncbatch._settings`): nothing here restates one. Options default to
``argparse.SUPPRESS``, so only the flags given reach ``Batch(...)``, whose defaults are the
settings' own.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from .._config import BatchConfig
from .._settings import Setting

__all__ = ["add_settings", "given_settings"]


def add_settings(parser: argparse.ArgumentParser) -> None:
    """Add an option for every setting that has a flag."""
    for f in fields(BatchConfig):
        spec: Setting = f.metadata["setting"]
        flags = spec.flag_names(f.name)
        if not flags:
            continue
        required = f.default is MISSING and f.default_factory is MISSING
        default = "" if required else _shown_default(f.default, f.default_factory)
        parser.add_argument(
            *flags,
            dest=f.name,
            default=argparse.SUPPRESS,
            required=required,
            help=f"{spec.help}{default}",
            **spec.kind.option(),
        )


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (by their field names)."""
    return {f.name: getattr(args, f.name) for f in fields(BatchConfig) if hasattr(args, f.name)}


def _shown_default(default: Any, factory: Any) -> str:
    value = factory() if default is MISSING else default
    if value is None or value == () or isinstance(value, bool):
        return ""
    if isinstance(value, frozenset):
        value = " ".join(sorted(value))
    return f" (default: {value})"
