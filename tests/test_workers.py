"""`workers: N`: processes sharing one port, one merged admin port, reload and drain intact."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.workers import merge_metrics
from tests.conftest import HERE, Keys, Process, Upstream, make_token


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def fresh_get(url: str, headers: dict[str, str] | None = None) -> int:
    """A GET on a new connection (so the kernel may pick any worker)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s, s.get(url, headers=headers) as r:
        await r.read()
        return r.status


async def wait_workers(pid: int, count: int, admin: str, within: float = 20) -> list[int]:
    deadline = time.monotonic() + within
    while True:
        kids = children(pid)
        if len(kids) == count:
            try:
                async with aiohttp.ClientSession() as s, s.get(f"{admin}/readyz") as r:
                    if r.status == 200:
                        return kids
            except aiohttp.ClientError:
                pass
        assert time.monotonic() < deadline, f"workers: {kids}"
        await asyncio.sleep(0.1)


async def test_two_workers_share_the_port_and_one_admin_port(
    sidecar_process: Any, upstream: Upstream, keys: Keys, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    shutil.copy(HERE / "policies/proxy.yaml", policy)
    proc: Process = sidecar_process(
        upstream.url, extra="workers: 2\npolicy_reload_interval: 200ms", policy=policy
    )
    admin = f"http://127.0.0.1:{proc.admin_port}"
    workers = await wait_workers(proc.proc.pid, 2, admin)
    token = make_token(keys, roles=["support"])
    auth = {"Authorization": f"Bearer {token}"}
    before = {pid: cpu_ticks(pid) for pid in workers}
    statuses = await asyncio.gather(*(fresh_get(f"{proc.url}/api/users", auth) for _ in range(300)))
    assert set(statuses) == {200}
    # both workers took part (each burned CPU on requests)
    assert all(cpu_ticks(pid) > before[pid] for pid in workers), (before, workers)

    async with aiohttp.ClientSession() as s:
        async with s.get(f"{admin}/metrics") as r:
            assert r.status == 200
            text = await r.text()
        async with s.get(f"{admin}/readyz") as r:
            body = await r.json()
            assert body["ready"] is True and body["checks"]["workers"] == "2/2 ready"
        async with s.get(f"{admin}/healthz") as r:
            assert r.status == 200
    line = 'dotmac_sidecar_requests_total{method="GET",rule="list-users",status_class="2xx"} '
    assert float(text.split(line, 1)[1].split()[0]) == 300  # summed over the workers
    assert "dotmac_sidecar_ready 1.0" in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool is needed (apt-get install prometheus; .ci/run does it)"
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # a policy edit reaches every worker
    policy.write_text(
        policy.read_text().replace(
            'require: {permissions: ["read:users"]}', "require: {roles: [admin]}", 1
        )
    )
    deadline = time.monotonic() + 3
    while True:
        codes = await asyncio.gather(*(fresh_get(f"{proc.url}/api/users", auth) for _ in range(40)))
        if set(codes) == {403}:
            break
        assert time.monotonic() < deadline, codes
        await asyncio.sleep(0.1)

    # a worker that dies is started again
    os.kill(workers[0], signal.SIGKILL)
    replaced = await wait_workers(proc.proc.pid, 2, admin, within=20)
    assert workers[0] not in replaced

    # SIGTERM: an in-flight request completes, then every process exits, the supervisor with 0
    slow = asyncio.create_task(fresh_get(f"{proc.url}/slow?ms=1500", auth))
    await asyncio.sleep(0.5)
    proc.proc.send_signal(signal.SIGTERM)
    assert await slow == 200
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    assert not children(proc.proc.pid)


def test_merge_sums_counters_and_takes_min_readiness() -> None:
    a = (
        "# TYPE dotmac_sidecar_requests counter\n"
        'dotmac_sidecar_requests_total{rule="x"} 3.0\n'
        "# TYPE dotmac_sidecar_ready gauge\n"
        "dotmac_sidecar_ready 1.0\n"
        "# TYPE dotmac_sidecar_build_info gauge\n"
        'dotmac_sidecar_build_info{version="0.1.0"} 1.0\n'
        "# TYPE dotmac_sidecar_request_duration_seconds histogram\n"
        'dotmac_sidecar_request_duration_seconds_bucket{le="0.001"} 2.0\n'
        'dotmac_sidecar_request_duration_seconds_bucket{le="+Inf"} 3.0\n'
        "dotmac_sidecar_request_duration_seconds_count 3.0\n"
        "dotmac_sidecar_request_duration_seconds_sum 0.002\n"
    )
    b = a.replace("} 3.0", "} 4.0").replace("dotmac_sidecar_ready 1.0", "dotmac_sidecar_ready 0.0")
    merged = merge_metrics([a, b]).decode()
    assert 'dotmac_sidecar_requests_total{rule="x"} 7.0' in merged
    assert "dotmac_sidecar_ready 0.0" in merged
    assert 'dotmac_sidecar_build_info{version="0.1.0"} 1.0' in merged
    assert 'dotmac_sidecar_request_duration_seconds_bucket{le="0.001"} 4.0' in merged
    assert 'dotmac_sidecar_request_duration_seconds_bucket{le="+Inf"} 7.0' in merged


async def test_workers_exit_when_the_supervisor_is_killed(
    sidecar_process: Any, upstream: Upstream
) -> None:
    proc: Process = sidecar_process(upstream.url, extra="workers: 2")
    admin = f"http://127.0.0.1:{proc.admin_port}"
    workers = await wait_workers(proc.proc.pid, 2, admin)
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(10)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "orphaned workers kept running"
        await asyncio.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
