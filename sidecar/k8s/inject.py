"""Sidecar injection: a pod and its annotations in, the JSON patch that adds the sidecar out.

The pod this produces is the one the Helm named templates `dotmac-sidecar.container` and
`dotmac-sidecar.volumes` render for the same inputs (a test holds the two together):
- the sidecar is a native sidecar, the first init container, `restartPolicy: Always`, so
  Kubernetes (1.29+) starts it, waits for its startup probe on `/readyz` (policy, keys and
  secrets loaded), and only then starts the app; on shutdown it stops after the app;
- the app's container port named `http` is renamed `http-app` (and its probes that named
  it follow), and the sidecar takes `http`, so Services that target the named port reach
  the sidecar unchanged;
- it runs as non-root with a read-only root file system and no capabilities; `/tmp` and
  `/run/secrets` are in-memory `emptyDir`s.

Annotations (contract section 8): `sidecar.dotmac.io/inject` ("true" / "false"),
`.../upstream-port`, `.../policy-configmap`, `.../config-configmap`, `.../vault-role`.
A malformed annotation raises `InjectionError` with a message fit for the admission
response; nothing here can raise anything else on a pod of any shape.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

PREFIX = "sidecar.dotmac.io/"
INJECT = PREFIX + "inject"
STATUS = PREFIX + "status"
UPSTREAM_PORT = PREFIX + "upstream-port"
POLICY_CONFIGMAP = PREFIX + "policy-configmap"
CONFIG_CONFIGMAP = PREFIX + "config-configmap"
VAULT_ROLE = PREFIX + "vault-role"
KNOWN = frozenset({INJECT, STATUS, UPSTREAM_PORT, POLICY_CONFIGMAP, CONFIG_CONFIGMAP, VAULT_ROLE})

CONTAINER = "dotmac-sidecar"
APP_PORT_NAME = "http-app"
ADMIN_PORT_NAME = "dotmac-admin"
CONFIG_DIR = "/etc/dotmac/config"
POLICY_DIR = "/etc/dotmac/policies"
VOLUMES = ("dotmac-config", "dotmac-policy", "dotmac-tmp", "dotmac-secrets")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_ROLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class InjectionError(ValueError):
    """The pod cannot be injected as asked; the message says why, naming the annotation."""


@dataclass(frozen=True)
class SidecarDefaults:
    """What every injected sidecar gets unless a pod's annotations say otherwise.

    The Helm chart renders these from its `sidecar:` values into the injector's config, so
    the webhook and the named templates start from the same values.
    """

    image: str = "ghcr.io/dotmac/sidecar:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    listen_port: int = 8000
    admin_port: int = 9090
    upstream_port: int = 8080
    policy_configmap: str = "dotmac-policy"
    config_configmap: str = ""
    vault_role: str = ""
    log_level: str = "INFO"
    resources: dict[str, Any] = field(
        default_factory=lambda: {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"cpu": "1", "memory": "256Mi"},
        }
    )
    run_as_user: int = 10001

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> SidecarDefaults:
        """From the injector config (the chart's `sidecar:` values, camelCase keys)."""
        known = {
            "image": str,
            "imagePullPolicy": str,
            "listenPort": int,
            "adminPort": int,
            "upstreamPort": int,
            "policyConfigMap": str,
            "configConfigMap": str,
            "vaultRole": str,
            "logLevel": str,
            "resources": dict,
            "runAsUser": int,
        }
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"injector config: unknown key '{unknown[0]}'")
        for key, kind in known.items():
            if key in data and not isinstance(data[key], kind):
                raise ValueError(f"injector config: '{key}' must be a {kind.__name__}")
        snake = {
            "imagePullPolicy": "image_pull_policy",
            "listenPort": "listen_port",
            "adminPort": "admin_port",
            "upstreamPort": "upstream_port",
            "policyConfigMap": "policy_configmap",
            "configConfigMap": "config_configmap",
            "vaultRole": "vault_role",
            "logLevel": "log_level",
            "runAsUser": "run_as_user",
        }
        return cls(**{snake.get(k, k): v for k, v in data.items()})


@dataclass(frozen=True)
class PodInputs:
    """The per-pod inputs, after the annotations were read and checked."""

    upstream_port: int
    policy_configmap: str
    config_configmap: str
    vault_role: str


