"""`maas models delete`: confirmation, refusals as one line, and the serving-apps probe (a
`GET /api/serve/applications/` body, shaped as ray.serve.schema.ServeInstanceDetails)."""

import http.server
import json
import socket
import threading

import pytest

from maas_ray.cli import main
from maas_ray.cli.serving_apps import (
    APPLICATIONS_PATH,
    dashboard_address,
    fetch_serve_details,
    is_maas_app,
    ray_auth_token,
    serving_versions,
)
from maas_ray.registry import Registry
from tests.helpers import linear_onnx

pytestmark = pytest.mark.unit


def _app(name, args, import_path="maas_ray.serving.app:build_app"):
    """One ``applications`` entry of ServeInstanceDetails, as the dashboard answers it."""
    return {
        "name": name, "route_prefix": f"/{name}", "docs_path": None, "status": "RUNNING", "message": "",
        "last_deployed_time_s": 1.7e9, "source": "declarative", "deployments": {},
        "external_scaler_enabled": False,
        "deployed_app_config": {"name": name, "route_prefix": f"/{name}", "import_path": import_path,
                                "args": args},
    }


def _details(*apps):
    return {"controller_info": {"node_id": "n", "actor_name": "SERVE_CONTROLLER_ACTOR"}, "proxy_location": "EveryNode",
            "proxies": {}, "applications": {a["name"]: a for a in apps}, "target_capacity": None}


@pytest.fixture
def reg(tmp_path):
    r = Registry(str(tmp_path / "reg"))
    for seed in range(3):
        r.publish("lin", linear_onnx(seed=seed))
    r.publish("other", linear_onnx())
    r.set_alias("lin", "production", 3)
    return r


