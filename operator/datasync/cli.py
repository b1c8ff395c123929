"""The ``datasync`` command line.

``sync`` and ``demo`` are the contract other tools and the tests drive; every
expected failure is a :class:`datasync.errors.DataSyncError`, printed on stderr
with its hint, exit status non-zero.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from datasync import errors
from datasync.engine import pgoutput, syncing

if TYPE_CHECKING:
    from rich.console import Console

# rich (and the progress module built on it) is imported where something is drawn:
# ~20 ms of a start-up that a `sync --once --quiet` run (cron jobs, the benchmarks) never uses


def _console(**kw: Any) -> Console:
    from rich.console import Console

    return Console(**kw)


def _fail(exc: errors.DataSyncError) -> None:
    console = _console(stderr=True)
    console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
    if exc.hint:
        console.print(f"[bold]hint:[/] {exc.hint}", highlight=False)
    sys.exit(exc.exit_code)


@click.group()
@click.option("--log-level", default="WARNING", show_default=True, help="Python log level.")
def main(log_level: str) -> None:
    """DataSync: keep DuckDB copies of PostgreSQL tables in sync."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--source", envvar="DATASYNC_SOURCE_DSN", required=True,
              help="PostgreSQL DSN (or env DATASYNC_SOURCE_DSN, keeps the password off the command line).")
@click.option("--target", required=True, help="DuckDB database file.")
@click.option("--table", "tables", multiple=True, required=True,
              help="SCHEMA.TABLE, SQL-quoted where needed: '\"Sales Dept\".\"Order Items\"'. Repeatable.")
