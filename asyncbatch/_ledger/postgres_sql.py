"""Every SQL statement of the PostgreSQL ledger, named, in one place (see :mod:`.postgres`).

Conventions (the counterpart of :mod:`.sqlite_sql`):

- Times are Unix seconds (``float8``) from the **server's** clock: ``NOW`` below, the start of
  the current transaction. Hosts with different clocks therefore agree on every lease, lock
  and heartbeat; callers pass durations (a lease, a TTL, a retry delay), never instants.
- Tables live in the ledger's own schema, which is the session's ``search_path``: statements
  name tables unqualified.
- Sets of rows travel as arrays (``unnest($n::text[], ...)``): one statement per batch. A
  statement that joins such a set to ``items`` joins on the key alone (a nested loop from the
  ``unnest`` into the primary key): adding ``key = ANY($keys)`` made the cached plan re-read
  the whole ``unnest`` for every row it updated, 218-284 us a row (benchmarks/PG_PROFILE.md,
  #1). The plan relies on the statistics the ledger refreshes as it grows ``items``
  (``ANALYZE``, see ``PostgresLedger._analyze``): on an empty table's statistics it would read
  every item of the job per commit.
- Every item write is conditioned on ``owner`` and ``fence`` (and ``state = 'running'``), so a
  runner whose lease was taken over cannot change the item any more.
"""

from __future__ import annotations

from typing import Final

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

#: The schema version this code writes (``meta.schema_version``).
SCHEMA_VERSION: Final = 11
#: ``meta.application``: marks a schema as an asyncbatch ledger.
APPLICATION: Final = "asyncbatch"

#: The server's time now (the transaction's start), as Unix seconds.
NOW: Final = "extract(epoch FROM now())::float8"

# Forward migrations: MIGRATIONS[v] takes a ledger from version v to v + 1 (run inside one
# transaction, in the ledger's schema, which exists by then).
MIGRATIONS: Final[dict[int, str]] = {
    0: """
CREATE TABLE meta (
    name  text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE jobs (
    job        text PRIMARY KEY,
    identity   text   NOT NULL,
    created_at float8 NOT NULL
);

CREATE TABLE items (
    job             text    NOT NULL,
    key             text    NOT NULL,
    relpath         bytea   NOT NULL,
    size            bigint  NOT NULL,
    mtime_ns        bigint  NOT NULL,
    inode           bigint  NOT NULL DEFAULT 0,
    state           text    NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    owner           text,
    fence           bigint  NOT NULL DEFAULT 0,
    started_fence   bigint,
    lease_until     float8,
    next_attempt_at float8,
    last_error      text,
    post_action     text,
    created_at      float8  NOT NULL,
    updated_at      float8  NOT NULL,
    done_at         float8,
    PRIMARY KEY (job, key)
);

-- Only items waiting for a (re)try are indexed, in claim order: new items are inserted already
-- leased and go straight to done, so the index costs nothing on the fast path.
CREATE INDEX items_waiting ON items (job, mtime_ns, relpath)
    WHERE state IN ('pending', 'failed');

CREATE TABLE task_lock (
    job_id      text PRIMARY KEY,
    owner       text   NOT NULL,
    pid         integer,
    host        text,
    pid_start   text,
    acquired_at float8 NOT NULL,
    expires_at  float8 NOT NULL
);

CREATE TABLE runners (
    owner        text PRIMARY KEY,
    job          text    NOT NULL,
    pid          integer,
    host         text,
    pid_start    text,
    shared       boolean NOT NULL,
    started_at   float8  NOT NULL,
    heartbeat_at float8  NOT NULL,
    expires_at   float8  NOT NULL
);

CREATE TABLE runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job         text    NOT NULL,
    owner       text    NOT NULL,
    pid         integer,
    host        text,
    mode        text    NOT NULL,
    started_at  float8  NOT NULL,
    finished_at float8,
    seen        bigint  NOT NULL DEFAULT 0,
    done        bigint  NOT NULL DEFAULT 0,
    failed      bigint  NOT NULL DEFAULT 0,
    dead        bigint  NOT NULL DEFAULT 0,
    vanished    bigint  NOT NULL DEFAULT 0,
    exit_status text
);
CREATE INDEX runs_job ON runs (job, started_at);
""",
    # Attempts cut short by the runner's death or stop, counted apart from handler failures;
    # the items whose input ctx.move() is taking somewhere; the idempotency store of
    # IdempotencyMiddleware (see IDEMPOTENCY_* below); every category of a run's report in
    # its history row.
    1: """
ALTER TABLE items ADD COLUMN interrupted integer NOT NULL DEFAULT 0;
CREATE INDEX items_moving ON items (job) WHERE substr(post_action, 1, 5) = 'moved';

CREATE TABLE idempotency_keys (
    scope        text    NOT NULL,
    key          text    NOT NULL,
    fingerprint  text    NOT NULL,
    state        text    NOT NULL,
    status       integer,
    headers      text,
    body         bytea,
    created_at   float8  NOT NULL,
    locked_until float8  NOT NULL,
    expires_at   float8  NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_expiry ON idempotency_keys (expires_at);
"""
    + "".join(
        f"ALTER TABLE runs ADD COLUMN {name} bigint NOT NULL DEFAULT 0;\n"
        for name in totals_since(1)
    ),
    # The joblog: when the latest attempt started, when its outcome committed, and which
    # runner made it (its pid and host are in its history row: runs_owner). Rows finished
    # before have their outcome's time and runner (their start is not known).
    2: """
ALTER TABLE items ADD COLUMN started_at float8;
ALTER TABLE items ADD COLUMN finished_at float8;
ALTER TABLE items ADD COLUMN runner text;
UPDATE items SET finished_at = coalesce(done_at, updated_at), runner = owner
    WHERE state IN ('done', 'failed', 'dead', 'vanished');
CREATE INDEX runs_owner ON runs (owner);
""",
    # The job's settings: the source it scans and its scan rules (a JSON object, see
    # JobSettings), recorded by its first run (a job of an older ledger: by its next run);
    # the scan rules a run changed, in its history row.
    3: """
ALTER TABLE jobs ADD COLUMN settings text;
ALTER TABLE runs ADD COLUMN settings_changed text;
""",
    # The items forgot (``asyncbatch forget``), for watches under way: they look at those
    # files again (see FORGOTTEN_SINCE); what a run left in the source (files not settled yet,
    # not registered yet), in its history row.
    4: """
CREATE TABLE forgotten (
    seq     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job     text   NOT NULL,
    relpath bytea  NOT NULL,
    at      float8 NOT NULL
);
CREATE INDEX forgotten_job ON forgotten (job, seq);
"""
    + "".join(
        f"ALTER TABLE runs ADD COLUMN {name} bigint NOT NULL DEFAULT 0;\n"
        for name in totals_since(4)
    ),
    # The listing role of runners sharing a job, and its listings (see Listing).
    5: """
CREATE TABLE listers (
    job          text PRIMARY KEY,
    owner        text,
    fence        bigint NOT NULL DEFAULT 0,
    lease_until  float8,
    since        float8,
    generation   bigint NOT NULL DEFAULT 0,
    complete     bigint NOT NULL DEFAULT 0,
    started_at   float8,
    listed_at    float8,
    listed_files bigint NOT NULL DEFAULT 0,
    found_done   bigint NOT NULL DEFAULT 0,
    found_dead   bigint NOT NULL DEFAULT 0,
    registered   bigint NOT NULL DEFAULT 0
);
""",
    # The files a run left not ready yet by each readiness rule but age (unsettled): stable,
    # marker, dir-marker, min-size, max-age (see RunTotals), in its history row.
    6: "".join(
        f"ALTER TABLE runs ADD COLUMN {name} bigint NOT NULL DEFAULT 0;\n"
        for name in totals_since(6)
    ),
    # Listed files queued for the runners sharing a job, a batch a row, in order (see
    # QUEUED_*): a runner registers a batch's files leased to it when it takes them, so a
    # shared item is written as often as an unshared one. The batches are stored as they
    # are (no compression: they are written once and read once).
    7: """
CREATE TABLE queued (
    seq   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job   text    NOT NULL,
    files integer NOT NULL,
    rows  bytea   NOT NULL
);
ALTER TABLE queued ALTER COLUMN rows SET STORAGE EXTERNAL;
CREATE INDEX queued_job ON queued (job, seq);
""",
    # The last chunk the lister queued (a digest of its keys): a queueing run again after
    # its connection was lost finds whether the run before committed (see queue_listed).
    8: "ALTER TABLE listers ADD COLUMN queued_last text;\n",
    # The log of names to look at again pruned by its entries' time through an index (it read
    # the whole log at every entry); from this version on, every writer of the log takes
    # FORGOTTEN_LOCK (see there), which an older asyncbatch did not. The files of a listing
    # with the bytes of another it queued (identity "content": one item), by key, for the
    # shared runs' reports.
    9: "CREATE INDEX forgotten_at ON forgotten (at);\nALTER TABLE listers ADD COLUMN twins text;\n",
    # The files the last complete listing left out as not ready yet, by count (see
    # Listing.not_ready): a runner that goes by another's listing reports them too.
    10: "ALTER TABLE listers ADD COLUMN not_ready text;\n",
}

