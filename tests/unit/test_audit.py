"""The audit trail: one event per registry change, with actor and before/after, and `maas audit`."""

import json
import threading
import types
from pathlib import Path

import pytest

from maas_ray.cli import main
from maas_ray.registry import Registry
from maas_ray.registry.audit import AuditLog
from maas_ray.registry.crypto import new_kek
from maas_ray.rollout.controller import RolloutController
from tests.helpers import linear_onnx

pytestmark = pytest.mark.unit


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("MAAS_ACTOR", "alice")
    return str(tmp_path / "registry")


def _summary(events):
    return [(e.actor, e.action, e.target, e.before, e.after) for e in events]


def test_each_registry_change_is_one_event_with_before_and_after(root):
    reg = Registry(root)
    m = reg.publish("lin", linear_onnx())
    reg.publish("lin", linear_onnx(seed=1))
    reg.set_alias("lin", "production", 1)
    reg.set_alias("lin", "production", 2)
    reg.delete_alias("lin", "production")
    events = reg.audit.events()
    assert [e.action for e in events] == ["publish", "publish", "alias.set", "alias.set", "alias.delete"]
    assert events[0].after == {"version": 1, "sha256": m.sha256, "encrypted": False, "kek_id": None,
                               "signed_by": None}
    assert _summary(events[2:]) == [
        ("alice", "alias.set", "lin@production", None, {"version": 1}),
        ("alice", "alias.set", "lin@production", {"version": 1}, {"version": 2}),
        ("alice", "alias.delete", "lin@production", {"version": 2}, None),
    ]
    assert all(e.time.tzinfo is not None and e.model == "lin" for e in events)
    # one object per event under _audit/<day>/, never a model
    files = list((Path(root) / "_audit").rglob("*.json"))
    assert len(files) == 5 and all(f.parent.name == f"{events[0].time:%Y-%m-%d}" for f in files)
    assert reg.list_models() == ["lin"]


def test_the_actor_is_a_key_id_the_env_or_the_os_user(root, monkeypatch):
    Registry(root, actor="key:ab12cd34").publish("lin", linear_onnx())
    monkeypatch.delenv("MAAS_ACTOR")
    import getpass

    Registry(root).publish("lin", linear_onnx())
    assert [e.actor for e in Registry(root).audit.events()] == ["key:ab12cd34", getpass.getuser()]


def test_concurrent_writers_lose_no_event(root):
    reg = Registry(root)
    log = AuditLog(reg)
    threads = [threading.Thread(target=lambda i=i: [log.append("test", f"t{i}:{j}") for j in range(10)])
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log.events(action="test")) == 40


def test_rollout_decisions_are_recorded(root):
    reg = Registry(root)
    controller = object.__new__(RolloutController)  # the actor's body, without Ray: only its record hook
    controller.registry, controller.model, controller.id = reg, "lin", "r1"
    controller.state, controller._lock = {"baseline": 1}, threading.Lock()
    controller.config = types.SimpleNamespace(candidate=2)
    controller._set(phase="rolling")  # no decision: no event
    controller._set(phase="rolled_back", decision={"decision": "rolled_back", "at": "now", "why": "p99 too high"})
    (event,) = reg.audit.events()
    assert (event.action, event.target, event.before) == ("rollout.rolled_back", "lin:rollout/r1", {"baseline": 1})
    assert event.after == {"candidate": 2, "decision": "rolled_back", "at": "now", "why": "p99 too high"}


def test_key_commands_and_kek_rotation_are_recorded(root, tmp_path, capsys):
    keyfile = str(tmp_path / "keys.json")
    assert main(["keys", "create", "--file", keyfile, "--models", "lin", "--name", "ci", "--registry", root]) == 0
    key_id = json.loads(Path(keyfile).read_text())["keys"][0]["id"]
    assert main(["keys", "revoke", key_id, "--file", keyfile, "--registry", root]) == 0
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    assert main(["keys", "gen-kek", str(old)]) == 0
    new.write_text(new_kek())
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(linear_onnx())
    assert main(["models", "publish", "lin", str(onnx), "--encrypt", "--kek", f"file://{old}", "--registry", root]) == 0
    before = (Path(root) / "lin" / "1" / "model.onnx").read_bytes()
    assert main(["keys", "rotate-kek", "--kek", f"file://{old}", "--new", f"file://{new}", "--registry", root]) == 0
    assert (Path(root) / "lin" / "1" / "model.onnx").read_bytes() == before
    capsys.readouterr()
    assert main(["audit", "--registry", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[2] for line in lines] == ["key.create", "key.revoke", "publish", "kek.rotate"]
    assert all(line.split("  ")[1] == "alice" for line in lines)
    events = Registry(root).audit.events(action="key")
    assert _summary(events) == [
        ("alice", "key.create", f"key:{key_id}", None, {"name": "ci", "models": ["lin"], "admin": False}),
        ("alice", "key.revoke", f"key:{key_id}", {"name": "ci", "models": ["lin"], "admin": False}, None),
    ]


def test_cli_filters_and_json(root, capsys, monkeypatch):
    reg = Registry(root)
    reg.publish("a", linear_onnx())
    reg.publish("b", linear_onnx())
    monkeypatch.setenv("MAAS_ACTOR", "bob")
    reg.set_alias("a", "production", 1)
    reg.set_alias("b", "production", 1)
    capsys.readouterr()

    def audit(*argv):
        assert main(["audit", "--registry", root, "--json", *argv]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert [(e["action"], e["target"]) for e in audit("--model", "a")] == [("publish", "a:1"), ("alias.set", "a@production")]
    assert [e["target"] for e in audit("--action", "alias")] == ["a@production", "b@production"]
    assert [e["target"] for e in audit("--action", "alias.set", "--limit", "1")] == ["b@production"]
    assert [e["target"] for e in audit("--actor", "alice")] == ["a:1", "b:1"]
    every = audit()
    assert [e["target"] for e in audit("--since", every[2]["time"])] == ["a@production", "b@production"]
    assert audit("--since", "2999-01-01") == []
    assert main(["audit", "--registry", root, "--since", "yesterday"]) == 1
    assert "since: not an ISO date or time: 'yesterday'" in capsys.readouterr().err
