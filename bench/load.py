"""Load benchmark: a live API under concurrent submissions, idempotent retries and polling.

It starts the API alone (no worker, so jobs stay PENDING and only the API and its database are
measured), uploads one checkpoint and one dataset, then at once sends ``--submissions`` job
creations, each with its own Idempotency-Key and half of them sent twice (some retries race
their original), while ``--pollers`` clients read random jobs and walk the job list for
``--seconds``. It then checks, through the API and straight in the database, the three things a
client must be able to rely on: no key made two jobs, no accepted job went missing, and no
request got a 5xx. The exit status is 1 when any of the three is not zero.

    .venv/bin/python bench/load.py [--seconds 60] [--submissions 200] [--pollers 50]
    .venv/bin/python bench/load.py --database-url postgresql://postgres@127.0.0.1:5432/test \\
        --broker-url redis://127.0.0.1:6379/15
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table
from safetensors.numpy import save
from sqlalchemy import func, select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.db import engine_for
from service.local import start_server, stop_server
from service.models import IdempotencyRecord, Job
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
TENANT = "load"
OPERATIONS = ("submit", "retry", "poll", "list")


@dataclass
class Stats:
    """Everything the run saw, kept per operation so one slow path cannot hide in a total."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    # Requests that got no HTTP answer at all count with the 5xx: the client cannot tell apart.
    no_answer: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    ids_by_key: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    accepted: set[str] = field(default_factory=set)

    def record(self, op: str, started: float, response: httpx.Response | None, note: str) -> None:
        self.latencies[op].append(time.perf_counter() - started)
        if response is None:
            self.no_answer[op] += 1
            self.server_errors.append(f"{op}: no answer ({note})")
            return
        self.statuses[op][response.status_code] += 1
        if response.status_code >= 500:
            self.server_errors.append(f"{op}: {response.status_code} {response.text[:300]}")

    def count_5xx(self) -> int:
        answered = sum(n for c in self.statuses.values() for s, n in c.items() if s >= 500)
        return answered + sum(self.no_answer.values())


# Inputs ---------------------------------------------------------------------------------------


def checkpoint_bytes() -> bytes:
    """Small but real: the API parses the safetensors header before it accepts a job."""
    return save({"w": np.zeros((2, 2), dtype=np.float32)})


def dataset_bytes() -> bytes:
    """The smallest set the API accepts: two classes of three decodable images."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for folder in ("cat", "dog"):
            for index in range(3):
                image = io.BytesIO()
                Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(image, "PNG")
                archive.writestr(f"{folder}/{index}.png", image.getvalue())
    return buffer.getvalue()


# The server -------------------------------------------------------------------------------------


def cli(env: dict[str, str], *args: str) -> str:
    """The operator's own commands, so the bench sets up exactly what a deployment would."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli.main", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"antidote {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def reset_database(settings: Settings) -> None:
    """A fresh schema, so that the job count in the database is the run's alone."""
    if settings.database.startswith("postgresql"):
        with engine_for(settings.database).begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))


@contextmanager
def api_server(env: dict[str, str], log: Path) -> Iterator[str]:
    """``antidote serve --api-only`` in its own process group; yields its URL once ready."""
    server = start_server(env, log, api_only=True)
    try:
        yield server.url
    finally:
        stop_server(server)


# The load ---------------------------------------------------------------------------------------


async def timed(
    client: httpx.AsyncClient, stats: Stats, op: str, method: str, url: str, **kwargs: Any
) -> httpx.Response | None:
    started = time.perf_counter()
    try:
        response = await client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        stats.record(op, started, None, f"{type(exc).__name__}: {exc}")
        return None
    stats.record(op, started, response, "")
    return response


async def submit(
    client: httpx.AsyncClient, stats: Stats, op: str, key: str, body: dict[str, Any]
) -> None:
    response = await timed(
        client, stats, op, "POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}
    )
    if response is not None and response.status_code == 202:
        job_id = str(response.json()["id"])
        stats.ids_by_key[key].add(job_id)
        stats.accepted.add(job_id)


async def submission(
    client: httpx.AsyncClient, stats: Stats, index: int, run: str, body: dict[str, Any]
) -> None:
    """Every other key is sent twice; of those, half race the original and half follow it."""
    key = f"{run}-{index:05d}"
    if index % 4 == 1:
        await asyncio.gather(
            submit(client, stats, "submit", key, body), submit(client, stats, "retry", key, body)
        )
        return
    await submit(client, stats, "submit", key, body)
    if index % 4 == 3:
        await submit(client, stats, "retry", key, body)


