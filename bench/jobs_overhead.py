"""What the job machinery costs: one loop round (generate -> judge -> export -> train -> eval) on the
tiny model, run as a loop job by an in-process `Worker` (job claim, heartbeat thread, progress and
log writes, generation and judgment claims) against the same stages called directly through
`run_loop`, each on a fresh database, alternating, in one process. The policy and judge answer
from a loopback server, so the stages' own work (sampling requests, DPO steps) is the same.

    python bench/jobs_overhead.py [--repeats 5] [--heartbeat 5] [--db sqlite|postgresql+psycopg://...]

Prints the median wall time of each and the overhead ratio; the target is at most 5 %.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, text  # noqa: E402

from cai.cli.app import quiet_libraries  # noqa: E402
from cai.config import load_settings  # noqa: E402
from cai.constitution import load_constitution  # noqa: E402
from cai.jobs import submit_job  # noqa: E402
from cai.promptsets import read_prompt_file  # noqa: E402
from cai.stages.loop import run_loop  # noqa: E402
from cai.stages.settings import GenerateSettings, JudgeSettings, LoopJob, LoopSettings, TrainSettings  # noqa: E402
from cai.store import repo  # noqa: E402
from cai.train import TrainConfig  # noqa: E402
from cai.worker import Worker, WorkerOptions  # noqa: E402
from cai.workspace import Workspace  # noqa: E402
from tests.fake_openai import FakeOpenAI  # noqa: E402
from tests.test_worker import deterministic  # noqa: E402
from tests.tiny_model import build_tiny_model, cached_smollm2_tokenizer  # noqa: E402


def fresh_database(kind: str, tmp: Path) -> tuple[str, str | None]:
    """(URL, PostgreSQL schema to drop afterwards)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp / f'{uuid.uuid4().hex}.db'}", None
    schema = f"cai_bench_{uuid.uuid4().hex[:10]}"
    with create_engine(kind).begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    return f"{kind}?options=-csearch_path%3D{schema}", schema


def prepared(url: str, model_dir: Path) -> tuple[Workspace, int]:
    ws = Workspace(load_settings(database_url=url))
    with ws.session() as session:
        record, _ = repo.register_constitution(
            session, load_constitution(REPO / "constitutions/helpful-harmless/v1.yaml")
        )
        prompts = REPO / "prompt_sets/helpful-harmless.jsonl"
        repo.import_prompts(session, read_prompt_file(prompts), source=prompts.name)
        policy = repo.ensure_policy(session, str(model_dir), str(model_dir))
        round_id = repo.create_round(session, record, policy, {"split": "train", "seed": 0}).id
    return ws, round_id


def loop_settings(server: FakeOpenAI, artifacts: Path, prompts: int) -> LoopSettings:
    backend = {"backend": "openai", "base_url": server.base_url}
    judge = {"judge_base_url": server.base_url, "judge_model": "fake-judge", "concurrency": 4}
    return LoopSettings.compose(
        GenerateSettings(**backend, samples=2, limit=prompts),
        JudgeSettings(**judge),
        eval_limit=prompts // 2,
        train=TrainSettings(dpo=TrainConfig(max_steps=8, per_device_train_batch_size=2, max_length=128)),
        artifacts=artifacts,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--latency", type=float, default=0.05, help="Seconds per loopback request.")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="The worker's heartbeat interval.")
    parser.add_argument("--db", default="sqlite", help="sqlite, or a PostgreSQL URL (a schema per run).")
    args = parser.parse_args()
    quiet_libraries()

    with tempfile.TemporaryDirectory(prefix="cai-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_tiny_model(tmp / "tiny", cached_smollm2_tokenizer(tmp / "tokenizers"))
        times: dict[str, list[float]] = {"direct": [], "job": []}
        with FakeOpenAI(deterministic(args.latency)) as server:
            # A first run of each, not counted: imports, model loading and caches warm up.
            for repeat in range(args.repeats + 1):
                for how in ("direct", "job") if repeat % 2 else ("job", "direct"):
                    server.responder = deterministic(args.latency)  # the same samples every run
                    url, schema = fresh_database(args.db, tmp)
                    ws, round_id = prepared(url, model_dir)
                    settings = loop_settings(server, tmp / f"{how}-{repeat}", args.prompts)
                    started = time.perf_counter()
                    if how == "direct":
                        run_loop(ws, 1, round_id, settings)
                    else:
                        submit_job(ws, "loop", round_id, LoopJob(rounds=1, loop=settings))
                        options = WorkerOptions(kinds=("loop",), once=True, heartbeat_s=args.heartbeat)
                        assert Worker(ws, options, say=lambda _: None).run() == 1
                    elapsed = time.perf_counter() - started
                    ws.close()
                    if schema:
                        with create_engine(args.db).begin() as connection:
                            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                    if repeat:
                        times[how].append(elapsed)
                    print(
                        f"  {how:>6} run {repeat}: {elapsed:6.2f} s{'' if repeat else ' (warm-up)'}",
                        flush=True,
                    )
    direct, job = statistics.median(times["direct"]), statistics.median(times["job"])
    print(
        f"loop round on the tiny model ({args.db.split(':')[0]}, heartbeat {args.heartbeat:g} s): "
        f"direct {direct:.2f} s, as a job {job:.2f} s (medians of {args.repeats}); "
        f"overhead {job / direct - 1:+.1%} (target <= 5%)"
    )


if __name__ == "__main__":
    main()
