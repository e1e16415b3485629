"""Optimized versions of published models: INT8 (dynamic/static), FP16, graph optimization,
measured against the parent on its held-out data before publishing; generative versions
(decoder LMs): dynamic INT8, measured by perplexity and decode tokens/s."""

from maas_ray.optimize.config import OptimizeConfig
from maas_ray.optimize.generative import GenerativeOptimizeReport
from maas_ray.optimize.pipeline import OptimizeReport, optimize_and_publish

__all__ = ["GenerativeOptimizeReport", "OptimizeConfig", "OptimizeReport", "optimize_and_publish"]