async def poller(
    client: httpx.AsyncClient, stats: Stats, deadline: float, rng: random.Random
) -> None:
    """Mostly reads one job, like a client waiting on it; sometimes walks the job list."""
    token: str | None = None
    while time.perf_counter() < deadline:
        known = sorted(stats.accepted)
        if known and rng.random() < 0.75:
            await timed(client, stats, "poll", "GET", f"/v1/jobs/{rng.choice(known)}")
            continue
        params: dict[str, str | int] = {"page_size": 50}
        if token:
            params["page_token"] = token
        response = await timed(client, stats, "list", "GET", "/v1/jobs", params=params)
        token = None
        if response is not None and response.status_code == 200:
            token = response.json().get("next_page_token")


async def run_load(
    url: str, key: str, args: argparse.Namespace, stats: Stats
) -> tuple[float, list[str]]:
    """Returns the seconds the load ran and every job id the API lists afterwards."""
    # Idle connections expire on our side well before uvicorn drops them (5 s): reusing one the
    # server is closing at that moment fails with no answer, which is the client's doing.
    limits = httpx.Limits(
        max_connections=args.connections, max_keepalive_connections=32, keepalive_expiry=2.0
    )
    # The pool wait is part of what a client sees, so it is inside the measured latency.
    timeout = httpx.Timeout(args.timeout, pool=None)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        files: dict[str, str] = {}
        for name, content in (
            ("checkpoint_file", checkpoint_bytes()),
            ("dataset_file", dataset_bytes()),
        ):
            response = await client.put("/v1/files", content=content)
            response.raise_for_status()
            files[name] = str(response.json()["id"])
        body = {**files, "model": "ViT-B-32"}
        # The first validation imports the engine's models (seconds); an unknown model name
        # pays for that without creating a job, so the run measures a warm API.
        warm = await client.post("/v1/jobs", json={**body, "model": "not-a-model"})
        if warm.status_code != 422:
            raise RuntimeError(f"warm-up expected 422, got {warm.status_code}: {warm.text}")
        run = uuid.uuid4().hex[:8]
        rng = random.Random(args.seed)
        started = time.perf_counter()
        deadline = started + args.seconds
        await asyncio.gather(
            *(submission(client, stats, i, run, body) for i in range(args.submissions)),
            *(
                poller(client, stats, deadline, random.Random(rng.random()))
                for _ in range(args.pollers)
            ),
        )
        elapsed = time.perf_counter() - started
        listed: list[str] = []
        token: str | None = None
        while True:
            params: dict[str, str | int] = {"page_size": 100}
            if token:
                params["page_token"] = token
            response = await client.get("/v1/jobs", params=params)
            response.raise_for_status()
            page = response.json()
            listed.extend(str(job["id"]) for job in page["jobs"])
            token = page["next_page_token"]
            if not token:
                return elapsed, listed


# Verification and report -----------------------------------------------------------------------


@dataclass
class Verdict:
    duplicate_keys: int
    lost: int
    unaccepted_keys: int
    server_errors: int
    listed: int
    listed_twice: int
    db_jobs: int
    db_keys: int
    db_orphans: int

    @property
    def ok(self) -> bool:
        return self.duplicate_keys == 0 and self.lost == 0 and self.server_errors == 0


def verify(settings: Settings, stats: Stats, listed: list[str], submissions: int) -> Verdict:
    """The API's view (every response, the whole listing) and the database's, side by side."""
    split_keys = sum(1 for ids in stats.ids_by_key.values() if len(ids) != 1)
    listed_set = set(listed)
    with engine_for(settings.database).connect() as connection:
        stored = set(connection.execute(select(Job.id).where(Job.tenant == TENANT)).scalars())
        db_keys = connection.execute(
            select(func.count(func.distinct(IdempotencyRecord.key))).where(
                IdempotencyRecord.tenant == TENANT
            )
        ).scalar_one()
        db_orphans = connection.execute(
            select(func.count())
            .select_from(Job)
            .where(
                Job.tenant == TENANT,
                Job.id.not_in(select(IdempotencyRecord.job_id)),
            )
        ).scalar_one()
    # A duplicate is any job beyond one per key, wherever it shows: a key answered with two ids,
    # more jobs listed or stored than keys, or a stored job that no key points at.
    duplicates = split_keys + max(0, len(listed_set) - len(stats.ids_by_key))
    duplicates += max(0, len(stored) - db_keys) + db_orphans
    return Verdict(
        duplicate_keys=duplicates,
        lost=len(stats.accepted - (listed_set & stored)),
        unaccepted_keys=submissions - len(stats.ids_by_key),
        server_errors=stats.count_5xx(),
        listed=len(listed),
        listed_twice=len(listed) - len(listed_set),
        db_jobs=len(stored),
        db_keys=db_keys,
        db_orphans=db_orphans,
    )


