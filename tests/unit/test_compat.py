"""maas_ray.serving.compat against the installed Ray: each private Serve API it wraps is still
where it was, takes what we pass, and the ASGI hook is still the name Serve calls. No cluster."""

from __future__ import annotations

import inspect
import io
import tokenize
import typing
from pathlib import Path

import pytest
from ray import serve

from maas_ray.serving import compat

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _params(func) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(func).parameters)


def _accepts(func, *names: str) -> None:
    params = {n: p for n, p in _params(func).items() if p.kind is not p.VAR_KEYWORD}  # named, not **kwargs
    missing = [n for n in names if n not in params]
    assert not missing, f"{func.__qualname__}{inspect.signature(func)} no longer takes {missing}"


# ---- Serve's controller client ---------------------------------------------------------
def test_global_client_is_importable_and_callable_without_arguments():
    from ray.serve._private.client import ServeControllerClient
    from ray.serve.context import _get_global_client

    required = [p for p in _params(_get_global_client).values() if p.default is p.empty]
    assert required == []
    hints = typing.get_type_hints(_get_global_client)
    assert ServeControllerClient in typing.get_args(hints["return"]) or hints["return"] is ServeControllerClient


def test_client_methods_take_what_we_pass():
    from ray.serve._private.client import ServeControllerClient

    _accepts(ServeControllerClient.deploy_apps, "self", "config", "_blocking")
    params = _params(ServeControllerClient.deploy_apps)
    assert list(params)[:2] == ["self", "config"]  # compat passes the schema positionally
    assert [n for n, p in _params(ServeControllerClient.get_serve_details).items() if p.default is p.empty] \
        == ["self"]


def test_serve_start_takes_what_we_pass_and_leaves_the_global_client():
    _accepts(serve.start, "proxy_location", "http_options", "grpc_options")
    # serve.start goes through the private serve_start, which caches the client global_client reads.
    from ray.serve._private import api as private_api

    assert "serve_start(" in inspect.getsource(serve.start)
    assert "_set_global_client(" in inspect.getsource(private_api.serve_start)


# ---- the late-bound ASGI ingress ---------------------------------------------------------
def test_asgi_hook_is_the_name_serve_calls():
    from ray.serve._private import replica
    from ray.serve._private.http_util import ASGIAppReplicaWrapper

    assert replica.SERVE_BUILD_ASGI_APP_METHOD == compat.ASGI_APP_HOOK
    caller = inspect.getsource(replica.UserCallableWrapper._initialize_asgi_callable)
    assert "getattr(self._callable, SERVE_BUILD_ASGI_APP_METHOD" in caller
    assert "_set_asgi_app(" in caller
    assert compat.ASGI_APP_HOOK in inspect.getsource(serve.ingress)
    assert "is None" in inspect.getsource(ASGIAppReplicaWrapper.__init__)  # late-bound: no app yet
    assert callable(ASGIAppReplicaWrapper._set_asgi_app)


class _Toy:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting


def _toy_app(self):
    async def app(scope, receive, send):  # a minimal ASGI app
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": self.greeting.encode()})

    app.owner = self
    return app


def test_asgi_ingress_wraps_like_serve_ingress_and_builds_per_instance():
    from ray.serve._private.http_util import ASGIAppReplicaWrapper

    toy = type("Toy", (_Toy,), {"__module__": __name__})
    wrapped = compat.asgi_ingress(_toy_app)(toy)

    assert wrapped.__wrapped__ is toy  # what serve.ingress returns: its wrapper around the class
    assert issubclass(wrapped, toy) and issubclass(wrapped, ASGIAppReplicaWrapper)
    assert inspect.iscoroutinefunction(wrapped.__init__)
    assert callable(getattr(wrapped, compat.ASGI_APP_HOOK))
    deployment = serve.deployment(wrapped)
    assert deployment.func_or_class is wrapped

    # What a replica does: construct (user __init__, then the wrapper's, given no app), call the
    # hook on the instance, set the app it returned.
    instance = wrapped.__new__(wrapped)
    toy.__init__(instance, "hi")
    ASGIAppReplicaWrapper.__init__(instance, None)
    assert not hasattr(instance, "_asgi_app")
    app = getattr(instance, compat.ASGI_APP_HOOK)()
    assert app.owner is instance
    instance._set_asgi_app(app)
    assert instance.app is app


def test_asgi_ingress_refuses_a_class_with_its_own_hook():
    toy = type("Toy", (_Toy,), {compat.ASGI_APP_HOOK: lambda self: None})
    with pytest.raises(TypeError, match="sets it"):
        compat.asgi_ingress(_toy_app)(toy)


def test_serve_still_requires_the_hook_for_a_late_bound_ingress():
    with pytest.raises(ValueError, match=compat.ASGI_APP_HOOK):
        serve.ingress()(type("NoHook", (), {}))


# ---- what tests and benchmarks use, listed in compat's docstring ----------------------------
def test_private_names_outside_compat_still_exist():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config  # tests/unit/test_cluster_configs.py

    assert list(_params(prepare_config)) == ["config"] and list(_params(validate_config)) == ["config"]
    assert callable(ray._config.metrics_report_interval_ms)  # tests/integration/test_metrics_endpoint.py


@pytest.mark.parametrize(("variable", "reader"), [
    ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "train/v2/_internal/constants.py"),  # maas_ray.cli
    ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "serve/_private/constants.py"),  # benchmarks
    ("RAY_SERVE_ENABLE_HA_PROXY", "serve/_private/constants.py"),  # benchmarks
    ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "serve/_private/constants.py"),  # tests
    ("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "serve/_private/constants.py"),  # tests
])
def test_environment_knobs_are_still_read(variable, reader):
    import ray

    assert f'"{variable}"' in (Path(ray.__file__).parent / reader).read_text(), f"Ray no longer reads {variable}"


# ---- nothing else uses private Ray API -----------------------------------------------------
_PRIVATE = {"_private", "_get_global_client", compat.ASGI_APP_HOOK}


def test_only_compat_uses_private_ray_serve_api():
    offenders = []
    for path in sorted([*(ROOT / "maas_ray").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "maas_ray/serving/compat.py":
            continue
        text = path.read_text()
        if not any(name in text for name in _PRIVATE):
            continue
        tokens = tokenize.generate_tokens(io.StringIO(text).readline)
        names = {t.string for t in tokens if t.type == tokenize.NAME} & _PRIVATE  # code, not comments
        if names:
            offenders.append(f"{rel}: {sorted(names)}")
    assert offenders == [], "private Ray API outside maas_ray/serving/compat.py"
