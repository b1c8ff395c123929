"""The operator and its writer end to end: real kube-apiserver + controller manager, real PostgreSQL.

What runs for real: the CRDs and the shipped RBAC on a real apiserver; ``datasync operator``
as a subprocess under a token of the ``datasync-operator`` ServiceAccount (so the shipped
ClusterRole is proven sufficient); an embedded PostgreSQL 18 with ``wal_level=logical`` on
loopback; the writer as a subprocess under a token of the writer ServiceAccount the operator
rendered, with exactly the command, args and env of the rendered container.

No kubelet exists here, so the writer pod never starts; the test starts its container's
process instead. Its env is resolved the way a kubelet would (``secretKeyRef`` from the
Secret) with two overrides, both places where a pod differs from this host:

* ``DATASYNC_TARGET_PATH``: the container writes ``/data/shop.duckdb`` on its volume; here
  that path is the host's root file system, so the file goes to a temporary directory;
* ``DATASYNC_HEALTH_ADDRESS``: the container serves probes on 8080 in its own network
  namespace; on this host that port may be taken, so a free port is used.

Plus ``KUBECONFIG`` (in a pod the ServiceAccount token is mounted instead). One scenario, in
order, because each step builds on the previous one (the whole module takes about a minute).
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest

from datasync.sources.embedded import EmbeddedPostgres, free_port
from tests.e2e.cluster import ControlPlane
from tests.e2e.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
NS = "ds-e2e-shop"
BAD_NS = "ds-e2e-bad"
OPERATOR_NS = "datasync-system"
WORKER_IMAGE = "registry.invalid/datasync:e2e"
ORDERS, CUSTOMERS = 500, 120



# --------------------------------------------------------------------------- helpers



def get(cp: ControlPlane, kind: str, name: str, namespace: str = NS) -> dict[str, Any] | None:
    proc = cp.kubectl("get", kind, name, "-n", namespace, "-o", "json", "--ignore-not-found", check=True)
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def apply(cp: ControlPlane, doc: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input=json.dumps(doc))


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    return {}


def sql(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []


def slots(dsn: str) -> list[str]:
    return [r[0] for r in sql(dsn, "SELECT slot_name FROM pg_replication_slots ORDER BY 1")]


def publication_tables(dsn: str, publication: str) -> list[str] | None:
    if not sql(dsn, "SELECT 1 FROM pg_publication WHERE pubname = %s", publication):
        return None
    return [r[0] for r in sql(dsn, "SELECT tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 1", publication)]


class Proc:
    """A subprocess with its output in a file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        fh = open(log, "ab")
        try:
            self.popen = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            fh.close()

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} log ({self.log}):\n" + "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            pytest.fail(f"{self.name} did not stop within {timeout:.0f}s of SIGTERM\n{self.tail()}", pytrace=False)


def http_get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def postgres() -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres()  # wal_level=logical by default
    server.start()
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE shop")
        with psycopg.connect(server.dsn("shop"), autocommit=True) as conn:
            conn.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric(10,2), note text)")
            conn.execute(f"INSERT INTO orders SELECT g, g * 1.5, 'order ' || g FROM generate_series(1, {ORDERS}) g")
            conn.execute("CREATE TABLE customers (id bigint PRIMARY KEY, name text)")
            conn.execute(f"INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, {CUSTOMERS}) g")
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def replica_level_postgres() -> Iterator[EmbeddedPostgres]:
    """A server without logical decoding: the policy must say so."""
    server = EmbeddedPostgres(settings={"wal_level": "replica"})
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


