"""The sidecar's exception tree; every rejection carries a status and a stable reason.

    SidecarError
    ├── ConfigError          a config file, flag or variable is wrong (names the key)
    ├── PolicyError          a policy file is wrong (names file:line and the key)
    └── Rejected             a request is refused: status + snake_case reason
        ├── BadRequest            400
        ├── Unauthenticated       401 (carries the WWW-Authenticate challenge)
        ├── Forbidden             403
        ├── MethodNotAllowed      405
        └── ...                   any other status through Rejected itself

Messages never contain a token, a key or a secret value.
"""

from __future__ import annotations

ERROR_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    429: "too_many_requests",
    431: "request_header_fields_too_large",
    500: "internal_error",
    501: "not_implemented",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
    505: "http_version_not_supported",
}


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


class ConfigError(SidecarError):
    """The configuration is invalid; the message names the key path at fault."""


class PolicyError(SidecarError):
    """A policy file is invalid; the message starts with file:line."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.detail = message


class Rejected(SidecarError):
    """A request is refused with `status`, a stable snake_case `reason` and a safe message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def error(self) -> str:
        """The `error` code of contract section 6 for this status."""
        return ERROR_CODES.get(self.status, "error")

    def headers(self) -> dict[str, str]:
        """Extra response headers this rejection needs."""
        return {}


class BadRequest(Rejected):
    """400: the request is malformed or ambiguous."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(400, reason, message)


class Unauthenticated(Rejected):
    """401: no credential, or a credential that does not verify.

    `invalid` is False when no credential was presented at all: the challenge then
    carries no `error` attribute (RFC 6750 section 3.1).
    """

    def __init__(self, reason: str, message: str, *, invalid: bool = True) -> None:
        super().__init__(401, reason, message)
        self.invalid = invalid
        self.method = ""  # the credential kind that failed (jwt, api_key), when known

    def headers(self) -> dict[str, str]:
        if not self.invalid:
            return {"WWW-Authenticate": 'Bearer realm="dotmac"'}
        description = self.message.replace('"', "'")
        return {
            "WWW-Authenticate": (
                f'Bearer realm="dotmac", error="invalid_token", error_description="{description}"'
            )
        }


class Forbidden(Rejected):
    """403: the caller is known but the policy does not allow the request."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(403, reason, message)


class MethodNotAllowed(Rejected):
    """405: TRACE, TRACK and CONNECT are never proxied."""

    def __init__(self, method: str) -> None:
        super().__init__(405, "method_not_allowed", f"method {method} is not allowed")

    def headers(self) -> dict[str, str]:
        return {"Allow": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"}
