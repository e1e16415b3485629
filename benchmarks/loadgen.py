"""Closed-loop HTTP load with ``wrk`` (Debian package): c connections each keep one request in flight.

The POST body goes in through a generated Lua script, whose ``done()`` prints one
JSON line with the counts and latency percentiles we report.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%s]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, ' ..
    '"status": %%d, "timeout": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass
class Point:
    concurrency: int
    duration_s: float
    requests: int  # completed responses, 2xx or not
    ok: int  # 2xx responses
    errors: int  # non-2xx + socket errors + timeouts
    rps: float  # 2xx responses per second (= items/s: one item per request)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict:
        return asdict(self)


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    return path


def run_wrk(url: str, body: bytes, concurrency: int, duration_s: float, *, timeout_s: float = 10.0) -> Point:
    """Run wrk for ``duration_s`` at ``concurrency`` connections (wrk threads: up to 2, this box's cores)."""
    threads = min(2, concurrency)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_LUA % body.decode())
        script = f.name
    try:
        cmd = [wrk_path(), "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(duration_s))}s",
               "--timeout", f"{int(timeout_s)}s", "-s", script, url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
    finally:
        Path(script).unlink(missing_ok=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed (rc {proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-500:]}")
    r = json.loads(line[len("BENCH_JSON "):])
    dur = r["duration_us"] / 1e6
    ok = r["requests"] - r["status"]
    errors = r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    return Point(
        concurrency=concurrency, duration_s=round(dur, 2), requests=r["requests"], ok=ok, errors=errors,
        rps=round(ok / dur, 1) if dur else 0.0,
        p50_ms=r["p50_us"] / 1e3, p90_ms=r["p90_us"] / 1e3, p99_ms=r["p99_us"] / 1e3, max_ms=r["max_us"] / 1e3,
    )
