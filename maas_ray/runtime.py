"""onnxruntime: install check, execution-provider choice, session creation; Ray env defaults.

``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install the same module and
overwrite each other's files, so exactly one must be present. The GPU build
lists CUDA in ``get_available_providers()`` even without a GPU (a build-time
list), so the only truth about what runs is ``session.get_providers()`` after
the session exists; that is what we log and report.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from importlib import metadata
from typing import Any, Mapping, Optional

from maas_ray.errors import DependencyError, InferenceError

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# Ray Train's controller polls its workers every 2 s by default, and a worker's per-epoch
# report (the console line of `maas train`, the quickstart's progress) waits for that poll;
# at 0.25 s a report costs <= 0.25 s. Read when Ray processes start (Train workers inherit
# it), so it must be in the environment before ``ray.init`` / the cluster starts.
QUICK_TRAIN_REPORTS_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def quick_train_reports() -> None:
    """Set :data:`QUICK_TRAIN_REPORTS_ENV` in this process unless already set; call before ``ray.init``."""
    for key, value in QUICK_TRAIN_REPORTS_ENV.items():
        os.environ.setdefault(key, value)


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


_LIBCUDA_NAMES = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")


def _load_libcuda() -> Optional[Any]:
    """The NVIDIA driver's CUDA library, or None where there is no driver."""
    for name in _LIBCUDA_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=None)
def _cuda_device_count(visible: Optional[str]) -> int:
    """CUDA devices the driver shows this process: ``cuInit`` + ``cuDeviceGetCount`` from libcuda,
    the question ``torch.cuda.is_available()`` asks, without importing torch (GPU serving replicas
    have no use for it). The driver honours CUDA_VISIBLE_DEVICES; ``visible`` keys the cache."""
    lib = _load_libcuda()
    if lib is None:
        return 0
    count = ctypes.c_int(0)
    try:
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0  # e.g. CUDA_ERROR_NO_DEVICE (100), a driver without a GPU, a broken install
    except AttributeError:  # not the CUDA driver API after all
        return 0
    return max(0, count.value)


def cuda_visible() -> bool:
    """Whether this process may use a GPU (Ray sets CUDA_VISIBLE_DEVICES per replica).

    Asks the CUDA driver (cheap, cached per process and CUDA_VISIBLE_DEVICES); never imports torch.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return _cuda_device_count(visible) > 0


def create_session(
    model_bytes: bytes,
    *,
    device: str = "auto",
    intra_op_threads: Optional[int] = None,
    spinning: bool = False,
    external_data: Optional[Mapping[str, bytes]] = None,
):
    """Create an InferenceSession, CUDA when requested/available, else CPU.

    Args:
        device: ``"auto"`` (CUDA if this process sees a GPU and the GPU build is
            installed), ``"cuda"`` (fail if CUDA does not run) or ``"cpu"``.
        intra_op_threads: onnxruntime intra-op threads; size it to the replica's CPUs.
        external_data: the graph's ONNX external data files (the name its initializers give
            -> bytes), handed to onnxruntime from memory (weights over 2 GB; never written to
            disk, so an encrypted version's weights stay off the disk in the clear).
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
    if external_data:  # onnxruntime copies what it needs while the session is created
        names = list(external_data)
        opts.add_external_initializers_from_files_in_memory(
            names, [external_data[n] for n in names], [len(external_data[n]) for n in names])
    try:
        session = ort.InferenceSession(model_bytes, sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise InferenceError(f"onnxruntime could not load the model: {exc}") from exc
    active = session.get_providers()
    if device == "cuda" and active[0] != CUDA:
        raise DependencyError(f"CUDA was required but onnxruntime runs {active}")
    logger.info("onnxruntime %s session providers: %s", ort.__version__, active)
    return session
