"""Fixtures for end-to-end tests against a real Kubernetes control plane.

Binaries: ``$DATASYNC_K8S_BIN`` if set, else built (or found in the cache) by
``hack/k8s-bins.sh``. The build runs once, right after collection and only when a selected
test uses ``k8s_cluster``/``k8s_bin_dir``, so a cold build (tens of minutes) is not cut short
by the per-test timeout. Missing binaries or a failed build fail the tests, never skip them.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import BINARIES, ControlPlane, wrapper_version

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "hack" / "k8s-bins.sh"
REQUIRED = (*BINARIES, "helm", "kwok")
BUILD_TIMEOUT = float(os.environ.get("DATASYNC_K8S_BUILD_TIMEOUT", "5400"))

_bins_key = pytest.StashKey[tuple[Path | None, str]]()


def _find_bins() -> tuple[Path | None, str]:
    """(bin dir, "") or (None, reason)."""
    env = os.environ.get("DATASYNC_K8S_BIN")
    if env:
        bin_dir = Path(env)
        source = f"DATASYNC_K8S_BIN={env}"
    else:
        if not os.access(BUILD_SCRIPT, os.X_OK):
            return None, f"{BUILD_SCRIPT} is missing or not executable"
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                [str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            return None, f"{BUILD_SCRIPT} did not finish within {BUILD_TIMEOUT:.0f}s"
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = "\n".join(proc.stderr.strip().splitlines()[-30:])
            return None, f"{BUILD_SCRIPT} failed (exit {proc.returncode}):\n{tail}"
        bin_dir = Path(lines[-1])
        source = f"{BUILD_SCRIPT} ({time.monotonic() - t0:.0f}s)"
    missing = [b for b in REQUIRED if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        return None, f"binaries missing in {bin_dir} (from {source}): {', '.join(missing)}"
    return bin_dir, ""


def _bins(config: pytest.Config) -> tuple[Path | None, str]:
    if _bins_key not in config.stash:
        config.stash[_bins_key] = _find_bins()
    return config.stash[_bins_key]


def pytest_collection_finish(session: pytest.Session) -> None:
    # Build before the first test starts (outside any per-test timeout), only if needed.
    if any({"k8s_cluster", "k8s_bin_dir"} & set(getattr(item, "fixturenames", ())) for item in session.items):
        _bins(session.config)


@pytest.fixture(scope="session")
def k8s_bin_dir(request: pytest.FixtureRequest) -> Path:
    bin_dir, reason = _bins(request.config)
    if bin_dir is None:
        pytest.fail(f"Kubernetes binaries unavailable: {reason}", pytrace=False)
    return bin_dir


@pytest.fixture(scope="session")
def k8s_version() -> str:
    return wrapper_version("kube", "k8s.io/kubernetes")


@pytest.fixture(scope="session")
def k8s_cluster(k8s_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager for the whole session."""
    cp = ControlPlane(bin_dir=k8s_bin_dir, workdir=tmp_path_factory.mktemp("k8s"))
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="module")
def installed(k8s_cluster: ControlPlane) -> ControlPlane:
    """CRDs, kopf's peering resources, the operator's namespace and RBAC, applied like the docs say."""
    cp = k8s_cluster
    cp.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cp.kubectl("apply", "--server-side", "-f", str(REPO / "manifests/operator/kopf-peering-crds.yaml"))
    for crd in ("syncpolicies", "synctables", "consistencychecks"):
        cp.kubectl("wait", "--for=condition=Established", f"crd/{crd}.datasync.dev", "--timeout=60s")
    for crd in ("clusterkopfpeerings", "kopfpeerings"):
        cp.kubectl("wait", "--for=condition=Established", f"crd/{crd}.kopf.dev", "--timeout=60s")
    cp.kubectl("apply", "--server-side", "-f", str(REPO / "manifests/operator/namespace.yaml"))
    cp.kubectl("apply", "--server-side", "-f", str(REPO / "manifests/operator/peering.yaml"))
    cp.kubectl("apply", "--server-side", "-k", str(REPO / "manifests/rbac"))
    return cp