def millis(values: list[float], q: float) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0] * 1000:.1f}"
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return f"{cuts[round(q) - 1] * 1000:.1f}"


def report(console: Console, title: str, stats: Stats, elapsed: float, verdict: Verdict) -> None:
    table = Table(title=title)
    for column in ("operation", "requests", "2xx", "4xx", "5xx+none", "p50 ms", "p95 ms",
                   "p99 ms", "max ms"):  # fmt: skip
        table.add_column(column, justify="left" if column == "operation" else "right")
    everything: list[float] = []
    for op in (*OPERATIONS, "total"):
        if op == "total":
            values = everything
            codes: Counter[int] = sum(stats.statuses.values(), Counter())
            none = sum(stats.no_answer.values())
        else:
            values = stats.latencies[op]
            everything.extend(values)
            codes, none = stats.statuses[op], stats.no_answer[op]
        table.add_row(
            op,
            str(len(values)),
            str(sum(n for s, n in codes.items() if 200 <= s < 300)),
            str(sum(n for s, n in codes.items() if 400 <= s < 500)),
            str(sum(n for s, n in codes.items() if s >= 500) + none),
            millis(values, 50),
            millis(values, 95),
            millis(values, 99),
            f"{max(values) * 1000:.1f}" if values else "-",
            end_section=op == OPERATIONS[-1],
        )
    console.print(table)
    console.print(
        f"{len(everything)} requests in {elapsed:.1f} s: {len(everything) / elapsed:.0f} requests/s"
    )
    checks = Table(title="targets")
    checks.add_column("check")
    checks.add_column("found", justify="right")
    checks.add_column("target", justify="right")
    checks.add_column("")
    for name, value in (
        ("duplicate jobs", verdict.duplicate_keys),
        ("lost jobs", verdict.lost),
        ("5xx or unanswered", verdict.server_errors),
    ):
        checks.add_row(name, str(value), "0", "ok" if value == 0 else "MISSED")
    console.print(checks)
    console.print(
        f"keys accepted {len(stats.ids_by_key)} (never accepted {verdict.unaccepted_keys}), ids "
        f"{len(stats.accepted)}, listed {verdict.listed} ({verdict.listed_twice} twice); "
        f"database: jobs "
        f"{verdict.db_jobs}, keys {verdict.db_keys}, jobs without a key {verdict.db_orphans}"
    )
    for line in stats.server_errors[:10]:
        console.print(f"  {line}", markup=False)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="How long pollers run.")
    parser.add_argument("--submissions", type=int, default=200, help="Distinct job requests.")
    parser.add_argument("--pollers", type=int, default=50, help="Concurrent reading clients.")
    parser.add_argument("--connections", type=int, default=64, help="Client connection cap.")
    parser.add_argument("--timeout", type=float, default=120.0, help="Per-request seconds.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--database-url", help="e.g. postgresql://user@host/db (its schema is reset)"
    )
    parser.add_argument("--broker-url", help="e.g. redis://host:6379/15")
    parser.add_argument("--keep", type=Path, help="Keep the data and serve.log in this folder.")
    args = parser.parse_args()
    console = Console(width=132)

    with tempfile.TemporaryDirectory(prefix="antidote-load-") as temp:
        scratch = Path(args.keep or temp)
        scratch.mkdir(parents=True, exist_ok=True)
        data_dir = scratch / "var"
        env = {**os.environ, "ANTIDOTE_DATA_DIR": str(data_dir)}
        for name, value in (("DATABASE_URL", args.database_url), ("BROKER_URL", args.broker_url)):
            env.pop(f"ANTIDOTE_{name}", None)
            if value:
                env[f"ANTIDOTE_{name}"] = value
        settings = Settings(
            data_dir=data_dir, database_url=args.database_url, broker_url=args.broker_url
        )
        reset_database(settings)
        cli(env, "db", "upgrade")
        key = cli(env, "keys", "create", "--tenant", TENANT).strip().splitlines()[-1]
        stats = Stats()
        log = scratch / "serve.log"
        with api_server(env, log) as url:
            elapsed, listed = asyncio.run(run_load(url, key, args, stats))
        verdict = verify(settings, stats, listed, args.submissions)
        where = "PostgreSQL" if settings.database.startswith("postgresql") else "SQLite"
        broker = "Redis" if args.broker_url else "filesystem queue"
        title = (
            f"{args.submissions} submissions (half retried) + {args.pollers} pollers for "
            f"{args.seconds:.0f} s, API only, {where} + {broker}, {args.connections} connections"
        )
        report(console, title, stats, elapsed, verdict)
        if not verdict.ok:
            tracebacks = [line for line in log.read_text().splitlines() if "error" in line.lower()]
            for line in tracebacks[-5:]:
                console.print(f"  server: {line[:400]}", markup=False)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
