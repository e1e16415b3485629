"""The ``maas batch`` subcommand: parse, start or join Ray, run the job, print the summary."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from pydantic import ValidationError

from maas_ray.batch.config import BatchConfig
from maas_ray.errors import ConfigError, format_validation_error


def add_batch_parser(sub: Any, common: argparse.ArgumentParser,
                     ray_options: Callable[[bool], dict[str, Any]]) -> None:
    """Register ``maas batch``; ``ray_options(verbose)`` gives ray.init's console settings."""
    p = sub.add_parser("batch", parents=[common],
                       help="Score a dataset offline with a version (Ray Data actor pool), to parquet.")
    p.add_argument("ref", help="MODEL:VERSION (a number or an alias), e.g. churn:1.")
    p.add_argument("--input", required=True, help=BatchConfig.model_fields["input"].description)
    p.add_argument("--output", required=True, help=BatchConfig.model_fields["output"].description)
    p.add_argument("--format", default="auto", choices=["auto", "parquet", "csv", "images", "text"],
                   help=BatchConfig.model_fields["format"].description)
    for name in ("actors", "batch_size", "cpus_per_actor", "gpus_per_actor"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                       help=BatchConfig.model_fields[name].description)
    p.add_argument("--address", default=None, help="Ray cluster address (default: join or start a local one).")
    p.set_defaults(func=lambda args: cmd_batch(args, ray_options))


def cmd_batch(args: argparse.Namespace, ray_options: Callable[[bool], dict[str, Any]]) -> int:
    import ray

    from maas_ray.batch.job import run_batch

    model, sep, ref = args.ref.partition(":")
    if not model:
        raise ConfigError(f"expected MODEL:VERSION (e.g. churn:1 or churn:production), got {args.ref!r}")
    settings: dict[str, Any] = {"model": model, "version": ref if sep and ref else "latest",
                                "input": args.input, "output": args.output, "format": args.format,
                                "registry": args.registry}
    for name in ("actors", "batch_size", "cpus_per_actor", "gpus_per_actor"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    try:
        config = BatchConfig(**settings)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "batch")) from exc
    started = False
    if not ray.is_initialized():
        ray.init(address=args.address, **ray_options(args.verbose))
        started = True
    try:
        report = run_batch(config)
    finally:
        if started:
            ray.shutdown()
    print(report.line(), flush=True)
    return 0
