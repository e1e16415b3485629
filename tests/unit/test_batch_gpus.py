"""``--gpus-per-actor`` on a cluster that cannot place such an actor fails at once with a
ConfigError (400) instead of Ray waiting forever for the resource."""

from __future__ import annotations

import pytest

from maas_ray.batch.gpus import check_gpus
from maas_ray.errors import ConfigError

pytestmark = pytest.mark.unit


def test_no_gpu_anywhere_is_refused_with_one_line():
    with pytest.raises(ConfigError) as err:
        check_gpus(1, node_gpus=[0.0, 0.0], group_gpus=[])
    assert err.value.status_code == 400 and "\n" not in str(err.value)
    assert "gpus_per_actor=1 but no node of the Ray cluster has that many GPUs (at most 0" in str(err.value)


def test_a_node_or_an_autoscalable_node_type_with_enough_gpus_passes():
    check_gpus(1, node_gpus=[0.0, 1.0], group_gpus=[])
    check_gpus(0.5, node_gpus=[1.0], group_gpus=[])
    check_gpus(1, node_gpus=[0.0], group_gpus=[0.0, 1.0])  # a ray up GPU group at zero nodes
    check_gpus(0, node_gpus=[], group_gpus=[])  # CPU jobs are never checked


def test_gpus_spread_over_nodes_do_not_make_one_actor_fit():
    with pytest.raises(ConfigError, match="at most 1"):
        check_gpus(2, node_gpus=[1.0, 1.0], group_gpus=[1.0])


def test_the_autoscaler_node_types_are_still_where_compat_reads_them():
    """maas_ray.serving.compat.autoscaler_node_gpus reads a private Ray API: fail here if it moves."""
    from ray._private.state import GlobalState
    from ray.core.generated import autoscaler_pb2

    assert callable(GlobalState.get_cluster_config)
    group = autoscaler_pb2.ClusterConfig().node_group_configs.add()
    group.resources["GPU"] = 1
    group.max_count = 2
    assert group.resources.get("GPU", 0) == 1 and group.max_count == 2
