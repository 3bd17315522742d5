"""``asyncbatch help [TOPIC]``: the documentation pages, as installed with the package.

The pages are the Markdown files of ``asyncbatch/docs/``: the repository's documentation lives
inside the package, so the wheel carries it and an error message can say "see 'asyncbatch help
troubleshooting'" to anyone who has asyncbatch, wherever it was installed from.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigurationError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["COMMANDS", "Page", "add_help_command", "find_page", "pages"]

EXIT_OK = 0


@dataclass(frozen=True)
class Page:
    """One page of the documentation: its topic (the file name, lower case, without ``.md``),
    its title (the first ``# `` heading) and where it is."""

    topic: str
    title: str
    source: Traversable

    def text(self) -> str:
        """The page's Markdown, as written."""
        return self.source.read_text(encoding="utf-8")


def _title(source: Traversable) -> str:
    with source.open("r", encoding="utf-8") as f:
        for line in f:
            if line.startswith("# "):
                return line[2:].strip()
    return ""


def pages() -> list[Page]:
    """Every page of ``asyncbatch/docs/``, by topic.

    Raises :class:`ConfigurationError` when the package was installed without its pages.
    """
    from importlib import resources  # only `help` reads the pages (4 ms at every start)

    docs = resources.files("asyncbatch").joinpath("docs")
    if not docs.is_dir():
        raise ConfigurationError("help: this installation of asyncbatch has no documentation")
    found = [
        Page(entry.name.removesuffix(".md").lower(), _title(entry), entry)
        for entry in docs.iterdir()
        if entry.name.endswith(".md") and entry.is_file()
    ]
    return sorted(found, key=lambda page: page.topic)


def find_page(topic: str) -> Page:
    """The page of ``topic`` (any case, ``.md`` or not).

    Raises :class:`ConfigurationError` naming the topic and listing the known ones.
    """
    known = pages()
    wanted = topic.removesuffix(".md").lower()
    for page in known:
        if page.topic == wanted:
            return page
    topics = ", ".join(page.topic for page in known)
    raise ConfigurationError(f"help: no topic {topic!r}; the topics: {topics}")


def _listing(known: list[Page]) -> str:
    width = max(len(page.topic) for page in known)
    lines = [f"  {page.topic:<{width}}  {page.title}" for page in known]
    return "\n".join(
        [
            "The documentation of asyncbatch: 'asyncbatch help TOPIC' prints a page.",
            "",
            *lines,
            "",
            "A command's options: 'asyncbatch COMMAND --help'.",
        ]
    )


async def help_command(args: argparse.Namespace) -> int:
    """``asyncbatch help [TOPIC]``: print the page of TOPIC, or list the topics."""
    if args.topic is None:
        print(_listing(pages()))
    else:
        sys.stdout.write(find_page(args.topic).text())
    return EXIT_OK


def add_help_command(sub: Any) -> None:
    """Add ``help`` to the CLI's subcommands."""
    p = sub.add_parser("help", help="print a page of the documentation, or list them")
    p.add_argument("topic", nargs="?", metavar="TOPIC", help="the page (default: list the topics)")


COMMANDS = {"help": help_command}
