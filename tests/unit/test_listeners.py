"""Every app YAML in deployments/ declares the same listeners: HTTP and the OIP gRPC service,
and the same (commented) TLS lines, so an operator turns HTTPS on the same way in each."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from maas_ray.serving.deploy import load_config

pytestmark = pytest.mark.unit

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"
APPS = sorted(DEPLOYMENTS.glob("*.yaml"))
SERVICER = "maas_ray.serving.grpc.add_inference_servicer"


def _tls_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip().startswith("# ssl_")]


def test_there_are_app_yamls():
    assert {p.name for p in APPS} >= {"digits-cpu.yaml", "text-cpu.yaml", "cnn-cpu.yaml"}


@pytest.mark.parametrize("path", APPS, ids=lambda p: p.name)
def test_every_app_has_http_and_grpc_listeners(path):
    raw = yaml.safe_load(path.read_text())
    assert set(raw["http_options"]) == {"host", "port"}, raw["http_options"]
    assert set(raw["grpc_options"]) == {"port", "grpc_servicer_functions"}, raw["grpc_options"]
    assert raw["grpc_options"]["grpc_servicer_functions"] == [SERVICER]
    schema = load_config(path)  # Serve's own schema accepts it
    assert schema.grpc_options.port == raw["grpc_options"]["port"]


def test_every_app_has_the_same_listener_settings_and_tls_lines():
    listeners = {p.name: (yaml.safe_load(p.read_text())["http_options"]["port"],
                          yaml.safe_load(p.read_text())["grpc_options"]) for p in APPS}
    assert len({repr(v) for v in listeners.values()}) == 1, listeners
    tls = {p.name: _tls_lines(p) for p in APPS}
    assert len({tuple(v) for v in tls.values()}) == 1, tls
    assert any("ssl_certfile" in line for line in next(iter(tls.values())))


@pytest.mark.parametrize("path", APPS, ids=lambda p: p.name)
def test_tls_lines_uncommented_are_a_valid_serve_config(path):
    text = path.read_text().replace("  # ssl_", "  ssl_")
    schema = load_config(yaml.safe_load(text))
    assert schema.http_options.ssl_certfile and schema.http_options.ssl_keyfile
