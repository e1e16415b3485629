"""``maas keys create|list|revoke``: manage the hash-only API key file (local, s3://, gs://).

The plaintext key is printed once, by ``create``; the file holds only its sha256.
Running replicas pick changes up within ``auth.reload_interval_s``. Creating and revoking
are recorded in the registry's audit trail (``maas audit --action key``).

``maas keys gen-kek|gen-signing-key|rotate-kek``: the keys of encrypted and signed artifacts
(docs/security.md).
"""

from __future__ import annotations

import argparse
import os
import sys

from maas_ray.errors import ConfigError
from maas_ray.registry.manifest import check_name


def cmd_keys(args: argparse.Namespace) -> int:
    from maas_ray.serving.keys import (
        AUTH_KEYS_FILE_ENV,
        KeyEntry,
        generate_key,
        hash_key,
        read_key_file,
        write_key_file,
    )

    uri = args.file or os.environ.get(AUTH_KEYS_FILE_ENV)
    if not uri:
        raise ConfigError(f"no key file: pass --file PATH_OR_URI or set ${AUTH_KEYS_FILE_ENV}")
    if args.keys_cmd == "create":
        try:
            names = [] if args.all_models else [m.strip() for m in args.models.split(",") if m.strip()]
            models = ["*"] if args.all_models else [check_name("model", m) for m in names]
        except ValueError as exc:  # check_name's message names the bad value
            raise ConfigError(f"--models: {exc}") from exc
        if not models:
            raise ConfigError(f"--models needs at least one model name, got {args.models!r}")
        keys = read_key_file(uri, missing_ok=True)
        taken = {k.id for k in keys.keys}
        key_id, key = generate_key()
        while key_id in taken:  # 36**8 ids: practically never
            key_id, key = generate_key()
        entry = KeyEntry(id=key_id, sha256=hash_key(key), models=models, admin=args.admin, name=args.name)
        keys.keys.append(entry)
        write_key_file(uri, keys)
        _audit(args, "key.create", key_id, None, {"name": entry.name, "models": models, "admin": entry.admin})
        # The key alone on stdout, so `KEY=$(maas keys create ...)` captures it; the rest on stderr.
        print(key)
        print(
            f"created key {key_id} (name={entry.name!r} models={','.join(models)} admin={entry.admin}); "
            "it is shown only this once.\n"
            f"use it as: curl -H 'authorization: Bearer <key>' ...  (or -H 'x-api-key: <key>')",
            file=sys.stderr,
        )
    elif args.keys_cmd == "list":
        keys = read_key_file(uri)
        print("id\tname\tmodels\tadmin\tcreated")
        for k in keys.keys:
            print(f"{k.id}\t{k.name or '-'}\t{','.join(k.models)}\t{'yes' if k.admin else 'no'}\t"
                  f"{k.created:%Y-%m-%d %H:%M}")
    elif args.keys_cmd == "revoke":
        keys = read_key_file(uri)
        kept = [k for k in keys.keys if k.id != args.key_id]
        if len(kept) == len(keys.keys):
            raise ConfigError(f"no key with id {args.key_id!r} in {uri.split('?', 1)[0]!r}; see `maas keys list`")
        gone = next(k for k in keys.keys if k.id == args.key_id)
        keys.keys = kept
        write_key_file(uri, keys)
        _audit(args, "key.revoke", args.key_id, {"name": gone.name, "models": gone.models, "admin": gone.admin}, None)
        print(f"revoked key {args.key_id}; replicas stop accepting it within auth.reload_interval_s")
    return 0


def _audit(args: argparse.Namespace, action: str, key_id: str, before: object, after: object) -> None:
    from maas_ray.registry import Registry

    Registry(args.registry).record_event(action, f"key:{key_id}", before=before, after=after)


def cmd_artifact_keys(args: argparse.Namespace) -> int:
    """gen-kek, gen-signing-key, rotate-kek."""
    import base64

    from maas_ray.registry import Registry
    from maas_ray.registry.crypto import key_id, new_kek
    from maas_ray.registry.signing import generate_signing_key

    if args.keys_cmd == "gen-kek":
        text = new_kek()
        try:
            fd = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise ConfigError(f"{args.path!r} exists; not overwriting a KEK") from exc
        except OSError as exc:
            raise ConfigError(f"cannot write KEK {args.path!r}: {exc}") from exc
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        print(f"wrote KEK {key_id(base64.b64decode(text))} to {args.path} (mode 0600); "
              f"use it as MAAS_KEK_URI=file://{os.path.abspath(args.path)}")
    elif args.keys_cmd == "gen-signing-key":
        kid = generate_signing_key(args.path)
        print(f"wrote signing key {kid}: {args.path} (private, 0600) and {args.path}.pub (public); "
              f"publish with MAAS_SIGNING_KEY=file://{os.path.abspath(args.path)}, "
              f"trust it in apps with security.trusted_signing_keys: [{os.path.abspath(args.path)}.pub]")
    elif args.keys_cmd == "rotate-kek":
        reg = Registry(args.registry, kek_uri=args.kek)
        done = reg.rekey(args.new, models=[args.model] if args.model else None)
        for model, version in done:
            print(f"re-wrapped {model}:{version}")
        print(f"{len(done)} data keys re-wrapped under {args.new}; no file was rewritten. "
              "Give replicas the new KEK (MAAS_KEK_URI) before retiring the old one.")
    return 0


def add_keys_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``maas keys ...`` under the top-level subcommands."""
    keys_common = argparse.ArgumentParser(add_help=False, parents=[common])
    keys_common.add_argument(
        "--file", default=None,
        help="Key file: a local path or s3:// / gs:// URI (default $MAAS_AUTH_KEYS_FILE).",
    )
    keys = sub.add_parser("keys", help="Create, list and revoke API keys (the file stores hashes only).")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    p = ksub.add_parser("create", parents=[keys_common], help="Create a key; prints it once.")
    p.add_argument("--name", default="", help="Who or what holds the key.")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--models", help="Comma-separated models the key may call.")
    scope.add_argument("--all-models", action="store_true", help="The key may call every model.")
    p.add_argument("--admin", action="store_true", help="Also allow metadata and registry routes.")
    ksub.add_parser("list", parents=[keys_common], help="List key ids, names, scopes (never hashes).")
    p = ksub.add_parser("revoke", parents=[keys_common], help="Remove a key by id.")
    p.add_argument("key_id", metavar="ID")
    for p in ksub.choices.values():
        p.set_defaults(func=cmd_keys)
    p = ksub.add_parser("gen-kek", parents=[common], help="Write a new key-encryption key (32 random bytes, base64).")
    p.add_argument("path")
    p.set_defaults(func=cmd_artifact_keys)
    p = ksub.add_parser("gen-signing-key", parents=[common],
                        help="Write an Ed25519 keypair: PATH (private) and PATH.pub (public).")
    p.add_argument("path")
    p.set_defaults(func=cmd_artifact_keys)
    p = ksub.add_parser("rotate-kek", parents=[common],
                        help="Re-wrap every encrypted version's data key under a new KEK (files untouched).")
    p.add_argument("--new", required=True, metavar="URI", help="The new KEK: file:///path or env:NAME.")
    p.add_argument("--kek", default=None, metavar="URI", help="The current KEK (default $MAAS_KEK_URI).")
    p.add_argument("--model", default=None, help="Only this model's versions (default: all).")
    p.set_defaults(func=cmd_artifact_keys)