def wants_injection(pod: dict[str, Any], *, default: bool = False) -> bool:
    """Whether the pod asks for the sidecar (annotation "true"), or opts out ("false")."""
    value = _annotations(pod).get(INJECT)
    if value is None:
        return default
    if value not in ("true", "false"):
        raise InjectionError(f'annotation {INJECT} must be "true" or "false", not {value!r}')
    return value == "true"


def already_injected(pod: dict[str, Any]) -> bool:
    """The pod has the sidecar already (a re-run of the webhook, or static injection)."""
    spec = pod.get("spec") or {}
    containers = list(spec.get("initContainers") or []) + list(spec.get("containers") or [])
    return any(isinstance(c, dict) and c.get("name") == CONTAINER for c in containers)


def pod_inputs(pod: dict[str, Any], defaults: SidecarDefaults) -> PodInputs:
    """Read and check the pod's annotations; the app's `http` port is the default upstream."""
    notes = _annotations(pod)
    for key in notes:
        if key.startswith(PREFIX) and key not in KNOWN:
            raise InjectionError(f"unknown annotation {key}")
    port_text = notes.get(UPSTREAM_PORT)
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise InjectionError(
                f"annotation {UPSTREAM_PORT} must be a port number 1-65535, not {port_text!r}"
            )
        upstream = int(port_text)
    else:
        upstream = _named_http_port(pod) or defaults.upstream_port
    if upstream in (defaults.listen_port, defaults.admin_port):
        raise InjectionError(
            f"the app's port {upstream} is the sidecar's own port; set {UPSTREAM_PORT} to "
            "the port the app listens on, and have it listen on another"
        )
    policy = notes.get(POLICY_CONFIGMAP, defaults.policy_configmap)
    config = notes.get(CONFIG_CONFIGMAP, defaults.config_configmap)
    for key, value in ((POLICY_CONFIGMAP, policy), (CONFIG_CONFIGMAP, config)):
        if value and not (_DNS_SUBDOMAIN.match(value) and len(value) <= 253):
            raise InjectionError(f"annotation {key} must be a ConfigMap name, not {value!r}")
    if not policy:
        raise InjectionError(f"no policy ConfigMap: set the annotation {POLICY_CONFIGMAP}")
    role = notes.get(VAULT_ROLE, defaults.vault_role)
    if role and not _ROLE.match(role):
        raise InjectionError(f"annotation {VAULT_ROLE} must be a Vault role name, not {role!r}")
    return PodInputs(upstream, policy, config, role)


def sidecar_container(defaults: SidecarDefaults, inputs: PodInputs) -> dict[str, Any]:
    """The injected init container (mirrors the chart's `dotmac-sidecar.container`)."""
    args = []
    if inputs.config_configmap:
        args += ["--config", f"{CONFIG_DIR}/sidecar.yaml"]
    args += [
        "--listen",
        f"0.0.0.0:{defaults.listen_port}",
        "--admin-listen",
        f"0.0.0.0:{defaults.admin_port}",
        "--upstream",
        f"http://127.0.0.1:{inputs.upstream_port}",
        "--policy",
        POLICY_DIR,
    ]
    env = [{"name": "DOTMAC_LOG_LEVEL", "value": defaults.log_level}]
    if inputs.vault_role:
        env.append({"name": "DOTMAC_VAULT_ROLE", "value": inputs.vault_role})
    mounts = [{"name": "dotmac-policy", "mountPath": POLICY_DIR, "readOnly": True}]
    if inputs.config_configmap:
        mounts.append({"name": "dotmac-config", "mountPath": CONFIG_DIR, "readOnly": True})
    mounts += [
        {"name": "dotmac-tmp", "mountPath": "/tmp"},
        {"name": "dotmac-secrets", "mountPath": "/run/secrets/dotmac"},
    ]

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": ADMIN_PORT_NAME},
            "periodSeconds": period,
            "timeoutSeconds": 1,
            "failureThreshold": failures,
        }

    return {
        "name": CONTAINER,
        "image": defaults.image,
        "imagePullPolicy": defaults.image_pull_policy,
        "restartPolicy": "Always",
        "args": args,
        "env": env,
        "ports": [
            {"name": "http", "containerPort": defaults.listen_port, "protocol": "TCP"},
            {"name": ADMIN_PORT_NAME, "containerPort": defaults.admin_port, "protocol": "TCP"},
        ],
        "startupProbe": probe("/readyz", 1, 120),
        "readinessProbe": probe("/readyz", 5, 3),
        "livenessProbe": probe("/healthz", 10, 3),
        "resources": copy.deepcopy(defaults.resources),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": defaults.run_as_user,
            "runAsGroup": defaults.run_as_user,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }


