"""Every private Ray Serve API maas_ray uses, in one place (pinned Ray: 2.60).

No other module in ``maas_ray`` or ``benchmarks`` names a private Ray API (a test checks), and
``tests/unit/test_compat.py`` fails on the pinned Ray when any of these moves (import,
parameters, the hook's name in the code that calls it). Paths are under ``site-packages/ray/``.

1. ``ray.serve.context._get_global_client()`` -> ``ServeControllerClient``
   (``serve/context.py``; the client class: ``serve/_private/client.py``). The connected
   Serve controller's client: :func:`global_client`. If it moves: the controller is the named
   actor ``SERVE_CONTROLLER_NAME`` in namespace ``serve`` (``serve/_private/constants.py``),
   ``ray.get_actor`` it and build the client from the new location, or call the controller's
   methods below on the actor handle directly.
2. ``ServeControllerClient.deploy_apps(config, _blocking=False)`` (``serve/_private/client.py``):
   ``ray.get(controller.apply_config.remote(config))``, what ``serve deploy`` does through the
   dashboard. :func:`deploy_apps`. If it moves: call ``apply_config`` on the controller actor, or
   ``PUT /api/serve/applications/`` on the dashboard (``ServeSubmissionClient`` in
   ``dashboard/modules/serve/sdk.py``), which needs the dashboard running.
3. ``ServeControllerClient.get_serve_details()`` (``serve/_private/client.py``): the controller's
   ``get_serve_instance_details``, a dict that ``ServeInstanceDetails`` (``serve/schema.py``)
   validates; ``deploy.update_ingress_user_config`` reads ``applications.*.deployed_app_config``,
   ``proxy_location``, ``http_options`` and ``grpc_options`` from it. If it moves: the same dict
   from ``GET /api/serve/applications/`` on the dashboard.
4. The late-bound ASGI ingress: ``serve.ingress()`` with no app (``serve/api.py`` ``ingress``)
   requires the class to define ``__serve_build_asgi_app__``; each replica calls it on the
   constructed instance and serves what it returns (``serve/_private/replica.py``:
   ``SERVE_BUILD_ASGI_APP_METHOD``, ``UserCallableWrapper._initialize_asgi_callable``;
   ``ASGIAppReplicaWrapper`` in ``serve/_private/http_util.py`` skips its own app when given
   None). :func:`asgi_ingress`. The decorator is public, the hook is not. If it moves:
   ``serve.ingress(builder)`` with a zero-argument builder (public, also run per replica, but
   without ``self``: the builder would reach the replica's state through a module-level
   registry the constructor fills), or rename :data:`ASGI_APP_HOOK`.
5. ``ray._private.state.state.get_cluster_config()`` (``_private/state.py``): the node types
   the autoscaler may start (``autoscaler_pb2.ClusterConfig.node_group_configs``: ``resources``,
   ``max_count``), as Ray Train reads them before placing workers. :func:`autoscaler_node_gpus`
   (``maas batch --gpus-per-actor``: refuse at once what no node type could ever place). If it
   moves: the same protobuf is in the GCS internal KV (``GCS_AUTOSCALER_STATE_NAMESPACE``,
   ``GCS_AUTOSCALER_CLUSTER_CONFIG_KEY`` in ``_raylet``); without it, judge by the alive nodes.

:func:`serve_start` needs no private API: public ``serve.start`` (``serve/api.py``) is a
pass-through to ``ray.serve._private.api.serve_start`` in 2.60, and the client it leaves
connected is :func:`global_client`'s.

Private Ray APIs used outside this module (not on a ``maas_ray`` code path, or not a Ray call):

- ``ray.autoscaler._private.util.prepare_config`` / ``validate_config``
  (``autoscaler/_private/util.py``): ``tests/unit/test_cluster_configs.py`` only, to validate
  ``cluster/*.yaml`` offline as ``ray up`` would. If they move: follow them, or validate against
  ``autoscaler/ray-schema.json`` with jsonschema alone (without Ray's provider defaults merged).
- ``maas_ray/serving/grpc.py`` ``_TolerantServer`` relies on how Serve's gRPC proxy server
  (``gRPCGenericServer`` in ``serve/_private/grpc_util.py``) registers a servicer: through
  ``add_generic_rpc_handlers`` with grpc's ``DictionaryGenericHandler`` (whose private
  ``_method_handlers`` both rewrite) or ``add_registered_method_handlers``. No Ray symbol is
  imported; a change there shows in ``tests/integration/test_grpc.py``.
- ``ray._config.metrics_report_interval_ms()`` (``_raylet``): ``tests/integration/test_metrics_endpoint.py``
  only, to size its deadline to Ray's export interval.
- Environment knobs Ray reads by name (a rename makes them silently do nothing; the test checks
  each name is still in the file that reads it): ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``
  (``train/v2/_internal/constants.py``; set by ``maas_ray.cli``), ``RAY_SERVE_THROUGHPUT_OPTIMIZED``
  and ``RAY_SERVE_ENABLE_HA_PROXY`` (``serve/_private/constants.py``; benchmarks),
  ``RAY_SERVE_{REPLICA,HANDLE}_AUTOSCALING_METRIC_PUSH_INTERVAL_S`` (``serve/_private/constants.py``;
  integration tests).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

# The method Serve calls on each replica's instance to build its ASGI app
# (ray.serve._private.replica.SERVE_BUILD_ASGI_APP_METHOD).
ASGI_APP_HOOK = "__serve_build_asgi_app__"

_C = TypeVar("_C", bound=type)


def global_client() -> Any:
    """The connected Serve controller's client (``ServeControllerClient``: ``deploy_apps``,
    ``get_serve_details``); raises ``RayServeException`` when no controller is running."""
    from ray.serve.context import _get_global_client

    return _get_global_client()


def serve_start(http_options: dict[str, Any], grpc_options: dict[str, Any], proxy_location: Any) -> Any:
    """Start Serve (or connect to the running controller) with these cluster-scoped options and
    return its client. Options are ignored by an already-running controller, as with ``serve start``."""
    from ray import serve

    serve.start(proxy_location=proxy_location, http_options=http_options, grpc_options=grpc_options)
    return global_client()


def deploy_apps(client: Any, schema: Any) -> None:
    """Apply a ``ServeDeploySchema`` through the controller, as ``serve deploy`` does, and return
    once the controller accepted it (not when the apps are RUNNING)."""
    client.deploy_apps(schema, _blocking=False)


def asgi_ingress(build_app: Callable[[Any], Any]) -> Callable[[_C], _C]:
    """A class decorator for a Serve deployment class whose ASGI app is built in each replica:
    ``build_app(self)`` runs on the constructed instance (after ``__init__``) and returns the
    ASGI app (or an awaitable of it) that replica serves. Returns what ``serve.ingress()``
    makes of the class (its ``__wrapped__`` is the class); apply ``serve.deployment`` to that.

        @asgi_ingress(lambda self: HttpApp(self.core, build_api(self.core)))
        class Ingress: ...
    """

    def decorate(cls: _C) -> _C:
        from ray import serve

        if ASGI_APP_HOOK in vars(cls):
            raise TypeError(f"{cls.__qualname__} defines {ASGI_APP_HOOK} itself; @asgi_ingress sets it")

        def hook(self: Any) -> Any:
            return build_app(self)

        hook.__name__ = ASGI_APP_HOOK
        hook.__qualname__ = f"{cls.__qualname__}.{ASGI_APP_HOOK}"
        hook.__module__ = cls.__module__
        setattr(cls, ASGI_APP_HOOK, hook)
        return serve.ingress()(cls)

    return decorate


def report_multiplexed_ids(model_ids: list[str]) -> bool:
    """Tell Serve's routers which multiplexed model IDs this replica holds, as ``@serve.multiplexed``
    does for its own cache (``_ModelMultiplexWrapper._push_model_ids_info``): handle calls made with
    ``.options(multiplexed_model_id=...)`` then go to a replica that reports the ID, else to the one
    with the fewest IDs. maas-ray keeps its own cache (a byte budget, loads concurrent across models,
    nothing in flight evicted: serving/cache.py) and reports through the same channel, so routing is
    Serve's. Returns False outside a replica (unit tests)."""
    from ray.serve._private.common import RequestRoutingInfo
    from ray.serve.context import _get_global_client, _get_internal_replica_context

    context = _get_internal_replica_context()
    if context is None:
        return False
    _get_global_client().record_request_routing_info(
        RequestRoutingInfo(replica_id=context.replica_id, multiplexed_model_ids=list(model_ids)))
    return True


def multiplexed_model_id() -> str:
    """The multiplexed model ID of the request being served ('' when none was given)."""
    from ray import serve

    return serve.get_multiplexed_model_id()


def autoscaler_node_gpus() -> list[float]:
    """GPUs of each node type the cluster's autoscaler may still start (``max_count`` != 0);
    [] without an autoscaler (a local Ray, ``ray start`` by hand). Needs a connected Ray."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is None:
        return []
    return [float(g.resources.get("GPU", 0)) for g in config.node_group_configs if g.max_count != 0]
