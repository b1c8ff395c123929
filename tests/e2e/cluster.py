"""A real Kubernetes control plane for tests: etcd + kube-apiserver + kube-controller-manager.

Started on loopback free ports the way controller-runtime's envtest does (no kubelet, no
scheduler: Pods are created but stay Pending). Binaries come from ``hack/k8s-bins.sh``.

Stdlib only; certificates and keys are made with the ``openssl`` command line tool.

    with ControlPlane(bin_dir, workdir) as cp:
        cp.kubectl("get", "ns")                       # admin (system:masters)
        kc = cp.service_account_kubeconfig("ns", "sa")  # a real ServiceAccount identity
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WRAPPERS = Path(__file__).resolve().parents[1] / "k8s"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"


class ControlPlaneError(RuntimeError):
    pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (same approach as envtest)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wrapper_version(component: str, module: str) -> str:
    """The version of ``module`` pinned in tests/k8s/<component>/go.mod (what hack/k8s-bins.sh builds)."""
    text = (WRAPPERS / component / "go.mod").read_text()
    m = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", text, re.M)
    if not m:
        raise ControlPlaneError(f"{module} is not required in {WRAPPERS / component / 'go.mod'}")
    return m.group(1)


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on loopback.

    ``bin_dir`` must hold etcd, kube-apiserver, kube-controller-manager and kubectl (helm
    and kwok are optional). ``workdir`` receives certificates, etcd data, logs and
    kubeconfigs; a temporary folder is used (and removed on stop) when it is None.
    """

    bin_dir: Path
    workdir: Path | None = None
    controller_manager: bool = True
    start_timeout: float = 120.0
    admin_token: str = field(default_factory=lambda: uuid.uuid4().hex)

    etcd_url: str = field(init=False, default="")
    host: str = field(init=False, default="")
    kubeconfig: Path = field(init=False)
    ca_file: Path = field(init=False)
    _kcm_token: str = field(init=False, default="")
    _procs: list[_Proc] = field(init=False, default_factory=list)
    _own_workdir: bool = field(init=False, default=False)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.bin_dir = Path(self.bin_dir)
        missing = [b for b in BINARIES if not os.access(self.bin_dir / b, os.X_OK)]
        if missing:
            raise ControlPlaneError(
                f"missing binaries in {self.bin_dir}: {', '.join(missing)} (build them with hack/k8s-bins.sh)"
            )
        if shutil.which("openssl") is None:
            raise ControlPlaneError("the 'openssl' command is needed to make certificates")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="datasync-k8s-"))
            self._own_workdir = True
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._make_pki()
            self._start_etcd()
            self._start_apiserver()
            if self.controller_manager:
                self._start_controller_manager()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        """Stop in reverse start order, one at a time (kube-apiserver shuts down in about a second
        while etcd is still up, but hangs if etcd goes first): SIGTERM, then SIGKILL after ``timeout``."""
        for p in reversed(self._procs):
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGTERM)
            try:
                p.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.kill()
                p.popen.wait(timeout=10)
        self._procs.clear()
        if self._own_workdir and self.workdir is not None and not os.environ.get("DATASYNC_K8S_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def running(self) -> bool:
        return bool(self._procs) and all(p.popen.poll() is None for p in self._procs)

    # ------------------------------------------------------------------ set-up steps
    @property
    def pki(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "pki"

    def _make_pki(self) -> None:
        pki = self.pki
        pki.mkdir(parents=True, exist_ok=True)
        _openssl("genrsa", "-out", "ca.key", "2048", cwd=pki)
        _openssl(
            "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "7",
            "-subj", "/CN=datasync-e2e-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            "-addext", "subjectKeyIdentifier=hash",
            "-out", "ca.crt", cwd=pki,
        )  # fmt: skip
        _openssl("genrsa", "-out", "apiserver.key", "2048", cwd=pki)
        _openssl("req", "-new", "-key", "apiserver.key", "-subj", "/CN=kube-apiserver", "-out", "apiserver.csr", cwd=pki)
        (pki / "apiserver.ext").write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n"
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            f"DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:{KUBERNETES_SERVICE_IP}\n"
        )
        _openssl(
            "x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-sha256", "-days", "7", "-extfile", "apiserver.ext", "-out", "apiserver.crt", cwd=pki,
        )  # fmt: skip
        # One RSA key signs ServiceAccount tokens (apiserver, controller manager) and verifies them.
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
        self.ca_file = pki / "ca.crt"
        # Static tokens: CSV token,user,uid,"groups".
        self._kcm_token = uuid.uuid4().hex
        (pki / "tokens.csv").write_text(
            f'{self.admin_token},admin,admin-uid,"system:masters"\n{self._kcm_token},system:kube-controller-manager,kcm-uid\n'
        )
        for key in ("ca.key", "apiserver.key", "sa.key", "tokens.csv"):
            (pki / key).chmod(0o600)

    def _spawn(self, name: str, args: list[str]) -> _Proc:
        assert self.workdir is not None
        log = self.workdir / f"{name}.log"
        fh = open(log, "ab")  # handed to the child process
        try:
            popen = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,  # no terminal signals; stopped by stop()
            )
        finally:
            fh.close()
        proc = _Proc(name, popen, log)
        self._procs.append(proc)
        return proc

    def _wait(self, proc: _Proc, check: Any, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise ControlPlaneError(
                    f"{proc.name} exited with code {proc.popen.returncode} while waiting for {what}; "
                    f"log {proc.log}:\n{_tail(proc.log)}"
                )
            try:
                if check():
                    return
            except (OSError, urllib.error.URLError, ssl.SSLError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.25)
        raise ControlPlaneError(
            f"{proc.name} not ready ({what}) after {self.start_timeout:.0f}s (last error: {last}); "
            f"log {proc.log}:\n{_tail(proc.log)}"
        )

    def _start_etcd(self) -> None:
        assert self.workdir is not None
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        proc = self._spawn(
            "etcd",
            [
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as r:
                return bool(json.load(r).get("health") == "true")

        self._wait(proc, healthy, "/health")

    def _start_apiserver(self) -> None:
        assert self.workdir is not None
        port = free_port()
        self.host = f"https://127.0.0.1:{port}"
        pki = self.pki
        proc = self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={self.etcd_url}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # A loopback advertise address is refused by the endpoint reconcilers.
                "--endpoint-reconciler-type=none",
                f"--secure-port={port}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                "--authorization-mode=RBAC",
                "--disable-admission-plugins=ServiceAccount",
                f"--token-auth-file={pki / 'tokens.csv'}",
                f"--service-account-issuer={self.host}/",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
            ],
        )
        self._wait(proc, lambda: self._get_text("/readyz") == "ok", "/readyz")
        self.kubeconfig = self.write_kubeconfig(self.workdir / "admin.kubeconfig", self.admin_token, user="admin")

    def _start_controller_manager(self) -> None:
        assert self.workdir is not None
        port = free_port()
        pki = self.pki
        kc = self.write_kubeconfig(
            self.workdir / "controller-manager.kubeconfig", self._kcm_token, user="system:kube-controller-manager"
        )
        proc = self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'kcm-certs'}",
                "--leader-elect=false",
                # Like kubeadm: each controller runs under its own ServiceAccount and RBAC role.
                "--use-service-account-credentials=true",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
            ],
        )
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE

        def healthy() -> bool:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=2, context=insecure) as r:
                return bool(r.read().decode().strip() == "ok")

        self._wait(proc, healthy, "/healthz")

    # ------------------------------------------------------------------ clients
    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def request(self, method: str, path: str, body: Any = None, token: str | None = None, timeout: float = 10) -> tuple[int, Any]:
        """One API call (admin token by default). Returns (status, parsed JSON or text)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.host + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl()) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def _get_text(self, path: str) -> str:
        status, body = self.request("GET", path, timeout=3)
        return body.strip() if status == 200 and isinstance(body, str) else ""

    def server_version(self) -> dict[str, Any]:
        status, body = self.request("GET", "/version")
        if status != 200:
            raise ControlPlaneError(f"GET /version: {status} {body}")
        return dict(body)

    def write_kubeconfig(self, path: Path, token: str, user: str = "user", namespace: str | None = None) -> Path:
        """A kubeconfig for ``token`` that verifies the server with the generated CA."""
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        ctx: dict[str, Any] = {"cluster": "datasync-e2e", "user": user}
        if namespace:
            ctx["namespace"] = namespace
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "datasync-e2e", "cluster": {"server": self.host, "certificate-authority-data": ca}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "datasync-e2e", "context": ctx}],
            "current-context": "datasync-e2e",
        }
        path = Path(path)
        path.write_text(json.dumps(cfg, indent=2))  # JSON is valid kubeconfig YAML
        path.chmod(0o600)
        return path

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster (admin kubeconfig by default)."""
        cmd = [str(self.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout)
        if check and proc.returncode != 0:
            raise ControlPlaneError(f"{' '.join(cmd[1:])} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}".strip())
        return proc

    # ------------------------------------------------------------------ ServiceAccounts
    def create_service_account(self, namespace: str, name: str) -> None:
        status, body = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}},
        )
        if status not in (201, 409):
            raise ControlPlaneError(f"create ServiceAccount {namespace}/{name}: {status} {body}")

    def service_account_token(
        self, namespace: str, name: str, expiration_seconds: int = 3600, audiences: list[str] | None = None
    ) -> str:
        """Mint a token for an existing ServiceAccount with the TokenRequest API."""
        spec: dict[str, Any] = {"expirationSeconds": expiration_seconds}
        if audiences:
            spec["audiences"] = audiences
        status, body = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        if status != 201 or not isinstance(body, dict) or not body.get("status", {}).get("token"):
            raise ControlPlaneError(f"TokenRequest for {namespace}/{name}: {status} {body}")
        return str(body["status"]["token"])

    def service_account_kubeconfig(
        self, namespace: str, name: str, path: Path | None = None, create: bool = True, expiration_seconds: int = 3600
    ) -> Path:
        """Kubeconfig that acts as ServiceAccount ``namespace/name`` (created unless ``create`` is False)."""
        assert self.workdir is not None
        if create:
            self.create_service_account(namespace, name)
        token = self.service_account_token(namespace, name, expiration_seconds)
        path = path or self.workdir / f"sa-{namespace}-{name}.kubeconfig"
        return self.write_kubeconfig(path, token, user=f"system:serviceaccount:{namespace}:{name}", namespace=namespace)