#: Who uses the ledger: its runners and lock holders (pid, host, pid_start, expires_at), in
#: columns every schema version has had; read before an upgrade (see base.live_user).
LEDGER_USERS = """
SELECT pid, host, pid_start, expires_at FROM runners
UNION ALL SELECT pid, host, pid_start, expires_at FROM task_lock
"""

#: The tables of a ledger of this schema version and their columns, in order (a ledger whose
#: tables differ is refused before anything is written: see postgres_session). A migration
#: that changes them changes this too (every test of a new ledger checks it).
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
        *("queued_last", "twins", "not_ready"),
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

# -- opening -------------------------------------------------------------------------------------

#: Serialises creation and migration of one schema across every client: $1 schema name.
MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(hashtext('asyncbatch.schema'), hashtext($1))"
#: What the schema holds: (schema exists, relations in it, has a meta table, that meta table
#: has the ledger's columns: name and value, both text; whether this role may use the schema:
#: without USAGE its tables are invisible to it, not missing). $1 schema name. Another application's
#: ``meta`` (other columns, or other types) is told apart here, in the same statement, before
#: anything reads it (READ_VERSION would fail on it with a raw SQL error).
INSPECT_SCHEMA = """
SELECT n.oid IS NOT NULL,
       (SELECT count(*) FROM pg_class c WHERE c.relnamespace = n.oid
                                          AND c.relkind IN ('r', 'p', 'v', 'm', 'f')),
       meta.oid IS NOT NULL,
       (SELECT count(*) FROM pg_attribute a
         WHERE a.attrelid = meta.oid AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attname IN ('name', 'value') AND a.atttypid = 'text'::regtype) = 2,
       n.oid IS NULL OR has_schema_privilege(n.oid, 'USAGE')
FROM (SELECT 1) AS one
LEFT JOIN pg_namespace n ON n.nspname = $1
LEFT JOIN pg_class meta ON meta.relnamespace = n.oid AND meta.relname = 'meta'
                       AND meta.relkind IN ('r', 'p')
"""
#: (table, its column names in order) of every table in schema $1 (from the catalogs: a
#: table this role may not read is listed too).
TABLE_COLUMNS = """
SELECT c.relname::text, array_agg(a.attname::text ORDER BY a.attnum)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
GROUP BY c.relname
"""
#: (application, schema_version) from an existing meta table.
#: A name with more than one row (another application's table: the ledger's ``name`` is its
#: key) reads as NULL, not as the error a scalar subquery of several rows raises.
READ_VERSION = """
SELECT (SELECT CASE WHEN count(*) = 1 THEN min(value) END FROM meta WHERE name = 'application'),
       (SELECT CASE WHEN count(*) = 1 THEN min(value) END FROM meta WHERE name = 'schema_version')
"""
#: Created with the schema name quoted by the caller (an identifier cannot be a parameter).
CREATE_SCHEMA = "CREATE SCHEMA IF NOT EXISTS {schema}"
PUT_META = "INSERT INTO meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING"
SET_META = """
INSERT INTO meta (name, value) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET value = excluded.value
"""
GET_META = "SELECT value FROM meta WHERE name = $1"
SERVER_NOW = f"SELECT {NOW}"
#: The server's clock at this instant (not the transaction's start): to measure clock offsets.
SERVER_CLOCK = "SELECT extract(epoch FROM clock_timestamp())::float8"

GET_JOB = "SELECT identity FROM jobs WHERE job = $1"
#: A job's identity mode and settings (JSON; NULL: not recorded yet).
GET_JOB_RECORD = "SELECT identity, settings FROM jobs WHERE job = $1"
GET_JOB_SETTINGS = "SELECT settings FROM jobs WHERE job = $1"
#: $1 job, $2 identity, $3 settings.
ADD_JOB = f"""
INSERT INTO jobs (job, identity, created_at, settings) VALUES ($1, $2, {NOW}, $3)
ON CONFLICT (job) DO NOTHING
"""
SET_JOB_SETTINGS = "UPDATE jobs SET settings = $2 WHERE job = $1"
LIST_JOBS = "SELECT job FROM jobs ORDER BY job"

# -- the job lock --------------------------------------------------------------------------------

