"""The demo and the command line, as a user runs them."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jwt

from tests.conftest import HS_SECRET

ROOT = Path(__file__).resolve().parent.parent


def _run_demo(cwd: Path) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "demo", "--port", "0", "--admin-port", "0"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("DOTMAC_")},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C" in line:
            break
    return proc, lines


def _status_of_curl_line(line: str) -> str:
    """Run a printed curl line with curl, or, where curl is missing, do what it says."""
    if shutil.which("curl"):
        out = subprocess.run(
            ["bash", "-c", line + " -s -o /dev/null -w '%{http_code}'"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip()
    args = shlex.split(line)
    assert args[0] == "curl"
    headers = dict(args[i + 1].split(": ", 1) for i, a in enumerate(args) if a == "-H")
    url = next(a for a in args[1:] if a.startswith("http"))
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return str(r.status)
    except urllib.error.HTTPError as err:
        return str(err.code)


def test_demo_prints_curl_lines_that_give_200_403_401(tmp_path: Path) -> None:
    # from a folder without policies/: the packaged example policy is used
    proc, lines = _run_demo(tmp_path)
    try:
        curls = [line.strip() for line in lines if line.strip().startswith("curl ")]
        assert len(curls) == 3, "".join(lines)
        codes = [_status_of_curl_line(line) for line in curls]
        assert codes == ["200", "403", "401"], "".join(lines)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert code == 0
    assert re.search(r"policy\s+\S*example-policy\.yaml", "".join(lines))


def test_token_command_mints_a_verifiable_token() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "token",
            "--secret-env",
            "T_SECRET",
            "--sub",
            "alice",
            "--roles",
            "admin,user",
            "--tenant",
            "t1",
            "--ttl",
            "5m",
            "--issuer",
            "me",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, T_SECRET=HS_SECRET),
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), HS_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["roles"] == ["admin", "user"]
    assert claims["tenant_id"] == "t1"
    assert claims["iss"] == "me"
    assert 290 <= claims["exp"] - claims["iat"] <= 300


def test_run_refuses_a_bad_config_with_one_clear_line(tmp_path: Path) -> None:
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text("listen: '127.0.0.1:0'\nproxy:\n  conect_timeout: 2s\n")
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert out.stderr.strip() == (f"dotmac-sidecar: {cfg}:3: proxy.conect_timeout: unknown key")
    assert "Traceback" not in out.stderr


def test_run_refuses_an_invalid_policy_naming_file_and_line(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("rules:\n  - name: a\n    paths: ['/a']\n    require: {roles: [ghost]}\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "run",
            "--policy",
            str(policy),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert f"{policy}:4:" in out.stderr
    assert "unknown role 'ghost'" in out.stderr


def test_refuses_to_start_without_the_c_http_parser(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "run",
            "--policy",
            str(ROOT / "policies"),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, AIOHTTP_NO_EXTENSIONS="1"),
    )
    assert out.returncode == 1
    assert "C HTTP parser is not in use" in out.stderr
