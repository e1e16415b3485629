"""Profile one system under load: py-spy samples every Serve process while wrk drives it.

    python -m benchmarks.profile maas-fused-tp --workload mlp --concurrency 32 --seconds 15

Prints, per process (proxy, ingress, model replica...), the functions with the most
samples (inclusive, "own code" frames only by default), and writes the raw collapsed
stacks to --out for flame graphs.
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
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/profile"))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    w = WORKLOADS[a.workload]
    with tempfile.TemporaryDirectory(prefix="maas-prof-") as tmp:
        model = w.onnx_bytes()
        Path(tmp, "m.onnx").write_bytes(model)
        from maas_ray.registry import Registry

        Registry(f"{tmp}/registry").publish(a.workload, model)
        ctx = Ctx(a.workload, f"{tmp}/m.onnx", f"{tmp}/registry", a.port, 2, w.max_batch_size,
                  "/tmp/kserve-venv/bin/python", a.maas_src)
        url = f"http://127.0.0.1:{a.port}{MODEL_PATH.format(model=a.workload)}"
        server = Server(SYSTEMS[a.system], ctx, a.out / f"{a.system}-{a.workload}.log")
        try:
            server.wait_ready(url, w.request_body())
            run_wrk(url, w.request_body(), 8, 3)
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
