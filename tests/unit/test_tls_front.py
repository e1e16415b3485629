"""`maas tls-front`: its config (files checked when built), the HAProxy config it renders (and
that HAProxy itself accepts), the CLI's errors; and the refusal of ``ssl_*`` under the
throughput profile (maas_ray/serving/deploy.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from maas_ray.cli import main
from maas_ray.cli.tls_front import (
    FRONT_HEADERS,
    TlsFrontConfig,
    check_config,
    haproxy_binary,
    render_haproxy_config,
)
from maas_ray.errors import ConfigError, DependencyError
from maas_ray.serving.deploy import HA_PROXY_ENV, load_config, refuse_tls_with_haproxy
from tests.helpers.tls import make_tls_files

pytestmark = pytest.mark.unit
YAML = Path(__file__).resolve().parents[2] / "deployments" / "digits-cpu.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def _haproxy() -> str:
    try:
        return haproxy_binary()
    except DependencyError as exc:
        pytest.skip(str(exc))


def _frontends(text: str) -> dict[str, list[str]]:
    out, current = {}, None
    for line in text.splitlines():
        if line.startswith(("frontend ", "backend ")):
            current = line
            out[current] = []
        elif current and line.startswith("    "):
            out[current].append(line.strip())
        elif line and not line.startswith("    "):
            current = None
    return out


def test_defaults_render_https_and_grpc_with_client_certificates(files):
    cfg = TlsFrontConfig(cert=files.server_cert, key=files.server_key, client_ca=files.ca)
    sections = _frontends(render_haproxy_config(cfg, "/run/front/server.pem"))
    https, grpcs = sections["frontend https_in"], sections["frontend grpcs_in"]
    assert https[0] == f"bind 0.0.0.0:8443 ssl crt /run/front/server.pem ca-file {files.ca} verify required " \
                      "alpn h2,http/1.1"
    assert grpcs[0] == f"bind 0.0.0.0:9443 ssl crt /run/front/server.pem ca-file {files.ca} verify required alpn h2"
    assert sections["backend serve_http"] == ["server serve 127.0.0.1:8000"]
    assert sections["backend serve_grpc"] == ["server serve 127.0.0.1:9000 proto h2"]
    assert "    hard-stop-after 10s" in render_haproxy_config(cfg, "b.pem").splitlines()  # drain bound on SIGTERM
    for rules in (https, grpcs):
        # The client's own copies go first, then the front sets its values.
        deleted = [r.split()[-1] for r in rules if r.startswith("http-request del-header")]
        assert deleted == list(FRONT_HEADERS)
        first_set = next(i for i, r in enumerate(rules) if r.startswith("http-request set-header"))
        assert all(not r.startswith("http-request del-header") for r in rules[first_set:])
        assert "http-request set-header X-Forwarded-For %[src]" in rules
        assert "http-request set-header X-Forwarded-Proto https" in rules
        assert "http-request set-header X-Client-Cert-Subject %[ssl_c_s_dn]" in rules


def test_without_a_client_ca_no_certificate_is_asked_and_the_header_is_only_dropped(files):
    cfg = TlsFrontConfig(cert=files.server_cert, key=files.server_key, grpc_port=None, https_port=443,
                         listen_host="::", http_backend="10.0.0.5:8000")
    text = render_haproxy_config(cfg, "b.pem")
    sections = _frontends(text)
    assert set(sections) == {"frontend https_in", "backend serve_http"}
    assert sections["frontend https_in"][0] == "bind :::443 ssl crt b.pem alpn h2,http/1.1"
    assert "verify" not in text and "ssl_c_s_dn" not in text
    assert "http-request del-header X-Client-Cert-Subject" in sections["frontend https_in"]
    assert sections["backend serve_http"] == ["server serve 10.0.0.5:8000"]


@pytest.mark.parametrize("client_ca", [False, True])
def test_haproxy_accepts_the_rendered_config(files, tmp_path, client_ca):
    haproxy = _haproxy()
    cfg = TlsFrontConfig(cert=files.server_cert, key=files.server_key, client_ca=files.ca if client_ca else None)
    bundle = tmp_path / "server.pem"
    bundle.write_bytes(cfg.bundle())
    path = tmp_path / "haproxy.cfg"
    path.write_text(render_haproxy_config(cfg, str(bundle)))
    check_config(haproxy, str(path))


def test_haproxy_rejections_are_config_errors_with_its_message(tmp_path):
    haproxy = _haproxy()
    path = tmp_path / "bad.cfg"
    path.write_text("frontend x\n    bind :1 ssl crt /nonexistent.pem\n")
    with pytest.raises(ConfigError, match="HAProxy rejected the generated config:.*nonexistent.pem"):
        check_config(haproxy, str(path))


def test_the_bundle_is_the_chain_then_the_key_and_a_combined_file_works(files, tmp_path):
    cfg = TlsFrontConfig(cert=files.server_cert, key=files.server_key)
    bundle = cfg.bundle()
    assert bundle.index(b"BEGIN CERTIFICATE") < bundle.index(b"BEGIN PRIVATE KEY")
    combined = tmp_path / "both.pem"
    combined.write_bytes(bundle)
    assert TlsFrontConfig(cert=combined, key=combined).bundle() == bundle


def _bad(files, tmp_path, case: str) -> dict:
    base = {"cert": files.server_cert, "key": files.server_key}
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a pem\n")
    encrypted = tmp_path / "encrypted.key"
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(files.server_key).read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pw")))
    return {
        "missing cert": ({**base, "cert": str(tmp_path / "nope.crt")}, r"cert file '.*nope.crt' cannot be read"),
        "cert not PEM": ({**base, "cert": str(garbage)}, r"cert '.*garbage.pem' holds no PEM certificate"),
        "key of another cert": ({**base, "key": files.client_key},
                                r"key '.*client.key' does not belong to the first certificate in '.*server.crt'"),
        "encrypted key": ({**base, "key": str(encrypted)}, r"key '.*encrypted.key' is not an unencrypted PEM"),
        "client_ca not PEM": ({**base, "client_ca": str(garbage)}, r"client_ca '.*garbage.pem' holds no PEM"),
        "no listener": ({**base, "https_port": None, "grpc_port": None}, "would listen nowhere"),
        "same ports": ({**base, "https_port": 9443}, "must differ, both are 9443"),
        "port range": ({**base, "grpc_port": 70000}, "port must be in 1..65535, got 70000"),
        "backend": ({**base, "http_backend": "localhost"}, "HOST:PORT .* got 'localhost'"),
        "extra field": ({**base, "ssl_ca": "x"}, "ssl_ca"),
    }[case]


@pytest.mark.parametrize("case", ["missing cert", "cert not PEM", "key of another cert", "encrypted key",
                                  "client_ca not PEM", "no listener", "same ports", "port range", "backend",
                                  "extra field"])
def test_bad_configs_are_refused_quoting_the_value(files, tmp_path, case):
    from pydantic import ValidationError

    fields, message = _bad(files, tmp_path, case)
    with pytest.raises(ValidationError, match=message):
        TlsFrontConfig(**fields)


def test_the_cli_prints_checks_and_refuses(files, capsys):
    flags = ["tls-front", "--cert", files.server_cert, "--key", files.server_key, "--client-ca", files.ca]
    assert main([*flags, "--no-grpc", "--https-port", "8444", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"bind 0\.0\.0\.0:8444 ssl crt .* verify required", out) and "grpcs_in" not in out
    assert main(["tls-front", "--cert", "/nonexistent.crt", "--key", files.server_key, "--check"]) == 1
    assert "tls-front: cert: Value error, cert file '/nonexistent.crt' cannot be read" in capsys.readouterr().err
    _haproxy()  # skips from here without the binary
    assert main([*flags, "--check"]) == 0  # the files and `haproxy -c`


# --- ssl_* under the throughput profile -------------------------------------------------------------

def _with_tls() -> dict:
    return yaml.safe_load(YAML.read_text().replace("  # ssl_", "  ssl_"))


def test_ssl_with_the_haproxy_profile_is_refused_pointing_at_tls_front():
    with pytest.raises(ConfigError, match=r"http_options\.ssl_certfile, http_options\.ssl_keyfile set with "
                                          r"RAY_SERVE_ENABLE_HA_PROXY=1.*`maas tls-front`"):
        refuse_tls_with_haproxy(_with_tls()["http_options"], {HA_PROXY_ENV: "1"})
    refuse_tls_with_haproxy(_with_tls()["http_options"], {HA_PROXY_ENV: "0"})  # Serve's Python proxy: fine
    refuse_tls_with_haproxy(_with_tls()["http_options"], {})
    refuse_tls_with_haproxy(yaml.safe_load(YAML.read_text())["http_options"], {HA_PROXY_ENV: "1"})  # no TLS


def test_load_config_refuses_it_from_the_environment(monkeypatch):
    monkeypatch.setenv(HA_PROXY_ENV, "1")
    load_config(YAML)  # the shipped YAML, TLS lines commented
    with pytest.raises(ConfigError, match="maas tls-front"):
        load_config(_with_tls())
    monkeypatch.setenv(HA_PROXY_ENV, "0")
    assert load_config(_with_tls()).http_options.ssl_certfile == "/etc/maas/tls/server.crt"