@click.option("--once", "mode", flag_value="once", help="Snapshot, apply changes up to now, exit.")
@click.option("--follow", "mode", flag_value="follow", help="Keep streaming until SIGTERM/SIGINT.")
@click.option("--slot", help="Replication slot name (default: derived from the target path).")
@click.option("--publication", help="Publication name (default: the slot name).")
@click.option("--snapshot-workers", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--batch-size", default=50_000, show_default=True, type=click.IntRange(1), help="Changes per batch.")
@click.option("--max-batch-seconds", default=0.5, show_default=True, type=click.FloatRange(0.0))
@click.option("--memory-limit", default="256MB", show_default=True,
              help="DuckDB buffer memory; the process needs about this plus ~600 MB.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--api-address", metavar="HOST:PORT",
              help="With --follow: serve consistency checks (datasync check --writer) and /metrics here.")
def sync(source: str, target: str, tables: tuple[str, ...], mode: str | None, slot: str | None,
         publication: str | None, snapshot_workers: int, batch_size: int, max_batch_seconds: float,
         memory_limit: str, quiet: bool, api_address: str | None) -> None:
    """Copy tables into TARGET and apply their changes (--once or --follow)."""
    if mode is None:
        raise click.UsageError("choose --once or --follow")
    if api_address and mode != "follow":
        raise click.UsageError("--api-address needs --follow")
    opts = syncing.Options(
        source=source, target=target, tables=list(tables), follow=mode == "follow", slot=slot,
        publication=publication, snapshot_workers=snapshot_workers, batch_changes=batch_size,
        max_batch_seconds=max_batch_seconds, memory_limit=memory_limit,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if opts.follow:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    server = _serve_api(opts, api_address) if api_address else None
    try:
        if quiet:
            result = syncing.run(opts, syncing.QuietReporter(), stop)
        else:
            from datasync import progress

            with progress.RichReporter(_console(stderr=True)) as reporter:
                result = syncing.run(opts, reporter, stop)
    except errors.DataSyncError as exc:
        _fail(exc)
        return
    finally:
        if server is not None:
            server.shutdown()
    if quiet:
        return
    st = result.stats
    _console(stderr=True).print(
        f"synced {len(result.rows)} table(s) into {target}: "
        + ", ".join(f"{n} {r:,} rows" for n, r in sorted(result.rows.items()))
        + f"; {st.changes:,} changes in {st.transactions:,} transactions applied, in sync up to "
        # the slot's position: past the last change applied when later WAL held none for these tables
        f"{pgoutput.format_lsn(max(st.applied_lsn, st.confirmed_lsn))} (slot {result.slot})",
        highlight=False,
    )


def _serve_api(opts: syncing.Options, address: str) -> Any:
    from datasync import serving
    from datasync.engine import pinning
    from datasync.working import metrics

    opts.pins = pinning.Pins()
    gauges = metrics.Metrics("", opts.slot or "")
    api = serving.Api(opts.source, opts.pins, gauges.exposition, lambda run: gauges.observe("api", run, {}))
    try:
        return serving.serve(api, address)
    except OSError as exc:
        raise click.UsageError(f"cannot serve the API on {address}: {exc}") from None


@main.command()
@click.option("--source", envvar="DATASYNC_SOURCE_DSN", help="PostgreSQL DSN (or env DATASYNC_SOURCE_DSN).")
@click.option("--target", help="DuckDB file written by `datasync sync` (no other process may hold it).")
@click.option("--writer", metavar="URL", help="Instead of --target: a running `sync --follow --api-address` to ask.")
@click.option("--table", "tables", multiple=True, help="SCHEMA.TABLE to check (default: every synced table). Repeatable.")
@click.option("--checks", default="row_count,data_hash", show_default=True,
              help="Comma-separated: row_count, data_hash, business_rules, referential_integrity.")
@click.option("--rule", "rule_texts", multiple=True, metavar="NAME=SELECT…",
              help="A business rule: NAME=SELECT … passes when it returns no rows; NAME~=SELECT … passes when the "
                   "source returns the same rows. Repeatable; implies business_rules.")
@click.option("--foreign-key", "fk_texts", multiple=True, metavar="[NAME:]CHILD(COLS)->PARENT(COLS)",
              help="A foreign key to check besides the source catalog's, e.g. 'public.orders(customer_id) -> "
                   "public.customers(id)'. Repeatable; implies referential_integrity.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.option("--repair", is_flag=True, help="Re-copy only the mismatching rows from the source, then re-check.")
@click.option("--timeout", type=click.FloatRange(min=0.001), help="Give up after this many seconds (default: no limit).")
@click.option("--slot", help="The target's replication slot (default: derived from the target path, as sync does).")
@click.option("--publication", help="Its publication (default: the slot name).")
def check(source: str | None, target: str | None, writer: str | None, tables: tuple[str, ...], checks: str,
          rule_texts: tuple[str, ...], fk_texts: tuple[str, ...], as_json: bool, repair: bool, timeout: float | None,
          slot: str | None, publication: str | None) -> None:
    """Compare the DuckDB copy with PostgreSQL at one LSN; exit 1 when they differ.

    With --target, the copy is first brought to the source's position through its own slot (as
    `sync --once` would), then both sides are compared at exactly the same LSN. With --writer,
    the running `sync --follow --api-address` that holds the file runs the check itself.
    """
    import json

    from datasync import identifiers
    from datasync.validation import references, rules, running

    if (target is None) == (writer is None):
        raise click.UsageError("give --target (a file no process holds) or --writer (the URL of a running sync's API)")
    if target is not None and not source:
        raise click.UsageError("--source (or env DATASYNC_SOURCE_DSN) is required with --target")
    check_types = [c.strip() for c in checks.split(",") if c.strip()]
    try:
        if writer is not None:
            report = _check_through(writer, {
                "tables": list(tables), "check_types": check_types, "repair": repair, "foreign_keys": list(fk_texts),
                "rules": [dataclasses.asdict(rules.parse(t)) for t in rule_texts], "timeout_seconds": timeout,
            })
        else:
            request = running.Request(
                [identifiers.TableName.parse(t) for t in tables], check_types, [rules.parse(t) for t in rule_texts],
                repair, [references.parse(t) for t in fk_texts], timeout,
            )
            assert source is not None
            report = running.check_file(source, target or "", request, slot=slot, publication=publication).as_json()
    except errors.DataSyncError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        _print_report(report)
    sys.exit(0 if report["ok"] else 1)


def _check_through(writer: str, body: dict[str, object]) -> dict[str, Any]:
    """POST the check to a writer's API; its report."""
    import json
    import urllib.error
    import urllib.request

    from datasync import serving

    url = writer.rstrip("/") + serving.CHECK_PATH
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=3600) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read())
        except ValueError:
            detail = {"error": exc.reason}
        raise errors.DataSyncError(f"the writer refused the check ({exc.code}): {detail.get('error')}",
                                   detail.get("hint") or "") from None
    except OSError as exc:
        raise errors.DataSyncError(f"cannot reach the writer at {writer}: {exc}",
                                   "start it with `datasync sync --follow --api-address HOST:PORT`") from None


def _print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console(width=None if sys.stdout.isatty() else 140)
    where = f"at LSN {report['lsn']}" if report["aligned"] else "copy as it stands"
    out = Table(title=f"consistency score {report['consistency_score']:g} ({where}, {report['duration_seconds']:.1f}s)")
    for col in ("table", "ok", "source rows", "target rows", "missing", "extra", "differing", "orphans",
                "repaired", "sample keys"):
        out.add_column(col)
    for t in report["tables"]:
        out.add_row(t["table"], "✓" if t["ok"] else "✗", f"{t['rows_source']:,}", f"{t['rows_target']:,}",
                    str(t["missing"]), str(t["extra"]), str(t["differing"]), str(t["orphans"]), str(t["repaired"]),
                    ", ".join(map(str, t["mismatched_keys"][:5])))
    console.print(out)
    for r in report.get("rules", []):
        console.print(f"rule {r['name']}: {'✓' if r['ok'] else '✗'} {r['message']}", highlight=False)
    if report.get("note"):
        console.print(f"note: {report['note']}", highlight=False)


@main.command()
@click.option("--target", default="demo.duckdb", show_default=True, help="DuckDB file to create.")
@click.option("--seconds", default=20.0, show_default=True, help="How long the live writer runs.")
@click.option("--scale", default=1.0, show_default=True, help="Multiplier for the sample data size.")
def demo(target: str, seconds: float, scale: float) -> None:
    """Embedded PostgreSQL → DuckDB: snapshot, live CDC, summary."""
    from datasync import demo as demo_mod

    try:
        demo_mod.run(target, seconds=seconds, scale=scale)
    except errors.DataSyncError as exc:
        _fail(exc)


@main.command()
def operator() -> None:
    """Run the Kubernetes operator (kopf) until SIGTERM/SIGINT.

    Settings come from the environment: DATASYNC_WORKER_IMAGE, DATASYNC_NAMESPACES,
    DATASYNC_RESYNC_SECONDS, DATASYNC_PEERING, DATASYNC_STANDALONE, DATASYNC_HEALTH_ADDRESS
    (see datasync.controllers.config).
    """
    import kopf

    from datasync.controllers import config, operating

    # kopf's handler with its object prefix ("[namespace/name] Handler 'on_change' failed ..."):
    # without it, a log of many policies and tables does not say which one a message is about
    root = logging.getLogger()
    level = root.level
    root.handlers.clear()  # basicConfig's: kopf's replaces it
    kopf.configure(log_format=kopf.LogFormat.FULL, log_prefix=True)
    root.setLevel(level)  # --log-level, not kopf's default
    operating.run(config.Settings.from_environment())


@main.command()
@click.option("--policy", required=True, help="Name of the SyncPolicy this writer serves.")
@click.option("--namespace", required=True, envvar="POD_NAMESPACE", help="Namespace of the SyncPolicy.")
def worker(policy: str, namespace: str) -> None:
    """Run a SyncPolicy's writer: sync its SyncTables into its DuckDB file until SIGTERM.

    The source DSN comes from env DATASYNC_SOURCE_DSN (the Deployment sets it from the Secret);
    DATASYNC_HEALTH_ADDRESS (default 0.0.0.0:8080) serves /healthz and /readyz;
    DATASYNC_TARGET_PATH overrides the policy's DuckDB path (running outside the pod).
    """
    import os

    from datasync import kube
    from datasync.working import loop

    dsn = os.environ.get("DATASYNC_SOURCE_DSN", "").strip()
    if not dsn:
        _fail(errors.DataSyncError("DATASYNC_SOURCE_DSN is not set", "set it from the source Secret (secretKeyRef)"))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = loop.Worker(
        kube.Kube.from_environment(),
        namespace,
        policy,
        dsn,
        target_override=loop.target_override(),
        health_address=os.environ.get("DATASYNC_HEALTH_ADDRESS", "").strip() or "0.0.0.0:8080",
    ).run(stop)
    sys.exit(code)


def run() -> None:
    """The ``datasync`` command: :func:`main`, then a prompt exit.

    Python's shutdown runs the cyclic garbage collector over the whole heap
    (the modules of DuckDB, pyarrow and the engine) while it tears the modules
    down.  Measured on a ``sync --once`` run that has closed everything already:
    its exit took 50 ms, 18 ms with the heap frozen first (medians of 6).  The
    process is ending: nothing is lost by not collecting.  (Not in :func:`main`:
    tests invoke that in their own process.)
    """
    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    run()