#: Serialises the start of a runner on one job (the SQLite backend's BEGIN IMMEDIATE): its
#: check of the job's settings, its lock decision and its registration. $1 job.
JOB_LOCK_GUARD = """
SELECT pg_advisory_xact_lock(hashtext('asyncbatch.lock:' || current_schema()), hashtext($1))
"""
#: The lock row (LockInfo, locked for this transaction) and the server's time (``now``); no
#: row if unlocked.
LOCK_GET = f"""
SELECT {", ".join(LockInfo.columns())}, {NOW} AS now
FROM task_lock WHERE job_id = $1 FOR UPDATE
"""
LOCK_LIST = f"SELECT {', '.join(LockInfo.columns())} FROM task_lock ORDER BY job_id"
#: $1 job, $2 owner, $3 pid, $4 host, $5 pid_start, $6 ttl. Returns a row when inserted.
LOCK_INSERT = f"""
INSERT INTO task_lock (job_id, owner, pid, host, pid_start, acquired_at, expires_at)
VALUES ($1, $2, $3, $4, $5, {NOW}, {NOW} + $6::float8)
ON CONFLICT (job_id) DO NOTHING
RETURNING owner
"""
#: $1 job, $2 stale owner, $3 owner, $4 pid, $5 host, $6 pid_start, $7 ttl.
LOCK_TAKE_OVER = f"""
UPDATE task_lock SET owner = $3, pid = $4, host = $5, pid_start = $6, acquired_at = {NOW},
                     expires_at = {NOW} + $7::float8
WHERE job_id = $1 AND owner = $2
RETURNING owner
"""
#: $1 job, $2 owner, $3 ttl.
LOCK_EXTEND = f"""
UPDATE task_lock SET expires_at = {NOW} + $3::float8 WHERE job_id = $1 AND owner = $2
RETURNING owner
"""
LOCK_RELEASE = "DELETE FROM task_lock WHERE job_id = $1 AND owner = $2 RETURNING owner"

# -- runners (liveness of item owners) -----------------------------------------------------------

#: $1 owner, $2 job, $3 pid, $4 host, $5 pid_start, $6 shared, $7 ttl.
RUNNER_ADD = f"""
INSERT INTO runners (owner, job, pid, host, pid_start, shared, started_at, heartbeat_at,
                     expires_at)
VALUES ($1, $2, $3, $4, $5, $6, {NOW}, {NOW}, {NOW} + $7::float8)
"""
#: $1 owner, $2 ttl.
RUNNER_EXTEND = f"""
UPDATE runners SET heartbeat_at = {NOW}, expires_at = {NOW} + $2::float8 WHERE owner = $1
RETURNING owner
"""
RUNNER_REMOVE = "DELETE FROM runners WHERE owner = $1"
#: The owners of a job's leases ($1 job) that have no runner record: gone (a live runner has
#: its record from before its first lease to after its last; a lease visible here was
#: committed after its owner's record was, in this statement's snapshot). A scan of the job.
ORPHANED_OWNERS = """
SELECT DISTINCT owner FROM items AS i
WHERE job = $1 AND state = 'running'
  AND NOT EXISTS (SELECT 1 FROM runners AS r WHERE r.owner = i.owner)
"""
#: The job's runners (RunnerInfo) and the server's time (``now``, in every row).
RUNNERS_OF_JOB = f"""
SELECT {", ".join(RunnerInfo.columns())}, {NOW} AS now
FROM runners WHERE job = $1 ORDER BY started_at, owner
"""
#: Hand the items of a runner that is gone back (a scan of the job: runs after a crash).
#: $1 job, $2 owner. Returns the number of items released.
# A lease given back (released, or reaped) whose attempt had started: interrupted, counted now
# (a claim of a lease that ran out counts it then), and the start forgotten so that the next
# claim does not count it again.
_COUNT_INTERRUPTED = """interrupted = interrupted
    + (started_fence IS NOT DISTINCT FROM fence)::int, started_fence = NULL"""
REAP_ITEMS = f"""
WITH reaped AS (
    UPDATE items SET state = 'pending', owner = NULL, lease_until = NULL, updated_at = {NOW},
                     {_COUNT_INTERRUPTED}
    WHERE job = $1 AND owner = $2 AND state = 'running'
    RETURNING 1
)
SELECT count(*) FROM reaped
"""

# -- the listing role ----------------------------------------------------------------------------

