"""Refuse a GPU batch job that the Ray cluster can never place.

Ray waits forever for an actor whose resources no node has; ``maas batch --gpus-per-actor N``
on a cluster without GPUs would hang rather than fail. So before the actor pool is created,
the job checks that some node has N GPUs now, or that the autoscaler's node types include
one with N GPUs (a ``ray up`` cluster whose GPU group starts at zero nodes: the job waits
for it, as it should).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from maas_ray.errors import ConfigError

logger = logging.getLogger(__name__)


def check_gpus(gpus_per_actor: float, node_gpus: Iterable[float], group_gpus: Iterable[float]) -> None:
    """Raise ConfigError unless one node (alive now: ``node_gpus``) or one autoscalable node
    type (``group_gpus``) has at least ``gpus_per_actor`` GPUs."""
    if gpus_per_actor <= 0:
        return
    nodes, groups = list(node_gpus), list(group_gpus)
    if any(g >= gpus_per_actor for g in nodes + groups):
        return
    most = max(nodes + groups, default=0)
    raise ConfigError(
        f"gpus_per_actor={gpus_per_actor:g} but no node of the Ray cluster has that many GPUs "
        f"(at most {most:g}, autoscaling included); use --gpus-per-actor 0 or a GPU cluster")


def cluster_gpus() -> tuple[list[float], list[float]]:
    """(GPUs of each alive node, GPUs of each node type the autoscaler may still start) of
    the Ray cluster this process is connected to."""
    import ray

    nodes = [float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    groups: list[float] = []
    try:
        from maas_ray.serving.compat import autoscaler_node_gpus

        groups = autoscaler_node_gpus()
    except Exception as exc:  # noqa: BLE001 - a private Ray API: without it, judge by the nodes alone
        logger.warning("cannot read the autoscaler's node types (%s): judging by the alive nodes only", exc)
    return nodes, groups


def check_cluster_gpus(gpus_per_actor: float) -> None:
    """:func:`check_gpus` against the connected Ray cluster."""
    nodes, groups = cluster_gpus()
    check_gpus(gpus_per_actor, nodes, groups)
