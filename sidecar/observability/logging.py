"""Structured logs: one JSON object per line, with request and trace ids where known."""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import json
import logging
import random
import sys
import threading
import time
from typing import IO, Any

ACCESS = logging.getLogger("sidecar.access")
LOG = logging.getLogger("sidecar")

# (request_id, trace_id, span_id) of the request being handled by this task, if any
REQUEST: contextvars.ContextVar[tuple[str, str, str] | None] = contextvars.ContextVar(
    "dotmac_request", default=None
)
_access_sample = 1.0
# library use (init_observability): take trace/span ids from the current OTel span
_otel_context = False


def use_otel_context() -> None:
    """Outside the sidecar's own requests, log the ids of the current OTel span."""
    global _otel_context
    _otel_context = True


def _otel_ids() -> tuple[str, str] | None:
    from opentelemetry import trace as trace_api

    ctx = trace_api.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


# one encoder, built once (json.dumps with arguments builds a new one on every call)
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
_ts_second = -1
_ts_prefix = ""
# set by configure() for JSON logs: the access log skips the logging machinery (a
# LogRecord, a formatter call) and writes its line to the same stream, under its lock
_fast: logging.StreamHandler[Any] | None = None


class _Lines:
    """Lines of the request path (access, audit), written once per event-loop turn.

    Under `PYTHONUNBUFFERED=1` (set in the image, as in most Python images) every
    `write()` of a text stream is a system call: two per request. Here the lines of one
    loop turn are joined and leave in one write (and one flush) when the turn ends; with no
    running loop (start-up, tests) a line is written at once.
    """

    def __init__(self) -> None:
        self.stream: IO[str] | None = None
        self.lock: threading.RLock | None = None
        self.lines: list[str] = []
        self.pending = False

    def add(self, stream: IO[str], text: str, lock: threading.RLock | None = None) -> None:
        if stream is not self.stream:
            self.flush()
            self.stream, self.lock = stream, lock
        self.lines.append(text)
        if self.pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self.pending = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self.pending = False
        stream, lines = self.stream, self.lines
        if not lines or stream is None:
            return
        text = "".join(lines)
        lines.clear()
        lock = self.lock
        if lock is not None:
            lock.acquire()
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken log stream loses lines, never a request
        finally:
            if lock is not None:
                lock.release()


_lines = _Lines()
write_line = _lines.add
flush_lines = _lines.flush
atexit.register(flush_lines)


def timestamp(now: float) -> str:
    """`2026-12-04T03:25:38.420Z` for a time.time() value (the second part is cached)."""
    global _ts_second, _ts_prefix
    second = int(now)
    if second != _ts_second:
        _ts_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _ts_second = second
    return f"{_ts_prefix}.{int((now - second) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "msg", ...fields}` on one line; fields come from `extra={"fields": ...}`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": timestamp(record.created),
            "level": record.levelname,
            "msg": record.getMessage(),
        }
        # every line names its request: null outside one (start-up, background loops)
        current = REQUEST.get()
        if current is None:
            out["request_id"] = None
            ids = _otel_ids() if _otel_context else None
            if ids is not None:
                out["trace_id"], out["span_id"] = ids
        else:
            out["request_id"], out["trace_id"], out["span_id"] = current
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info and record.levelno >= logging.ERROR:
            out["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return _encode(out)


class TextFormatter(logging.Formatter):
    """Human-readable lines for local runs."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{record.levelname:<7} {record.getMessage()} {tail}".rstrip()


def configure(
    level: str = "INFO",
    fmt: str = "json",
    *,
    access_log: bool = True,
    access_log_sample_ratio: float = 1.0,
) -> None:
    """Send the sidecar's logs to stdout in the chosen format.

    `access_log_sample_ratio` < 1 keeps only that share of the access-log lines of allowed
    requests answered below 500; denials, refusals and errors are always logged.
    """
    global _access_sample, _fast
    _access_sample = access_log_sample_ratio
    handler = logging.StreamHandler(sys.stdout)
    _fast = handler if fmt == "json" else None
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


def access(fields: dict[str, Any], *, sampled: bool = False) -> None:
    """Write one access-log line (contract section 9 keys).

    `sampled`: the line is of an allowed, successful request, subject to the sample ratio.
    """
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    if sampled and _access_sample < 1.0 and random.random() >= _access_sample:
        return
    fast = _fast
    if fast is not None and not ACCESS.handlers and fast in logging.root.handlers:
        line = {"ts": timestamp(time.time()), "level": "INFO", "msg": "access", **fields}
        write_line(fast.stream, _encode(line) + "\n", fast.lock)
        return
    ACCESS.info("access", extra={"fields": fields})


_str = json.encoder.encode_basestring_ascii  # a JSON string literal, as json.dumps writes it


def request_access(
    request_id: str,
    trace_id: str | None,
    span_id: str | None,
    method: str,
    path: str,
    rule: str,
    decision: str,
    reason: str,
    status: int,
    auth_method: str,
    upstream_ms: float | None,
    duration_ms: float,
    *,
    sampled: bool,
) -> None:
    """`access()` for a request the handler answered: the same line, written directly
    (no dict, no encoder pass) when the JSON handler is the only one."""
    fast = _fast
    if fast is None or ACCESS.handlers or fast not in logging.root.handlers:
        access(
            {
                "request_id": request_id,
                "trace_id": trace_id,
                "span_id": span_id,
                "method": method,
                "path": path,
                "rule": rule,
                "decision": decision,
                "reason": reason,
                "status": status,
                "auth_method": auth_method,
                "upstream_ms": upstream_ms,
                "duration_ms": duration_ms,
            },
            sampled=sampled,
        )
        return
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    if sampled and _access_sample < 1.0 and random.random() >= _access_sample:
        return
    s = _str
    text = (
        f'{{"ts":"{timestamp(time.time())}","level":"INFO","msg":"access",'
        f'"request_id":{s(request_id)},'
        f'"trace_id":{"null" if trace_id is None else s(trace_id)},'
        f'"span_id":{"null" if span_id is None else s(span_id)},'
        f'"method":{s(method)},"path":{s(path)},"rule":{s(rule)},'
        f'"decision":{s(decision)},"reason":{s(reason)},"status":{status:d},'
        f'"auth_method":{s(auth_method)},'
        f'"upstream_ms":{"null" if upstream_ms is None else repr(upstream_ms)},'
        f'"duration_ms":{duration_ms!r}}}\n'
    )
    write_line(fast.stream, text, fast.lock)


def event(level: int, msg: str, **fields: Any) -> None:
    """Write one structured log line from the sidecar itself."""
    if LOG.isEnabledFor(level):
        LOG.log(level, msg, extra={"fields": fields})
