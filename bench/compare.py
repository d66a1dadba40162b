"""Benchmark: dotmac-sidecar beside nginx and HAProxy on loopback, one run after another.

    bench/run [--runs 3] [--workers 1] [--quick]

Subjects, each in front of the same upstream (nginx, 1 worker, a fixed 1 KB body,
keep-alive):
  direct     wrk/h2load straight to the upstream
  nginx      nginx as a plain reverse proxy, 1 worker, keep-alive to the upstream
  haproxy    HAProxy (1 thread) verifying the RS256 JWT with jwt_verify, checking
             alg, exp, iss, aud and a permission claim with jwt_payload_query ACLs
  sidecar    dotmac-sidecar: RS256 JWT, a 20-rule policy, metrics and access log on
             (with --workers N > 1, also `sidecar-Nw`: the same with `workers: N`)

For each: maximum throughput (wrk, 1 thread, 32 connections, 10 s) with its p50/p99; then a
fixed 1000 requests/s for 20 s (h2load, 8 connections at 125 req/s each, started 1 ms
apart so they do not fire in lock-step) with the subject's CPU time from /proc (every
process of the subject, all threads) as vCPU per 1000 rps, its RSS (sum over its
processes) at the end, and p50/p90/p99 from h2load's per-request log. Prints a markdown
table of medians over --runs runs with ratios against direct, and writes the raw figures
as JSON to bench/out/. Loopback only; bounded in time; stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
ISSUER = "https://idp.bench"
AUDIENCE = "orders"
PATH = "/api/items/42"
TOOLS = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "h2load": "nghttp2-client"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"install these Debian packages first: {' '.join(missing)}")
    print(f"installing {' '.join(missing)} ...", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


# ------------------------------------------------------------------------------------------
# processes


@dataclass
class Subject:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    note: str = ""

    def pids(self) -> list[int]:
        """The subject's process and all its descendants."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        return total

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            except OSError:
                continue
            total += pages * PAGE
        return total / 2**20

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port} within {timeout}s")


def start(
    name: str,
    argv: list[str],
    port: int,
    log: Path,
    env: dict[str, str] | None = None,
    ready_url: str | None = None,
) -> Subject:
    out = log.open("ab")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    out.close()
    wait_port(port, proc, name)
    if ready_url:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} not ready: {log.read_text()[-2000:]}")
            time.sleep(0.05)
    return Subject(name, port, proc)


def nginx_conf(folder: Path, name: str, body: str) -> Path:
    conf = folder / f"{name}.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {folder}/{name}.pid;
error_log {folder}/{name}.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {folder}/{name}-body;
    proxy_temp_path {folder}/{name}-proxy;
    fastcgi_temp_path {folder}/{name}-fcgi;
    uwsgi_temp_path {folder}/{name}-uwsgi;
    scgi_temp_path {folder}/{name}-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
{body}
}}
"""
    )
    return conf


def start_upstream(folder: Path) -> Subject:
    port = free_port()
    payload = "x" * 1024
    conf = nginx_conf(
        folder,
        "upstream",
        f"""    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 '{payload}'; }}
    }}""",
    )
    return start(
        "upstream", ["nginx", "-c", str(conf), "-p", str(folder)], port, folder / "upstream.log"
    )


def start_nginx(folder: Path, upstream: int) -> Subject:
    port = free_port()
    conf = nginx_conf(
        folder,
        "proxy",
        f"""    upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}""",
    )
    return start("nginx", ["nginx", "-c", str(conf), "-p", str(folder)], port, folder / "nginx.log")


def start_haproxy(folder: Path, upstream: int, pubkey: Path) -> Subject:
    port = free_port()
    checks = " ".join(
        f"{{ var(txn.bearer),jwt_payload_query('$.permissions[{i}]') -m str read:items }}"
        for i in range(8)
    )
    cfg = folder / "haproxy.cfg"
    cfg.write_text(
        f"""
global
    nbthread 1
    maxconn 4096
    log stderr format short local0 err

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive

frontend fe
    bind 127.0.0.1:{port}
    http-request set-var(txn.bearer) http_auth_bearer
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
    http-request set-var(txn.now) date()
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
    acl alg_ok var(txn.alg) -m str RS256
    acl sig_ok var(txn.bearer),jwt_verify(txn.alg,"{pubkey}") -m int 1
    acl not_expired var(txn.exp),sub(txn.now) -m int gt 0
    acl iss_ok var(txn.bearer),jwt_payload_query('$.iss') -m str {ISSUER}
    acl aud_ok var(txn.bearer),jwt_payload_query('$.aud') -m str {AUDIENCE}
    http-request return status 401 unless alg_ok sig_ok not_expired iss_ok aud_ok
    http-request return status 403 unless {checks.replace("} {", "} || {")}
    default_backend app

backend app
    http-reuse always
    server app 127.0.0.1:{upstream} maxconn 64
"""
    )
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"haproxy config: {check.stdout}{check.stderr}")
    return start("haproxy", ["haproxy", "-db", "-f", str(cfg)], port, folder / "haproxy.log")


POLICY_RULES = 20


def sidecar_policy() -> str:
    """20 rules; the benchmark's request matches the 12th, which needs a permission."""
    lines = [
        "roles:",
        '  reader: {permissions: ["read:items", "read:orders"]}',
        '  admin: {permissions: ["*"]}',
        "rules:",
        '  - {name: health, paths: ["/healthz"], methods: [GET], public: true}',
    ]
    for i in range(10):
        lines.append(
            f'  - {{name: svc-{i}, paths: ["/svc{i}/{{id}}", "/svc{i}/**"], methods: [GET, POST],'
            f' require: {{permissions: ["read:svc{i}"]}}}}'
        )
    lines.append('  - {name: internal, paths: ["/internal/**"], deny: true}')
    lines.append(
        '  - {name: items, paths: ["/api/items/{id}"], methods: [GET],'
        ' require: {permissions: ["read:items"]}}'
    )
    for i in range(POLICY_RULES - 13):
        lines.append(
            f'  - {{name: after-{i}, paths: ["/api/after{i}/**"], require: {{roles: [admin]}}}}'
        )
    lines.append('  - {name: admin, paths: ["/admin/**"], require: {roles: [admin]}}')
    return "\n".join(lines) + "\n"


def launch_sidecar(
    folder: Path, name: str, upstream: int, settings: str, env: dict[str, str] | None = None
) -> Subject:
    """dotmac-sidecar on free loopback ports in front of `upstream`, with the policy in
    folder/policy.yaml and `settings` (more YAML keys) in its config; ready when it returns."""
    port, admin = free_port(), free_port()
    cfg = folder / f"{name}.yaml"
    cfg.write_text(
        f"""
listen: "127.0.0.1:{port}"
admin_listen: "127.0.0.1:{admin}"
upstream: "http://127.0.0.1:{upstream}"
policy: "{folder / "policy.yaml"}"
{settings}"""
    )
    return start(
        name,
        [sys.executable, "-m", "sidecar", "run", "--config", str(cfg)],
        port,
        folder / f"{name}.log",  # the access log lands here: one JSON line per request
        env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
        ready_url=f"http://127.0.0.1:{admin}/readyz",
    )


def start_sidecar(folder: Path, upstream: int, pubkey: Path, workers: int) -> Subject:
    (folder / "policy.yaml").write_text(sidecar_policy())
    worker_line = f"workers: {workers}\n" if workers > 1 else ""
    name = "sidecar" if workers == 1 else f"sidecar-{workers}w"
    return launch_sidecar(
        folder,
        name,
        upstream,
        f"""{worker_line}auth:
  jwt:
    - issuer: "{ISSUER}"
      audiences: ["{AUDIENCE}"]
      algorithms: ["RS256"]
      public_key_file: "{pubkey}"
observability:
  access_log: true
  log_level: INFO
""",
    )


# ------------------------------------------------------------------------------------------
# load