#: The job's role ($1), and the server's time (``now``).
LISTING_GET = f"SELECT {', '.join(Listing.columns())}, {NOW} AS now FROM listers WHERE job = $1"
#: The role for $2 for $3 seconds ($1 job), taken if it is free (never held, its lease
#: expired, or its holder without a live runner record) or renewed if $2 holds it; then read.
#: $4 (NULL: never): a run()'s start, in the server's clock; the role is handed over to $2
#: too when its holder is done with a listing too old for it, or took the role after that
#: one began and has not listed since, more than $5 seconds ago (see Listing.stale_for).
LISTING_TAKE = f"""
INSERT INTO listers AS l (job, owner, fence, lease_until, since)
VALUES ($1, $2, 1, {NOW} + $3::float8, {NOW})
ON CONFLICT (job) DO UPDATE SET
    owner = excluded.owner,
    fence = l.fence + (l.owner IS DISTINCT FROM excluded.owner)::int,
    lease_until = excluded.lease_until,
    since = CASE WHEN l.owner IS DISTINCT FROM excluded.owner THEN excluded.since ELSE l.since END
WHERE l.owner = excluded.owner OR l.owner IS NULL OR l.lease_until IS NULL
   OR l.lease_until < {NOW}
   OR NOT EXISTS (SELECT 1 FROM runners WHERE owner = l.owner AND expires_at >= {NOW})
   OR (l.started_at < $4::float8 AND (
       (l.since <= l.started_at AND l.complete > 0 AND l.generation = l.complete)
       OR (l.since > l.started_at AND l.since < {NOW} - $5::float8)))
"""
_HOLDER = "job = $1 AND owner = $2 AND fence = $3"
#: The channel on which registrations of waiting items are announced (the payload: the
#: schema and the job; see NOTIFY_REGISTERED).
REGISTERED_CHANNEL: Final = "asyncbatch_registered"
#: ($4: whether the listing counts the files it finds, see Ledger.begin_listing: a watch's
#: full scans do not, and have no ``started_at``.)
LISTING_BEGIN = f"""
UPDATE listers SET generation = generation + 1, started_at = CASE WHEN $4 THEN {NOW} END,
                   found_done = 0, found_dead = 0, queued_last = NULL
WHERE {_HOLDER}
RETURNING job
"""
#: Listed files as waiting items ($1 job; $4.. the rows), fenced by the role ($2 owner, $3
#: fence): a vanished item whose file is listed again waits again, any other the ledger holds
#: is left as it is. Returns (new, found done, found dead), or no row when not the holder.
REGISTER_LISTED = f"""
WITH holder AS (SELECT 1 FROM listers WHERE {_HOLDER} FOR UPDATE),
found AS (
    SELECT count(*) FILTER (WHERE d.state = 'done') AS done,
           count(*) FILTER (WHERE d.state = 'dead') AS dead
    FROM items d WHERE d.job = $1 AND d.key = ANY($4::text[]) AND d.state IN ('done', 'dead')
),
added AS (
    INSERT INTO items AS i (job, key, relpath, size, mtime_ns, inode, state, attempts, fence,
                            created_at, updated_at)
    SELECT $1, r.key, r.relpath, r.size, r.mtime_ns, r.inode, 'pending', 0, 0, {NOW}, {NOW}
    FROM unnest($4::text[], $5::bytea[], $6::int8[], $7::int8[], $8::int8[])
         AS r(key, relpath, size, mtime_ns, inode)
    WHERE EXISTS (SELECT 1 FROM holder)
    ON CONFLICT (job, key) DO UPDATE SET state = 'pending', owner = NULL, lease_until = NULL,
        updated_at = excluded.updated_at, started_fence = NULL, relpath = excluded.relpath,
        size = excluded.size, mtime_ns = excluded.mtime_ns, inode = excluded.inode
    WHERE i.state = 'vanished'
    RETURNING 1
),
counted AS (
    UPDATE listers SET registered = registered + (SELECT count(*) FROM added),
                       found_done = found_done + (SELECT done FROM found),
                       found_dead = found_dead + (SELECT dead FROM found)
    WHERE {_HOLDER}
    RETURNING 1
)
SELECT (SELECT count(*) FROM added), done, dead FROM found WHERE EXISTS (SELECT 1 FROM counted)
"""
#: The items the ledger holds of these keys ($2) of the job ($1), with their state.
KNOWN_STATES = "SELECT key, state FROM items WHERE job = $1 AND key = ANY($2::text[])"
#: The job's ($1) items with a key between the least and the greatest of $2 (by the
#: database's collation), with their state, $3 at most (see types.known_range_limit).
KNOWN_STATES_RANGE = """
SELECT key, state FROM items
WHERE job = $1 AND key >= (SELECT min(k) FROM unnest($2::text[]) AS k)
  AND key <= (SELECT max(k) FROM unnest($2::text[]) AS k)
ORDER BY key LIMIT $3
"""
#: Vanished items whose files are listed again wait again, as the files listed (as
#: REGISTER_LISTED): $1 job, then arrays $2 keys (distinct), $3 relpaths, $4 sizes, $5 mtimes
#: (ns), $6 inodes (as signed 64-bit).
REVIVE_VANISHED = f"""
WITH revived AS (
    UPDATE items AS i SET state = 'pending', owner = NULL, lease_until = NULL,
                          updated_at = {NOW}, started_fence = NULL, relpath = r.relpath,
                          size = r.size, mtime_ns = r.mtime_ns, inode = r.inode
    FROM unnest($2::text[], $3::bytea[], $4::int8[], $5::int8[], $6::int8[])
         AS r(key, relpath, size, mtime_ns, inode)
    WHERE i.job = $1 AND i.key = r.key AND i.state = 'vanished'
    RETURNING 1
)
SELECT count(*) FROM revived
"""
#: Batches of queued files (see types.pack_queued), in order: $1 job, $2 files, $3 rows.
QUEUED_ADD = """
INSERT INTO queued (job, files, rows)
SELECT $1, q.files, q.rows FROM unnest($2::int[], $3::bytea[]) WITH ORDINALITY AS q(files, rows, n)
ORDER BY q.n
"""
#: The job's ($1) oldest batch that no other transaction is taking (locked until the end).
QUEUED_FIRST = """
SELECT seq, files, rows FROM queued WHERE job = $1 ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED
"""
QUEUED_DROP = "DELETE FROM queued WHERE seq = $1"
QUEUED_KEEP = "UPDATE queued SET files = $2, rows = $3 WHERE seq = $1"
QUEUED_CLEAR = "DELETE FROM queued WHERE job = $1"
QUEUED_FILES = "SELECT coalesce(sum(files), 0) FROM queued WHERE job = $1"
#: Count what a queueing of listed files found into the listing ($4 new, $5 done, $6 dead).
LISTING_FOUND = f"""
UPDATE listers SET registered = registered + $4, found_done = found_done + $5,
                   found_dead = found_dead + $6
WHERE {_HOLDER}
"""
#: LISTING_FOUND for a queued chunk, whose digest ($7) it keeps.
LISTING_QUEUED = f"""
UPDATE listers SET registered = registered + $4, found_done = found_done + $5,
                   found_dead = found_dead + $6, queued_last = $7
WHERE {_HOLDER}
"""
#: The last chunk queued by the holder ($1 job, $2 owner, $3 fence), the row locked; no row
#: when not the holder.
LISTING_QUEUED_LAST = f"SELECT queued_last FROM listers WHERE {_HOLDER} FOR UPDATE"
#: Announce that waiting items of the job $1 were registered (to LISTEN REGISTERED_CHANNEL),
#: naming the ledger's schema too (a JSON array): notifications are the database's, and the
#: runners of a job of the same name in another schema were woken by them.
NOTIFY_REGISTERED = (
    "SELECT pg_notify('asyncbatch_registered', json_build_array(current_schema(), $1::text)::text)"
)
#: The ledger's schema (what NOTIFY_REGISTERED names).
CURRENT_SCHEMA = "SELECT current_schema()"
#: Mark the listing complete: $4 files found, $5 done and $6 dead of them not registered, $7
#: its twins (see LISTING_TWINS), $8 the files it left out not ready yet (Listing.not_ready).
LISTING_END = f"""
UPDATE listers SET complete = generation, listed_at = {NOW}, listed_files = $4,
                   found_done = found_done + $5, found_dead = found_dead + $6, twins = $7,
                   not_ready = $8
WHERE {_HOLDER}
RETURNING job
"""
#: The found files and those left out not ready yet of the complete listing numbered $2 (no
#: row when it is not the last complete one), locked for their update
#: (Ledger.listing_changed).
LISTING_COUNTS = (
    "SELECT listed_files, not_ready FROM listers WHERE job = $1 AND complete = $2 FOR UPDATE"
)
LISTING_CHANGED = (
    "UPDATE listers SET listed_files = $3, not_ready = $4 WHERE job = $1 AND complete = $2"
)
#: The files of the complete listing numbered $2 (no row when it is not the last complete
#: one) not queued for having the bytes of one it queued (identity "content"): a
#: JSON object, the number of such files by key; NULL: none.
LISTING_TWINS = "SELECT twins FROM listers WHERE job = $1 AND complete = $2"
LISTING_EXTEND = f"""
UPDATE listers SET lease_until = {NOW} + $4::float8 WHERE {_HOLDER} RETURNING job
"""
LISTING_RELEASE = "UPDATE listers SET lease_until = NULL WHERE job = $1 AND owner = $2"
#: The job's ($1) items by state, and of each state how many runners other than $2 finished
#: at or after $3 (server clock; what a shared runner's report counts as finished before:
#: done and dead).
FINISH_COUNTS = """
SELECT state, count(*),
       count(*) FILTER (WHERE runner IS DISTINCT FROM $2 AND finished_at >= $3::float8)
FROM items WHERE job = $1 GROUP BY state
"""
#: Whether the job ($1) has files queued, an item pending or failed, or one running among its
#: $2 newest items by key (see Ledger.work_left).
WORK_LEFT = """
SELECT EXISTS (SELECT 1 FROM queued WHERE job = $1)
    OR EXISTS (SELECT 1 FROM items WHERE job = $1 AND state IN ('pending', 'failed'))
    OR EXISTS (SELECT 1 FROM (SELECT state FROM items WHERE job = $1 ORDER BY key DESC
                              LIMIT $2) AS newest
               WHERE newest.state = 'running')
"""

# -- claims --------------------------------------------------------------------------------------

