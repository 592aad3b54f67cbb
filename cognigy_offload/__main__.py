"""The command line of SPEC §5: serve, demo, check-config, jobs, bench, systemd-unit."""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Sequence
from typing import Any

import anyio

from . import logs
from .config import (
    Config,
    check_delivery_secrets,
    find_config_path,
    load_config,
    load_secrets,
)
from .errors import ConfigError, OffloadError
from .models import ENCODER


def _positive_int(text: str) -> int:
    """An argparse type: a whole number from 1 to 1,000,000."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be 1 to 1000000, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cognigy_offload",
        description="Run heavy PostgreSQL aggregations for Cognigy.AI flows in the background.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            metavar="PATH",
            help="config file (default: $COGNIGY_OFFLOAD_CONFIG, else ./config.toml)",
        )
        return p

    with_config(sub.add_parser("serve", help="run the service"))
    demo = sub.add_parser("demo", help="an end-to-end run on an embedded PostgreSQL")
    demo.add_argument("--rows", type=int, default=1_000_000, help="demo table size")
    demo.add_argument("--data-dir", default=".cognigy_offload/demo-pg")
    with_config(sub.add_parser("check-config", help="validate config, secrets and queries"))
    jobs = sub.add_parser("jobs", help="inspect and replay jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = with_config(jobs_sub.add_parser("list", help="the newest jobs"))
    listing.add_argument(
        "--status",
        choices=["queued", "running", "delivering", "delivered", "answered", "failed", "expired"],
    )
    listing.add_argument(
        "--limit", type=_positive_int, default=50, help="at most this many (1 to 1000000)"
    )
    with_config(jobs_sub.add_parser("show", help="one job in full")).add_argument("id")
    with_config(
        jobs_sub.add_parser(
            "retry", help="re-deliver a failed or expired job (re-run it if it has no result)"
        )
    ).add_argument("id")
    bench = sub.add_parser("bench", help="measure throughput and latency")
    bench.add_argument("--quick", action="store_true", help="a short run")
    bench.add_argument("--output", default=None, help="where to write the JSON results")
    with_config(sub.add_parser("systemd-unit", help="print a systemd unit for this install"))
    stand_in = sub.add_parser(
        "stand-in",
        help="a local Cognigy stand-in on 127.0.0.1 that prints each delivery it receives",
    )
    stand_in.add_argument("--port", type=_positive_int, default=8090)
    stand_in.add_argument(
        "--client-id",
        default="your-client-id",
        help="the OAuth2 client id it accepts (default: the shipped config's); the secret "
        "is $COGNIGY_CLIENT_SECRET and the API key $COGNIGY_API_KEY, as the service reads them",
    )
    return parser


def _load(args: argparse.Namespace) -> Config:
    return load_config(find_config_path(args.config))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print("configuration error:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    except OffloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from .app import serve

        config = _load(args)
        logs.configure(config.server.log_format, config.server.log_level)
        secrets = load_secrets(config)
        problems = check_delivery_secrets(config, secrets)
        if problems:
            raise ConfigError(problems)
        serve(config, secrets)
        return 0
    if args.command == "demo":
        from .demo import run_demo

        return int(run_demo(rows=args.rows, data_dir=args.data_dir))
    if args.command == "check-config":
        return anyio.run(_check_config, args)
    if args.command == "jobs":
        return anyio.run(_jobs, args)
    if args.command == "bench":
        from .bench import run_bench

        return int(run_bench(quick=args.quick, output=args.output))
    if args.command == "systemd-unit":
        from .systemd import render_unit

        path = find_config_path(args.config)
        if not path.exists():
            print(f"note: {path} does not exist yet; the unit needs it to start", file=sys.stderr)
        print(render_unit(path))
        return 0
    if args.command == "stand-in":
        return _stand_in(args)
    raise AssertionError(args.command)


def _stand_in(args: argparse.Namespace) -> int:
    import os
    import signal

    from .sim import SimState, serve_stand_in

    state = SimState(
        client_id=args.client_id,
        client_secret=os.environ.get("COGNIGY_CLIENT_SECRET", "unused"),
        api_key=os.environ.get("COGNIGY_API_KEY", "unused"),
    )

    def write(line: bytes) -> None:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()

    def ready(url: str) -> None:
        print(
            f"Cognigy stand-in on {url}: set COGNIGY_OFFLOAD__COGNIGY__API_URL={url} and "
            f"COGNIGY_OFFLOAD__COGNIGY__ENDPOINT_URL={url} for the service; Ctrl-C stops it",
            file=sys.stderr,
        )

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_stand_in, state, args.port, write, ready)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break

    try:
        anyio.run(run)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


async def _check_config(args: argparse.Namespace) -> int:
    """Validate file, secrets, connection and every query; print each problem with its key."""
    import os

    import asyncpg

    from . import db
    from .app import open_database
    from .config import Secrets, is_loopback
    from .queries import Catalog
    from .store import TABLE

    def report(problems: list[str]) -> int:
        if problems:
            print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
            return 1
        print(f"{path}: ok")
        return 0

    path = find_config_path(args.config)
    problems: list[str] = []
    try:
        config = load_config(path)
    except ConfigError as exc:
        # The file itself is wrong: nothing else can be checked against it.
        problems.extend(exc.problems)
        return report(problems)
    print(f"{path}: file ok, queries: {', '.join(config.queries) or 'none'}")
    if not config.queries:
        problems.append("queries: no query is configured; every webhook would be refused (422)")

    auth = config.cognigy.auth
    try:
        secrets = load_secrets(config)
    except ConfigError as exc:
        problems.extend(exc.problems)
        # Still check the Cognigy credentials, which do not depend on the webhook token.
        secrets = Secrets(
            webhook_tokens=(),
            client_secret=os.environ.get(auth.client_secret_env, ""),
            api_key=os.environ.get(auth.api_key_env, ""),
        )
    else:
        if not secrets.webhook_tokens and is_loopback(config.server.host):
            print(
                f"note: server.webhook_token_env: ${config.server.webhook_token_env} is empty, "
                "so the webhook takes any caller (allowed only on loopback)"
            )
    problems.extend(check_delivery_secrets(config, secrets))

    where = "database.dsn"
    if not config.database.dsn:
        where = f"database.dsn is empty: the embedded PostgreSQL under {config.database.data_dir}"
    try:
        async with open_database(config) as pools:
            async with db.connection(pools.jobs) as conn:
                version = await conn.fetchval("SHOW server_version")
                table = await conn.fetchrow(
                    f"""SELECT to_regclass('{TABLE}') IS NOT NULL AS present,
                               has_schema_privilege(
                                   coalesce(current_schema(), 'public'), 'CREATE') AS can_create,
                               coalesce(current_schema(), 'public') AS schema"""
                )
            print(f"database ok: PostgreSQL {version} ({where})")
            if not table["present"] and not table["can_create"]:
                problems.append(
                    f"database.dsn: this role may not create the job table {TABLE} in schema "
                    f"{table['schema']}; GRANT CREATE ON SCHEMA {table['schema']} to it, or "
                    "start the service once as a role that may"
                )
            try:
                catalog = await Catalog.prepare(pools.queries, config.queries)
                print(f"queries ok: {', '.join(sorted(catalog.queries)) or 'none'}")
            except ConfigError as exc:
                problems.extend(exc.problems)
    except ConfigError as exc:
        problems.extend(exc.problems)
    except (OffloadError, asyncpg.PostgresError, *db.UNAVAILABLE_ERRORS) as exc:
        detail = str(exc) if isinstance(exc, OffloadError) else db.describe(exc)
        problems.append(f"database.dsn: no connection ({where}): {detail}")
        problems.append("queries: not checked against PostgreSQL (no database connection)")
    return report(problems)


async def _jobs(args: argparse.Namespace) -> int:
    """jobs list / show / retry against the configured database."""
    from .app import open_database
    from .store import Store

    config = _load(args)
    async with open_database(config) as pools:
        store = Store(
            pools.jobs,
            instance_id="cli",
            lease_s=config.queue.lease_s,
            deadline_s=config.queue.job_deadline_s,
        )
        await store.migrate()
        if args.jobs_command == "list":
            jobs = await store.list_jobs(args.status, args.limit)
            print(f"{'taskId':36}  {'status':10}  {'query':14}  {'q/d':5}  {'created':24}  error")
            for job in jobs:
                doc = job.document()
                error = f"{doc.error.kind}: {doc.error.detail}"[:60] if doc.error else ""
                tries = f"{job.attempts_query}/{job.attempts_delivery}"
                print(
                    f"{doc.taskId:36}  {doc.status:10}  {doc.query[:14]:14}  {tries:5}  "
                    f"{doc.createdAt:24}  {error}"
                )
            counts = await store.counts()
            print(
                "totals: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no jobs")
            )
            return 0
        job_id = _parse_id(args.id)
        if args.jobs_command == "show":
            found = await store.get(job_id) if job_id else None
            if found is None:
                print(f"no job {args.id}", file=sys.stderr)
                return 1
            shown: dict[str, Any] = {
                "task": found.document(),
                "target": found.target,
                "variables": found.variables,
                "deadlineAt": found.deadline_at.isoformat(),
            }
            print(ENCODER.encode(shown).decode())
            return 0
        retried = await store.retry(job_id) if job_id else None
        if retried is None:
            current = await store.get(job_id) if job_id else None
            why = f"it is {current.status}" if current is not None else "no such job"
            print(
                f"cannot retry {args.id}: {why} (only failed or expired jobs are retried)",
                file=sys.stderr,
            )
            return 1
        step = "re-delivered from its stored result" if retried.result else "run again"
        print(
            f"{retried.id}: {retried.status} again; it will be {step} by a running service "
            f"within queue.sweep_interval_s ({config.queue.sweep_interval_s:g} s)"
        )
        return 0


def _parse_id(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
