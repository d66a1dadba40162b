"""Structured logs: one JSON object per line, with request and trace ids where known."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

ACCESS = logging.getLogger("sidecar.access")
LOG = logging.getLogger("sidecar")


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "msg", ...fields}` on one line; fields come from `extra={"fields": ...}`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info and record.levelno >= logging.ERROR:
            out["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for local runs."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{record.levelname:<7} {record.getMessage()} {tail}".rstrip()


def configure(level: str = "INFO", fmt: str = "json", *, access_log: bool = True) -> None:
    """Send the sidecar's logs to stdout in the chosen format."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's own access log is replaced by ours; its error log stays at WARNING+
    logging.getLogger("aiohttp.access").disabled = True
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    ACCESS.disabled = not access_log
    ACCESS.setLevel(logging.INFO)


def access(fields: dict[str, Any]) -> None:
    """Write one access-log line (contract section 9 keys)."""
    if ACCESS.isEnabledFor(logging.INFO):
        ACCESS.info("access", extra={"fields": fields})


def event(level: int, msg: str, **fields: Any) -> None:
    """Write one structured log line from the sidecar itself."""
    if LOG.isEnabledFor(level):
        LOG.log(level, msg, extra={"fields": fields})
