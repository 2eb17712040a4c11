"""Judging throughput of 1 `cai judge` worker process against N of them judging one round on
PostgreSQL, against the loopback judge server at a fixed latency L with C requests in flight per
worker: the judge is latency-bound, so N workers should judge close to N times as fast.

    python bench/workers.py [--pairs 480] [--workers 4] [--latency 0.5] [--concurrency 8] [--db URL]

Each run gets a fresh round in a fresh schema of the database (dropped afterwards), built through
the store by bench/judge_throughput.py's `build_round`; the server runs in a process of its own, as
there. The workers are real `cai judge` processes (`python -m cai`), so claims, round locks and
writes go through PostgreSQL as in production. Throughput is the rate of stored verdicts between
10% and 90% of the round's judgments, from the judgments table polled here: process start-up
(imports take seconds) and the tail are left out. CPU during that window is read from /proc: the
workers', the judge server's, and the whole machine's (other processes share its cores).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.judge_throughput import build_round, serve_loopback  # noqa: E402
from cai.judge_round import JudgeSpec  # noqa: E402
from cai.stages.settings import JudgeSettings  # noqa: E402
from cai.store import judges  # noqa: E402
from cai.store.db import session_scope  # noqa: E402
from cai.templates import TemplateSet  # noqa: E402

DEFAULT_DB = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MODEL = "fake-judge"
POLL_S = 0.1
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, all processes)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICKS


@dataclass
class Sample:
    t: float
    done: int
    total: int
    cpu_workers: float
    cpu_server: float
    cpu_machine: float


@dataclass
class Result:
    workers: int
    judgments: int
    rate: float
    window_judgments: int
    window_s: float
    first_verdict_s: float
    all_claiming_s: float | None
    wall_s: float
    cpu_workers: float
    cpu_server: float
    cpu_machine: float
    samples: list[Sample] = field(repr=False, default_factory=list)


def schema_url(db_url: str, schema: str) -> str:
    """`db_url` with every connection's search_path set to `schema` (libpq `options`)."""
    url = make_url(db_url).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def steady_window(samples: list[Sample]) -> tuple[Sample, Sample]:
    """The first samples at or past 10% and 90% done; a run too short to tell them apart uses the
    sample before the 10% one."""
    total = samples[-1].total
    first = next(i for i, s in enumerate(samples) if s.total and s.done >= 0.1 * total)
    last = next(i for i, s in enumerate(samples) if s.total and s.done >= 0.9 * total)
    if last == first:
        first = max(first - 1, 0)
    return samples[first], samples[last]