class Operator:
    def __init__(self, cp: ControlPlane, workdir: Path) -> None:
        self.cp, self.workdir = cp, workdir
        self.port = free_port()
        self.proc: Proc | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        kubeconfig = self.cp.service_account_kubeconfig(
            OPERATOR_NS, "datasync-operator", path=self.workdir / "operator.kubeconfig", create=False
        )
        env = {
            "PATH": f"{VENV_BIN}:/usr/bin:/bin",
            "HOME": str(self.workdir),
            "KUBECONFIG": str(kubeconfig),
            "DATASYNC_WORKER_IMAGE": WORKER_IMAGE,
            "DATASYNC_RESYNC_SECONDS": "3",
            "DATASYNC_RELEASE_TIMEOUT_SECONDS": "60",
            "DATASYNC_HEALTH_ADDRESS": f"127.0.0.1:{self.port}",
        }
        self.proc = Proc(
            f"operator#{self.runs}",
            [sys.executable, "-m", "datasync", "--log-level=INFO", "operator"],
            env,
            self.workdir / f"operator-{self.runs}.log",
        )
        wait_for("the operator's liveness endpoint", lambda: self._alive() and http_get(self.port, "/healthz") == 200,
                 timeout=60, logs=self.logs)  # fmt: skip

    def _alive(self) -> bool:
        assert self.proc is not None
        if not self.proc.alive():
            pytest.fail(f"the operator exited with {self.proc.popen.returncode}\n{self.proc.tail()}", pytrace=False)
        return True

    def logs(self) -> str:
        return self.proc.tail() if self.proc else ""

    def full_log(self) -> str:
        """The whole log of the running operator process (``logs``: its tail)."""
        return self.proc.log.read_text(errors="replace") if self.proc and self.proc.log.exists() else ""

    def stop(self) -> int:
        return self.proc.stop() if self.proc else 0


