"""``maas rollout start|status|abort``: progressive delivery of a candidate version."""

from __future__ import annotations

import argparse
import json
import re

from maas_ray.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: str) -> float:
    """'90', '90s', '10m', '1.5h', '500ms' -> seconds."""
    match = _DURATION.match(value)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 60s, 10m or 1h, got {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _connect(args: argparse.Namespace) -> None:
    import logging

    import ray

    ray.init(address=args.address, logging_level=logging.ERROR, log_to_driver=False)


def cmd_rollout(args: argparse.Namespace) -> int:
    from maas_ray.rollout import RolloutConfig, abort_rollout, rollout_status, start_rollout

    _connect(args)
    if args.rollout_cmd == "start":
        config = RolloutConfig(
            app=args.app, model=args.model, candidate=args.candidate, baseline=args.baseline,
            shadow_s=args.shadow, steps=[float(s) for s in args.steps.split(",")], interval_s=args.interval,
            max_error_rate=args.max_error_rate, max_p99_ratio=args.max_p99_ratio,
            min_agreement=None if args.min_agreement < 0 else args.min_agreement, min_requests=args.min_requests,
            max_ttft_p99_ratio=args.max_ttft_p99_ratio, max_itl_p99_ratio=args.max_itl_p99_ratio,
            min_generation_agreement=None if args.min_generation_agreement < 0 else args.min_generation_agreement,
            min_overlap=args.min_overlap,
        )
        state = start_rollout(config, args.registry)
        print(f"rollout {state['id']}: {args.model} {state['baseline']} -> {args.candidate} in app {args.app!r}, "
              f"shadow {config.shadow_s:g}s then steps {config.steps} every {config.interval_s:g}s; "
              f"follow it with: maas rollout status {args.model} --app {args.app}")
        return 0
    if args.rollout_cmd == "abort":
        state = abort_rollout(args.app, args.model)
    else:
        state = rollout_status(args.app, args.model, args.registry)
        if state is None:
            raise ConfigError(f"no rollout of {args.model} in app {args.app!r}")
    if args.json:
        print(json.dumps(state, indent=1, default=str))
        return 0
    weight = state.get("weight")
    print(f"rollout {state['id']}: {state['phase']}" + (f" at {weight:g} %" if weight else ""))
    for record in state.get("history", []):
        ev = record["evidence"]
        where = "shadow" if record["phase"] == "shadow" else f"step {record['weight']:g} %"
        latency = (f"TTFT p99 ratio {_fmt(ev.get('ttft_p99_ratio'))}, ITL p99 ratio {_fmt(ev.get('itl_p99_ratio'))}"
                   if ev.get("kind") == "generative" else f"p99 ratio {_fmt(ev['p99_ratio'])}")
        print(f"  {where}: {record['verdict']} (candidate requests {ev['candidate_requests']:.0f}, "
              f"error rate {_fmt(ev['error_rate'])}, {latency}, agreement {_fmt(ev['agreement'])})")
    if state.get("decision"):
        print(f"  decision: {state['decision']['decision']}: {state['decision']['why']}")
    return 0


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def add_rollout_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    rollout = sub.add_parser("rollout", help="Shadow, canary and promote (or roll back) a candidate version.")
    rsub = rollout.add_subparsers(dest="rollout_cmd", required=True)
    p = rsub.add_parser("start", parents=[common], help="Start a rollout; a controller in the cluster runs it.")
    p.add_argument("model")
    p.add_argument("--candidate", type=int, required=True, help="Version to roll out (deployed with weight 0).")
    p.add_argument("--baseline", type=int, default=None, help="Version it replaces (default: the heaviest).")
    p.add_argument("--shadow", type=parse_duration, default=0.0, help="Shadow phase, e.g. 10m (default: none).")
    p.add_argument("--steps", default="5,25,50,100", help="Candidate live share per step, %% (default 5,25,50,100).")
    p.add_argument("--interval", type=parse_duration, default=60.0, help="Observation per step (default 60s).")
    p.add_argument("--max-error-rate", type=float, default=0.01, help="Guard: candidate 5xx share (default 0.01).")
    p.add_argument("--max-p99-ratio", type=float, default=1.3, help="Guard: p99 candidate/baseline (default 1.3).")
    p.add_argument("--min-agreement", type=float, default=0.98,
                   help="Guard: top-1 agreement with the primary (default 0.98; negative: off).")
    p.add_argument("--min-requests", type=int, default=20, help="Candidate requests a step needs (default 20).")
    p.add_argument("--max-ttft-p99-ratio", type=float, default=1.5,
                   help="Guard (generative): time-to-first-token p99 candidate/baseline (default 1.5).")
    p.add_argument("--max-itl-p99-ratio", type=float, default=1.5,
                   help="Guard (generative): inter-token latency p99 candidate/baseline (default 1.5).")
    p.add_argument("--min-generation-agreement", type=float, default=0.9,
                   help="Guard (generative): share of mirrored generations that agreed (default 0.9; negative: off).")
    p.add_argument("--min-overlap", type=float, default=0.5,
                   help="Generative: word overlap a sampled generation needs to agree (default 0.5).")
    for name in ("status", "abort"):
        q = rsub.add_parser(name, parents=[common], help=f"{name.capitalize()} the model's rollout.")
        q.add_argument("model")
        q.add_argument("--json", action="store_true", help="The whole record, as stored in the registry.")
    for q in rsub.choices.values():
        q.add_argument("--app", default="default", help="Serve application name (default: default).")
        q.add_argument("--address", default="auto", help="Ray cluster address (default: auto).")
        q.set_defaults(func=cmd_rollout)