@pytest.fixture
def no_dashboard(monkeypatch):
    """A dashboard address where nothing listens (a port just freed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_DASHBOARD_ADDRESS", f"http://127.0.0.1:{port}")
    return port


@pytest.fixture
def dashboard(monkeypatch):
    """A real HTTP server answering GET /api/serve/applications/ with ``state["details"]``."""
    state = {"details": _details(), "paths": [], "auth": [], "token": None}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["paths"].append(self.path)
            state["auth"].append(self.headers.get("Authorization"))
            body = json.dumps(state["details"]).encode()
            if state["token"] and self.headers.get("Authorization") != f"Bearer {state['token']}":
                status = 401  # a RAY_AUTH_MODE=token dashboard
            else:
                status = 200 if self.path == APPLICATIONS_PATH else 404
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("RAY_DASHBOARD_ADDRESS", state["url"])
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-123")
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


# ---- the serving-apps parser -----------------------------------------------------------------


def test_the_fake_details_have_the_shape_serve_answers_with():
    schema = pytest.importorskip("ray.serve.schema")
    details = _details(_app("a", {"models": [{"name": "lin", "versions": [{"version": 1}]}]}))
    parsed = schema.ServeInstanceDetails.model_validate(details)
    assert parsed.applications["a"].deployed_app_config.args["models"][0]["name"] == "lin"
    assert schema.ServeInstanceDetails.get_empty_schema_dict()["applications"] == {}


def test_serving_versions_resolves_numbers_aliases_and_latest(reg):
    details = _details(
        _app("canary", {"models": [{"name": "lin", "versions": [{"version": "production", "weight": 90},
                                                                {"version": 1, "weight": 10}]}]}),
        _app("all", {"models": [{"name": "lin", "versions": [{"version": "1"}]},
                                {"name": "other", "versions": [{"version": "latest"}]}]}),
        _app("gone", {"models": [{"name": "lin", "versions": [{"version": "old-alias"}]},
                                 {"name": "deleted-model", "versions": [{"version": 1}]}]}),
        _app("foreign", {"models": [{"name": "lin", "versions": [{"version": 2}]}]}, import_path="myapp:build"),
    )
    assert serving_versions(details, reg) == {("lin", 3): ["canary"], ("lin", 1): ["all", "canary"],
                                              ("other", 1): ["all"]}
    assert serving_versions(details, reg, model="other") == {("other", 1): ["all"]}
    assert serving_versions(_details(), reg) == {}
    assert serving_versions({"applications": {"x": {"deployed_app_config": None}}}, reg) == {}


def test_a_dynamic_app_points_at_its_alias_or_the_latest_version(reg):
    details = _details(_app("pool", {"dynamic": {"models": ["l*"], "exclude": ["lx"], "version": "production"}}),
                       _app("pool2", {"dynamic": {"version": "stable"}, "models": [{"name": "other",
                                                                                   "versions": [{"version": 1}]}]}))
    assert serving_versions(details, reg, model="lin") == {("lin", 3): ["pool", "pool2"]}
    reg.set_alias("lin", "stable", 2)
    assert serving_versions(details, reg) == {("lin", 3): ["pool"], ("lin", 2): ["pool2"], ("other", 1): ["pool2"]}


@pytest.mark.parametrize(("path", "ours"), [
    ("maas_ray.serving.app:build_app", True), ("maas_ray.serving.app.build_app", True),
    ("maas_ray.serving:build_app", True), ("myapp:build_app", False), ("maas_ray.serving.app:other", False),
])
def test_is_maas_app(path, ours):
    assert is_maas_app(path) is ours


@pytest.mark.parametrize(("env", "address"), [
    ({}, "http://127.0.0.1:8265"),
    ({"RAY_ADDRESS": "auto"}, "http://127.0.0.1:8265"),
    ({"RAY_ADDRESS": "http://head:8265"}, "http://head:8265"),
    ({"RAY_ADDRESS": "ray://head:10001"}, "http://head:8265"),
    ({"RAY_ADDRESS": "10.0.0.5:6379"}, "http://10.0.0.5:8265"),
    ({"RAY_ADDRESS": "10.0.0.5:6379", "RAY_DASHBOARD_ADDRESS": "dash:8265"}, "http://dash:8265"),
])
def test_dashboard_address(env, address):
    assert dashboard_address(env) == address


def test_fetch_reads_the_dashboard_and_says_why_not(dashboard, no_dashboard):
    details, why = fetch_serve_details(dashboard_address())  # RAY_DASHBOARD_ADDRESS: no_dashboard's port
    assert details is None and f"no Ray dashboard at http://127.0.0.1:{no_dashboard}" in why
    dashboard["details"] = _details(_app("a", {"models": []}))
    assert fetch_serve_details(dashboard["url"]) == (dashboard["details"], "")
    assert dashboard["paths"] == [APPLICATIONS_PATH]
    details, why = fetch_serve_details(dashboard["url"] + "/elsewhere")
    assert details is None and "HTTP 404" in why


def test_ray_auth_token_is_found_where_ray_looks(tmp_path):
    (tmp_path / ".ray").mkdir()
    assert ray_auth_token({}, home=str(tmp_path)) is None
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert ray_auth_token({}, home=str(tmp_path)) == "from-home"
    (tmp_path / "tok").write_text("from-path")
    assert ray_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}, home=str(tmp_path)) == "from-path"
    assert ray_auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}) == "from-env"


def test_a_token_dashboard_gets_the_token(dashboard):
    dashboard["token"] = "tok-123"
    assert fetch_serve_details(dashboard["url"], token="tok-123")[0] == dashboard["details"]
    details, why = fetch_serve_details(dashboard["url"])
    assert details is None and "HTTP 401 (Ray token authentication" in why
    assert dashboard["auth"] == ["Bearer tok-123", None]


# ---- the command -------------------------------------------------------------------------


def test_delete_with_yes_and_no_cluster(reg, no_dashboard, capsys):
    assert main(["models", "delete", "lin", "2", "--yes", "--registry", reg.root]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "deleted lin:2"
    assert len(err.strip().splitlines()) == 1
    assert "serving apps not checked: no Ray dashboard at" in err and "only aliases are checked" in err
    assert reg.list_versions("lin") == [1, 3]


def test_without_yes_a_non_interactive_stdin_refuses(reg, no_dashboard, capsys):
    assert main(["models", "delete", "lin", "2", "--registry", reg.root]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: not deleting lin:2 without confirmation: stdin is not a terminal; pass --yes"
    assert reg.list_versions("lin") == [1, 2, 3]


@pytest.mark.parametrize(("answer", "deleted"), [("y", True), ("yes", True), ("n", False), ("", False)])
def test_interactive_confirmation(reg, no_dashboard, capsys, monkeypatch, answer, deleted):
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    prompts = []
    monkeypatch.setattr("builtins.input", lambda prompt: prompts.append(prompt) or answer)
    assert main(["models", "delete", "lin", "1", "--registry", reg.root]) == (0 if deleted else 1)
    assert prompts == ["delete lin:1? This cannot be undone. [y/N] "]
    assert (1 not in reg.list_versions("lin")) is deleted
    assert capsys.readouterr().out.strip() == ("deleted lin:1" if deleted else "lin:1 not deleted")


@pytest.mark.parametrize(("argv", "message"), [
    (["lin", "3"], "error: cannot delete lin:3: alias production names it (move it first: "
                   "`maas models alias lin ALIAS VERSION`)"),
    (["lin", "production"], "error: delete takes a version number, not 'production'"),
    (["lin", "9"], "error: model 'lin' has no version 9"),
    (["nope", "1"], "error: model 'nope' does not exist"),
])
def test_refusals_are_one_line_and_ask_nothing(reg, no_dashboard, capsys, argv, message):
    assert main(["models", "delete", *argv, "--yes", "--registry", reg.root]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert reg.list_versions("lin") == [1, 2, 3]


def test_refused_while_a_serving_app_serves_it(reg, dashboard, capsys):
    dashboard["details"] = _details(_app("digits", {"models": [{"name": "lin", "versions": [{"version": 2}]}]}))
    assert main(["models", "delete", "lin", "2", "--yes", "--registry", reg.root]) == 1
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        "error: cannot delete lin:2: serving app digits serves it (`serve status`; redeploy without it or move "
        "its alias first)"]
    assert dashboard["paths"] == [APPLICATIONS_PATH] and dashboard["auth"] == ["Bearer tok-123"]
    assert reg.list_versions("lin") == [1, 2, 3]
    assert main(["models", "delete", "lin", "1", "--yes", "--registry", reg.root]) == 0  # not served: no note
    out, err = capsys.readouterr()
    assert out.strip() == "deleted lin:1" and err == ""
