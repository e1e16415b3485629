"""``maas audit``: list the registry's audit trail (maas_ray/registry/audit.py), filtered."""

from __future__ import annotations

import argparse


def cmd_audit(args: argparse.Namespace) -> int:
    from maas_ray.registry import Registry

    events = Registry(args.registry).audit.events(
        model=args.model, action=args.action, since=args.since, actor=args.actor, limit=args.limit)
    for event in events:  # oldest first, the newest last
        print(event.model_dump_json() if args.json else event.line())
    return 0


def add_audit_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``maas audit`` under the top-level subcommands."""
    p = sub.add_parser("audit", parents=[common],
                       help="List registry changes (publish, alias, rollout, keys, KEK rotation), newest last.")
    p.add_argument("--model", default=None, help="Only events about this model.")
    p.add_argument("--action", default=None,
                   help="Only this action, or a family: publish, alias (alias.set/alias.delete), rollout, key, kek.")
    p.add_argument("--since", default=None, metavar="ISO", help="Only events at or after this time (UTC if no zone).")
    p.add_argument("--actor", default=None, help="Only events by this actor (API key id or user).")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="Only the newest N events.")
    p.add_argument("--json", action="store_true", help="One JSON object per line.")
    p.set_defaults(func=cmd_audit)
