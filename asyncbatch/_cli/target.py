"""Resolve a CLI ``TARGET`` (``module:function`` or ``path/to/file.py:function``) to a handler."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .._exceptions import HandlerImportError

__all__ = ["load_handler"]


def _import_file(path: Path, target: str) -> ModuleType:
    if not path.is_file():
        raise HandlerImportError(f"TARGET {target!r}: no such file {str(path)!r}")
    name = f"asyncbatch_target_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise HandlerImportError(f"TARGET {target!r}: cannot load {str(path)!r} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent.resolve()))
    spec.loader.exec_module(module)
    return module


def load_handler(target: str) -> Any:
    """Import ``TARGET`` and return the named attribute.

    ``module:function`` is imported with the current directory first on ``sys.path``;
    ``path/to/file.py:function`` is loaded from that file. Raises :class:`HandlerImportError`
    (one line, naming TARGET) when the module cannot be imported or lacks the function.
    """
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        raise HandlerImportError(
            f"TARGET {target!r}: expected 'module:function' or 'path/to/file.py:function'"
        )
    try:
        if module_part.endswith(".py") or os.sep in module_part:
            module = _import_file(Path(module_part), target)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_part)
    except HandlerImportError:
        raise
    except (Exception, SystemExit, KeyboardInterrupt) as e:
        # (SystemExit: a module that calls sys.exit() when imported, a script's ``main()`` at
        # its top level; KeyboardInterrupt raised by it: neither may end the run as if it
        # had ended, with its exit code and nothing said)
        what = type(e).__name__
        if isinstance(e, SystemExit):
            what += f" (sys.exit({e.code!r}) when imported)"
        elif str(e):
            what += f": {str(e).splitlines()[0]}"
        raise HandlerImportError(f"TARGET {target!r}: cannot import {module_part!r}: {what}") from e
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerImportError(
                f"TARGET {target!r}: module {module_part!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise HandlerImportError(f"TARGET {target!r}: {attr!r} is not callable")
    return obj