#: When a lease is replaced whose attempt started and never reached an outcome (the item is
#: still 'running': its lease ran out), the runner died, lost its lease or stalled during that
#: attempt: it is counted in ``interrupted`` as well as ``attempts``. (One put back, released or
#: reaped, was counted then; 'pending' here: a row an earlier version put back.)
_INTERRUPTED = (
    "(i.state IN ('running', 'pending') AND i.started_fence IS NOT DISTINCT FROM i.fence)::int"
)

#: Register a chunk of scanned entries and lease the claimable ones, in one statement.
#: $1 job, $2 owner, $3 lease (seconds); then arrays $4 keys, $5 relpaths, $6 sizes,
#: $7 mtimes (ns), $8 inodes (as signed 64-bit), with distinct keys.
#: New entries are inserted already leased (fence 1, no attempt yet); pending, vanished, due
#: failed and expired running entries are leased with the fence incremented (an attempt is
#: counted when it starts: see COMMIT_OUTCOMES). A conflicting row being written by another
#: transaction is waited for, then re-checked on its new version, so two runners never both
#: lease one item. Returns the leased rows as ClaimedRows, their LEASE_FIELDS in order (state
#: 'running'), and the other keys whose fate the statement's snapshot cannot
#: tell (anything but plainly done: held, failed, dead, done with a post action, or a row that
#: another runner committed while this statement waited) as (key, 'check', NULL...):
#: CLAIM_CHECK reads those in a statement of its own. A fresh inbox (all leased) or a resume
#: (all done) needs no second statement.
CLAIM_SCANNED = f"""
WITH claimed AS (
INSERT INTO items AS i (job, key, relpath, size, mtime_ns, inode, state, attempts, owner,
                        fence, lease_until, created_at, updated_at)
SELECT $1, r.key, r.relpath, r.size, r.mtime_ns, r.inode, 'running', 0, $2, 1,
       {NOW} + $3::float8, {NOW}, {NOW}
FROM unnest($4::text[], $5::bytea[], $6::int8[], $7::int8[], $8::int8[])
     AS r(key, relpath, size, mtime_ns, inode)
-- Rows the claim would not lease anyway (finished, or leased to a live runner) are left out
-- before the insert: ON CONFLICT locks a conflicting row (a heap write and a WAL record)
-- before it checks its WHERE. A row that changes after this read still meets the unchanged
-- guard below. (benchmarks/PG_PROFILE.md, #3 and #4)
WHERE NOT EXISTS (
    SELECT 1 FROM items d
    WHERE d.job = $1 AND d.key = r.key
      AND (d.state IN ('done', 'dead') OR (d.state = 'running' AND d.lease_until >= {NOW})))
ON CONFLICT (job, key) DO UPDATE SET
    state = 'running', owner = excluded.owner, fence = i.fence + 1,
    lease_until = excluded.lease_until,
    relpath = excluded.relpath, size = excluded.size, mtime_ns = excluded.mtime_ns,
    inode = excluded.inode, updated_at = excluded.updated_at,
    interrupted = i.interrupted + {_INTERRUPTED}
WHERE i.state IN ('pending', 'vanished')
   OR (i.state = 'failed' AND i.next_attempt_at <= {NOW})
   OR (i.state = 'running' AND i.lease_until < {NOW})
RETURNING {", ".join(f"i.{name}" for name in LEASE_FIELDS)}
)
SELECT {", ".join(LEASE_FIELDS)} FROM claimed
UNION ALL
SELECT r.key, 'check', NULL, NULL, NULL, NULL
FROM unnest($4::text[]) AS r(key)
WHERE r.key NOT IN (SELECT key FROM claimed)
  AND NOT EXISTS (SELECT 1 FROM items d WHERE d.job = $1 AND d.key = r.key
                                       AND d.state = 'done' AND d.post_action IS NULL)
"""
#: The keys of a chunk that a claim did not lease ($1 job, $2 keys, $3 owner): every row but
#: the plainly done ones, as ClaimedRows. 'running': leased to $3 after all (a claim whose
#: commit was lost with its connection, then run again); 'held': another runner's (or being
#: taken by one); 'failed': a retry not due yet; 'dead'; done rows whose post-commit action may
#: still be due, with the file that was handled.
CLAIM_CHECK = """
SELECT key, CASE WHEN state = 'running' AND owner = $3 THEN 'running'
                 WHEN state IN ('running', 'pending', 'vanished') THEN 'held' ELSE state END
           AS state,
       fence, attempts, interrupted, post_action, relpath, size, mtime_ns, inode
FROM items
WHERE job = $1 AND key = ANY($2::text[]) AND (state <> 'done' OR post_action IS NOT NULL)
"""

#: Lease items waiting in the ledger (not found by this scan): retries, reaped, operator-retried.
#: $1 job, $2 owner, $3 lease (seconds), $4 limit, $5 keys left alone (files the run found not
#: settled yet). The oldest (mtime_ns, relpath) first; rows
#: another transaction has locked (being claimed by another runner) are skipped, not waited
#: for, so concurrent runners take disjoint sets without queueing behind each other.
CLAIM_WAITING = f"""
WITH waiting AS (
    SELECT key FROM items
    WHERE job = $1 AND state IN ('pending', 'failed')
      AND (state = 'pending' OR next_attempt_at <= {NOW})
      AND NOT (key = ANY($5::text[])){{after}}
    ORDER BY mtime_ns, relpath
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE items AS i SET state = 'running', owner = $2, fence = i.fence + 1,
                          lease_until = {NOW} + $3::float8, updated_at = {NOW},
                          interrupted = i.interrupted + {_INTERRUPTED}
    FROM waiting
    WHERE i.job = $1 AND i.key = waiting.key
    RETURNING {", ".join(f"i.{name}" for name in ClaimedRow.columns())}
)
SELECT {", ".join(ClaimedRow.columns())} FROM claimed ORDER BY mtime_ns, relpath
"""
#: The same, of the items after a place in claim order only, $6 its mtime_ns, $7 its relpath:
#: a claim that goes on from where the last one ended. A statement of its own, not an
#: "$6 IS NULL OR ..." in the one above: a prepared statement's generic plan would check
#: that condition row by row instead of starting the index scan there (measured: 90,000 rows
#: filtered, 14 ms a claim, against 0.08 ms).
CLAIM_WAITING_AFTER = CLAIM_WAITING.replace(
    "{after}", "\n      AND (mtime_ns, relpath) > ($6::bigint, $7::bytea)"
)
CLAIM_WAITING = CLAIM_WAITING.replace("{after}", "")
#: Seconds from the server's now until the earliest failed item is due (may be negative).
NEXT_RETRY_IN = f"""
SELECT min(next_attempt_at) - {NOW} FROM items
WHERE job = $1 AND state = 'failed'
"""

# -- outcomes ------------------------------------------------------------------------------------

