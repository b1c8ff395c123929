"""The real control plane works: kubectl, CRDs with validation, controllers, RBAC, helm."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cluster import ControlPlane, ControlPlaneError, wrapper_version
from tests.e2e.waiting import wait_for

CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.e2e.datasync.local
spec:
  group: e2e.datasync.local
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}
  versions:
    - name: v1
      served: true
      storage: true
      subresources: {status: {}}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size: {type: integer, minimum: 1}
            status:
              type: object
              properties:
                ready: {type: boolean}
"""

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: {ns}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
        - name: web
          image: registry.invalid/never-pulled:1   # no kubelet here: Pods stay Pending
"""



def get_json(cp: ControlPlane, *args: str) -> Any:
    return json.loads(cp.kubectl("get", *args, "-o", "json").stdout)


@pytest.fixture
def namespace(k8s_cluster: ControlPlane, request: pytest.FixtureRequest) -> str:
    name: str = "e2e-" + request.node.name.replace("_", "-").lower()[:40].rstrip("-")
    k8s_cluster.kubectl("create", "namespace", name)
    return name


def test_server_version_matches_build(k8s_cluster: ControlPlane, k8s_version: str) -> None:
    assert k8s_cluster.server_version()["gitVersion"] == k8s_version
    out = json.loads(k8s_cluster.kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"] == k8s_version
    assert out["clientVersion"]["gitVersion"] == k8s_version  # the kubectl we built


def test_namespace(k8s_cluster: ControlPlane, namespace: str) -> None:
    ns = get_json(k8s_cluster, "namespace", namespace)
    assert ns["metadata"]["name"] == namespace
    assert ns["status"]["phase"] == "Active"
    # kube-controller-manager's serviceaccount and root-ca-cert-publisher controllers run.
    wait_for(
        "default ServiceAccount",
        lambda: k8s_cluster.kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0,
    )
    cm = wait_for(
        "kube-root-ca.crt ConfigMap",
        lambda: k8s_cluster.kubectl("get", "cm", "kube-root-ca.crt", "-n", namespace, "-o", "json", check=False).stdout,
    )
    assert json.loads(cm)["data"]["ca.crt"] == k8s_cluster.ca_file.read_text()


def test_custom_resource_definition(k8s_cluster: ControlPlane, namespace: str) -> None:
    k8s_cluster.kubectl("apply", "-f", "-", input=CRD)
    k8s_cluster.kubectl("wait", "--for=condition=Established", "crd/widgets.e2e.datasync.local", "--timeout=60s")
    good = {"apiVersion": "e2e.datasync.local/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}}
    k8s_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(good))
    assert get_json(k8s_cluster, "widgets", "w1", "-n", namespace)["spec"]["size"] == 3
    # The real apiserver validates against the CRD schema.
    bad = {**good, "metadata": {"name": "w2"}, "spec": {"size": 0}}
    proc = k8s_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0
    assert "spec.size" in proc.stderr and "should be greater than or equal to 1" in proc.stderr
    # The status subresource ignores status on the main resource and vice versa.
    k8s_cluster.kubectl(
        "patch",
        "widget",
        "w1",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"ready":true}}',
    )
    assert get_json(k8s_cluster, "widget", "w1", "-n", namespace)["status"] == {"ready": True}


def test_deployment_gets_replicaset_from_controller_manager(k8s_cluster: ControlPlane, namespace: str) -> None:
    k8s_cluster.kubectl("apply", "-f", "-", input=DEPLOYMENT.format(ns=namespace))
    deploy = get_json(k8s_cluster, "deployment", "web", "-n", namespace)

    def replicasets() -> list[dict[str, Any]]:
        return list(get_json(k8s_cluster, "replicasets", "-n", namespace, "-l", "app=web")["items"])

    rs = wait_for("ReplicaSet of Deployment web", replicasets)
    assert len(rs) == 1
    owner = rs[0]["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Deployment", "web", deploy["metadata"]["uid"])
    assert owner["controller"] is True
    assert rs[0]["spec"]["replicas"] == 2

    # The ReplicaSet controller creates the Pods; nothing schedules them here.
    def pods() -> list[dict[str, Any]]:
        items = get_json(k8s_cluster, "pods", "-n", namespace, "-l", "app=web")["items"]
        return list(items) if len(items) == 2 else []

    for pod in wait_for("2 Pods of ReplicaSet", pods):
        assert pod["metadata"]["ownerReferences"][0]["name"] == rs[0]["metadata"]["name"]
        assert pod["status"]["phase"] == "Pending"
        assert not pod["spec"].get("nodeName")
    wait_for(
        "Deployment status",
        lambda: get_json(k8s_cluster, "deployment", "web", "-n", namespace)["status"].get("replicas") == 2,
    )

    # Garbage collector: deleting the Deployment removes its ReplicaSet and Pods.
    k8s_cluster.kubectl("delete", "deployment", "web", "-n", namespace, "--cascade=foreground", "--timeout=60s")
    wait_for("ReplicaSet deletion", lambda: not replicasets())


def test_service_account_token_has_real_rbac(k8s_cluster: ControlPlane, namespace: str) -> None:
    kc = k8s_cluster.service_account_kubeconfig(namespace, "operator")
    who = json.loads(k8s_cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=kc).stdout)
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:operator"

    denied = k8s_cluster.kubectl("get", "configmaps", "-n", namespace, kubeconfig=kc, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    k8s_cluster.kubectl("create", "role", "cm-reader", "-n", namespace, "--verb=get,list", "--resource=configmaps")
    k8s_cluster.kubectl(
        "create",
        "rolebinding",
        "cm-reader",
        "-n",
        namespace,
        "--role=cm-reader",
        f"--serviceaccount={namespace}:operator",
    )
    wait_for(
        "RBAC to allow the ServiceAccount",
        lambda: k8s_cluster.kubectl("get", "configmaps", "-n", namespace, kubeconfig=kc, check=False).returncode == 0,
        timeout=30,
    )
    # Still nothing beyond the Role.
    assert k8s_cluster.kubectl("get", "secrets", "-n", namespace, kubeconfig=kc, check=False).returncode != 0
    with pytest.raises(ControlPlaneError, match="TokenRequest"):
        k8s_cluster.service_account_token(namespace, "does-not-exist")


def _helm(bin_dir: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    proc = subprocess.run([str(bin_dir / "helm"), *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_helm_version_and_install(k8s_cluster: ControlPlane, namespace: str, tmp_path: Path) -> None:
    out = _helm(k8s_cluster.bin_dir, tmp_path, "version", "--template", "{{.Version}}").stdout.strip()
    assert out == wrapper_version("helm", "helm.sh/helm/v3")

    chart = tmp_path / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: e2e\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )
    (chart / "values.yaml").write_text("greeting: hello\n")
    _helm(
        k8s_cluster.bin_dir, tmp_path, "install", "rel", str(chart), "-n", namespace,
        f"--kubeconfig={k8s_cluster.kubeconfig}", "--set", "greeting=hi", "--wait", "--timeout=60s",
    )  # fmt: skip
    assert get_json(k8s_cluster, "configmap", "rel-cm", "-n", namespace)["data"] == {"greeting": "hi"}
    listed = json.loads(_helm(k8s_cluster.bin_dir, tmp_path, "list", "-n", namespace, "-o", "json",
                              f"--kubeconfig={k8s_cluster.kubeconfig}").stdout)  # fmt: skip
    assert [(r["name"], r["status"]) for r in listed] == [("rel", "deployed")]


def test_kwok_binary_runs(k8s_bin_dir: Path) -> None:
    proc = subprocess.run([str(k8s_bin_dir / "kwok"), "--version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert wrapper_version("kwok", "sigs.k8s.io/kwok").lstrip("v") in proc.stdout + proc.stderr
