"""Readiness rules: when a file the scan lists may be handled, as values, and how each is told.

A job's rules all must hold (see ``asyncbatch help concepts``, "Readiness"):

- :class:`Age` (``age``, the default): mtime and ctime at least ``settle`` seconds old;
- :class:`Stable` (``stable:N``): size, mtime, ctime and inode unchanged across N looks at
  least ``settle`` seconds apart;
- :class:`Marker` (``marker:SUFFIX``): ``NAME+SUFFIX`` exists, and the file was not modified
  after it (mtimes);
- :class:`DirMarker` (``dir-marker:NAME``): the file's directory, or one above it, holds
  ``NAME``, and the file was not modified after it;
- :class:`MinSize` (``min-size:BYTES``) and :class:`MaxAge` (``max-age:DURATION``, the mtime;
  older files are left alone and counted).

The rules are values: ``Batch(..., ready=[Age(), Marker(".done")])`` or the command line's
strings (``ready=["age", "marker:.done"]``); a bad one is a :class:`ConfigurationError` of one
line naming it. :class:`Readiness` is a job's rules compiled for the scan; :class:`ReadyWalk`
what one walk of the source learns of them (markers, and the verdicts that need them);
:func:`explain_rules` says, rule by rule, whether each holds for one file.

Markers are never inputs: a name a marker rule gives (``*.done``, ``_SUCCESS``) is not an
item, and follows its file's post-commit action.

The package: :mod:`.rules` (the values, their strings, their parsing), :mod:`.readiness` (a
job's rules compiled, and single markers looked at), :mod:`.walk` (what one walk of the source
learns of them), :mod:`.explain` (rule by rule, for one file).
"""

from __future__ import annotations

from .explain import MarkerAt as MarkerAt
from .explain import RuleVerdict as RuleVerdict
from .explain import explain_rules as explain_rules
from .explain import marker_paths as marker_paths
from .readiness import NS_NONE as NS_NONE
from .readiness import Readiness as Readiness
from .readiness import ancestors as ancestors
from .readiness import change_ns as change_ns
from .rules import KINDS as KINDS
from .rules import Age as Age
from .rules import BadRule as BadRule
from .rules import DirMarker as DirMarker
from .rules import Marker as Marker
from .rules import MaxAge as MaxAge
from .rules import MinSize as MinSize
from .rules import ReadyRule as ReadyRule
from .rules import Stable as Stable
from .rules import parse_duration as parse_duration
from .rules import parse_rule as parse_rule
from .rules import parse_size as parse_size
from .rules import ready_rules as ready_rules
from .rules import rule_argument as rule_argument
from .rules import show_duration as show_duration
from .walk import LASTING as LASTING
from .walk import ReadyWalk as ReadyWalk

__all__ = [
    "KINDS",
    "LASTING",
    "NS_NONE",
    "Age",
    "BadRule",
    "DirMarker",
    "Marker",
    "MarkerAt",
    "MaxAge",
    "MinSize",
    "Readiness",
    "ReadyRule",
    "ReadyWalk",
    "RuleVerdict",
    "Stable",
    "ancestors",
    "change_ns",
    "explain_rules",
    "marker_paths",
    "parse_duration",
    "parse_rule",
    "parse_size",
    "ready_rules",
    "rule_argument",
    "show_duration",
]