@pytest.fixture(scope="module")
def operator(installed: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    op = Operator(installed, tmp_path_factory.mktemp("operator"))
    op.start()
    try:
        yield op
    finally:
        op.stop()


def run_container_locally(cp: ControlPlane, deployment: dict[str, Any], workdir: Path, target: Path, health_port: int) -> Proc:
    """Start the Deployment's container as a local process, env resolved like a kubelet would."""
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    namespace = deployment["metadata"]["namespace"]
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin"}  # the image's PATH: where `datasync` is installed
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        secret = get(cp, "secret", ref["name"], namespace)
        assert secret is not None, f"Secret {ref['name']} of env {var['name']} is missing"
        env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    # Where this host differs from the pod (see the module docstring).
    env["DATASYNC_TARGET_PATH"] = str(target)
    env["DATASYNC_HEALTH_ADDRESS"] = f"127.0.0.1:{health_port}"
    env["KUBECONFIG"] = str(
        cp.service_account_kubeconfig(namespace, pod["serviceAccountName"], path=workdir / "worker.kubeconfig", create=False)
    )
    return Proc("worker", [*container["command"], *container["args"]], env, workdir / "worker.log")


# --------------------------------------------------------------------------- the scenario


def test_operator_end_to_end(
    operator: Operator,
    postgres: EmbeddedPostgres,
    replica_level_postgres: EmbeddedPostgres,
    tmp_path: Path,
) -> None:
    cp = operator.cp
    dsn = postgres.dsn("shop")
    logs = operator.logs

    # ---- bad sources (checked later; created first so the operator works on them meanwhile)
    cp.kubectl("create", "namespace", BAD_NS)
    cp.kubectl("create", "secret", "generic", "wrong-password", "-n", BAD_NS,
               f"--from-literal=dsn={postgres.dsn('shop', password='not-the-password-xyz')}")  # fmt: skip
    cp.kubectl("create", "secret", "generic", "no-logical", "-n", BAD_NS,
               f"--from-literal=dsn={replica_level_postgres.dsn()}")  # fmt: skip
    bad_policies = (("missing-secret", "does-not-exist"), ("wrong-password", "wrong-password"), ("no-logical", "no-logical"))
    for name, secret in bad_policies:
        apply(cp, {"apiVersion": "datasync.dev/v1alpha1", "kind": "SyncPolicy",
                   "metadata": {"name": name, "namespace": BAD_NS},
                   "spec": {"source": {"secretRef": {"name": secret}}}})  # fmt: skip
        apply(cp, {"apiVersion": "datasync.dev/v1alpha1", "kind": "SyncTable",
                   "metadata": {"name": f"{name}-orders", "namespace": BAD_NS},
                   "spec": {"policyRef": {"name": name}, "source": {"table": "orders"}}})  # fmt: skip

    # ---- the real thing: Secret, SyncPolicy, two SyncTables and one for a table that does not exist
    cp.kubectl("create", "namespace", NS)
    cp.kubectl("create", "secret", "generic", "shop-postgres", "-n", NS, f"--from-literal=dsn={dsn}")
    apply(cp, {"apiVersion": "datasync.dev/v1alpha1", "kind": "SyncPolicy",
               "metadata": {"name": "shop", "namespace": NS},
               "spec": {"source": {"secretRef": {"name": "shop-postgres", "key": "dsn"}},
                        "target": {"type": "duckdb",
                                   "duckdb": {"path": "/data/shop.duckdb", "storage": {"size": "1Gi"}}}}})  # fmt: skip
    tables = (("orders", "orders", "delete"), ("customers", "customers", "retain"), ("ghost", "ghost", "retain"))
    for name, table, reclaim in tables:
        apply(cp, {"apiVersion": "datasync.dev/v1alpha1", "kind": "SyncTable",
                   "metadata": {"name": name, "namespace": NS},
                   "spec": {"policyRef": {"name": "shop"}, "source": {"table": table}, "reclaimPolicy": reclaim}})  # fmt: skip

    slot = publication = "datasync_ds_e2e_shop_shop"
    wait_for("the policy's slot on PostgreSQL", lambda: slot in slots(dsn), logs=logs)
    assert slots(dsn) == [slot]
    wait_for("orders and customers in the publication",
             lambda: publication_tables(dsn, publication) == ["customers", "orders"], logs=logs)  # fmt: skip

    def policy_ready() -> dict[str, Any] | None:
        p = get(cp, "syncpolicy", "shop")
        ok = condition(p, "Ready").get("status") == "True" and (p or {}).get("status", {}).get("tables") == 3
        return p if ok else None

    policy = wait_for("SyncPolicy Ready with 3 tables", policy_ready, logs=logs)
    st = policy["status"]
    assert st["slotName"] == slot and st["publicationName"] == publication
    assert st["tables"] == 3 and st["observedGeneration"] == policy["metadata"]["generation"]
    assert st["workers"] == 1  # the writer Deployment (batch workers come later)
    assert isinstance(st["slotLagBytes"], int) and st["slotLagBytes"] >= 0
    assert condition(policy, "Ready")["observedGeneration"] == policy["metadata"]["generation"]
    assert "datasync.dev/finalizer" in policy["metadata"]["finalizers"]

    # ---- what the operator rendered
    uid = policy["metadata"]["uid"]
    owner = {"apiVersion": "datasync.dev/v1alpha1", "kind": "SyncPolicy", "name": "shop", "uid": uid,
             "controller": True, "blockOwnerDeletion": True}  # fmt: skip
    deployment = wait_for("the writer Deployment", lambda: get(cp, "deployment", "datasync-shop"), logs=logs)
    pvc = wait_for("the writer PVC", lambda: get(cp, "pvc", "datasync-shop-data"), logs=logs)
    for obj in (deployment, pvc, get(cp, "serviceaccount", "datasync-shop"), get(cp, "role", "datasync-shop"),
                get(cp, "rolebinding", "datasync-shop")):  # fmt: skip
        assert obj is not None
        assert obj["metadata"]["ownerReferences"] == [owner], obj["kind"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "datasync-shop"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["image"] == WORKER_IMAGE
    assert container["command"] == ["datasync"]
    assert container["args"] == ["--log-level=INFO", "worker", "--policy=shop", f"--namespace={NS}"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["DATASYNC_SOURCE_DSN"] == {
        "name": "DATASYNC_SOURCE_DSN", "valueFrom": {"secretKeyRef": {"name": "shop-postgres", "key": "dsn"}}
    }  # fmt: skip
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health", "scheme": "HTTP"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health", "scheme": "HTTP"}
    assert container["ports"][0]["containerPort"] == 8080
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {"/data": "data", "/tmp": "tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "datasync-shop-data"}
    role = get(cp, "role", "datasync-shop")
    assert role is not None
    policy_rule = {"apiGroups": ["datasync.dev"], "resources": ["syncpolicies"], "resourceNames": ["shop"], "verbs": ["get"]}
    assert policy_rule in role["rules"]
    # The DSN (and so the password) appears in no object the operator wrote.
    for kind in ("deployments", "syncpolicies", "synctables", "events", "roles", "persistentvolumeclaims"):
        out = cp.kubectl("get", kind, "-n", NS, "-o", "json").stdout
        assert postgres.password not in out, kind

    # ---- the ghost table is Degraded with the reason; the others wait for the writer
    def phase(kind: str, name: str, want: str) -> dict[str, Any] | None:
        obj = get(cp, kind, name)
        return obj if ((obj or {}).get("status") or {}).get("phase") == want else None

    ghost = wait_for("ghost Degraded", lambda: phase("synctable", "ghost", "Degraded"), logs=logs)
    assert condition(ghost, "Ready")["reason"] == "TableNotFound"
    assert "ghost" in ghost["status"]["message"] and "does not exist" in ghost["status"]["message"]
    orders = get(cp, "synctable", "orders")
    assert orders is not None and orders["status"]["phase"] == "Pending"

    # ---- the writer: the rendered container, run here under the writer's ServiceAccount
    health_port = free_port()
    target = tmp_path / "data" / "shop.duckdb"
    worker = run_container_locally(cp, deployment, tmp_path, target, health_port)

    def both_logs() -> str:
        return logs() + "\n" + worker.tail()

    def streaming(name: str, rows: int) -> dict[str, Any] | None:
        assert worker.alive(), f"the worker exited with {worker.popen.returncode}"
        t = get(cp, "synctable", name)
        s = (t or {}).get("status") or {}
        if s.get("phase") == "Streaming" and condition(t, "Ready").get("status") == "True" and s.get("rows") == rows:
            return t
        return None

    orders = wait_for("orders Streaming with every row", lambda: streaming("orders", ORDERS), timeout=90, logs=both_logs)
    customers = wait_for("customers Streaming with every row", lambda: streaming("customers", CUSTOMERS), timeout=60,
                         logs=both_logs)  # fmt: skip
    for t in (orders, customers):
        s = t["status"]
        assert s["observedGeneration"] == t["metadata"]["generation"]
        assert condition(t, "Ready")["observedGeneration"] == t["metadata"]["generation"]
        assert condition(t, "Snapshotted")["status"] == "True"
        assert s["lastAppliedLSN"] and "/" in s["lastAppliedLSN"]
        assert s["targetTable"] == f"public.{t['metadata']['name']}"
    assert orders["status"]["snapshotRows"] == ORDERS
    assert http_get(health_port, "/healthz") == 200 and http_get(health_port, "/readyz") == 200

    # Changes stream through: 25 new orders, 5 deleted.
    sql(dsn, f"INSERT INTO orders SELECT g, g, 'late' FROM generate_series({ORDERS + 1}, {ORDERS + 25}) g")
    sql(dsn, "DELETE FROM orders WHERE id <= 5")
    orders = wait_for("orders after CDC", lambda: streaming("orders", ORDERS + 20), timeout=30, logs=both_logs)
    assert isinstance(orders["status"]["lagBytes"], int)

    # ---- kubectl shows real values in the printer columns
    def table_rows(kind: str, namespace: str = NS) -> dict[str, list[str]]:
        out = cp.kubectl("get", kind, "-n", namespace).stdout.splitlines()
        return {line.split()[0]: line.split() for line in out[1:]}

    def columns_ok() -> bool:
        rows = table_rows("synctables")
        # NAME POLICY MODE READY ROWS LAG AGE
        orders_ok = rows["orders"][1:5] == ["shop", "cdc", "True", str(ORDERS + 20)]
        return orders_ok and rows["customers"][3:5] == ["True", str(CUSTOMERS)]

    wait_for("kubectl get synctables columns", columns_ok, timeout=20, logs=both_logs)
    sp = table_rows("syncpolicies")["shop"]  # NAME TABLES WORKERS SLOT-LAG READY AGE
    assert sp[1] == "3" and sp[2] == "1" and sp[3].isdigit() and sp[4] == "True", sp
    combined = cp.kubectl("get", "synctables,syncpolicies,consistencychecks", "-n", NS).stdout
    assert "synctable.datasync.dev/orders" in combined and "syncpolicy.datasync.dev/shop" in combined

    # ---- a consistency check, run by the writer at one LSN while customers keep changing
    stop_traffic = threading.Event()

    def traffic() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            n = 0
            while not stop_traffic.is_set():
                n += 1
                conn.execute("UPDATE customers SET name = %s WHERE id = %s", (f"customer {n}", 1 + n % CUSTOMERS))
                time.sleep(0.002)

    mover = threading.Thread(target=traffic, daemon=True)
    mover.start()
    rules = [{"name": "no-negative-totals", "sql": "SELECT id FROM public.orders WHERE total < 0"},
             {"name": "order-totals", "sql": "SELECT count(*), sum(total) FROM public.orders", "compareWithSource": True}]
    apply(cp, {"apiVersion": "datasync.dev/v1alpha1", "kind": "ConsistencyCheck",
               "metadata": {"name": "nightly", "namespace": NS},
               "spec": {"policyRef": {"name": "shop"}, "tables": ["orders", "customers"], "schedule": "@every 8s",
                        "checks": ["row_count", "data_hash", "business_rules", "referential_integrity"],
                        "rules": rules, "historyLimit": 3}})  # fmt: skip
    cc = wait_for("the check result", lambda: phase("consistencycheck", "nightly", "Complete"), timeout=60, logs=both_logs)
    st = cc["status"]
    assert st["score"] == 100 and st["consistent"] is True, st
    assert condition(cc, "Consistent")["status"] == "True" and condition(cc, "Complete")["status"] == "True"
    assert st["observedGeneration"] == cc["metadata"]["generation"]
    assert {r["table"]: (r["rowCountSource"], r["rowCountTarget"], r["missing"], r["extra"], r["differing"], r["ok"])
            for r in st["tables"]} == {"orders": (ORDERS + 20, ORDERS + 20, 0, 0, 0, True),
                                       "customers": (CUSTOMERS, CUSTOMERS, 0, 0, 0, True)}  # fmt: skip
    assert [(r["name"], r["ok"]) for r in st["rules"]] == [("no-negative-totals", True), ("order-totals", True)]
    assert "/" in st["lsn"] and st["lastRun"] and st["nextRun"] > st["lastRun"] and st["durationSeconds"] > 0
    # the schedule runs it again (history is bounded by historyLimit)
    cc = wait_for("a scheduled second run", lambda: (c := get(cp, "consistencycheck", "nightly")) and
                  len(c["status"].get("history", [])) >= 2 and c, timeout=60, logs=both_logs)  # fmt: skip
    assert all(h["consistent"] and h["score"] == 100 for h in cc["status"]["history"])
    line = table_rows("consistencychecks")["nightly"]  # NAME SCORE CONSISTENT LAST-RUN AGE
    assert line[1] == "100" and line[2] == "true", line
    with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert f'datasync_consistency_score{{check="nightly",namespace="{NS}"}} 100.0' in metrics
    assert f'datasync_consistency_mismatched_rows{{check="nightly",namespace="{NS}",table="orders"}} 0.0' in metrics
    assert "datasync_consistency_check_duration_seconds_count" in metrics
    assert "datasync_consistency_last_success_timestamp_seconds" in metrics
    assert "datasync_replication_lag_bytes" in metrics and postgres.password not in metrics
    stop_traffic.set()
    mover.join()

    # ---- damage the copy behind the writer's back: the check finds the rows, repair re-copies only them
    assert worker.stop() == 0, worker.tail()
    with duckdb.connect(str(target)) as con:
        con.execute("DELETE FROM public.orders WHERE id = 10")
        con.execute("UPDATE public.orders SET note = 'damaged' WHERE id = 11")
        con.execute("INSERT INTO public.customers VALUES (100000, 'stray')")
    worker = run_container_locally(cp, deployment, tmp_path, target, health_port)

    def run_after(moment: str) -> dict[str, Any] | None:
        c = get(cp, "consistencycheck", "nightly")
        s = (c or {}).get("status") or {}
        return c if s.get("phase") == "Complete" and s.get("lastRun", "") > moment else None

    damaged_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    cc = wait_for("a run that sees the damage", lambda: run_after(damaged_at), timeout=90, logs=both_logs)
    st = cc["status"]
    assert st["consistent"] is False and 99 < st["score"] < 100, st
    assert condition(cc, "Consistent")["status"] == "False" and condition(cc, "Consistent")["reason"] == "Diverged"
    by = {r["table"]: r for r in st["tables"]}
    assert sorted(by["orders"]["mismatchedKeys"]) == ["10", "11"] and by["orders"]["missing"] == 1
    assert by["customers"]["mismatchedKeys"] == ["100000"] and by["customers"]["extra"] == 1
    line = table_rows("consistencychecks")["nightly"]
    assert line[2] == "false", line
    cp.kubectl("patch", "consistencycheck", "nightly", "-n", NS, "--type=merge", "-p", '{"spec": {"repair": true}}')
    repaired_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    cc = wait_for("the repairing run", lambda: (c := run_after(repaired_at)) and c["status"]["consistent"] and c,
                  timeout=90, logs=both_logs)  # fmt: skip
    st = cc["status"]
    assert st["score"] == 100 and st["history"][0]["repaired"] == 3, st
    assert {r["table"]: r.get("repaired", 0) for r in st["tables"]} == {"orders": 2, "customers": 1}
    orders = wait_for("orders whole again", lambda: streaming("orders", ORDERS + 20), timeout=30, logs=both_logs)
    cp.kubectl("delete", "consistencycheck", "nightly", "-n", NS)

    # ---- bad sources: Ready=False with the reason and the engine's message, never the secret
    def bad(name: str) -> dict[str, Any] | None:
        p = get(cp, "syncpolicy", name, BAD_NS)
        return p if condition(p, "Ready").get("status") == "False" else None

    reasons = {name: condition(wait_for(f"{name} not Ready", lambda n=name: bad(n), logs=logs), "Ready")  # type: ignore[misc]
               for name in ("missing-secret", "wrong-password", "no-logical")}  # fmt: skip
    assert reasons["missing-secret"]["reason"] == "SecretNotFound"
    assert reasons["wrong-password"]["reason"] == "SourceUnreachable"
    assert "authentication failed" in reasons["wrong-password"]["message"]
    assert reasons["no-logical"]["reason"] == "SourceCheckFailed"
    assert "wal_level" in reasons["no-logical"]["message"]
    # the operator's log names the object a message is about, and never holds the password
    wait_for("the operator's log naming the failing table",
             lambda: f"[{BAD_NS}/wrong-password-orders] Handler 'on_change' failed temporarily: authentication failed"
             in operator.full_log(), timeout=30, logs=logs)  # fmt: skip
    assert "not-the-password-xyz" not in operator.full_log()
    bad_out = cp.kubectl("get", "syncpolicies,synctables,events,deployments", "-n", BAD_NS, "-o", "json").stdout
    assert "not-the-password-xyz" not in bad_out and replica_level_postgres.password not in bad_out
    assert get(cp, "deployment", "datasync-wrong-password", BAD_NS) is None  # nothing rendered for a broken source
    assert sql(replica_level_postgres.dsn(), "SELECT count(*) FROM pg_replication_slots") == [(0,)]

    # ---- the ghost goes away (never admitted: no hand-over needed)
    cp.kubectl("delete", "synctable", "ghost", "-n", NS, "--wait=false")
    wait_for("ghost deleted", lambda: get(cp, "synctable", "ghost") is None, timeout=30, logs=both_logs)

    # ---- restarting the operator does not redo or undo anything
    before = get(cp, "deployment", "datasync-shop")
    assert before is not None
    assert operator.stop() == 0
    operator.start()
    wait_for("the restarted operator to resume the policy",
             lambda: "reconciled" in (operator.proc.log.read_text() if operator.proc else ""), timeout=30, logs=logs)  # fmt: skip
    time.sleep(4)  # at least one timer tick of the new operator
    after = get(cp, "deployment", "datasync-shop")
    assert after is not None
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert slots(dsn) == [slot]
    assert len(json.loads(cp.kubectl("get", "deployments", "-n", NS, "-o", "json").stdout)["items"]) == 1
    assert streaming("orders", ORDERS + 20) is not None  # not reset to Pending

    # ---- a second replica: peering (random priorities) leaves exactly one of the two acting.
    # kopf starts paused until it has seen the peering; a replica acts after "Resuming
    # operations" and stops after "Pausing operations" (logged only when it was acting).
    second = Operator(cp, tmp_path / "second-operator")
    second.workdir.mkdir()
    second.start()
    try:

        def acting(op: Operator) -> bool:
            text = op.proc.log.read_text() if op.proc else ""
            return text.count("Resuming operations") > text.count("Pausing operations")

        time.sleep(5)  # both have seen each other's keep-alive in the ClusterKopfPeering
        wait_for("exactly one of two replicas acting", lambda: acting(operator) + acting(second) == 1, timeout=20,
                 logs=lambda: operator.logs() + second.logs())  # fmt: skip
    finally:
        assert second.stop() == 0

    # ---- deleting a table: the writer drops it (reclaimPolicy delete), the publication loses it, the slot stays
    cp.kubectl("delete", "synctable", "orders", "-n", NS, "--wait=false")
    wait_for("orders deleted", lambda: get(cp, "synctable", "orders") is None, timeout=60, logs=both_logs)
    assert publication_tables(dsn, publication) == ["customers"]
    assert slots(dsn) == [slot]
    wait_for("customers still streaming", lambda: streaming("customers", CUSTOMERS), timeout=30, logs=both_logs)

    # ---- deleting the last table drops the slot and the publication
    cp.kubectl("delete", "synctable", "customers", "-n", NS, "--wait=false")
    wait_for("customers deleted", lambda: get(cp, "synctable", "customers") is None, timeout=60, logs=both_logs)
    wait_for("the slot dropped", lambda: slots(dsn) == [], timeout=30, logs=both_logs)
    assert publication_tables(dsn, publication) is None

    # ---- the writer stops cleanly on SIGTERM; the file says what reclaimPolicy asked
    assert worker.stop() == 0, worker.tail()
    with duckdb.connect(str(target), read_only=True) as con:
        found = con.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'").fetchall()
        names = {r[0] for r in found}
        assert names == {"customers"}  # orders: reclaimPolicy delete; customers: retain
        assert con.execute("SELECT count(*) FROM public.customers").fetchone() == (CUSTOMERS,)
        assert con.execute("SELECT count(*) FROM _datasync.tables").fetchone() == (0,)

    # ---- deleting the policy: the garbage collector removes what it owned
    cp.kubectl("delete", "syncpolicy", "shop", "-n", NS, "--wait=false")
    def still_there(kind: str, name: str) -> str:  # what holds it (finalizers, owners), for a failure
        return f"{logs()}\n--- {kind} {name}, metadata: {json.dumps((get(cp, kind, name) or {}).get('metadata'))}"

    for kind, name in (("syncpolicy", "shop"), ("deployment", "datasync-shop"), ("role", "datasync-shop")):
        wait_for(f"{kind} {name} gone (garbage collector)", lambda k=kind, n=name: get(cp, k, n) is None,  # type: ignore[misc]
                 timeout=60, logs=lambda k=kind, n=name: still_there(k, n))  # type: ignore[misc]
    assert operator.proc is not None and operator.proc.alive()