def _to_ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    if not m:
        raise ValueError(text)
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def steal_ticks() -> tuple[int, int, int]:
    """(steal, idle, total) CPU ticks of the machine so far: a VM's stolen time is noise,
    and idle time says whether the machine (not only the subject) was the limit."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (fields[7] if len(fields) > 7 else 0), idle, sum(fields)


def max_throughput(
    port: int, token: str, seconds: int, subject: Subject | None = None
) -> dict[str, float]:
    steal0, idle0, total0 = steal_ticks()
    cpu0, t0 = (subject.cpu_seconds() if subject else 0.0), time.monotonic()
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            "-c32",
            f"-d{seconds}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {token}",
            f"http://127.0.0.1:{port}{PATH}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"non-2xx answers under load:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _to_ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _to_ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    elapsed = time.monotonic() - t0
    cores = ((subject.cpu_seconds() - cpu0) / elapsed) if subject else 0.0
    steal1, idle1, total1 = steal_ticks()
    ticks = max(1, total1 - total0)
    return {
        "max_rps": rps,
        "max_p50_ms": p50,
        "max_p99_ms": p99,
        "steal_pct": (steal1 - steal0) / ticks * 100,
        # the subject's CPU while at its maximum (1.0 = one core), and the machine's
        "max_cores": cores,
        "machine_busy_pct": (1 - (idle1 - idle0) / ticks) * 100,
    }


def fixed_rate(
    subject: Subject, token: str, seconds: int, rate: int, folder: Path
) -> dict[str, float]:
    clients = 8
    per_client = rate // clients
    log = folder / f"h2load-{subject.name}.log"
    log.unlink(missing_ok=True)
    total = rate * seconds
    cpu0, t0 = subject.cpu_seconds(), time.monotonic()
    done = subprocess.run(
        [
            "h2load",
            "--h1",
            "-n",
            str(total),
            "-c",
            str(clients),
            "--rps",
            str(per_client),
            "-r",
            "1",
            "--rate-period",
            "1ms",
            "--log-file",
            str(log),
            "-H",
            f"authorization: Bearer {token}",
            f"http://127.0.0.1:{subject.port}{PATH}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds * 3 + 30,
    )
    elapsed = time.monotonic() - t0
    cpu = subject.cpu_seconds() - cpu0
    rss = subject.rss_mb()
    if done.returncode != 0:
        raise SystemExit(f"h2load failed: {done.stdout}{done.stderr}")
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    statuses = {r[1] for r in rows}
    if statuses != {"200"}:
        raise SystemExit(f"{subject.name}: statuses {statuses} at the fixed rate")
    latencies = sorted(int(r[2]) / 1000 for r in rows)
    achieved = len(rows) / elapsed

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]

    return {
        "rate_rps": achieved,
        "vcpu_per_1000rps": cpu / elapsed / (achieved / 1000),
        "rss_mb": rss,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
    }


@dataclass
class Results:
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def add(self, name: str, figures: dict[str, float]) -> None:
        self.runs.setdefault(name, []).append(figures)

    def median(self, name: str, key: str) -> float:
        return statistics.median(r[key] for r in self.runs[name])


def make_token(folder: Path) -> tuple[str, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = folder / "jwt.pub.pem"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "bench-user",
            "iat": now,
            "nbf": now,
            "exp": now + 6 * 3600,
            "permissions": ["read:orders", "read:items"],
        },
        key,
        algorithm="RS256",
        headers={"kid": "bench"},
    )
    return token, pub


def table(results: Results, names: list[str], runs: int) -> str:
    direct = "direct"
    out = [
        f"Medians of {runs} run(s); max = wrk -t1 -c32 10 s; fixed = 1000 req/s for 20 s "
        "(h2load, 8 connections).",
        "",
        "| subject | max rps | vs direct | max p50 ms | max p99 ms | vCPU / 1000 rps | "
        "RSS MB | p50 ms | p90 ms | p99 ms | added p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_p99 = results.median(direct, "p99_ms")
    base_rps = results.median(direct, "max_rps")
    for name in names:

        def m(key: str, name: str = name) -> float:
            return results.median(name, key)

        out.append(
            f"| {name} | {m('max_rps'):,.0f} | {m('max_rps') / base_rps:.2f}x | "
            f"{m('max_p50_ms'):.2f} | {m('max_p99_ms'):.2f} | {m('vcpu_per_1000rps'):.3f} | "
            f"{m('rss_mb'):.1f} | {m('p50_ms'):.3f} | {m('p90_ms'):.3f} | {m('p99_ms'):.3f} | "
            f"{m('p99_ms') - base_p99:+.3f} |"
        )
    worker_names = [n for n in names if n.startswith("sidecar-")]
    if worker_names and "sidecar" in results.runs:
        for name in worker_names:
            ratios = [
                w["max_rps"] / one["max_rps"]
                for w, one in zip(results.runs[name], results.runs["sidecar"], strict=False)
            ]
            out.append("")
            out.append(
                f"{name} / sidecar maximum throughput, run by run: "
                + ", ".join(f"{r:.2f}x" for r in ratios)
                + f" (median {statistics.median(ratios):.2f}x)"
            )
            out.append("")
            out.append("| at maximum throughput | sidecar | " + name + " |")
            out.append("|---|---:|---:|")
            one, many = "sidecar", name
            out.append(
                f"| sidecar CPU, cores | {results.median(one, 'max_cores'):.2f} | "
                f"{results.median(many, 'max_cores'):.2f} |"
            )
            out.append(
                f"| rps per sidecar core | "
                f"{results.median(one, 'max_rps') / results.median(one, 'max_cores'):,.0f} | "
                f"{results.median(many, 'max_rps') / results.median(many, 'max_cores'):,.0f} |"
            )
            out.append(
                f"| machine CPU busy (sidecar + wrk + upstream), % | "
                f"{results.median(one, 'machine_busy_pct'):.0f} | "
                f"{results.median(many, 'machine_busy_pct'):.0f} |"
            )
    steal = [r["steal_pct"] for runs in results.runs.values() for r in runs if "steal_pct" in r]
    if steal:
        out.append("")
        out.append(
            f"CPU time stolen from this VM during the throughput phases: median "
            f"{statistics.median(steal):.1f}%, max {max(steal):.1f}%"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=1, help="also measure the sidecar with this many workers"
    )
    parser.add_argument("--quick", action="store_true", help="3 s and 5 s phases (a smoke run)")
    parser.add_argument("--only", default="", help="comma-separated subjects to run")
    args = parser.parse_args()
    ensure_tools()
    max_s, fixed_s = (3, 5) if args.quick else (10, 20)
    names = ["direct", "nginx", "haproxy", "sidecar"]
    if args.workers > 1:
        names.append(f"sidecar-{args.workers}w")
    if args.only:
        wanted = set(args.only.split(","))
        names = [n for n in names if n in wanted or n == "direct"]
    results = Results()
    with tempfile.TemporaryDirectory(prefix="dotmac-bench-") as tmp:
        folder = Path(tmp)
        token, pub = make_token(folder)
        upstream = start_upstream(folder)
        try:
            for run in range(args.runs):
                for name in names:
                    if name == "direct":
                        subject = Subject("direct", upstream.port, upstream.proc)
                    elif name == "nginx":
                        subject = start_nginx(folder, upstream.port)
                    elif name == "haproxy":
                        subject = start_haproxy(folder, upstream.port, pub)
                    else:
                        workers = 1 if name == "sidecar" else args.workers
                        subject = start_sidecar(folder, upstream.port, pub, workers)
                    try:
                        figures = max_throughput(subject.port, token, max_s, subject)
                        figures.update(fixed_rate(subject, token, fixed_s, 1000, folder))
                    finally:
                        if name != "direct":
                            subject.stop()
                    results.add(name, figures)
                    print(
                        f"run {run + 1} {name}: "
                        + ", ".join(f"{k}={v:.3f}" for k, v in figures.items()),
                        file=sys.stderr,
                    )
        finally:
            upstream.stop()
    print(table(results, names, args.runs))
    out_dir = ROOT / "bench/out"
    out_dir.mkdir(exist_ok=True)
    out_file = out_dir / time.strftime("compare-%Y%m%d-%H%M%S.json")
    out_file.write_text(json.dumps({"runs": results.runs, "args": vars(args)}, indent=2))
    print(f"\nraw figures: {out_file.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
