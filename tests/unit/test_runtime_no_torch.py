"""torch is for training only: GPU detection asks the CUDA driver, the CLI's other commands and a
serving session never import torch, and training without torch says how to install it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from maas_ray import runtime

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


class FakeDriver:
    """libcuda as ctypes shows it: cuInit(flags) and cuDeviceGetCount(int*) return CUresult."""

    def __init__(self, devices=1, init_result=0):
        self.devices, self.init_result, self.calls = devices, init_result, 0

    def cuInit(self, flags):
        self.calls += 1
        return self.init_result

    def cuDeviceGetCount(self, count_ref):
        count_ref._obj.value = self.devices
        return 0


@pytest.fixture
def driver(monkeypatch):
    def use(fake):
        monkeypatch.setattr(runtime, "_load_libcuda", lambda: fake)
        runtime._cuda_device_count.cache_clear()
        return fake

    yield use
    runtime._cuda_device_count.cache_clear()


def test_cuda_visible_asks_the_driver_once(driver, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = driver(FakeDriver(devices=2))
    assert runtime.cuda_visible() and runtime.cuda_visible()
    assert fake.calls == 1  # cached


@pytest.mark.parametrize("visible", ["", " ", "-1"])
def test_no_devices_assigned_means_no_gpu_without_asking(driver, monkeypatch, visible):
    fake = driver(FakeDriver(devices=1))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert not runtime.cuda_visible() and fake.calls == 0


@pytest.mark.parametrize("fake", [None, FakeDriver(devices=0), FakeDriver(init_result=100)],
                         ids=["no-driver", "no-device", "CUDA_ERROR_NO_DEVICE"])
def test_no_gpu(driver, monkeypatch, fake):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    driver(fake)
    assert runtime.cuda_visible() is False


def test_the_real_probe_answers_here():
    """The driver probe and torch (where installed) see the same devices, GPU machine or not."""
    torch = pytest.importorskip("torch")
    runtime._cuda_device_count.cache_clear()
    assert runtime._cuda_device_count(os.environ.get("CUDA_VISIBLE_DEVICES")) == torch.cuda.device_count()
    assert runtime.cuda_visible() is torch.cuda.is_available()


_SESSION = """
import sys
from onnx import TensorProto, helper
import maas_ray.runtime as rt
{simulate}
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
rt.create_session(model.SerializeToString(), device="auto")
print(rt.cuda_visible(), REQUESTED[-1] if REQUESTED else None, "torch" in sys.modules)
"""

# onnxruntime-gpu on a GPU node: CUDA listed, the driver shows one device. The session itself
# is made on CPU (there is no CUDA library here); the providers asked for are recorded.
_SIMULATED_GPU = """
import onnxruntime
class Driver:
    def cuInit(self, flags): return 0
    def cuDeviceGetCount(self, ref):
        ref._obj.value = 1
        return 0
rt._load_libcuda = lambda: Driver()
onnxruntime.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
REQUESTED = []
_session = onnxruntime.InferenceSession
def _cpu_session(model, sess_options=None, providers=None, **kw):
    REQUESTED.append(providers[0])
    return _session(model, sess_options=sess_options, providers=["CPUExecutionProvider"], **kw)
onnxruntime.InferenceSession = _cpu_session
"""


def _run(code: str, *, block_torch: bool = False) -> subprocess.CompletedProcess:
    prelude = "import sys; sys.modules['torch'] = None\n" if block_torch else ""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=180)


@pytest.mark.parametrize("runtime_kind", ["cpu", "simulated-gpu"])
def test_session_creation_never_imports_torch(runtime_kind):
    simulate = _SIMULATED_GPU if runtime_kind == "simulated-gpu" else "REQUESTED = []"
    out = _run(_SESSION.format(simulate=simulate))
    assert out.returncode == 0, out.stderr[-3000:]
    visible, requested, torch_loaded = out.stdout.split()[-3:]
    assert torch_loaded == "False"
    if runtime_kind == "simulated-gpu":
        assert (visible, requested) == ("True", "CUDAExecutionProvider")


def test_quick_train_reports_sets_a_default_only():
    key, value = next(iter(runtime.QUICK_TRAIN_REPORTS_ENV.items()))
    old = os.environ.pop(key, None)
    try:
        runtime.quick_train_reports()
        assert os.environ[key] == value
        os.environ[key] = "3"
        runtime.quick_train_reports()
        assert os.environ[key] == "3"  # an operator's setting wins
    finally:
        os.environ.pop(key, None)
        if old is not None:
            os.environ[key] = old


_CLI = """
import contextlib, io, sys, tempfile
from maas_ray.cli import build_parser, main
build_parser()
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["models", "list", "--registry", tempfile.mkdtemp()]) == 0
print(sys.modules.get("torch") is not None)  # None: blocked, never imported
"""


def test_the_cli_imports_torch_only_to_train():
    out = _run(_CLI)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "False"


def test_without_torch_training_says_how_to_install_it(tmp_path):
    code = _CLI + f"""
import maas_ray
print(maas_ray.TrainConfig.__name__)
for name in ("train_and_publish", "TrainReport"):
    try:
        getattr(maas_ray, name)
    except maas_ray.DependencyError as exc:
        print("DependencyError:", exc)
sys.exit(main(["train", "--registry", {str(tmp_path)!r}]))
"""
    out = _run(code, block_torch=True)
    assert out.returncode == 1, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[:2] == ["False", "TrainConfig"]
    assert len([l for l in lines if l.startswith("DependencyError:")]) == 2
    assert "pip install 'maas-ray[train]'" in lines[-1]
    assert out.stderr.startswith("error: training needs torch") and "pip install 'maas-ray[train]'" in out.stderr
