"""The mutating admission webhook: AdmissionReview v1 in, a JSON patch that adds the sidecar out.

`review(body, defaults)` is the whole decision and never raises: a request it cannot read,
or a pod whose annotations are malformed, is answered with `allowed: false` and a message
that says what to fix (the pod is refused rather than started unprotected). The aiohttp
app serves it over TLS at `POST /mutate`, with `GET /healthz` for the probes.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from sidecar.errors import SidecarError
from sidecar.k8s.inject import (
    InjectionError,
    SidecarDefaults,
    already_injected,
    patch,
    wants_injection,
)

LOG = logging.getLogger("sidecar.webhook")
MAX_REVIEW_BYTES = 4 * 1024 * 1024


def review(
    body: Any, defaults: SidecarDefaults, *, inject_by_default: bool = False
) -> dict[str, Any]:
    """The AdmissionReview response to one AdmissionReview request."""
    uid = ""
    try:
        if not isinstance(body, dict) or body.get("kind") != "AdmissionReview":
            raise InjectionError("expected an AdmissionReview object")
        request = body.get("request")
        if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
            raise InjectionError("the AdmissionReview has no request.uid")
        uid = request["uid"]
        kind = request.get("kind") or {}
        if kind.get("kind") != "Pod" or request.get("operation", "CREATE") != "CREATE":
            return _response(uid, allowed=True)
        pod = request.get("object")
        if not isinstance(pod, dict):
            raise InjectionError("the AdmissionReview request carries no pod object")
        if already_injected(pod) or not wants_injection(pod, default=inject_by_default):
            return _response(uid, allowed=True)
        ops = patch(pod, defaults)
    except InjectionError as exc:
        return _response(uid, allowed=False, message=f"dotmac-sidecar injection: {exc}")
    except Exception:  # a pod of a shape nobody foresaw: refuse it, never crash
        LOG.exception("injection failed")
        return _response(
            uid, allowed=False, message="dotmac-sidecar injection: the pod could not be read"
        )
    return _response(uid, allowed=True, ops=ops)


def _response(
    uid: str,
    *,
    allowed: bool,
    message: str | None = None,
    ops: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if message is not None:
        response["status"] = {"code": 403, "message": message, "reason": "Forbidden"}
    if ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def load_defaults(path: Path | None) -> tuple[SidecarDefaults, bool]:
    """The injector config file (the chart renders it): sidecar defaults, inject-by-default."""
    if path is None:
        return SidecarDefaults(), False
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SidecarError(f"{path}: cannot read the injector config ({exc})") from None
    if not isinstance(data, dict):
        raise SidecarError(f"{path}: expected a mapping")
    by_default = data.pop("injectByDefault", False)
    sidecar = data.pop("sidecar", {})
    if data:
        raise SidecarError(f"{path}: unknown key '{sorted(data)[0]}'")
    if not isinstance(by_default, bool) or not isinstance(sidecar, dict):
        raise SidecarError(f"{path}: injectByDefault is a boolean, sidecar a mapping")
    try:
        return SidecarDefaults.from_mapping(sidecar), by_default
    except (ValueError, TypeError) as exc:
        raise SidecarError(f"{path}: {exc}") from None


def build_app(defaults: SidecarDefaults, *, inject_by_default: bool = False) -> web.Application:
    """The webhook's aiohttp app."""

    async def mutate(request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        return web.json_response(review(body, defaults, inject_by_default=inject_by_default))

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    return app


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2+) from PEM files; a clear error when they are wrong."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise SidecarError(f"cannot load the TLS certificate {cert} / key {key}: {exc}") from None
    return context