#: A group of outcomes, and of attempts that started and still run, in one statement.
#: $1 job, $2 owner; arrays (one entry per item, distinct keys) $3 keys, $4 fences, $5 states
#: (NULL: the attempt started and still runs), $6 errors, $7 retry delays in seconds (NULL:
#: none), $8 post actions, $9 sizes, $10 mtimes, $11 inodes (of a file handled that was not
#: the scanned one; NULL: unchanged), $12 attempted (false: not an attempt, given up on
#: without running or found vanished; its joblog has no start then, the runner that recorded it),
#: $13 when the attempt started, as seconds from now (NULL: not known; the start noted when
#: the attempt was first seen running, else now). The joblog: an outcome sets finished_at
#: and the runner; an attempt seen running for the first time, started_at (and clears
#: finished_at: the previous attempt's).
#: Only rows still leased to us under the same fence change. An attempt is counted once per
#: lease: when it is seen started or finished, whichever first (``started_fence`` remembers
#: the lease it was counted for), so a runner that dies during an attempt has used it up. A
#: failed attempt keeps the row's post action (ctx.move()'s 'moved...' record). Returns (key,
#: whether it was an outcome) of the rows changed: an outcome key not returned lost its lease.
COMMIT_OUTCOMES = f"""
UPDATE items AS i
SET state = coalesce(o.state, i.state),
    lease_until = CASE WHEN o.state IS NULL THEN i.lease_until END,
    next_attempt_at = CASE WHEN o.state IS NULL THEN i.next_attempt_at
                           ELSE {NOW} + o.delay END,
    last_error = CASE WHEN o.state IS NULL THEN i.last_error ELSE o.error END,
    post_action = CASE WHEN o.state IS NULL OR o.state = 'failed' THEN i.post_action
                       ELSE o.post_action END,
    size = coalesce(o.size, i.size), mtime_ns = coalesce(o.mtime_ns, i.mtime_ns),
    inode = coalesce(o.inode, i.inode),
    updated_at = CASE WHEN o.state IS NULL THEN i.updated_at ELSE {NOW} END,
    done_at = CASE WHEN o.state = 'done' THEN {NOW} ELSE i.done_at END,
    attempts = i.attempts + (o.attempted AND i.started_fence IS DISTINCT FROM i.fence)::int,
    started_fence = CASE WHEN o.attempted THEN i.fence ELSE i.started_fence END,
    started_at = CASE
        WHEN NOT o.attempted THEN NULL  -- not an attempt (given up on, vanished): no start
        WHEN o.state IS NULL THEN {NOW}
        ELSE coalesce({NOW} + o.started,
                      CASE WHEN i.started_fence IS NOT DISTINCT FROM i.fence THEN i.started_at END,
                      {NOW}) END,
    finished_at = CASE WHEN o.state IS NULL THEN NULL ELSE {NOW} END,
    runner = $2
FROM unnest($3::text[], $4::int8[], $5::text[], $6::text[], $7::float8[], $8::text[],
            $9::int8[], $10::int8[], $11::int8[], $12::bool[], $13::float8[])
     AS o(key, fence, state, error, delay, post_action, size, mtime_ns, inode, attempted,
          started)
WHERE i.job = $1 AND i.key = o.key AND i.owner = $2
  AND i.fence = o.fence AND i.state = 'running'
  AND (o.state IS NOT NULL OR i.started_fence IS DISTINCT FROM i.fence)
RETURNING i.key, o.state IS NOT NULL
"""
#: Who holds these items ($2 keys) of the job ($1) now: after a commit that did not update them
#: all (``key, owner, fence, state``).
LEASE_STATE = "SELECT key, owner, fence, state FROM items WHERE job = $1 AND key = ANY($2::text[])"
#: $1 job, $2 owner; arrays $3 keys, $4 fences. Attempts were counted when they started, so
#: nothing is undone. A released item waits again as it was leased: a retry (its retry time
#: set: leased 'failed', and due; only a failed outcome sets it, any other outcome and
#: ``retry`` clear it) stays 'failed', attempts and last error kept; any other, 'pending'.
RELEASE_ITEMS = f"""
UPDATE items AS i
SET state = CASE WHEN i.next_attempt_at IS NULL THEN 'pending' ELSE 'failed' END,
    owner = NULL, lease_until = NULL, updated_at = {NOW},
    interrupted = i.interrupted + (i.started_fence IS NOT DISTINCT FROM i.fence)::int,
    started_fence = NULL
FROM unnest($3::text[], $4::int8[]) AS r(key, fence)
WHERE i.job = $1 AND i.key = r.key AND i.owner = $2
  AND i.fence = r.fence AND i.state = 'running'
"""
#: The leases of a runner ($1 job, $2 owner) that it does not know of: not among the keys
#: ($3) it holds. A claim whose commit went through but whose reply was lost with the
#: connection (the session ran it again, and that run leased other items) leaves such rows;
#: nobody else takes a lease of a live runner over, so those whose lease ran out are put back
#: (an item leased since the runner listed its keys has a fresh lease: left alone).
RELEASE_UNKNOWN_LEASES = f"""
WITH released AS (
    UPDATE items SET state = 'pending', owner = NULL, lease_until = NULL, updated_at = {NOW},
                     {_COUNT_INTERRUPTED}
    WHERE job = $1 AND owner = $2 AND state = 'running' AND NOT key = ANY($3::text[])
      AND lease_until < {NOW}
    RETURNING 1
)
SELECT count(*) FROM released
"""
#: Whether a runner ($1 job, $2 owner) still holds leases it does not know of ($3 its keys).
UNKNOWN_LEASES_LEFT = """
SELECT EXISTS (SELECT 1 FROM items WHERE job = $1 AND owner = $2 AND state = 'running'
                                     AND NOT key = ANY($3::text[]))
"""
#: $1 job, $2 owner, $3 lease (seconds); arrays $4 keys, $5 fences.
EXTEND_LEASES = f"""
UPDATE items AS i SET lease_until = {NOW} + $3::float8
FROM unnest($4::text[], $5::int8[]) AS l(key, fence)
WHERE i.job = $1 AND i.key = l.key AND i.owner = $2
  AND i.fence = l.fence AND i.state = 'running'
RETURNING i.key
"""
#: ctx.move() records where the input goes before moving it: a retry after a crash finds it.
#: $1 job, $2 key, $3 owner, $4 fence, $5 post action.
RECORD_MOVE = f"""
UPDATE items SET post_action = $5, updated_at = {NOW}
WHERE job = $1 AND key = $2 AND owner = $3 AND fence = $4 AND state = 'running'
RETURNING key
"""

#: Planner statistics for the item lookups (see PostgresLedger._analyze).
ANALYZE_ITEMS = "ANALYZE items"
#: The rows of ``items`` as its statistics last counted them (``reltuples``: -1 or 0 when
#: never analyzed) and as the server counts them now (``n_live_tup``, lagging by up to about
#: a second; 0 without ``track_counts``).
ITEMS_ROWS = """
SELECT c.reltuples::float8, coalesce(s.n_live_tup, 0)::float8
FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.oid = 'items'::regclass
"""

