"""asyncbatch: reentrant batch jobs over the files of a directory.

Run it, kill it at any instant, run it again or run four copies at once: every settled file is
handled, its completion recorded exactly once, and its effects applied once when the handler
uses the idempotent tools on its context.
"""

# The package's only version number: the build (flit_core) reads it from here, and
# ``asyncbatch --version`` prints it.
__version__ = "0.1.0"

# When this process began importing asyncbatch: taken before the imports below (a quarter
# second), for the command line's runner (see asyncbatch/_started.py).
from . import _started  # noqa: F401

# isort: split
from ._batch import Batch as Batch
from ._context import TaskContext as TaskContext
from ._effects.files import atomic_write as atomic_write
from ._effects.files import idempotent_move as idempotent_move
from ._effects.files import remove_stale_temp_files as remove_stale_temp_files
from ._exceptions import AsyncBatchError as AsyncBatchError
from ._exceptions import AttemptInterrupted as AttemptInterrupted
from ._exceptions import CommandFailedError as CommandFailedError
from ._exceptions import ConfigurationError as ConfigurationError
from ._exceptions import DamagedLedgerError as DamagedLedgerError
from ._exceptions import EffectError as EffectError
from ._exceptions import HandlerImportError as HandlerImportError
from ._exceptions import IdempotencyKeyMismatchError as IdempotencyKeyMismatchError
from ._exceptions import InputChangedError as InputChangedError
from ._exceptions import JobLockedError as JobLockedError
from ._exceptions import LedgerError as LedgerError
from ._exceptions import LedgerValueError as LedgerValueError
from ._exceptions import LockLostError as LockLostError
from ._exceptions import NotALedgerError as NotALedgerError
from ._exceptions import PermanentError as PermanentError
from ._exceptions import SchemaVersionError as SchemaVersionError
from ._exceptions import SourceError as SourceError
from ._exceptions import SourceKeyError as SourceKeyError
from ._exec import ExecHandler as ExecHandler
from ._exec import StartedCommand as StartedCommand
from ._http.client import ItemHTTP as ItemHTTP
from ._http.middleware import IdempotencyMiddleware as IdempotencyMiddleware
from ._ledger.idempotency import IdempotencyStore as IdempotencyStore
from ._ready import Age as Age
from ._ready import DirMarker as DirMarker
from ._ready import Marker as Marker
from ._ready import MaxAge as MaxAge
from ._ready import MinSize as MinSize
from ._ready import ReadyRule as ReadyRule
from ._ready import Stable as Stable
from ._report import Report as Report
from ._report import Statistics as Statistics
from ._scanner import Entry as Entry
from ._service.health import Health as Health
from ._service.health import HealthCheck as HealthCheck
from ._sources.objects import ObjectEntry as ObjectEntry

__all__ = [
    "Age",
    "AsyncBatchError",
    "AttemptInterrupted",
    "Batch",
    "CommandFailedError",
    "ConfigurationError",
    "DamagedLedgerError",
    "DirMarker",
    "EffectError",
    "Entry",
    "ExecHandler",
    "HandlerImportError",
    "Health",
    "HealthCheck",
    "IdempotencyKeyMismatchError",
    "IdempotencyMiddleware",
    "IdempotencyStore",
    "InputChangedError",
    "ItemHTTP",
    "JobLockedError",
    "LedgerError",
    "LedgerValueError",
    "LockLostError",
    "Marker",
    "MaxAge",
    "MinSize",
    "NotALedgerError",
    "ObjectEntry",
    "PermanentError",
    "ReadyRule",
    "Report",
    "SchemaVersionError",
    "SourceError",
    "SourceKeyError",
    "Stable",
    "StartedCommand",
    "Statistics",
    "TaskContext",
    "__version__",
    "atomic_write",
    "idempotent_move",
    "remove_stale_temp_files",
]