def sidecar_volumes(inputs: PodInputs) -> list[dict[str, Any]]:
    """The pod volumes the sidecar mounts (mirrors the chart's `dotmac-sidecar.volumes`)."""
    volumes: list[dict[str, Any]] = [
        {"name": "dotmac-policy", "configMap": {"name": inputs.policy_configmap}}
    ]
    if inputs.config_configmap:
        volumes.append({"name": "dotmac-config", "configMap": {"name": inputs.config_configmap}})
    volumes += [
        {"name": "dotmac-tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        {"name": "dotmac-secrets", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]
    return volumes


def patch(pod: dict[str, Any], defaults: SidecarDefaults) -> list[dict[str, Any]]:
    """The RFC 6902 JSON patch that injects the sidecar into `pod` ([] if it has it)."""
    if not isinstance(pod.get("spec"), dict) or not isinstance(pod["spec"].get("containers"), list):
        raise InjectionError("the object is not a pod with spec.containers")
    if already_injected(pod):
        return []
    inputs = pod_inputs(pod, defaults)
    spec = pod["spec"]
    names = {str(v.get("name")) for v in spec.get("volumes") or [] if isinstance(v, dict)}
    clash = sorted(names & set(VOLUMES))
    if clash:
        raise InjectionError(f"the pod already has a volume named {clash[0]}")
    ops: list[dict[str, Any]] = []

    # the app's port named http becomes http-app; its probes that named it follow
    for i, container in enumerate(spec["containers"]):
        if not isinstance(container, dict):
            raise InjectionError(f"spec.containers[{i}] is not a container")
        raw_ports = container.get("ports") or []
        ports = [p for p in raw_ports if isinstance(p, dict)]
        if {"http", APP_PORT_NAME} <= {p.get("name") for p in ports}:
            raise InjectionError(
                f"spec.containers[{i}] has ports named both http and {APP_PORT_NAME}"
            )
        for j, port in enumerate(raw_ports):
            if not isinstance(port, dict):
                continue
            if port.get("name") == "http":
                ops.append(
                    {
                        "op": "replace",
                        "path": f"/spec/containers/{i}/ports/{j}/name",
                        "value": APP_PORT_NAME,
                    }
                )
            if port.get("containerPort") in (defaults.listen_port, defaults.admin_port):
                raise InjectionError(
                    f"spec.containers[{i}] listens on {port['containerPort']}, a port the "
                    "sidecar takes; move the app to another port"
                )
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            action = (container.get(probe) or {}).get("httpGet") or {}
            if isinstance(action, dict) and action.get("port") == "http":
                ops.append(
                    {
                        "op": "replace",
                        "path": f"/spec/containers/{i}/{probe}/httpGet/port",
                        "value": APP_PORT_NAME,
                    }
                )

    container = sidecar_container(defaults, inputs)
    if spec.get("initContainers"):
        ops.append({"op": "add", "path": "/spec/initContainers/0", "value": container})
    else:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": [container]})
    volumes = sidecar_volumes(inputs)
    if spec.get("volumes"):
        ops += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes]
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes})
    meta = pod.get("metadata") or {}
    if not meta:
        ops.append({"op": "add", "path": "/metadata", "value": {}})
    if not meta.get("annotations"):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    ops.append(
        {"op": "add", "path": "/metadata/annotations/" + _pointer(STATUS), "value": "injected"}
    )
    return ops


def _annotations(pod: dict[str, Any]) -> dict[str, str]:
    meta = pod.get("metadata")
    notes = meta.get("annotations") if isinstance(meta, dict) else None
    if not isinstance(notes, dict):
        return {}
    return {str(k): str(v) for k, v in notes.items()}


def _named_http_port(pod: dict[str, Any]) -> int | None:
    for container in pod["spec"].get("containers") or []:
        for port in (container.get("ports") or []) if isinstance(container, dict) else []:
            if isinstance(port, dict) and port.get("name") in ("http", APP_PORT_NAME):
                value = port.get("containerPort")
                if isinstance(value, int):
                    return value
    return None


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")
