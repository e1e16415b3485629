"""Results -> markdown tables (with ratios to the limit and to each baseline) and a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

BASELINES = ("flask", "kserve", "ray-plain", "ray-tuned")


def peak(points: list[dict]) -> Optional[dict]:
    good = [p for p in points if p["ok"] > 0]
    return max(good, key=lambda p: p["rps"]) if good else None


def within(points: list[dict], p99_ms: float) -> Optional[dict]:
    """The highest-throughput point whose p99 is no worse than ``p99_ms`` (None if none is)."""
    return peak([p for p in points if p["errors"] == 0 and p["p99_ms"] <= p99_ms])


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    if not (a and b):
        return "-"
    r = a / b
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def _ms(v: float) -> str:
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _grpc_table(w: dict, lim: dict) -> list[str]:
    """Systems measured over gRPC too (run.py --grpc): each concurrency, HTTP beside gRPC."""
    rows = []
    for s, r in w["systems"].items():
        http = {q["concurrency"]: q for q in r.get("points", [])}
        for g in r.get("grpc_points", []):
            h = http.get(g["concurrency"])
            rows.append(
                f"| {s} | {g['concurrency']} | " + (f"{h['rps']:,.0f} / {_ms(h['p99_ms'])}" if h else "-")
                + f" | {g['rps']:,.0f} / {_ms(g['p99_ms'])} | {_ratio(g['rps'], h['rps'] if h else None)} | "
                f"{_ratio(g['rps'], lim['batch1_items_per_s'])} | {g['errors']} |")
    if not rows:
        return []
    return ["", "**OIP v2 over gRPC** (benchmarks/grpc_loadgen.py: grpc.aio closed loop, raw_input_contents) "
            "beside HTTP (wrk) on the same server:", "",
            "| system | c | HTTP items/s / p99 ms | gRPC items/s / p99 ms | gRPC vs HTTP | gRPC vs limit b1 | "
            "gRPC errors |", "|---|---|---|---|---|---|---|", *rows]


def markdown(results: dict) -> str:
    meta = results["meta"]
    out = [f"# Benchmark results ({meta['started']})", "",
           f"Host: {meta['host']}; {meta['cores']} cores given to every system; loopback; wrk closed loop, "
           f"{meta['duration_s']} s per point after a warm-up; one item per request, so req/s = items/s. "
           f"Command: `{meta['command']}`.", ""]
    for wname, w in results["workloads"].items():
        lim = w["limit"]
        out += [f"## {wname}: {w['description']}", "",
                f"**Limit** (raw onnxruntime in process on {lim['threads']} cores, the better of one "
                f"{lim['threads']}-thread session (1x{lim['threads']}) and {lim['threads']} one-thread sessions "
                f"side by side ({lim['threads']}x1)): batch 1 = {lim['batch1_items_per_s']:,.0f} items/s; best batch "
                f"{lim['best_batch']} = {lim['best_items_per_s']:,.0f} items/s. Sweep: "
                + ", ".join(f"b{b}: {v['items_per_s']:,.0f} ({v.get('layout', '1x' + str(lim['threads']))})"
                            for b, v in lim["sweep"].items()) + ".", ""]
        # Raw workloads: the ratios are to the ceiling, which adds decoding and labelling.
        ceiling = "prepost_us" in lim
        b1, best = ((lim["ceiling_batch1_items_per_s"], lim["ceiling_best_items_per_s"]) if ceiling
                    else (lim["batch1_items_per_s"], lim["best_items_per_s"]))
        if ceiling:
            out += [f"**Pre+postprocessing** of the request item in process on one core (no inference, HTTP or "
                    f"JSON): maas-ray's processors {lim['prepost_us']['maas']:,.0f} us, the baselines' code "
                    f"{lim['prepost_us']['baselines']:,.0f} us. **Ceiling** (the limit plus the cheaper pre+post "
                    f"spread over {lim['threads']} cores): batch 1 = {b1:,.0f} items/s; batch {lim['best_batch']} = "
                    f"{best:,.0f} items/s.", ""]
        vs = "ceiling" if ceiling else "limit"
        peaks = {s: peak(r["points"]) for s, r in w["systems"].items() if r.get("points")}
        base = {b: peaks[b]["rps"] for b in BASELINES if peaks.get(b)}
        out += ["| system | peak items/s (at c) | p50 / p99 at peak, ms | p50 at c=1, ms | errors | "
                f"vs {vs} b1 | vs {vs} best | " + " | ".join(f"vs {b}" for b in BASELINES) + " |",
                "|---|---|---|---|---|---|---|" + "---|" * len(BASELINES)]
        for s, r in w["systems"].items():
            if not r.get("points"):
                out.append(f"| {s} | skipped: {r.get('note', 'no data')} |" + " |" * (6 + len(BASELINES)))
                continue
            p = peaks[s]
            c1 = next((q for q in r["points"] if q["concurrency"] == 1), None)
            errs = sum(q["errors"] for q in r["points"])
            if p is None:
                out.append(f"| {s} | 0 (all failed) | - | - | {errs} |" + " - |" * (2 + len(BASELINES)))
                continue
            out.append(
                f"| {s} | {p['rps']:,.0f} (c={p['concurrency']}) | {_ms(p['p50_ms'])} / {_ms(p['p99_ms'])} | "
                f"{_ms(c1['p50_ms']) if c1 else '-'} | {errs} | {_ratio(p['rps'], b1)} | {_ratio(p['rps'], best)} | "
                + " | ".join(_ratio(p["rps"], base.get(b)) for b in BASELINES) + " |")
        out += _grpc_table(w, lim)
        out += ["", "**At a p99 no worse than the baseline's own** (the targets' reading): each system's best "
                "point with p99 <= the baseline's p99 at its peak, over the baseline's peak items/s.", "",
                "| system | " + " | ".join(f"vs {b} (p99 <= {_ms(peaks[b]['p99_ms'])} ms)" for b in base) + " |",
                "|---|" + "---|" * len(base)]
        for s, r in w["systems"].items():
            if s in BASELINES or not r.get("points"):
                continue
            cells = []
            for b in base:
                q = within(r["points"], peaks[b]["p99_ms"])
                cells.append(f"{_ratio(q['rps'], base[b])} ({q['rps']:,.0f} at c={q['concurrency']}, "
                             f"p99 {_ms(q['p99_ms'])})" if q else "none within")
            out.append(f"| {s} | " + " | ".join(cells) + " |")
        out += ["", "<details><summary>every point</summary>", "",
                "Mean batch: items per onnxruntime call that maas-ray's batcher formed during the point and its "
                "settle run (outside --quick), from its batch-size metric; baselines report none. Mean hop "
                "(fused placement): what a request waited between the ingress and the inference replica "
                "beyond the replica's own stages (a call slot, the handle call's round trip), from the "
                "hop stage of maas-ray's stage-latency metric.", "",
                "| system | c | items/s | p50 ms | p90 ms | p99 ms | errors | mean batch | mean hop ms |",
                "|---|---|---|---|---|---|---|---|---|"]
        for s, r in w["systems"].items():
            for q in r.get("points", []):
                out.append(f"| {s} | {q['concurrency']} | {q['rps']:,.0f} | {_ms(q['p50_ms'])} | "
                           f"{_ms(q['p90_ms'])} | {_ms(q['p99_ms'])} | {q['errors']} | "
                           f"{q['mean_batch'] if q.get('mean_batch') else '-'} | "
                           f"{q['mean_hop_ms'] if q.get('mean_hop_ms') else '-'} |")
        notes = [f"- {s}: {r['note']}" for s, r in w["systems"].items() if r.get("note")]
        out += ["", "</details>", ""] + (["Notes:", *notes, ""] if notes else [])
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["workloads"])
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 5.5), squeeze=False)
    for ax, wname in zip(axes[0], names):
        w = results["workloads"][wname]
        for i, (s, r) in enumerate(w["systems"].items()):
            pts = [q for q in r.get("points", []) if q["ok"] > 0]
            if not pts:
                continue
            style = "--" if s.startswith(("flask", "kserve", "ray-")) else "-"
            ax.plot([q["rps"] for q in pts], [q["p99_ms"] for q in pts], style, marker="o", label=s,
                    color=plt.cm.tab10(i % 10))
            for q in pts:
                ax.annotate(f"c{q['concurrency']}", (q["rps"], q["p99_ms"]), fontsize=6, alpha=0.6)
        vs = "ceiling" if "prepost_us" in w["limit"] else "limit"  # raw workloads: with pre/post
        for key, ls in (("batch1_items_per_s", ":"), ("best_items_per_s", "-.")):
            ax.axvline(w["limit"][key if vs == "limit" else f"ceiling_{key}"], color="k", ls=ls, lw=1,
                       label=f"{vs} {'b1' if key.startswith('batch1') else 'b' + str(w['limit']['best_batch'])}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("throughput, items/s (log)")
        ax.set_ylabel("p99 latency, ms (log)")
        ax.set_title(f"{wname} ({results['meta']['cores']} cores)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