def run_workers(
    db_url: str, workers: int, pairs: int, base_url: str, concurrency: int, server_pid: int, logs: Path
) -> Result:
    schema = f"bench_workers_{os.getpid()}_{workers}"
    admin = create_engine(db_url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = schema_url(db_url, schema)
    engine: Engine | None = None
    processes: list[subprocess.Popen[bytes]] = []
    try:
        built = build_round(url, pairs)
        engine, round_id = cast(Engine, built[0]), built[1]
        # The judge the workers will be (build_round plans for another one), registered before
        # they start: workers that all register it at once race on uq_judges_config_sha256.
        settings = JudgeSettings(judge_base_url=base_url, judge_model=MODEL, concurrency=concurrency)
        spec = JudgeSpec("openai", MODEL, base_url, settings.identity_params())
        with session_scope(engine) as session:
            judge_id = judges.ensure_judge(session, spec.config("pairwise", TemplateSet()))
        poll = text(
            "SELECT count(*) FILTER (WHERE status = 'ok'), count(*),"
            " array_agg(DISTINCT claimed_by) FILTER (WHERE claimed_by IS NOT NULL)"
            " FROM judgments WHERE judge_id = :judge_id"
        )
        command = [
            sys.executable,
            "-m",
            "cai",
            "--db",
            url,
            "judge",
            "--round",
            str(round_id),
            "--judge-base-url",
            base_url,
            "--judge-model",
            MODEL,
            "--concurrency",
            str(concurrency),
        ]
        env = {**os.environ, "CAI_JUDGE_API_KEY": "bench"}
        samples: list[Sample] = []
        claimants: set[str] = set()
        all_claiming: float | None = None
        with engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            started = time.perf_counter()
            for index in range(workers):
                log = (logs / f"{workers}-{index}.log").open("wb")
                processes.append(
                    subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
                )
            cpu: dict[int, float] = {}
            while True:
                running = [p for p in processes if p.poll() is None]
                for p in running:
                    cpu[p.pid] = cpu_s(p.pid) or cpu.get(p.pid, 0.0)
                done, total, holders = connection.execute(poll, {"judge_id": judge_id}).one()
                now = time.perf_counter() - started
                samples.append(
                    Sample(now, done, total, sum(cpu.values()), cpu_s(server_pid), machine_busy_s())
                )
                claimants.update(holders or ())
                if all_claiming is None and len(claimants) >= workers:
                    all_claiming = now
                if not running:
                    break
                time.sleep(POLL_S)
        wall = time.perf_counter() - started
        failed = [p.returncode for p in processes if p.returncode]
        if failed or not samples[-1].total or samples[-1].done != samples[-1].total:
            raise RuntimeError(
                f"{workers} worker(s): exit codes {[p.returncode for p in processes]}, "
                f"{samples[-1].done}/{samples[-1].total} judged; logs in {logs}"
            )
        a, b = steady_window(samples)
        span = b.t - a.t
        return Result(
            workers=workers,
            judgments=samples[-1].total,
            rate=(b.done - a.done) / span,
            window_judgments=b.done - a.done,
            window_s=span,
            first_verdict_s=next(s.t for s in samples if s.done),
            all_claiming_s=all_claiming,
            wall_s=wall,
            cpu_workers=(b.cpu_workers - a.cpu_workers) / span,
            cpu_server=(b.cpu_server - a.cpu_server) / span,
            cpu_machine=(b.cpu_machine - a.cpu_machine) / span,
            samples=samples,
        )
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
        if engine is not None:
            engine.dispose()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def describe(result: Result) -> str:
    label = f"{result.workers} worker{'s' if result.workers > 1 else ''}"
    claiming = "-" if result.all_claiming_s is None else f"{result.all_claiming_s:.1f}s"
    per_judgment = 1000 * result.cpu_workers / result.rate if result.rate else float("nan")
    return (
        f"{label}: {result.rate:.1f} judgments/s ({result.window_judgments} judgments between 10% and "
        f"90% in {result.window_s:.1f}s; {result.judgments} in all, {result.wall_s:.1f}s from launch, "
        f"first verdict at {result.first_verdict_s:.1f}s, all workers claiming at {claiming}); "
        f"CPU in window: workers {result.cpu_workers:.2f} cores ({per_judgment:.1f} ms/judgment), "
        f"judge server {result.cpu_server:.2f}, whole machine {result.cpu_machine:.2f} of {os.cpu_count()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=480, help="pairs per round (two judgments each)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes of the second run")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per request at the server (L)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight per worker (C)")
    parser.add_argument("--db", default=DEFAULT_DB, help="PostgreSQL URL (a schema per run is made there)")
    parser.add_argument("--keep-logs", action="store_true", help="print where the workers' logs are")
    args = parser.parse_args()
    if make_url(args.db).get_backend_name() != "postgresql":
        parser.error("--db must be a PostgreSQL URL: several workers judge one round only there")
    ceiling = args.concurrency / args.latency
    print(
        f"workers bench: PostgreSQL, {args.pairs} pairs per round (both orders), judge server L={args.latency}s, "
        f"C={args.concurrency} per worker; ceiling C/L = {ceiling:.1f} judgments/s per worker",
        flush=True,
    )
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=serve_loopback, args=(args.latency, child), daemon=True)
    server.start()
    base_url = parent.recv()
    assert server.pid is not None
    results = []
    try:
        with contextlib.ExitStack() as stack:
            logs = Path(tempfile.mkdtemp(prefix="bench-workers-")) if args.keep_logs else None
            if logs is None:
                logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-workers-")))
            for workers in (1, args.workers):
                result = run_workers(
                    args.db, workers, args.pairs, base_url, args.concurrency, server.pid, logs
                )
                results.append(result)
                print(describe(result), flush=True)
            if args.keep_logs:
                print(f"worker logs: {logs}")
    finally:
        parent.send("done")
        server.join(timeout=5)
    one, many = results
    print(
        f"ratio {many.workers} workers / 1 worker: {many.rate / one.rate:.2f}x (target >= 3.5x at 4 workers; "
        f"ideal {many.workers}x; ceilings {ceiling:.1f} and {many.workers * ceiling:.1f} judgments/s)"
    )


if __name__ == "__main__":
    main()
