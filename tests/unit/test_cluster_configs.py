"""`ray up` configs in cluster/ pass Ray's own validator, offline.

``prepare_config`` merges Ray's provider defaults exactly as ``ray up`` does and
``validate_config`` applies ray-schema.json plus the node-type checks. Both live in
the private ``ray.autoscaler._private.util``: pyproject pins the Ray range this ran on.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

pytestmark = pytest.mark.unit

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "cluster"
CONFIGS = sorted(CLUSTER_DIR.glob("*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def _validated(raw: dict[str, Any]) -> dict[str, Any]:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _setup_per_node_type(config: dict[str, Any]) -> dict[str, str]:
    """Node type -> the setup commands Ray will run there, joined (after prepare_config)."""
    out = {}
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            commands = config["head_setup_commands"]
        else:  # a node type's own list replaces setup_commands + worker_setup_commands
            commands = node_type.get("worker_setup_commands", config["worker_setup_commands"])
        out[name] = "\n".join(commands)
    return out


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"aws-gpu.yaml", "onprem.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_ray_validator(path):
    _validated(_load(path))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_node_installs_one_runtime_and_sees_the_registry(path):
    config = _validated(_load(path))
    for name, commands in _setup_per_node_type(config).items():
        assert "MAAS_REGISTRY_ROOT=" in commands, f"{name} never sets MAAS_REGISTRY_ROOT"
        assert "check_onnxruntime_install" in commands, name
        assert "ray-wheels" not in commands, f"{name} inherited Ray's default nightly install"
        if config["provider"]["type"] == "local":  # one node type: pick the build per machine
            assert "nvidia-smi" in commands and "maas-ray[gpu,train]" in commands, name
            assert "maas-ray[cpu,train]" in commands, name
            continue
        gpus = config["available_node_types"][name]["resources"].get("GPU", 0)
        wanted, unwanted = ("[gpu,train]", "[cpu,") if gpus else ("[cpu,train]", "[gpu,")
        assert f"maas-ray{wanted}" in commands, f"{name} should install maas-ray{wanted}"
        assert f"maas-ray{unwanted}" not in commands, f"{name} installs both onnxruntime builds"


def test_aws_config_declares_resources_and_a_gpu_group():
    config = _validated(_load(CLUSTER_DIR / "aws-gpu.yaml"))
    node_types = config["available_node_types"]
    assert all("CPU" in t["resources"] for t in node_types.values())  # no AWS lookup needed
    workers = [t for n, t in node_types.items() if n != config["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU")]
    cpu = [t for t in workers if not t["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1
    assert len(cpu) == 1 and cpu[0]["max_workers"] >= 1


def test_unknown_key_is_rejected():
    raw = _load(CLUSTER_DIR / "aws-gpu.yaml")
    raw["available_node_types"]["gpu.worker"]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        _validated(raw)


def test_min_workers_above_max_workers_is_rejected():
    raw = _load(CLUSTER_DIR / "aws-gpu.yaml")
    raw["max_workers"] = 1
    raw["available_node_types"]["gpu.worker"]["min_workers"] = 2
    with pytest.raises(ValueError, match="smaller than the sum of `min_workers`"):
        _validated(raw)


def test_local_provider_without_head_ip_is_rejected():
    raw = _load(CLUSTER_DIR / "onprem.yaml")
    del raw["provider"]["head_ip"]
    with pytest.raises(click.ClickException, match="head_ip"):  # not a ValueError
        _validated(raw)


def _exports(commands: str) -> dict[str, str]:
    """The `export NAME="value"` lines a setup command writes to ~/.maas_env."""
    return {m.group(1): m.group(2) for m in re.finditer(r"export (\w+)=\"?([^\"'\s]+)\"?", commands)}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_node_turns_api_keys_and_ray_token_auth_on(path):
    from maas_ray.serving.config import AuthConfig
    from maas_ray.serving.keys import resolve_auth

    config = _validated(_load(path))
    for name, commands in _setup_per_node_type(config).items():
        env = _exports(commands)
        assert env.get("RAY_AUTH_MODE") == "token", f"{name} runs Ray without token authentication"
        assert env.get("MAAS_AUTH_KEYS_FILE", "").startswith("s3://"), f"{name} has no s3:// key file"
        # what build_app sees on that node for a serve YAML without an auth block
        auth = resolve_auth(AuthConfig(), env)
        assert auth.enabled and auth.keys_file == env["MAAS_AUTH_KEYS_FILE"], name
    # the Ray token every node needs comes from the machine running `ray up`
    mounts = config["file_mounts"]
    assert any(remote.endswith("/.ray/auth_token") for remote in mounts), mounts


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_node_turns_ray_tls_on(path):
    """Ray's own TLS between its processes: the four variables on every node, and the files
    they name copied there by file_mounts."""
    config = _validated(_load(path))
    for name, commands in _setup_per_node_type(config).items():
        env = _exports(commands)
        assert env.get("RAY_USE_TLS") == "1", f"{name} runs Ray without TLS"
        for var in ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT"):
            assert env.get(var, "").startswith("$HOME/maas-tls/"), f"{name}: {var}={env.get(var)!r}"
    mounts = config["file_mounts"]
    assert any(remote.endswith("/maas-tls") and local == "./cluster/tls" for remote, local in mounts.items()), mounts
