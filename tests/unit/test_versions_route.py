"""The ingress's route to a fused version: what a request waited beyond the replica's own stages."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from maas_ray.serving.config import ModelConfig
from maas_ray.serving.versions import Route

pytestmark = pytest.mark.unit
REPLICA_STAGES = {"decode": 0.001, "queue": 0.002, "inference": 0.004, "encode": 0.001}


class _Method:
    """``handle.<method>.remote(items)`` of a fake Serve handle: answers after ``delay_s``."""

    def __init__(self, delay_s: float, stages: dict) -> None:
        self.delay_s, self.stages, self.calls = delay_s, stages, []

    def remote(self, items: list):
        self.calls.append(len(items))

        async def answer():
            await asyncio.sleep(self.delay_s)
            return [({"y": tensors["x"] * 2}, dict(self.stages)) for tensors, _ in items]

        return answer()


class _Handle:
    def __init__(self, method: _Method) -> None:
        self.infer_many = method


def _route(method: _Method) -> Route:
    model = ModelConfig(name="m", placement="fused", versions=[{"version": 1}])
    return Route(handles={"infer": _Handle(method)}, model=model)


async def _route_infer(route: Route, i: int):
    return await route.infer({"x": np.array([[float(i)]], np.float32)}, False)


def test_fused_requests_report_the_hop_beyond_the_replica_stages():
    method = _Method(delay_s=0.05, stages=REPLICA_STAGES)  # 50 ms round trip, 8 ms in the replica

    async def go():
        return await asyncio.gather(*(_route_infer(route, i) for i in range(3)))

    route = _route(method)
    results = asyncio.run(go())
    for i, (outputs, stages) in enumerate(results):
        assert outputs["y"].tolist() == [[2.0 * i]]
        assert {k: stages[k] for k in REPLICA_STAGES} == REPLICA_STAGES
        # the 50 ms round trip less the replica's 8 ms (5 ms of slack for the event loop's timers)
        assert 0.05 - 0.008 - 0.005 <= stages["hop"] <= 0.2
    assert sum(method.calls) == 3


def test_no_hop_stage_when_the_replica_reports_no_stages():
    """split placement: the chain of three deployments reports no stages of its own."""
    route = _route(_Method(delay_s=0.0, stages={}))
    _, stages = asyncio.run(_route_infer(route, 1))
    assert stages == {}
