"""How many module boundaries one HTTP OIP v2 infer crosses in the ingress replica.

Builds the real ingress (in process, ``ingress`` placement, a linear ONNX model, no Serve
proxy: the ASGI app the replica serves) and traces one warm request with ``sys.setprofile``:
every call or return whose caller and callee live in different ``maas_ray`` modules is one
crossing (a coroutine's resume counts as a call). Prints the crossings and the calls between
each pair of modules: a call from a lower module into a transport is a callback.

    python -m benchmarks.crossings                 # this tree
    python -m benchmarks.crossings --src /tmp/base # another checkout (e.g. a git worktree)
    python -m benchmarks.crossings --cpu 2000 --baseline /tmp/base  # CPU per request, A/B

The count is structure and does not depend on the machine. ``--cpu`` adds a cost: process CPU
spent inside the ingress's ASGI app per request (the in-process client left out), alternating
two trees, which a busy box disturbs far less than wall-clock throughput.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_PROBE = r'''
import asyncio, collections, json, sys, tempfile
import httpx
sys.path.insert(0, {tests!r})
from tests.helpers import linear_onnx
from maas_ray.registry import Registry

root = tempfile.mkdtemp()
Registry(root).publish("lin", linear_onnx(4, 3, seed=7))
args = {{"registry_root": root, "models": [{{"name": "lin", "placement": "ingress", "versions": [{{"version": 1}}]}}]}}
try:  # the split tree: a transport-free core under the ASGI app
    from maas_ray.serving.config import AppArgs
    from maas_ray.serving.core import IngressCore
    from maas_ray.serving.http import HttpApp, build_api
    core = IngressCore(AppArgs.model_validate(args), {{"lin": {{1: {{}}}}}}, {{"lin": {{"1": 1}}}})
    app = HttpApp(core, build_api(core))
except ImportError:  # before the split: the Serve ingress class built its own ASGI app
    from maas_ray.serving.ingress import Ingress
    ingress = Ingress.__new__(Ingress)
    Ingress.__mro__[1].__init__(ingress, args, {{"lin": {{1: {{}}}}}}, {{"lin": {{"1": 1}}}})
    app = ingress.__serve_build_asgi_app__()

body = json.dumps({{"inputs": [{{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}}]}})

def module_of(frame):
    name = frame.f_globals.get("__name__", "")
    return name if name.startswith("maas_ray") else None

crossings, entered, calls = [], collections.Counter(), collections.Counter()

def profile(frame, event, arg):
    if event not in ("call", "return"):
        return
    callee = module_of(frame)
    caller = module_of(frame.f_back) if frame.f_back is not None else None
    if callee and caller and callee != caller:
        src, dst = (caller, callee) if event == "call" else (callee, caller)
        crossings.append((src, dst))
        entered[dst] += 1
        if event == "call":
            calls[(caller, callee)] += 1

async def go(trace):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        if trace:
            sys.setprofile(profile)
        r = await client.post("/v2/models/lin/infer", content=body)
        sys.setprofile(None)
        assert r.status_code == 200, r.text

asyncio.run(go(False))  # warm: sessions, caches
asyncio.run(go(True))

import time
server_cpu = [0.0]

async def timed_app(scope, receive, send):  # the ingress's own share: inside its ASGI call
    t0 = time.process_time()
    try:
        await app(scope, receive, send)
    finally:
        server_cpu[0] += time.process_time() - t0

async def cpu_per_request(n):
    """Process CPU per request (us) over n requests, spent inside the ingress's ASGI app (the
    in-process client's work is left out)."""
    transport = httpx.ASGITransport(app=timed_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        for _ in range(50):
            await client.post("/v2/models/lin/infer", content=body)
        server_cpu[0] = 0.0
        for _ in range(n):
            await client.post("/v2/models/lin/infer", content=body)
        return server_cpu[0] / n * 1e6

cpu_us = [asyncio.run(cpu_per_request({requests})) for _ in range({rounds})] if {requests} else []
import maas_ray
print(json.dumps({{"file": maas_ray.__file__, "crossings": len(crossings), "modules": sorted(set(m for pair in crossings for m in pair)),
                  "entered": dict(entered.most_common()),
                  "calls": sorted([a, b, n] for (a, b), n in calls.items()), "cpu_us": cpu_us}}))
'''


def measure(src: Path, requests: int = 0, rounds: int = 1) -> dict:
    tests = str(src)  # the traced tree's own tests.helpers (and maas_ray: first on sys.path)
    env = {**os.environ, "PYTHONPATH": str(src), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", _PROBE.format(tests=tests, requests=requests, rounds=rounds)], env=env, cwd=cwd,
                             capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-4000:])
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose maas_ray to trace (default: this one)")
    parser.add_argument("--cpu", type=int, default=0, metavar="N",
                        help="also report process CPU per request over N requests (3 rounds), this tree "
                        "and --baseline alternately")
    parser.add_argument("--baseline", type=Path, help="with --cpu: a second tree, measured alternately")
    args = parser.parse_args()
    if args.cpu and args.baseline:
        trees = {"this": args.src.resolve(), "baseline": args.baseline.resolve()}
        runs: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(3):  # alternate, so drift on a noisy box hits both
            for name, tree in trees.items():
                runs[name] += measure(tree, args.cpu, 1)["cpu_us"]
        for name, values in runs.items():
            print(f"{name} ({trees[name]}): CPU per request us, rounds: {[round(v, 1) for v in values]}, "
                  f"min {min(values):.1f}")
        print(f"this / baseline (min): {min(runs['this']) / min(runs['baseline']):.3f}")
        return
    result = measure(args.src.resolve(), args.cpu, 3)
    print(f"{result['file']}: {result['crossings']} module crossings, {len(result['modules'])} modules")
    if result["cpu_us"]:
        print(f"  process CPU per request: {[round(v, 1) for v in result['cpu_us']]} us")
    calls = result["calls"]
    print(f"  {sum(n for _, _, n in calls)} calls across modules (returns not counted):")
    for caller, callee, n in calls:
        print(f"    {caller} -> {callee}: {n}")


if __name__ == "__main__":
    main()
