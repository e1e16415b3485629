"""Profile one system under load: py-spy samples every Serve process while wrk drives it.

    python -m benchmarks.profile maas-fused-tp --workload mlp --concurrency 32 --seconds 15

Prints, per process (proxy, ingress, model replica...), the functions with the most
samples (inclusive, "own code" frames only by default), and writes the raw collapsed
stacks to --out for flame graphs.

    python -m benchmarks.profile maas-ingress-tp-x2 --cpu

``--cpu`` measures instead of sampling: the CPU time each process of the system (replicas,
HAProxy, Ray's own processes, gunicorn workers) spent during the load, as % of a core and as
microseconds per request.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil

from benchmarks.loadgen import run_wrk
from benchmarks.systems import SYSTEMS, Ctx, Server
from benchmarks.workloads import MODEL_PATH, WORKLOADS


def summarize(collapsed: Path, top: int, focus: tuple[str, ...]) -> list[str]:
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        n = int(n)
        total += n
        seen = set()
        for frame in stack.split(";"):
            if (not focus or any(f in frame for f in focus)) and frame not in seen:
                seen.add(frame)
                incl[frame] += n
    return [f"{100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)] if total else ["(no samples)"]


def cpu_per_request(root_pid: int, url: str, body: bytes, concurrency: int, seconds: int) -> list[str]:
    """Run wrk and charge each process of the server's tree its CPU time per request."""
    def snapshot() -> dict[int, tuple[str, float]]:
        out = {}
        for q in [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]:
            try:
                t = q.cpu_times()
                out[q.pid] = (q.name(), t.user + t.system)
            except psutil.Error:  # exited meanwhile
                pass
        return out

    before = snapshot()
    pt = run_wrk(url, body, concurrency, seconds)
    after = snapshot()
    used = sorted(((after[p][1] - before[p][1], f"{after[p][0]} ({p})") for p in after if p in before), reverse=True)
    lines = [f"c={concurrency}: {pt.rps:.0f} requests/s, p50 {pt.p50_ms:.1f} ms, p99 {pt.p99_ms:.1f} ms"]
    for cpu, name in used:
        if cpu > 0.01 * seconds:
            lines.append(f"  {name:50s} {100 * cpu / seconds:5.1f} % of a core  {1e6 * cpu / max(pt.rps * seconds, 1):7.1f} us/request")
    total = sum(c for c, _ in used)
    lines.append(f"  total {100 * total / seconds:.0f} % of a core, {1e6 * total / max(pt.rps * seconds, 1):.0f} us/request "
                 "(wrk not counted)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("system", choices=list(SYSTEMS))
    p.add_argument("--workload", default="mlp", choices=list(WORKLOADS))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--port", type=int, default=8190)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--focus", default="maas_ray,benchmarks,fastapi,starlette,json,numpy,onnxruntime,serve/",
                   help="comma list of substrings; frames matching none are not ranked ('' = all)")
    p.add_argument("--maas-src")
    p.add_argument("--cpu", action="store_true", help="CPU time per process and per request instead of py-spy")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/profile"))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    w = WORKLOADS[a.workload]
    with tempfile.TemporaryDirectory(prefix="maas-prof-") as tmp:
        published = w.publish(Path(tmp))
        ctx = Ctx(a.workload, published.model_path, published.registry, a.port, 2, w.max_batch_size,
                  "/tmp/kserve-venv/bin/python", a.maas_src, raw=published.raw)
        url = f"http://127.0.0.1:{a.port}{MODEL_PATH.format(model=a.workload)}"
        server = Server(SYSTEMS[a.system], ctx, a.out / f"{a.system}-{a.workload}.log")
        try:
            server.wait_ready(url, w.request_body(), w.sample)
            run_wrk(url, w.request_body(), 8, 3)
            if a.cpu:
                print(f"{a.system} {a.workload}", "\n".join(cpu_per_request(server.proc.pid, url, w.request_body(),
                                                                             a.concurrency, a.seconds)))
                return 0
            procs = [q for q in psutil.Process(server.proc.pid).children(recursive=True)
                     if q.name().startswith("ray::Serve") or q.name().startswith("ray::Proxy")
                     or "gunicorn" in " ".join(q.cmdline())]
            spies = []
            for q in procs:
                name = q.name().replace("ray::", "").replace(":", "_").split(".")[0] + f"-{q.pid}"
                dest = a.out / f"{a.system}-{a.workload}-{name}.txt"
                spies.append((name, dest, subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(q.pid), "--duration", str(a.seconds - 2), "--rate", "200",
                     "--format", "raw", "--nonblocking", "--output", str(dest)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            result = {}
            t = threading.Thread(target=lambda: result.update(pt=run_wrk(url, w.request_body(), a.concurrency,
                                                                          a.seconds)))
            t.start()
            for _, _, sp in spies:
                sp.wait()
            t.join()
            pt = result["pt"]
            print(f"{a.system} {a.workload} c={a.concurrency}: {pt.rps:.0f} items/s, p50 {pt.p50_ms:.1f} ms, "
                  f"p99 {pt.p99_ms:.1f} ms (while profiling)")
            focus = tuple(f for f in a.focus.split(",") if f)
            for name, dest, _ in spies:
                print(f"\n== {name} ({dest})")
                if dest.exists():
                    print("\n".join(summarize(dest, a.top, focus)))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
