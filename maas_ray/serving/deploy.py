"""Deploy a Serve config file (or dict) from Python: the path ``serve run/deploy <yaml>`` takes.

Going through the controller's ``apply_config`` keeps `serve deploy` semantics:
a change to a deployment's ``user_config`` only (e.g. traffic weights) reconfigures
running replicas in place; a change to ``args`` rebuilds the app.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from maas_ray.errors import ConfigError
from maas_ray.serving import compat

logger = logging.getLogger(__name__)


HA_PROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"  # the throughput profile (deployments/profiles/throughput.env)
_SSL_OPTIONS = ("ssl_certfile", "ssl_keyfile", "ssl_keyfile_password", "ssl_ca_certs")


def refuse_tls_with_haproxy(http_options: Any, environ: Optional[Mapping[str, str]] = None) -> None:
    """ConfigError if ``http_options`` set ``ssl_*`` while the throughput profile is on
    (``RAY_SERVE_ENABLE_HA_PROXY=1`` in ``environ``, default ``os.environ``): Serve's HAProxy
    binds without ``ssl`` and ignores them, so the port would silently speak plain text."""
    env = os.environ if environ is None else environ
    if env.get(HA_PROXY_ENV, "0") != "1":
        return
    get = http_options.get if isinstance(http_options, dict) else lambda k: getattr(http_options, k, None)
    set_ = [k for k in _SSL_OPTIONS if get(k)]
    if set_:
        raise ConfigError(
            f"http_options.{', http_options.'.join(set_)} set with {HA_PROXY_ENV}=1: the throughput profile's "
            "HAProxy binds without TLS and ignores them, so traffic would be plain text. Remove the ssl_* lines "
            "and terminate TLS in front with `maas tls-front` (docs/security.md, \"TLS\"), or unset "
            f"{HA_PROXY_ENV} to let Serve's Python proxy serve HTTPS.")


def load_config(config: Union[str, Path, dict[str, Any]]):
    """A Serve config (YAML file or dict) as Serve's ``ServeDeploySchema``; ConfigError if invalid,
    or if it sets ``http_options.ssl_*`` under the throughput profile (:func:`refuse_tls_with_haproxy`,
    read from this process's environment: the one a local ``ray.init`` hands to Serve)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    raw = config if isinstance(config, dict) else yaml.safe_load(Path(config).read_text())
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid Serve config: {exc}") from exc
    refuse_tls_with_haproxy(schema.http_options)
    return schema


def deploy(config: Union[str, Path, dict[str, Any]], *, timeout_s: float = 180.0) -> None:
    """Apply a Serve config to the connected cluster and wait until every app is RUNNING."""
    from ray import serve

    schema = load_config(config)
    client = compat.serve_start(
        http_options=schema.http_options.model_dump(),
        # The OIP v2 gRPC service (maas_ray.serving.grpc) when the config names a servicer;
        # Serve's default (no servicer functions) starts no gRPC server.
        grpc_options=schema.grpc_options.model_dump(),
        proxy_location=schema.proxy_location,
    )
    compat.deploy_apps(client, schema)
    names = [app.name for app in schema.applications]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        if all(s == "RUNNING" for s in states.values()):
            return
        failed = {n: apps[n].message for n, s in states.items() if s == "DEPLOY_FAILED"}
        if failed:
            raise ConfigError(f"deploy failed: {failed}")
        time.sleep(0.5)
    raise TimeoutError(f"apps {names} not RUNNING after {timeout_s}s: {states}")


def update_ingress_user_config(app: str, user_config: dict[str, Any]) -> None:
    """Set the ``Ingress`` deployment's ``user_config`` of a running app, as ``serve deploy`` of an
    edited YAML would: replicas are reconfigured in place (no restarts).

    Every other app is redeployed with its config unchanged (``deploy_apps`` takes the whole
    set; an unchanged config is a no-op for Serve). Apps must have been deployed from a config
    (``serve run``/``serve deploy``/:func:`deploy`), as the deployed config is what is edited.
    """
    client = compat.global_client()
    details = client.get_serve_details()
    apps = []
    for name, info in details.get("applications", {}).items():
        config = info.get("deployed_app_config")
        if config is None:
            raise ConfigError(f"app {name!r} was not deployed from a config; cannot update it in place")
        config = dict(config)
        if name == app:
            deployments = [dict(d) for d in config.get("deployments") or []]
            ingress = next((d for d in deployments if d.get("name") == "Ingress"), None)
            if ingress is None:
                ingress = {"name": "Ingress"}
                deployments.append(ingress)
            ingress["user_config"] = user_config
            config["deployments"] = deployments
        apps.append(config)
    if app not in details.get("applications", {}):
        raise ConfigError(f"no app {app!r} is running; apps: {sorted(details.get('applications', {}))}")
    schema = load_config({
        "proxy_location": details.get("proxy_location") or "EveryNode",
        "http_options": details.get("http_options") or {},
        **({"grpc_options": details["grpc_options"]} if details.get("grpc_options") else {}),
        "applications": apps,
    })
    compat.deploy_apps(client, schema)