#: Pages of ``items`` at which runners sharing a job first analyze it (about 2,000 items).
FIRST_ANALYZE_PAGES: Final = 64
#: Whether ``items`` has grown to four times the pages its statistics last counted (and to
#: at least $1 pages): its size now, not a count that lags (see PostgresLedger._analyze_grown).
_ITEMS_GROWN = """
pg_relation_size(c.oid)
    >= greatest(4 * c.relpages::int8, $1::int8) * current_setting('block_size')::int8
"""
ANALYZE_DUE = f"SELECT {_ITEMS_GROWN} FROM pg_class c WHERE c.oid = 'items'::regclass"
#: ANALYZE_DUE, and the transaction's lock on analyzing the ledger's ``items`` taken if
#: nobody holds it (false: another runner is analyzing, or the table has not grown).
ANALYZE_TAKE = f"""
SELECT {_ITEMS_GROWN}
   AND pg_try_advisory_xact_lock(hashtext('asyncbatch analyze ' || current_schema())::int8)
FROM pg_class c WHERE c.oid = 'items'::regclass
"""

# -- reading -------------------------------------------------------------------------------------

COUNTS = "SELECT state, count(*) FROM items WHERE job = $1 GROUP BY state"
#: An item's full record (ItemInfo; times the server's), with its runner's pid and host from
#: the run history (runs_owner).
_ITEM_COLUMNS = ", ".join(ItemInfo.columns())
ITEM_BY_KEY = f"SELECT {_ITEM_COLUMNS} FROM items WHERE job = $1 AND key = $2"
ITEMS_BY_RELPATH = f"SELECT {_ITEM_COLUMNS} FROM items WHERE job = $1 AND relpath = $2"
ACTIONS_DUE = f"""
SELECT {_ITEM_COLUMNS} FROM items
WHERE job = $1 AND key = ANY($2::text[]) AND state IN ('done', 'dead')
  AND post_action IS NOT NULL
"""
FAILURES = f"""
SELECT {_ITEM_COLUMNS} FROM items WHERE job = $1 AND state IN ('failed', 'dead')
ORDER BY updated_at DESC LIMIT $2
"""


def list_items(
    which: ItemFilter, *, count: bool = False, keyset: bool = False
) -> tuple[str, list[str]]:
    """The statement listing (or counting) the items ``which`` selects, and the names of its
    parameters after ``$1`` job, in order: ``states`` (text[]), ``after``/``before``
    (server times), ``glob`` (a regular expression), ``limit``; with ``keyset``, first
    ``after_u``/``after_k``: a keyset page's start (the ``updated_at``, server time, and key
    the items listed sort after)."""
    where = ["job = $1"]
    names: list[str] = []

    def param(name: str) -> str:
        names.append(name)
        return f"${len(names) + 1}"

    if keyset:
        u, k = param("after_u"), param("after_k")
        where.append(f"(updated_at < {u}::float8 OR (updated_at = {u}::float8 AND key > {k}))")

    if which.states:
        where.append(f"state = ANY({param('states')}::text[])")
    column = "updated_at" if which.time == "updated" else "finished_at"
    if which.after is not None:
        where.append(f"{column} >= {param('after')}::float8")
    if which.before is not None:
        where.append(f"{column} < {param('before')}::float8")
    if which.glob is not None:
        where.append(f"convert_from(relpath, 'LATIN1') ~ ('^(?:' || {param('glob')} || ')$')")
    if count:
        return f"SELECT count(*) FROM items WHERE {' AND '.join(where)}", names
    query = f"SELECT {_ITEM_COLUMNS} FROM items WHERE {' AND '.join(where)}"
    query += " ORDER BY updated_at DESC, key"
    if which.limit is not None:
        query += f" LIMIT {param('limit')}"
    return query, names


#: Forgetting items, in one transaction. $1 job, $2 keys: their rows, locked, with the
#: server's time (``now``, to judge their leases by).
#: The states of some items: $1 job, $2 keys.
STATES_OF = "SELECT key, state FROM items WHERE job = $1 AND key = ANY($2::text[])"
FORGET_READ = f"""
SELECT {_ITEM_COLUMNS}, {NOW} AS now FROM items WHERE job = $1 AND key = ANY($2::text[])
ORDER BY key FOR UPDATE
"""
#: $1 job, $2 keys.
FORGET_KEYS = "DELETE FROM items WHERE job = $1 AND key = ANY($2::text[])"
#: $1 job, $2 the server time before which the items were done: their rows, then the delete.
_DONE_BEFORE = "job = $1 AND state = 'done' AND coalesce(finished_at, done_at) < $2::float8"
FORGET_READ_DONE_BEFORE = (
    f"SELECT {_ITEM_COLUMNS} FROM items WHERE {_DONE_BEFORE} ORDER BY key FOR UPDATE"
)
FORGET_DONE_BEFORE = f"DELETE FROM items WHERE {_DONE_BEFORE}"
#: A chunk of a chunked forget, its rows locked: $1 job, $2 the key it starts after, $3 how
#: many; then ``FORGET_PAGE_DONE`` $4 the server time before which the items were done.
_FORGET_PAGE = f"SELECT {_ITEM_COLUMNS} FROM items WHERE job = $1 AND key > $2 AND {{}} "
_FORGET_PAGE += "ORDER BY key LIMIT $3 FOR UPDATE"
FORGET_PAGE_DONE = _FORGET_PAGE.format(
    "state = 'done' AND coalesce(finished_at, done_at) < $4::float8"
)
FORGET_PAGE_VANISHED = _FORGET_PAGE.format("state = 'vanished'")
#: Taken ($1 job) before a transaction adds to the job's log of names to look at again, and
#: held to its end: the job's entries then commit in the order of their numbers, which a
#: watch following the log relies on (it remembers the newest number it read). Without it,
#: an entry numbered 11 could commit after a watch had read 12 and moved past 11 for good.
#: The lock is released after the commit is visible to every new snapshot, so a snapshot
#: that holds an entry holds every entry of the job numbered before it (or never will).
FORGOTTEN_LOCK = """
SELECT pg_advisory_xact_lock(hashtext('asyncbatch.forgotten:' || current_schema()), hashtext($1))
"""
#: The forgotten items' names, for watches under way: $1 job, $2 relpaths; the entries older
#: than FORGOTTEN_PRUNE's $1 seconds (server clock) are pruned (no watch lags that far behind).
FORGOTTEN_ADD = f"""
INSERT INTO forgotten (job, relpath, at) SELECT $1, r, {NOW} FROM unnest($2::bytea[]) AS r
"""
FORGOTTEN_PRUNE = f"DELETE FROM forgotten WHERE at < {NOW} - $1::float8"
#: The job's newest entry's number (0: none); the job's entries after $2 ($1 job). The
#: newest of the job's, not of the whole log: another job's entries are not ordered with
#: this job's (their writers take another lock).
FORGOTTEN_LAST = "SELECT coalesce(max(seq), 0) FROM forgotten WHERE job = $1"
FORGOTTEN_SINCE = "SELECT seq, relpath FROM forgotten WHERE job = $1 AND seq > $2 ORDER BY seq"
OLDEST_WAITING = """
SELECT min(created_at) FROM items WHERE job = $1 AND state IN ('pending', 'failed')
"""
#: Where ctx.move() took (or was taking) inputs of unfinished items: ``moved...`` actions.
MOVE_DESTINATIONS = """
SELECT DISTINCT post_action FROM items WHERE job = $1 AND substr(post_action, 1, 5) = 'moved'
"""
_RETRY = f"""
WITH reset AS (
    UPDATE items SET state = 'pending', attempts = 0, interrupted = 0, started_fence = NULL,
                     next_attempt_at = NULL, owner = NULL, lease_until = NULL,
                     updated_at = {NOW}
    WHERE job = $1 AND state = ANY($2::text[]){{}}
    RETURNING 1
)
SELECT count(*) FROM reset
"""
#: $1 job, $2 states to reset. Returns how many items were reset.
RETRY_ALL = _RETRY.format("")
#: $1 job, $2 states to reset, $3 keys. Returns how many items were reset.
RETRY_KEYS = _RETRY.format(" AND key = ANY($3::text[])")

