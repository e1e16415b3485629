"""Which registry versions the running Serve apps serve, for ``maas models delete``.

Read from the Ray dashboard's REST API, ``GET /api/serve/applications/`` (what ``serve status``
and Ray's ``ServeSubmissionClient.get_serve_details`` read; the body is
``ray.serve.schema.ServeInstanceDetails``): no ``ray.init``, so asking costs one HTTP request and
nothing listening answers at once. Each maas app's deployed config names its versions
(``args.models[].versions[].version``, numbers or aliases; an ``args.dynamic`` app every model its
patterns match); aliases and ``latest`` are resolved through the registry as the apps resolve them.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from typing import Any, Mapping, Optional

from maas_ray.errors import MaasError

logger = logging.getLogger(__name__)

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
DASHBOARD_PORT = 8265
APPLICATIONS_PATH = "/api/serve/applications/"
PROBE_TIMEOUT_S = 1.0


def dashboard_address(env: Optional[Mapping[str, str]] = None) -> str:
    """The dashboard URL: ``$RAY_DASHBOARD_ADDRESS`` (as ``serve status``), else ``$RAY_ADDRESS``
    (an ``http(s)://`` URL as is; ``ray://host:10001`` or ``host:6379`` -> that host's port 8265),
    else the local dashboard."""
    env = os.environ if env is None else env
    address = (env.get("RAY_DASHBOARD_ADDRESS") or "").strip()
    if address:
        return address if "://" in address else f"http://{address}"
    address = (env.get("RAY_ADDRESS") or "").strip()
    if not address or address in ("auto", "local"):
        return DEFAULT_DASHBOARD
    if address.startswith(("http://", "https://")):
        return address
    host = address.split("://", 1)[-1].rsplit(":", 1)[0] or "127.0.0.1"
    return f"http://{host}:{DASHBOARD_PORT}"


def ray_auth_token(env: Optional[Mapping[str, str]] = None, home: Optional[str] = None) -> Optional[str]:
    """Ray's token (``RAY_AUTH_MODE=token`` clusters, docs/cluster.md), found where Ray looks:
    ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``; None if none."""
    env = os.environ if env is None else env
    if (env.get("RAY_AUTH_TOKEN") or "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    path = env.get("RAY_AUTH_TOKEN_PATH") or os.path.join(home or os.path.expanduser("~"), ".ray", "auth_token")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def fetch_serve_details(address: str, *, timeout_s: float = PROBE_TIMEOUT_S,
                        token: Optional[str] = None) -> tuple[Optional[dict[str, Any]], str]:
    """``(details, "")`` from the dashboard at ``address``, or ``(None, why)`` when none answers
    (nothing listening, a timeout, an error status, a body that is not JSON). ``token``: Ray's
    auth token, sent as ``Authorization: Bearer`` (as Ray's own clients send it)."""
    url = address.rstrip("/") + APPLICATIONS_PATH
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        hint = (" (Ray token authentication: set $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)"
                if exc.code == 401 and not token else "")
        return None, f"{url} answered HTTP {exc.code}{hint}"
    except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, unresolvable, timed out, bad URL
        return None, f"no Ray dashboard at {address} ({getattr(exc, 'reason', exc)})"
    try:
        details = json.loads(body)
    except ValueError as exc:
        return None, f"{url} did not answer JSON ({exc})"
    if not isinstance(details, dict):
        return None, f"{url} answered {type(details).__name__}, not an object"
    return details, ""


def find_serving(registry: Any, model: Optional[str] = None, *,
                 env: Optional[Mapping[str, str]] = None) -> tuple[Optional[dict[tuple[str, int], list[str]]], str]:
    """``(serving_versions(...), "")`` read from the dashboard the environment names, or
    ``(None, why)`` when no dashboard answered."""
    details, why = fetch_serve_details(dashboard_address(env), token=ray_auth_token(env))
    return (None, why) if details is None else (serving_versions(details, registry, model=model), "")


def is_maas_app(import_path: str) -> bool:
    """``maas_ray.serving.app:build_app`` (or the dotted form Serve also accepts)."""
    return import_path.startswith("maas_ray.") and import_path.replace(":", ".").rsplit(".", 1)[-1] == "build_app"


def serving_versions(details: Mapping[str, Any], registry: Any, *,
                     model: Optional[str] = None) -> dict[tuple[str, int], list[str]]:
    """``(model, version) -> [app names]`` for every version a maas app in ``details`` points at.

    ``details``: a ``GET /api/serve/applications/`` body (``ServeInstanceDetails``). An app's
    ``args.models[].versions[].version`` are resolved as the app resolves them; an app with
    ``args.dynamic`` points, for each registry model its patterns match, at the version its
    ``dynamic.version`` alias names (already an alias) or else at the latest one. ``model``:
    look at this model only (what a delete needs; a registry may hold thousands). Apps built by
    another import path are not read. A reference the registry cannot resolve any more (its
    model or alias is gone) points at nothing and is skipped.
    """
    out: dict[tuple[str, int], list[str]] = {}

    def add(app_name: str, name: str, ref: Any) -> None:
        try:
            version = registry.resolve(name, None if ref is None else str(ref))
        except MaasError as exc:
            logger.debug("app %s: %s:%s does not resolve: %s", app_name, name, ref, exc)
            return
        apps = out.setdefault((name, version), [])
        if app_name not in apps:
            apps.append(app_name)

    for app_name, app in sorted((details.get("applications") or {}).items()):
        config = (app or {}).get("deployed_app_config") or {}
        if not is_maas_app(config.get("import_path") or ""):
            continue
        args = config.get("args") or {}
        listed = set()
        for entry in args.get("models") or []:
            name = entry.get("name") if isinstance(entry, dict) else None
            if not name:
                continue
            listed.add(name)
            if model is None or name == model:
                for v in entry.get("versions") or []:
                    add(app_name, name, v.get("version") if isinstance(v, dict) else v)
        dynamic = args.get("dynamic")
        if isinstance(dynamic, dict):
            names = [model] if model is not None else registry.list_models()
            for name in names:
                if name in listed or not _dynamic_matches(dynamic, name):
                    continue
                alias = str(dynamic.get("version") or "production")
                if alias in registry.aliases(name):
                    add(app_name, name, alias)
                else:
                    add(app_name, name, None)  # the latest version
    return out


def _dynamic_matches(dynamic: Mapping[str, Any], name: str) -> bool:
    """``dynamic.models`` patterns (default every model) less ``dynamic.exclude``, as the app reads them."""
    import fnmatch

    patterns = dynamic.get("models") or ["*"]
    return (any(fnmatch.fnmatchcase(name, str(p)) for p in patterns)
            and not any(fnmatch.fnmatchcase(name, str(p)) for p in dynamic.get("exclude") or []))
