"""Hot reload: poll the policy file or folder, compile a new snapshot, swap it in whole.

Changes are detected by content (a digest of every file's name and text), so Kubernetes
ConfigMap updates, which swap a `..data` symlink and keep old mtimes, are seen. Reading and
compiling run in a worker thread. A broken edit never replaces the last good policy: it is
logged with file:line, counted, and reported on /readyz without gating it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from sidecar.errors import PolicyError
from sidecar.observability import logging as logs
from sidecar.policy.load import compile_sources, read_sources
from sidecar.policy.model import Policy

# Policy -> failure lines of the policy tests beside it ([] when they pass or do not gate)
TestGate = Callable[[Policy], list[str]]


def _digest(sources: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, text in sources:
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def _read_all(path: Path, extra: Callable[[], list[tuple[str, str]]]) -> list[tuple[str, str]]:
    return read_sources(path) + extra()


class PolicyWatcher:
    """Reloads the policy at `path` every `interval` seconds when its content changed."""

    def __init__(
        self,
        path: Path,
        current: Policy,
        *,
        interval: float,
        on_change: Callable[[Policy], None],
        on_result: Callable[[str], None],
        gate: TestGate | None = None,
        enforce_tests: bool = False,
        test_sources: Callable[[], list[tuple[str, str]]] = list,
    ) -> None:
        self.path = path
        self.interval = interval
        self.on_change = on_change
        self.on_result = on_result  # "success" | "failure"
        self.gate = gate
        self.enforce_tests = enforce_tests
        self.test_sources = test_sources
        self.last_error = ""
        self._digest = ""
        self._failed_digest = ""
        self._current = current

    async def prime(self) -> None:
        """Remember the digest of what is loaded now, so the first poll does not reload it."""
        try:
            sources = await asyncio.to_thread(_read_all, self.path, self.test_sources)
        except PolicyError:
            return
        self._digest = _digest(sources)

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            await self.poll()

    async def poll(self) -> bool:
        """Reload if the content changed; True when a new policy was swapped in."""
        try:
            sources = await asyncio.to_thread(_read_all, self.path, self.test_sources)
        except PolicyError as exc:
            self._fail(str(exc), f"unreadable:{exc}")
            return False
        digest = _digest(sources)
        if digest in (self._digest, self._failed_digest):
            return False
        policy_sources = [s for s in sources if not _is_test(s[0])]
        try:
            policy = await asyncio.to_thread(compile_sources, policy_sources)
        except PolicyError as exc:
            self._fail(str(exc), digest)
            return False
        if self.gate is not None:
            failures = await asyncio.to_thread(self.gate, policy)
            if failures and self.enforce_tests:
                self._fail("policy tests failed: " + "; ".join(failures), digest)
                return False
            if failures:
                logs.event(logging.WARNING, "policy_tests_failed", failures=failures)
        self._digest = digest
        self._failed_digest = ""
        self.last_error = ""
        self._current = policy
        self.on_change(policy)
        self.on_result("success")
        logs.event(
            logging.INFO,
            "policy_reloaded",
            rules=len(policy.rules),
            files=len(policy.sources),
            digest=policy.digest[:12],
        )
        return True

    def _fail(self, message: str, digest: str) -> None:
        if digest and digest == self._failed_digest:
            return
        self._failed_digest = digest
        self.last_error = message
        self.on_result("failure")
        logs.event(
            logging.ERROR,
            "policy_reload_failed",
            error=message,
            kept_digest=self._current.digest[:12],
        )


def _is_test(name: str) -> bool:
    return name.endswith(("_test.yaml", "_test.yml"))
