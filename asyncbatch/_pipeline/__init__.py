"""The pipeline of one run: the path of a file from the scan to its committed outcome.

scanner → Claimer → ItemQueue → WorkerPool → Outbox → Committer → PostActions

runner.py       Run: the lifecycle around the pipeline (lock, heartbeat, stop, report)
state.py        RunState: what the parts share, and nothing more
claimer.py      scanned entries registered and leased in chunks
queues.py       the hand-offs between the tasks, and the leased item that travels them
workers.py      the worker pool: one attempt per item, the watchdog over them
committer.py    outcomes committed in groups
postactions.py  archive or delete inputs once their outcome committed
observation.py  RunObservation: what a run observed, a frozen snapshot (health and metrics)
recorder.py     what the pipeline records for metrics (histograms), when they are on
"""

from .observation import RunObservation
from .recorder import Recorder
from .runner import Handler, Mode, Run

__all__ = ["Handler", "Mode", "Recorder", "Run", "RunObservation"]
