"""Progressive delivery: a detached controller that shadows, steps and promotes or rolls back
a candidate version on the serving metrics (see :mod:`maas_ray.rollout.controller`)."""

from maas_ray.rollout.controller import RolloutConfig, abort_rollout, rollout_status, start_rollout

__all__ = ["RolloutConfig", "abort_rollout", "rollout_status", "start_rollout"]
