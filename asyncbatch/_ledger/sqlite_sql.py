"""Every SQL statement of the SQLite ledger, named, in one place (see :mod:`.sqlite`).

Conventions: times are Unix seconds (REAL) from the runner's wall clock; every statement that
writes runs inside ``BEGIN IMMEDIATE``; every item write is conditioned on ``owner`` and
``fence`` so a runner whose lease was taken over cannot change the item any more. Statements
with more than a few parameters name them (``:name``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from .idempotency import IdempotencyRecord
from .types import (
    IN_FLIGHT,
    JOBLOG_COUNTS,
    LEASE_FIELDS,
    SAVED_CATEGORIES,
    TOTALS,
    ClaimedRow,
    ItemFilter,
    ItemInfo,
    Listing,
    LockInfo,
    RunInfo,
    RunnerInfo,
    totals_since,
)

#: ``PRAGMA application_id`` of an asyncbatch ledger ("ABCH").
APPLICATION_ID: Final = 0x41424348
#: The schema version this code writes (``PRAGMA user_version``).
SCHEMA_VERSION: Final = 11

# Forward migrations: MIGRATIONS[v] takes a ledger from version v to v + 1.
MIGRATIONS: Final[dict[int, str]] = {
    0: """
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE jobs (
    job        TEXT PRIMARY KEY,
    identity   TEXT NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;

CREATE TABLE items (
    job             TEXT    NOT NULL,
    key             TEXT    NOT NULL,
    relpath         BLOB    NOT NULL,
    size            INTEGER NOT NULL,
    mtime_ns        INTEGER NOT NULL,
    inode           INTEGER NOT NULL DEFAULT 0,
    state           TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    owner           TEXT,
    fence           INTEGER NOT NULL DEFAULT 0,
    started_fence   INTEGER,
    lease_until     REAL,
    next_attempt_at REAL,
    last_error      TEXT,
    post_action     TEXT,
    created_at      REAL    NOT NULL,
    updated_at      REAL    NOT NULL,
    done_at         REAL,
    PRIMARY KEY (job, key)
) WITHOUT ROWID;

-- Only items waiting for a (re)try are indexed: new items are inserted already leased and
-- go straight to done, so the index costs nothing on the fast path.
CREATE INDEX items_waiting ON items (job, state, next_attempt_at)
    WHERE state IN ('pending', 'failed');

CREATE TABLE task_lock (
    job_id      TEXT PRIMARY KEY,
    owner       TEXT    NOT NULL,
    pid         INTEGER,
    host        TEXT,
    pid_start   TEXT,
    acquired_at REAL    NOT NULL,
    expires_at  REAL    NOT NULL
);

CREATE TABLE runners (
    owner        TEXT PRIMARY KEY,
    job          TEXT    NOT NULL,
    pid          INTEGER,
    host         TEXT,
    pid_start    TEXT,
    shared       INTEGER NOT NULL,
    started_at   REAL    NOT NULL,
    heartbeat_at REAL    NOT NULL,
    expires_at   REAL    NOT NULL
);

CREATE TABLE runs (
    id          INTEGER PRIMARY KEY,
    job         TEXT    NOT NULL,
    owner       TEXT    NOT NULL,
    pid         INTEGER,
    host        TEXT,
    mode        TEXT    NOT NULL,
    started_at  REAL    NOT NULL,
    finished_at REAL,
    seen        INTEGER NOT NULL DEFAULT 0,
    done        INTEGER NOT NULL DEFAULT 0,
    failed      INTEGER NOT NULL DEFAULT 0,
    dead        INTEGER NOT NULL DEFAULT 0,
    vanished    INTEGER NOT NULL DEFAULT 0,
    exit_status TEXT
);
CREATE INDEX runs_job ON runs (job, started_at);

CREATE TABLE idempotency_keys (
    scope        TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    fingerprint  TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    status       INTEGER,
    headers      TEXT,
    body         BLOB,
    created_at   REAL    NOT NULL,
    locked_until REAL    NOT NULL,
    expires_at   REAL    NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_expiry ON idempotency_keys (expires_at);
""",
    # Attempts cut short by the runner's death or stop, counted apart from handler failures;
    # the items whose input ctx.move() is taking somewhere (their post_action is 'moved...'),
    # so a run can clean up after a move that a kill interrupted; every category of a run's
    # report in its history row.
    1: """
ALTER TABLE items ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0;
CREATE INDEX items_moving ON items (job) WHERE substr(post_action, 1, 5) = 'moved';
"""
    + "".join(
        f"ALTER TABLE runs ADD COLUMN {name} INTEGER NOT NULL DEFAULT 0;\n"
        for name in totals_since(1)
    ),
    # The joblog: when the latest attempt started, when its outcome committed, and which
    # runner made it (its pid and host are in its history row: runs_owner). Rows finished
    # before have their outcome's time and runner (their start is not known).
    2: """
ALTER TABLE items ADD COLUMN started_at REAL;
ALTER TABLE items ADD COLUMN finished_at REAL;
ALTER TABLE items ADD COLUMN runner TEXT;
UPDATE items SET finished_at = coalesce(done_at, updated_at), runner = owner
    WHERE state IN ('done', 'failed', 'dead', 'vanished');
CREATE INDEX runs_owner ON runs (owner);
""",
    # The job's settings: the source it scans and its scan rules (a JSON object, see
    # JobSettings), recorded by its first run (a job of an older ledger: by its next run);
    # the scan rules a run changed, in its history row.
    3: """
ALTER TABLE jobs ADD COLUMN settings TEXT;
ALTER TABLE runs ADD COLUMN settings_changed TEXT;
""",
    # The items forgot (``asyncbatch forget``), for watches under way: they look at those
    # files again (see FORGOTTEN_SINCE); what a run left in the source (files not settled yet,
    # not registered yet), in its history row.
    4: """
CREATE TABLE forgotten (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    job     TEXT NOT NULL,
    relpath BLOB NOT NULL,
    at      REAL NOT NULL
);
CREATE INDEX forgotten_job ON forgotten (job, seq);
"""
    + "".join(
        f"ALTER TABLE runs ADD COLUMN {name} INTEGER NOT NULL DEFAULT 0;\n"
        for name in totals_since(4)
    ),
    # The listing role of runners sharing a job, and its listings (see Listing).
    5: """
CREATE TABLE listers (
    job          TEXT PRIMARY KEY,
    owner        TEXT,
    fence        INTEGER NOT NULL DEFAULT 0,
    lease_until  REAL,
    since        REAL,
    generation   INTEGER NOT NULL DEFAULT 0,
    complete     INTEGER NOT NULL DEFAULT 0,
    started_at   REAL,
    listed_at    REAL,
    listed_files INTEGER NOT NULL DEFAULT 0,
    found_done   INTEGER NOT NULL DEFAULT 0,
    found_dead   INTEGER NOT NULL DEFAULT 0,
    registered   INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
""",
    # The files a run left not ready yet by each readiness rule but age (unsettled): stable,
    # marker, dir-marker, min-size, max-age (see RunTotals), in its history row.
    6: "".join(
        f"ALTER TABLE runs ADD COLUMN {name} INTEGER NOT NULL DEFAULT 0;\n"
        for name in totals_since(6)
    ),
    # Waiting items in claim order (CLAIM_WAITING): a claim reads the first few, instead of
    # sorting every waiting item of the job (runners sharing a job claim all its files so).
    7: """
CREATE INDEX items_claim ON items (job, mtime_ns, relpath)
    WHERE state IN ('pending', 'failed');
""",
    # Listed files queued for the runners sharing a job, a batch a row, in order (see
    # QUEUED_*): a runner registers a batch's files leased to it when it takes them, so a
    # shared item is written as often as an unshared one.
    8: """
CREATE TABLE queued (
    seq   INTEGER PRIMARY KEY,
    job   TEXT    NOT NULL,
    files INTEGER NOT NULL,
    rows  BLOB    NOT NULL
);
CREATE INDEX queued_job ON queued (job, seq);
""",
    # The log of names to look at again pruned by its entries' time through an index (it read
    # the whole log at every entry); the files of a listing with the bytes of another it
    # queued (identity "content": one item), by key, for the shared runs' reports.
    9: "CREATE INDEX forgotten_at ON forgotten (at);\nALTER TABLE listers ADD COLUMN twins TEXT;\n",
    # The files the last complete listing left out as not ready yet, by count (see
    # Listing.not_ready): a runner that goes by another's listing reports them too.
    10: "ALTER TABLE listers ADD COLUMN not_ready TEXT;\n",
}

#: The tables of a ledger of this schema version and their columns, in order (a ledger whose
#: tables differ is refused before anything is written: see sqlite.py). A migration that
#: changes them changes this too (tests/test_ledger.py checks it against MIGRATIONS).
TABLES: Final[dict[str, tuple[str, ...]]] = {
    "forgotten": ("seq", "job", "relpath", "at"),
    "idempotency_keys": (
        *("scope", "key", "fingerprint", "state", "status", "headers", "body"),
        *("created_at", "locked_until", "expires_at"),
    ),
    "items": (
        *("job", "key", "relpath", "size", "mtime_ns", "inode", "state", "attempts", "owner"),
        *("fence", "started_fence", "lease_until", "next_attempt_at", "last_error"),
        *("post_action", "created_at", "updated_at", "done_at", "interrupted", "started_at"),
        *("finished_at", "runner"),
    ),
    "jobs": ("job", "identity", "created_at", "settings"),
    "listers": (
        *("job", "owner", "fence", "lease_until", "since", "generation", "complete"),
        *("started_at", "listed_at", "listed_files", "found_done", "found_dead", "registered"),
        *("twins", "not_ready"),
    ),
    "meta": ("name", "value"),
    "queued": ("seq", "job", "files", "rows"),
    "runners": (
        *("owner", "job", "pid", "host", "pid_start", "shared", "started_at", "heartbeat_at"),
        "expires_at",
    ),
    "runs": (
        *("id", "job", "owner", "pid", "host", "mode", "started_at", "finished_at", "seen"),
        *("done", "failed", "dead", "vanished", "exit_status", "done_before", "held"),
        *("waiting", "dead_before", "unfinished", "lost", "earlier", "settings_changed"),
        *("unsettled", "unregistered", "unstable", "unmarked", "dir_unmarked", "too_small"),
        "too_old",
    ),
    "task_lock": ("job_id", "owner", "pid", "host", "pid_start", "acquired_at", "expires_at"),
}

#: Who uses the ledger: its runners and lock holders (pid, host, pid_start, expires_at), in
#: columns every schema version has had; read before an upgrade (see base.live_user).
LEDGER_USERS = """
SELECT pid, host, pid_start, expires_at FROM runners
UNION ALL SELECT pid, host, pid_start, expires_at FROM task_lock
"""

# -- opening -------------------------------------------------------------------------------------

SCHEMA_OBJECTS = "SELECT count(*) FROM sqlite_schema"
#: (schema objects, application_id, user_version), read in one snapshot.
SCHEMA_HEADER = f"""
SELECT ({SCHEMA_OBJECTS}), (SELECT application_id FROM pragma_application_id),
       (SELECT user_version FROM pragma_user_version)
"""
#: (table, column) of every table but SQLite's own, its columns in order.
TABLE_COLUMNS = r"""
SELECT m.name, p.name FROM sqlite_schema AS m, pragma_table_info(m.name) AS p
WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\_%' ESCAPE '\' ORDER BY m.name, p.cid
"""
GET_META = "SELECT value FROM meta WHERE name = ?"
PUT_META = "INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)"

GET_JOB = "SELECT identity FROM jobs WHERE job = ?"
#: A job's identity mode and settings (JSON; NULL: not recorded yet).
GET_JOB_RECORD = "SELECT identity, settings FROM jobs WHERE job = ?"
GET_JOB_SETTINGS = "SELECT settings FROM jobs WHERE job = ?"
ADD_JOB = """
INSERT OR IGNORE INTO jobs (job, identity, created_at, settings) VALUES (?, ?, ?, ?)
"""
SET_JOB_SETTINGS = "UPDATE jobs SET settings = ? WHERE job = ?"
LIST_JOBS = "SELECT job FROM jobs ORDER BY job"

# -- the job lock --------------------------------------------------------------------------------

LOCK_INSERT = """
INSERT OR IGNORE INTO task_lock (job_id, owner, pid, host, pid_start, acquired_at, expires_at)
VALUES (:job, :owner, :pid, :host, :pid_start, :now, :expires_at)
"""
#: A job's lock (LockInfo).
LOCK_GET = f"SELECT {', '.join(LockInfo.columns())} FROM task_lock WHERE job_id = ?"
LOCK_LIST = f"SELECT {', '.join(LockInfo.columns())} FROM task_lock ORDER BY job_id"
LOCK_TAKE_OVER = """
UPDATE task_lock SET owner = :owner, pid = :pid, host = :host, pid_start = :pid_start,
                     acquired_at = :now, expires_at = :expires_at
WHERE job_id = :job AND owner = :stale_owner
"""
LOCK_EXTEND = "UPDATE task_lock SET expires_at = ? WHERE job_id = ? AND owner = ?"
LOCK_RELEASE = "DELETE FROM task_lock WHERE job_id = ? AND owner = ?"

# -- runners (liveness of item owners) -----------------------------------------------------------

RUNNER_ADD = """
INSERT INTO runners (owner, job, pid, host, pid_start, shared, started_at, heartbeat_at, expires_at)
VALUES (:owner, :job, :pid, :host, :pid_start, :shared, :now, :now, :expires_at)
"""
RUNNER_EXTEND = "UPDATE runners SET heartbeat_at = ?, expires_at = ? WHERE owner = ?"
RUNNER_REMOVE = "DELETE FROM runners WHERE owner = ?"
#: A job's runners (RunnerInfo).
RUNNERS_OF_JOB = f"SELECT {', '.join(RunnerInfo.columns())} FROM runners WHERE job = ?"
# A lease given back (released, or reaped from a runner that is gone) whose attempt had
# started: interrupted, counted now (a claim of a lease that ran out counts it then, see
# _INTERRUPTED), and the start forgotten so that the next claim does not count it again.
#: The state a released item waits in again: ``failed`` for a retry (its retry time is set only
#: by a failed outcome, and cleared by any other outcome and by ``retry``), else ``pending``.
_WAITING_AGAIN = "CASE WHEN next_attempt_at IS NULL THEN 'pending' ELSE 'failed' END"
_COUNT_INTERRUPTED = "interrupted = interrupted + (started_fence IS fence), started_fence = NULL"
# Hand the items of a runner that is gone back to the ledger (a full scan: runs after a crash).
REAP_ITEMS = f"""
UPDATE items SET state = 'pending', owner = NULL, lease_until = NULL, updated_at = ?,
                 {_COUNT_INTERRUPTED}
WHERE job = ? AND owner = ? AND state = 'running'
"""
#: The owners of a job's leases (? job) that have no runner record: gone (a live runner has
#: its record from before its first lease to after its last). Through items_waiting.
ORPHANED_OWNERS = """
SELECT DISTINCT owner FROM items
WHERE job = ? AND state = 'running' AND owner NOT IN (SELECT owner FROM runners)
"""

# -- the listing role ----------------------------------------------------------------------------

LISTING_GET = f"SELECT {', '.join(Listing.columns())} FROM listers WHERE job = ?"
LISTING_ADD = """
INSERT INTO listers (job, owner, fence, lease_until, since) VALUES (:job, :owner, 1, :until, :now)
"""
LISTING_RENEW = "UPDATE listers SET lease_until = :until WHERE job = :job AND owner = :owner"
LISTING_TAKE = """
UPDATE listers SET owner = :owner, fence = fence + 1, lease_until = :until, since = :now
WHERE job = :job
"""
#: Whether a runner (the role's holder) still has a live runner record.
RUNNER_LIVE = "SELECT 1 FROM runners WHERE owner = ? AND expires_at >= ?"
_HOLDER = "job = :job AND owner = :owner AND fence = :fence"
LISTING_HELD = f"SELECT 1 FROM listers WHERE {_HOLDER}"
LISTING_BEGIN = f"""
UPDATE listers SET generation = generation + 1, started_at = :started, found_done = 0,
                   found_dead = 0
WHERE {_HOLDER}
"""
LISTING_FOUND = f"""
UPDATE listers SET registered = registered + :new, found_done = found_done + :done,
                   found_dead = found_dead + :dead
WHERE {_HOLDER}
"""
LISTING_END = f"""
UPDATE listers SET complete = generation, listed_at = :now, listed_files = :files,
                   found_done = found_done + :done, found_dead = found_dead + :dead,
                   twins = :twins, not_ready = :not_ready
WHERE {_HOLDER}
"""
#: The found files and those left out not ready yet of the complete listing numbered ?2 (no
#: row when it is not the last complete one), and their update (Ledger.listing_changed).
LISTING_COUNTS = "SELECT listed_files, not_ready FROM listers WHERE job = ? AND complete = ?"
LISTING_CHANGED = (
    "UPDATE listers SET listed_files = ?, not_ready = ? WHERE job = ? AND complete = ?"
)
#: The files of the complete listing numbered ?2 (no row when it is not the last complete
#: one) not queued for having the bytes of one it queued (identity "content"): a
#: JSON object, the number of such files by key; NULL: none.
LISTING_TWINS = "SELECT twins FROM listers WHERE job = ? AND complete = ?"
LISTING_EXTEND = f"UPDATE listers SET lease_until = :until WHERE {_HOLDER}"
LISTING_RELEASE = "UPDATE listers SET lease_until = NULL WHERE job = ? AND owner = ?"
# Statements of many rows (a claim, a registration) take the rows' values as plain ``?``
# parameters, numbered after the shared ones (``?1``...), which a first CTE names first:
# SQLite looks each numbered parameter up in a list of them when it compiles a statement (a
# walk: quadratic in the parameters, 10 ms for a claim of 512 rows, 0.7 s for 5,000), a
# plain ``?`` not (1.7 ms and 40 ms). Each runner compiles each size of claim it makes once.
_ROWS = "(?, ?, ?, ?, ?)"
#: Listed files as waiting items: ?1 job, ?2 now, then per row key, relpath, size, mtime_ns,
#: inode.
_REGISTER_HEAD = """
WITH shared AS (SELECT ?1, ?2),
listed (key, relpath, size, mtime_ns, inode) AS (VALUES """
_REGISTER_INSERT = """)
INSERT INTO items (job, key, relpath, size, mtime_ns, inode, state, attempts, fence,
                   created_at, updated_at)
SELECT ?1, key, relpath, size, mtime_ns, inode, 'pending', 0, 0, ?2, ?2 FROM listed WHERE true"""
#: A vanished item whose file is listed again (the same key: it was being written when its
#: turn came; identity "content": another file with its bytes) waits again, as the file
#: listed (its name and stat), its vanishing not taken for an interrupted attempt at its next
#: lease (``started_fence`` cleared); any other item the ledger holds is left as it is.
_REGISTER_TAIL = """
ON CONFLICT (job, key) DO UPDATE SET state = 'pending', owner = NULL, lease_until = NULL,
    updated_at = ?2, started_fence = NULL, relpath = excluded.relpath, size = excluded.size,
    mtime_ns = excluded.mtime_ns, inode = excluded.inode
WHERE items.state = 'vanished'"""


def register_listed(rows: int) -> str:
    """Register ``rows`` listed files as pending items, in one statement (see above)."""
    return _REGISTER_HEAD + ",".join([_ROWS] * rows) + _REGISTER_INSERT + _REGISTER_TAIL


#: The items the ledger holds of a chunk's keys (?2, a JSON array), with their state (?1 job).
KNOWN_STATES = """
SELECT key, state FROM items WHERE job = ?1 AND key IN (SELECT value FROM json_each(?2))
"""
#: The job's (?1) items with a key from ?2 to ?3, with their state, ?4 at most (see
#: types.known_range_limit).
KNOWN_STATES_RANGE = """
SELECT key, state FROM items WHERE job = ?1 AND key BETWEEN ?2 AND ?3 ORDER BY key LIMIT ?4
"""
#: A vanished item whose file is listed again waits again (as REGISTER_TAIL does it).
REVIVE_VANISHED = """
UPDATE items SET state = 'pending', owner = NULL, lease_until = NULL, updated_at = :now,
                 started_fence = NULL, relpath = :relpath, size = :size, mtime_ns = :mtime_ns,
                 inode = :inode
WHERE job = :job AND key = :key AND state = 'vanished'
"""
#: A batch of queued files (see types.pack_queued): job, files, rows.
QUEUED_ADD = "INSERT INTO queued (job, files, rows) VALUES (?, ?, ?)"
QUEUED_FIRST = "SELECT seq, files, rows FROM queued WHERE job = ? ORDER BY seq LIMIT 1"
QUEUED_DROP = "DELETE FROM queued WHERE seq = ?"
QUEUED_KEEP = "UPDATE queued SET files = ?, rows = ? WHERE seq = ?"
QUEUED_CLEAR = "DELETE FROM queued WHERE job = ?"
QUEUED_FILES = "SELECT coalesce(sum(files), 0) FROM queued WHERE job = ?"
#: Of a chunk's keys (?2, a JSON array), how many the ledger holds done and dead (?1 job).
FOUND_FINISHED = """
SELECT coalesce(sum(state = 'done'), 0), coalesce(sum(state = 'dead'), 0) FROM items
WHERE job = ?1 AND key IN (SELECT value FROM json_each(?2)) AND state IN ('done', 'dead')
"""
#: The job's (?1) items by state, and of each state how many runners other than ?2 finished
#: at or after ?3 (what a shared runner's report counts as finished before: done and dead).
FINISH_COUNTS = """
SELECT state, count(*), coalesce(sum(runner IS NOT ?2 AND finished_at >= ?3), 0) FROM items
WHERE job = ?1 GROUP BY state
"""
#: Whether the job (?1) has files queued, an item pending or failed, or one running among its
#: ?2 newest items by key (see Ledger.work_left).
WORK_LEFT = """
SELECT EXISTS (SELECT 1 FROM queued WHERE job = ?1)
    OR EXISTS (SELECT 1 FROM items INDEXED BY items_waiting
               WHERE job = ?1 AND state IN ('pending', 'failed'))
    OR EXISTS (SELECT 1 FROM (SELECT state FROM items WHERE job = ?1 ORDER BY key DESC LIMIT ?2)
               WHERE state = 'running')
"""

# -- claims --------------------------------------------------------------------------------------

_CLAIMABLE = """(
       items.state IN ('pending', 'vanished')
    OR (items.state = 'failed' AND items.next_attempt_at <= ?4)
    OR (items.state = 'running' AND items.lease_until < ?4))"""

_CLAIM_HEAD = """
WITH shared AS (SELECT ?1, ?2, ?3, ?4),
scanned (key, relpath, size, mtime_ns, inode) AS (VALUES """
_CLAIM_INSERT = """)
INSERT INTO items (job, key, relpath, size, mtime_ns, inode, state, attempts, owner, fence,
                   lease_until, created_at, updated_at)
SELECT ?1, key, relpath, size, mtime_ns, inode, 'running', 0, ?2, 1, ?3, ?4, ?4
FROM scanned WHERE true"""
# When a lease is replaced whose attempt started and never reached an outcome (the item is
# still 'running': its lease ran out), the runner died, lost its lease or stalled during that
# attempt: it is counted in ``interrupted`` as well as ``attempts``. (One put back, released or
# reaped, was counted then; 'pending' here: a row an earlier version put back.)
_INTERRUPTED = "(state IN ('running', 'pending') AND started_fence IS fence)"
# A lease bumps the fence; an attempt is counted when it starts (see MARK_STARTED), so items
# leased but never started (a runner killed with a queue full of them) lose nothing.
_CLAIM_TAIL = f"""
ON CONFLICT (job, key) DO UPDATE SET
    state = 'running', owner = ?2, fence = items.fence + 1, lease_until = ?3,
    relpath = excluded.relpath, size = excluded.size, mtime_ns = excluded.mtime_ns,
    inode = excluded.inode, updated_at = ?4,
    interrupted = items.interrupted
        + (items.state IN ('running', 'pending') AND items.started_fence IS items.fence)
WHERE {_CLAIMABLE}
"""


def claim_scanned(rows: int) -> str:
    """Register ``rows`` scanned entries and lease the claimable ones, in one statement.

    Shared parameters: ``?1`` job, ``?2`` owner, ``?3`` lease_until, ``?4`` now; then per row
    ``key, relpath, size, mtime_ns, inode``. New entries are inserted already leased to us;
    pending, vanished, due failed and expired entries are leased; finished ones cost one index
    probe. No RETURNING: a statement that returns a row per item hands the GIL back and forth
    once per row; :data:`CLAIMED_IN_CHUNK` reads the result back as one JSON value instead.
    """
    return _CLAIM_HEAD + ",".join([_ROWS] * rows) + _CLAIM_INSERT + _CLAIM_TAIL


def _claimed_json(fields: Sequence[str], **expressions: str) -> str:
    """A ``json_array`` of these :class:`ClaimedRow` fields, in its order: each field's column,
    or the SQL expression given for it."""
    return f"json_array({', '.join(expressions.get(name, name) for name in fields)})"


# What the claim above did to a chunk, as one JSON array of ClaimedRows, each an array of its
# fields in order (LEASE_FIELDS: key, state, fence, attempts, interrupted, post_action): every
# row of the chunk but the plainly done ones. 'running': leased to this owner (by this claim,
# or before it); 'held': leased to another runner; 'failed': a retry not due yet; 'dead'; and
# done rows whose post-commit action may still be due. Dead and done rows have every field,
# the file that was handled too (relpath in hex), which the post-commit action must still
# find (a newer file under the name is left alone). ?1 job, ?2 JSON array of the chunk's keys,
# ?3 owner.
_HELD_OR_FAILED = "CASE WHEN state = 'failed' THEN 'failed' ELSE 'held' END"
CLAIMED_IN_CHUNK = f"""
SELECT json_group_array(CASE
    WHEN state = 'running' AND owner = ?3
        THEN {_claimed_json(LEASE_FIELDS)}
    WHEN state IN ('running', 'failed', 'pending', 'vanished')
        THEN {_claimed_json(LEASE_FIELDS, state=_HELD_OR_FAILED)}
    ELSE {_claimed_json(ClaimedRow.columns(), relpath="hex(relpath)")} END)
FROM items
WHERE job = ?1 AND key IN (SELECT value FROM json_each(?2))
  AND (state <> 'done' OR post_action IS NOT NULL)
"""

# Lease items waiting in the ledger (not found by this scan): retries, reaped, operator-retried,
# and what the listing of runners sharing a job registered. "INDEXED BY items_claim" keeps
# these on a small partial index in claim order: the first ?5 are read, not every waiting item
# sorted (O(waiting) a claim: 100,000 registered files cost seconds), and without statistics
# the planner would walk every item of the job instead. ?6: a JSON array of keys left alone
# (files the run found not settled yet).
CLAIM_WAITING = f"""
UPDATE items SET state = 'running', owner = ?2, fence = fence + 1,
                 lease_until = ?3, updated_at = ?4, interrupted = interrupted + {_INTERRUPTED}
WHERE job = ?1 AND key IN (
    SELECT key FROM items INDEXED BY items_claim
    WHERE job = ?1 AND state IN ('pending', 'failed')
      AND (state = 'pending' OR next_attempt_at <= ?4)
      AND key NOT IN (SELECT value FROM json_each(?6)){{after}}
    ORDER BY mtime_ns, relpath LIMIT ?5)
RETURNING {", ".join(ClaimedRow.columns())}
"""
#: The same, of the items after a place in claim order only, ?7 its mtime_ns, ?8 its relpath:
#: a claim that goes on from where the last one ended, past the items left waiting before it.
CLAIM_WAITING_AFTER = CLAIM_WAITING.replace("{after}", "\n      AND (mtime_ns, relpath) > (?7, ?8)")
CLAIM_WAITING = CLAIM_WAITING.replace("{after}", "")
NEXT_RETRY_AT = """
SELECT min(next_attempt_at) FROM items INDEXED BY items_waiting
WHERE job = ? AND state IN ('pending', 'failed') AND state = 'failed'
"""

# -- outcomes ------------------------------------------------------------------------------------

# Groups of items in one statement (one sqlite3_step, not one per row): ?3 is a JSON array of
# keys (it drives the primary-key lookups), ?4 a JSON array of "key fence" pairs (the fences).
_FENCED_GROUP = """
WHERE job = ?1 AND owner = ?2 AND state = 'running'
  AND key IN (SELECT value FROM json_each(?3))
  AND (key || ' ' || fence) IN (SELECT value FROM json_each(?4))"""
# Count the attempt of this lease, unless it was counted when it started.
_COUNT_ATTEMPT = "attempts = attempts + (started_fence IS NOT fence), started_fence = fence"
# Attempts that started and are still running at a group commit: counted now, so a crash
# during them counts (a file that kills its runner every time ends dead, not in a loop).
# The joblog notes such an attempt's start at this commit (within one group commit of it).
MARK_STARTED = f"""
UPDATE items SET {_COUNT_ATTEMPT}, started_at = ?5, finished_at = NULL, runner = ?2
{_FENCED_GROUP}
  AND started_fence IS NOT fence
"""
# The joblog: finished now; started at ?7, the start of the group's attempts (the caller groups
# them by the millisecond they started in: one value per statement), else when MARK_STARTED
# noted it, else now.
MARK_DONE = f"""
UPDATE items SET state = 'done', lease_until = NULL, next_attempt_at = NULL, last_error = NULL,
                 post_action = ?5, updated_at = ?6, done_at = ?6, finished_at = ?6, runner = ?2,
                 started_at = coalesce(?7, CASE WHEN started_fence IS fence THEN started_at END,
                                       ?6),
                 {_COUNT_ATTEMPT}
{_FENCED_GROUP}
"""
# One outcome on its own: failed, dead, vanished, or done with the stat of a file that changed
# between the scan and the open (identity "path"). A failed attempt keeps the row's
# post_action: a 'moved...' record of ctx.move() must outlive the failure so the retry finds
# the input. ``:attempted`` is 0 for an outcome that is not an attempt (an item given up on
# without running, or found vanished): nothing counted, and no start in the joblog (an earlier
# attempt's start, another run's, would make a duration of what this runner never ran; the
# runner is the one that recorded the outcome). ``:started_at``: when the attempt began
# (NULL: as noted, or now).
MARK_OUTCOME = """
UPDATE items SET
    started_at = CASE WHEN NOT :attempted THEN NULL
                      ELSE coalesce(:started_at,
                                    CASE WHEN started_fence IS fence THEN started_at END, :now)
                 END,
    finished_at = :now, runner = :owner,
    state = :state, lease_until = NULL, next_attempt_at = :next_attempt_at, last_error = :error,
    post_action = CASE WHEN :state = 'failed' THEN post_action ELSE :post_action END,
    size = coalesce(:size, size), mtime_ns = coalesce(:mtime_ns, mtime_ns),
    inode = coalesce(:inode, inode),
    updated_at = :now, done_at = CASE WHEN :state = 'done' THEN :now ELSE done_at END,
    attempts = attempts + (:attempted AND started_fence IS NOT fence),
    started_fence = CASE WHEN :attempted THEN fence ELSE started_fence END
WHERE job = :job AND key = :key AND owner = :owner AND fence = :fence AND state = 'running'
"""
# Who holds these items now (after a group commit that did not update them all).
LEASE_STATE = """
SELECT key, owner, fence, state FROM items
WHERE job = ? AND key IN (SELECT value FROM json_each(?))
"""
# A released item goes back to waiting as it was leased: a retry (its retry time set: leased
# 'failed', and due) stays 'failed', its attempts and last error kept (what `failures` and
# `status` show of it); any other, 'pending'.
RELEASE_ITEM = f"""
UPDATE items SET state = {_WAITING_AGAIN}, owner = NULL, lease_until = NULL, updated_at = ?,
                 {_COUNT_INTERRUPTED}
WHERE job = ? AND key = ? AND owner = ? AND fence = ? AND state = 'running'
"""
EXTEND_LEASE = """
UPDATE items SET lease_until = ? WHERE job = ? AND key = ? AND owner = ? AND fence = ?
    AND state = 'running'
"""
# ctx.move() records where the input goes before moving it: a retry after a crash finds it there.
RECORD_MOVE = """
UPDATE items SET post_action = ?, updated_at = ?
WHERE job = ? AND key = ? AND owner = ? AND fence = ? AND state = 'running'
"""

# -- reading -------------------------------------------------------------------------------------

COUNTS = "SELECT state, count(*) FROM items WHERE job = ? GROUP BY state"
#: An item's full record (ItemInfo), with its runner's pid and host from the run history.
_ITEM_COLUMNS = ", ".join(ItemInfo.columns())
ITEM_BY_KEY = f"SELECT {_ITEM_COLUMNS} FROM items WHERE job = ? AND key = ?"
ITEMS_BY_RELPATH = f"SELECT {_ITEM_COLUMNS} FROM items WHERE job = ? AND relpath = ?"
ACTIONS_DUE = f"""
SELECT {_ITEM_COLUMNS} FROM items
WHERE job = ? AND key IN (SELECT value FROM json_each(?)) AND state IN ('done', 'dead')
  AND post_action IS NOT NULL
"""
FAILURES = f"""
SELECT {_ITEM_COLUMNS} FROM items WHERE job = ? AND state IN ('failed', 'dead')
ORDER BY updated_at DESC LIMIT ?
"""
#: The name of the function that matches a relpath against glob_regex(pattern) (registered on
#: the connection: SQLite has no regular expressions of its own).
GLOB_FUNCTION = "asyncbatch_glob"


def list_items(
    which: ItemFilter, *, count: bool = False, after: tuple[float, str] | None = None
) -> tuple[str, dict[str, Any]]:
    """The statement listing (or counting) the items ``which`` selects, and its parameters
    besides ``:job`` (and ``:glob``, a regular expression, when it filters by glob); with
    ``after`` (a keyset page's start), only those that sort after it."""
    where = ["job = :job"]
    params_after: dict[str, Any] = {}
    if after is not None:
        where.append("(updated_at < :after_u OR (updated_at = :after_u AND key > :after_k))")
        params_after = {"after_u": after[0], "after_k": after[1]}
    params: dict[str, Any] = dict(params_after)
    if which.states:
        where.append(f"state IN ({', '.join(f':s{i}' for i in range(len(which.states)))})")
        params.update({f"s{i}": state for i, state in enumerate(which.states)})
    column = "updated_at" if which.time == "updated" else "finished_at"
    if which.after is not None:
        where.append(f"{column} >= :after")
        params["after"] = which.after
    if which.before is not None:
        where.append(f"{column} < :before")
        params["before"] = which.before
    if which.glob is not None:
        where.append(f"{GLOB_FUNCTION}(:glob, relpath)")
    if count:
        return f"SELECT count(*) FROM items WHERE {' AND '.join(where)}", params
    order = " ORDER BY updated_at DESC, key"
    if which.limit is None:
        return f"SELECT {_ITEM_COLUMNS} FROM items WHERE {' AND '.join(where)}{order}", params
    # The keys first, then their rows: the sort of every item the filter keeps is of keys
    # (SQLite would work out each one's runner, the columns' subqueries, before it sorts).
    params["limit"] = which.limit
    chosen = f"SELECT key FROM items WHERE {' AND '.join(where)}{order} LIMIT :limit"
    query = f"SELECT {_ITEM_COLUMNS} FROM items WHERE job = :job AND key IN ({chosen}){order}"
    return query, params


#: Forgetting items (inside BEGIN IMMEDIATE): read, then delete those no live lease holds.
#: ?1 job, ?2 key; or ?1 job, ?2 the time before which the items were done.
#: The states of some items: ?1 job, ?2 a JSON array of keys.
STATES_OF = """
SELECT key, state FROM items WHERE job = ?1 AND key IN (SELECT value FROM json_each(?2))
"""
FORGET_READ = f"SELECT {_ITEM_COLUMNS} FROM items WHERE job = ? AND key = ?"
FORGET_ITEM = "DELETE FROM items WHERE job = ? AND key = ?"
_DONE_BEFORE = "job = ? AND state = 'done' AND coalesce(finished_at, done_at) < ?"
FORGET_READ_DONE_BEFORE = f"SELECT {_ITEM_COLUMNS} FROM items WHERE {_DONE_BEFORE}"
FORGET_DONE_BEFORE = f"DELETE FROM items WHERE {_DONE_BEFORE}"
#: A chunk of a chunked forget: ?1 job, ?2 the key it starts after, ?3 how many; then
#: ``FORGET_PAGE_DONE`` ?4 the time before which the items were done.
_FORGET_PAGE = f"SELECT {_ITEM_COLUMNS} FROM items WHERE job = ?1 AND key > ?2 AND {{}} "
_FORGET_PAGE += "ORDER BY key LIMIT ?3"
FORGET_PAGE_DONE = _FORGET_PAGE.format("state = 'done' AND coalesce(finished_at, done_at) < ?4")
FORGET_PAGE_VANISHED = _FORGET_PAGE.format("state = 'vanished'")
#: The forgotten items' names, for watches under way (?1 job, ?2 relpath, ?3 now); entries
#: older than ?2 seconds are pruned (no watch lags that far behind).
FORGOTTEN_ADD = "INSERT INTO forgotten (job, relpath, at) VALUES (?, ?, ?)"
FORGOTTEN_PRUNE = "DELETE FROM forgotten WHERE at < ?"
#: The newest entry's number (0: none), and the entries after ?2 (?1 job). Writers take the
#: write lock before they number an entry (BEGIN IMMEDIATE) and hold it to their commit, so
#: entries commit in the order of their numbers: a reader that sees an entry sees every entry
#: numbered before it, and may remember the newest number it read (PostgreSQL needs a lock of
#: its own for this: FORGOTTEN_LOCK in postgres_sql).
FORGOTTEN_LAST = "SELECT coalesce(max(seq), 0) FROM forgotten"
FORGOTTEN_SINCE = "SELECT seq, relpath FROM forgotten WHERE job = ? AND seq > ? ORDER BY seq"
#: Where ctx.move() took (or was taking) inputs of unfinished items: ``moved...`` actions.
MOVE_DESTINATIONS = """
SELECT DISTINCT post_action FROM items INDEXED BY items_moving
WHERE job = ? AND substr(post_action, 1, 5) = 'moved'
"""
OLDEST_WAITING = """
SELECT min(created_at) FROM items INDEXED BY items_waiting
WHERE job = ? AND state IN ('pending', 'failed')
"""
_RETRY = """
UPDATE items SET state = 'pending', attempts = 0, interrupted = 0, started_fence = NULL,
                 next_attempt_at = NULL, owner = NULL, lease_until = NULL, updated_at = ?
WHERE job = ? AND state IN ({states})"""
RETRY_ITEM = _RETRY + " AND key = ?"
RETRY_ALL = _RETRY

# -- runs ----------------------------------------------------------------------------------------

RUN_START = """
INSERT INTO runs (job, owner, pid, host, mode, started_at, settings_changed)
VALUES (:job, :owner, :pid, :host, :mode, :now, :settings_changed)
"""
_RUN_TOTALS = ", ".join(f"{name} = :{name}" for name in TOTALS)
RUN_FINISH = f"""
UPDATE runs SET finished_at = :now, exit_status = :exit_status, {_RUN_TOTALS}
WHERE id = :id
"""
#: The counts of a live run, as of its heartbeat (what `status` shows of it).
RUN_PROGRESS = f"UPDATE runs SET {_RUN_TOTALS} WHERE id = :id AND finished_at IS NULL"
_JOBLOG_STATES = ", ".join(f"'{state}'" for state in JOBLOG_COUNTS)
#: The runs of a runner that is gone: killed or lost (:status; see ``end_of_gone``), finished
#: when its heartbeat stopped. Its ``seen`` is kept at least what the ledger shows it touched
#: (as ``RunInfo.with_joblog`` counts it): the items it finished, those it still holds leased
#: (put back right after, when their owner is forgotten), and its other categories as of its
#: last heartbeat. A full scan of the job's items, as the reaping after it.
RUN_KILLED = f"""
UPDATE runs SET exit_status = :status,
    finished_at = coalesce((SELECT heartbeat_at FROM runners WHERE owner = :owner), :now),
    seen = max(seen, {" + ".join(SAVED_CATEGORIES)} + (
        SELECT count(*) FROM items
        WHERE job = :job AND (state IN ({_JOBLOG_STATES}) AND runner = :owner
                              OR state = '{IN_FLIGHT}' AND owner = :owner)))
WHERE job = :job AND owner = :owner AND finished_at IS NULL
"""
#: What runners finished (the joblog), and what they hold leased (as ``'running'``, by its
#: ``owner``): ?1 job, ?2 a JSON array of their owners. One read of the job's items.
FINISHED_BY = f"""
SELECT CASE WHEN state = '{IN_FLIGHT}' THEN owner ELSE runner END AS who, state, count(*)
FROM items
WHERE job = ?1 AND (state IN ({_JOBLOG_STATES}) AND runner IN (SELECT value FROM json_each(?2))
                    OR state = '{IN_FLIGHT}' AND owner IN (SELECT value FROM json_each(?2)))
GROUP BY who, state
"""
RUNS_OF_JOB = f"""
SELECT {", ".join(RunInfo.columns())}
FROM runs WHERE job = ? ORDER BY started_at DESC, id DESC LIMIT ?
"""

# -- idempotency keys (receiving side) -----------------------------------------------------------
# One row per (scope, key) seen by IdempotencyMiddleware. A 'running' row belongs to the request
# executing it: while running, its ``headers`` column holds that request's random owner token, so
# only that request may complete or release it (a request that outlived ``lock_timeout`` and was
# taken over cannot overwrite the newer owner's row). A 'started' row is a running one whose
# response has begun (still the token in ``headers``): it is never released nor taken over. A
# 'done' row holds the stored response: ``status``, ``headers`` (JSON list of [name, value]
# latin-1 strings) and ``body``. An 'unstored' row ran but its response could not be stored:
# ``headers`` holds why (an UnstoredReason).

IDEMPOTENCY_INSERT = """
INSERT OR IGNORE INTO idempotency_keys
    (scope, key, fingerprint, state, headers, created_at, locked_until, expires_at)
VALUES (:scope, :key, :fingerprint, 'running', :token, :now, :locked_until, :expires_at)
"""
IDEMPOTENCY_GET = f"""
SELECT {", ".join(IdempotencyRecord.columns())} FROM idempotency_keys WHERE scope = ? AND key = ?
"""
# Take over an expired row, or a running row whose owner outlived its lock (abandoned).
IDEMPOTENCY_TAKE_OVER = """
UPDATE idempotency_keys
SET fingerprint = :fingerprint, state = 'running', status = NULL, headers = :token, body = NULL,
    created_at = :now, locked_until = :locked_until, expires_at = :expires_at
WHERE scope = :scope AND key = :key
"""
IDEMPOTENCY_START = """
UPDATE idempotency_keys SET state = 'started'
WHERE scope = ? AND key = ? AND state IN ('running', 'started') AND headers = ?
"""
IDEMPOTENCY_COMPLETE = """
UPDATE idempotency_keys
SET state = 'done', status = :status, headers = :headers, body = :body, locked_until = :now,
    expires_at = :expires_at
WHERE scope = :scope AND key = :key AND state IN ('running', 'started') AND headers = :token
"""
IDEMPOTENCY_UNSTORED = """
UPDATE idempotency_keys
SET state = 'unstored', status = NULL, headers = :reason, body = NULL, locked_until = :now,
    expires_at = :expires_at
WHERE scope = :scope AND key = :key AND state IN ('running', 'started') AND headers = :token
"""
IDEMPOTENCY_RELEASE = """
DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND state = 'running' AND headers = ?
"""
IDEMPOTENCY_PURGE = "DELETE FROM idempotency_keys WHERE expires_at < ?"
