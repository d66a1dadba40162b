"""Benchmark: microseconds per token verification, first sight vs cached.

    python bench/jwt_verify.py

For HS256, RS256 (2048-bit) and ES256 (P-256): "first sight" verifies distinct tokens
(every one a cache miss: header parse, issuer pick, signature, claims, identity); "cached"
verifies one token again and again (the path every request after the first takes).
Medians over repeated runs. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.auth.jwt import TokenVerifier
from sidecar.config import IssuerConfig


def setup(alg: str, folder: Path) -> tuple[TokenVerifier, object]:
    if alg == "HS256":
        secret = b"k" * 32
        cfg = IssuerConfig(
            issuer="bench", audiences=("api",), algorithms=(alg,), secret_env="X", secret=secret
        )
        return TokenVerifier([cfg], cache_size=100_000), secret
    private: object = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if alg == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = private.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = folder / f"{alg}.pem"
    path.write_bytes(pem)
    cfg = IssuerConfig(issuer="bench", audiences=("api",), algorithms=(alg,), public_key_file=path)
    return TokenVerifier([cfg], cache_size=100_000), private


def tokens(alg: str, key: object, n: int) -> list[str]:
    exp = int(time.time()) + 3600
    return [
        jwt.encode(
            {
                "iss": "bench",
                "aud": "api",
                "sub": f"user{i}",
                "exp": exp,
                "roles": ["user"],
                "permissions": ["read:own"],
            },
            key,
            algorithm=alg,
        )  # type: ignore[arg-type]
        for i in range(n)
    ]


def measure(alg: str, folder: Path) -> tuple[float, float]:
    verifier, key = setup(alg, folder)
    n = 2000 if alg != "RS256" else 1000
    runs = []
    for _ in range(5):
        fresh = tokens(alg, key, n)
        verifier.forget()
        started = time.perf_counter()
        for t in fresh:
            verifier.verify(t)
        runs.append((time.perf_counter() - started) / n * 1e6)
    first = statistics.median(runs)
    token = tokens(alg, key, 1)[0]
    verifier.verify(token)
    number = 100_000
    cached = (
        statistics.median(timeit.repeat(lambda: verifier.verify(token), number=number, repeat=7))
        / number
        * 1e6
    )
    return first, cached


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = {alg: measure(alg, Path(tmp)) for alg in ("HS256", "RS256", "ES256")}
    print("| algorithm | first sight µs | cached µs |")
    print("|-----------|---------------:|----------:|")
    for alg, (first, cached) in results.items():
        print(f"| {alg} | {first:.1f} | {cached:.2f} |")


if __name__ == "__main__":
    main()
