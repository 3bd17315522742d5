"""The public API is exactly what ``asyncbatch.__all__`` lists (httpx's test, adapted)."""

from __future__ import annotations

import inspect

import asyncbatch


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(asyncbatch).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert set(asyncbatch.__all__) == public | {"__version__"}
    assert asyncbatch.__all__ == sorted(asyncbatch.__all__)


def test_every_public_name_has_a_docstring() -> None:
    for name in asyncbatch.__all__:
        value = getattr(asyncbatch, name)
        if name == "__version__":
            continue
        assert inspect.getdoc(value), f"asyncbatch.{name} has no docstring"
        if inspect.isclass(value):
            for attr, member in vars(value).items():
                if attr.startswith("_") or not callable(member):
                    continue
                assert inspect.getdoc(member), f"asyncbatch.{name}.{attr} has no docstring"
