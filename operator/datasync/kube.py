"""A small, typed Kubernetes API client: JSON in, JSON out, by REST path.

Why not the generated ``kubernetes`` API classes: the operator and the worker touch a
handful of kinds (three custom resources, Deployments, PVCs, RBAC, Secrets) and want the
same few verbs on each: get, list, server-side apply, merge-patch of ``/status``, delete.
Working with plain dicts by path keeps that uniform, keeps custom resources first-class and
keeps mypy strict at this boundary. What the ``kubernetes`` package does give us is the hard
part: loading credentials exactly like kubectl (kubeconfig with tokens, certificates and exec
plugins; in-cluster ServiceAccount tokens, re-read when the kubelet rotates them) and a
pooled, TLS-verifying HTTP client. kopf logs in through the same package, so the operator's
handlers and kopf's watches always act as the same identity.

Server-side apply (``apply``) is how the operator owns the objects it renders: re-applying an
unchanged object is a no-op on the server (no new resourceVersion, no rollout), fields other
managers set are left alone, and a field the operator stops rendering is removed.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any
from urllib.parse import quote, urlencode

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

FIELD_MANAGER = "datasync-operator"
WORKER_FIELD_MANAGER = "datasync-worker"

Obj = dict[str, Any]


class ApiError(RuntimeError):
    """A non-2xx answer from the apiserver (``status`` is the HTTP status code)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


def path(
    api_version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """REST path of a collection or an object: ``path("apps/v1", "deployments", "ns", "x")``."""
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [root]
    if namespace:
        parts += ["namespaces", quote(namespace, safe="")]
    parts.append(plural)
    if name:
        parts.append(quote(name, safe=""))
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


#: Plural resource names of the built-in kinds the operator renders.
PLURALS = {
    "Deployment": "deployments",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Secret": "secrets",
    "SyncPolicy": "syncpolicies",
    "SyncTable": "synctables",
    "ConsistencyCheck": "consistencychecks",
}


def object_path(obj: Obj, subresource: str | None = None) -> str:
    meta = obj["metadata"]
    return path(obj["apiVersion"], PLURALS[obj["kind"]], meta.get("namespace"), meta["name"], subresource)


class Kube:
    """Synchronous JSON client for one identity (thread-safe: urllib3 pools connections)."""

    def __init__(self, api: Any) -> None:
        self._api = api

    @classmethod
    def from_environment(cls) -> Kube:
        """In a pod: the ServiceAccount; elsewhere: ``$KUBECONFIG`` or ~/.kube/config (like kubectl)."""
        configuration = k8s_client.Configuration()
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            k8s_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return cls(k8s_client.ApiClient(configuration))

    def request(
        self,
        method: str,
        url_path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Obj:
        """One call; returns the decoded JSON answer or raises :class:`ApiError`."""
        if query:
            url_path = f"{url_path}?{urlencode(query)}"
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method_, url, header_params, body_, post = self._api.param_serialize(
            method, url_path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        response = self._api.call_api(method_, url, header_params, body_, post, _request_timeout=timeout)
        raw = response.read() or b""
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"message": raw.decode(errors="replace")}
        if not 200 <= response.status <= 299:
            raise ApiError(response.status, str(data.get("reason") or response.reason), str(data.get("message") or data))
        return data if isinstance(data, dict) else {"items": data}

    # ------------------------------------------------------------------ verbs
    def get(self, url_path: str) -> Obj | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", url_path)
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    def list(self, url_path: str, label_selector: str | None = None) -> list[Obj]:
        query = {"labelSelector": label_selector} if label_selector else None
        items = self.request("GET", url_path, query=query).get("items") or []
        return list(items)

    def apply(self, obj: Obj, field_manager: str = FIELD_MANAGER) -> Obj:
        """Server-side apply ``obj`` (created when missing); conflicts with other managers are forced."""
        return self.request(
            "PATCH",
            object_path(obj),
            obj,
            content_type="application/apply-patch+yaml",  # JSON is YAML
            query={"fieldManager": field_manager, "force": "true"},
        )

    def merge_patch(self, url_path: str, patch: Obj) -> Obj:
        return self.request("PATCH", url_path, patch, content_type="application/merge-patch+json")

    def patch_status(self, api_version: str, plural: str, namespace: str, name: str, status: Obj) -> Obj | None:
        """Merge ``status`` into the object's status subresource; None when the object is gone."""
        try:
            return self.merge_patch(path(api_version, plural, namespace, name, "status"), {"status": status})
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    def delete(self, url_path: str) -> bool:
        """Delete (background propagation); False when it was already gone."""
        try:
            self.request("DELETE", url_path, {"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.not_found:
                return False
            raise
        return True


_shared: Kube | None = None
_shared_lock = threading.Lock()


def shared() -> Kube:
    """One client per process, created on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Kube.from_environment()
        return _shared