# -- runs ----------------------------------------------------------------------------------------

#: $1 job, $2 owner, $3 pid, $4 host, $5 mode. Returns the run's id.
#: $1 job, $2 owner, $3 pid, $4 host, $5 mode, $6 the scan rules this run changed (or NULL).
RUN_START = f"""
INSERT INTO runs (job, owner, pid, host, mode, started_at, settings_changed)
VALUES ($1, $2, $3, $4, $5, {NOW}, $6)
RETURNING id
"""


def _set_totals(first: int) -> str:
    return ", ".join(f"{column} = ${first + i}" for i, column in enumerate(TOTALS))


#: $1 id, $2 exit status, $3... the run's totals (TOTALS, in order).
RUN_FINISH = f"""
UPDATE runs SET finished_at = {NOW}, exit_status = $2, {_set_totals(3)}
WHERE id = $1
"""
#: The counts of a live run, as of its heartbeat: $1 id, $2... the totals.
RUN_PROGRESS = f"UPDATE runs SET {_set_totals(2)} WHERE id = $1 AND finished_at IS NULL"
_JOBLOG_STATES = ", ".join(f"'{state}'" for state in JOBLOG_COUNTS)
#: The runs of a runner that is gone ($1 job, $2 owner): killed or lost ($3; see
#: ``end_of_gone``), finished at its last heartbeat. Its ``seen`` is kept at least what the
#: ledger shows it touched (as ``RunInfo.with_joblog`` counts it): the items it finished,
#: those it still holds leased (put back right after, when their owner is forgotten), and its
#: other categories as of its last heartbeat.
RUN_KILLED = f"""
UPDATE runs r SET finished_at = coalesce(
        (SELECT heartbeat_at FROM runners WHERE owner = $2), extract(epoch FROM now())::float8),
    exit_status = $3,
    seen = greatest(seen, {" + ".join(SAVED_CATEGORIES)} + (
        SELECT count(*) FROM items
        WHERE job = $1 AND (state IN ({_JOBLOG_STATES}) AND runner = $2
                            OR state = '{IN_FLIGHT}' AND owner = $2)))
WHERE job = $1 AND owner = $2 AND finished_at IS NULL
"""
#: What runners finished (the joblog), and what they hold leased (as ``'running'``, by its
#: ``owner``): $1 job, $2 their owners. One read of the job's items.
FINISHED_BY = f"""
SELECT CASE WHEN state = '{IN_FLIGHT}' THEN owner ELSE runner END AS who, state, count(*)
FROM items
WHERE job = $1 AND (state IN ({_JOBLOG_STATES}) AND runner = ANY($2::text[])
                    OR state = '{IN_FLIGHT}' AND owner = ANY($2::text[]))
GROUP BY who, state
"""
RUNS_OF_JOB = f"""
SELECT {", ".join(RunInfo.columns())}
FROM runs WHERE job = $1 ORDER BY started_at DESC, id DESC LIMIT $2
"""

# -- idempotency keys (receiving side) -----------------------------------------------------------
# As in the SQLite ledger: while a row is 'running' or 'started', ``headers`` holds its request's
# owner token; a 'done' row holds the stored response, an 'unstored' row in ``headers`` why it
# has none. Lock and expiry times are the server's.

#: $1 scope, $2 key, $3 fingerprint, $4 token, $5 lock timeout, $6 ttl. A row when inserted;
#: a concurrent insert of the same key waits for the first to commit, then inserts nothing.
IDEMPOTENCY_INSERT = f"""
INSERT INTO idempotency_keys
    (scope, key, fingerprint, state, headers, created_at, locked_until, expires_at)
VALUES ($1, $2, $3, 'running', $4, {NOW}, {NOW} + $5::float8, {NOW} + $6::float8)
ON CONFLICT (scope, key) DO NOTHING
RETURNING 1
"""
#: The record of $1 scope, $2 key (IdempotencyRecord), locked for this transaction, and the
#: server's time (``now``).
IDEMPOTENCY_GET = f"""
SELECT {", ".join(IdempotencyRecord.columns())}, {NOW} AS now
FROM idempotency_keys WHERE scope = $1 AND key = $2 FOR UPDATE
"""
#: Take over an expired or abandoned record: $1 scope, $2 key, $3 fingerprint, $4 token,
#: $5 lock timeout, $6 ttl.
IDEMPOTENCY_TAKE_OVER = f"""
UPDATE idempotency_keys
SET fingerprint = $3, state = 'running', status = NULL, headers = $4, body = NULL,
    created_at = {NOW}, locked_until = {NOW} + $5::float8, expires_at = {NOW} + $6::float8
WHERE scope = $1 AND key = $2
"""
#: $1 scope, $2 key, $3 token. A row when marked.
IDEMPOTENCY_START = """
UPDATE idempotency_keys SET state = 'started'
WHERE scope = $1 AND key = $2 AND state IN ('running', 'started') AND headers = $3
RETURNING 1
"""
#: $1 scope, $2 key, $3 token, $4 status, $5 headers, $6 body, $7 ttl. A row when stored.
IDEMPOTENCY_COMPLETE = f"""
UPDATE idempotency_keys
SET state = 'done', status = $4, headers = $5, body = $6, locked_until = {NOW},
    expires_at = {NOW} + $7::float8
WHERE scope = $1 AND key = $2 AND state IN ('running', 'started') AND headers = $3
RETURNING 1
"""
#: $1 scope, $2 key, $3 token, $4 reason, $5 ttl. A row when recorded.
IDEMPOTENCY_UNSTORED = f"""
UPDATE idempotency_keys
SET state = 'unstored', status = NULL, headers = $4, body = NULL, locked_until = {NOW},
    expires_at = {NOW} + $5::float8
WHERE scope = $1 AND key = $2 AND state IN ('running', 'started') AND headers = $3
RETURNING 1
"""
IDEMPOTENCY_RELEASE = """
DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND state = 'running' AND headers = $3
"""
#: How many expired records were deleted.
IDEMPOTENCY_PURGE = f"""
WITH gone AS (DELETE FROM idempotency_keys WHERE expires_at < {NOW} RETURNING 1)
SELECT count(*) FROM gone
"""
