"""onnxruntime: install check, execution-provider choice, session creation.

``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install the same module and
overwrite each other's files, so exactly one must be present. The GPU build
lists CUDA in ``get_available_providers()`` even without a GPU (a build-time
list), so the only truth about what runs is ``session.get_providers()`` after
the session exists; that is what we log and report.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from typing import Optional

from maas_ray.errors import DependencyError, InferenceError

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def installed_onnxruntime_builds() -> list[str]:
    builds = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            builds.append(dist)
        except metadata.PackageNotFoundError:
            pass
    return builds


def check_onnxruntime_install() -> str:
    """Return the one installed onnxruntime distribution, or raise DependencyError."""
    builds = installed_onnxruntime_builds()
    if len(builds) != 1:
        hint = (
            "install exactly one: pip install 'maas-ray[cpu]' or 'maas-ray[gpu]'"
            if not builds
            else "both overwrite the same files; uninstall both, then reinstall one "
            "(pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'maas-ray[cpu]')"
        )
        raise DependencyError(f"found onnxruntime builds {builds}: {hint}")
    return builds[0]


def cuda_visible() -> bool:
    """Whether this process may use a GPU (Ray sets CUDA_VISIBLE_DEVICES per replica)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # serving nodes may not have torch
        return os.path.exists("/dev/nvidiactl")


def create_session(
    model_bytes: bytes,
    *,
    device: str = "auto",
    intra_op_threads: Optional[int] = None,
    spinning: bool = False,
):
    """Create an InferenceSession, CUDA when requested/available, else CPU.

    Args:
        device: ``"auto"`` (CUDA if this process sees a GPU and the GPU build is
            installed), ``"cuda"`` (fail if CUDA does not run) or ``"cpu"``.
        intra_op_threads: onnxruntime intra-op threads; size it to the replica's CPUs.
        spinning: let the intra-op threads spin-wait for work between runs (onnxruntime's
            default). Off here: a spinning pool keeps its cores busy between batches, CPU that
            the ingress and the proxy on the same node need (fused placement, wide MLP, 2
            cores: 347 -> 530 items/s with spinning off before the hop was coalesced, 1,205 ->
            1,241 after; benchmarks/README.md).
    """
    check_onnxruntime_install()
    import onnxruntime as ort

    want_cuda = device == "cuda" or (
        device == "auto" and CUDA in ort.get_available_providers() and cuda_visible()
    )
    providers = [CUDA, CPU] if want_cuda else [CPU]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(model_bytes, sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise InferenceError(f"onnxruntime could not load the model: {exc}") from exc
    active = session.get_providers()
    if device == "cuda" and active[0] != CUDA:
        raise DependencyError(f"CUDA was required but onnxruntime runs {active}")
    logger.info("onnxruntime %s session providers: %s", ort.__version__, active)
    return session
