"""API keys: hash-only key file, authentication, scopes, reload, CLI round trip."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import pickle

import pytest

from maas_ray.cli import main
from maas_ray.errors import ConfigError, PermissionDeniedError, UnauthenticatedError
from maas_ray.serving import keys as keys_mod
from maas_ray.serving.config import AuthConfig
from maas_ray.serving.keys import (
    ANONYMOUS,
    KeyEntry,
    KeyFile,
    KeyStore,
    Principal,
    extract_key,
    generate_key,
    hash_key,
    read_key_file,
    resolve_auth,
    write_key_file,
)

pytestmark = pytest.mark.unit


def _entry(key_id: str, key: str, models=("digits",), admin=False, name="") -> KeyEntry:
    return KeyEntry(id=key_id, sha256=hash_key(key), models=list(models), admin=admin, name=name)


@pytest.fixture
def keyfile(tmp_path):
    """A key file with one digits-only key and one admin key for every model."""
    (id1, k1), (id2, k2) = generate_key(), generate_key()
    path = tmp_path / "keys.json"
    write_key_file(str(path), KeyFile(keys=[_entry(id1, k1), _entry(id2, k2, models=["*"], admin=True)]))
    return path, {"user": (id1, k1), "admin": (id2, k2)}


def _store(path, **kw) -> KeyStore:
    return KeyStore.from_config(AuthConfig(enabled=True, keys_file=str(path), **kw))


# ---- format -------------------------------------------------------------------------------
def test_key_format_and_ids_are_unique():
    seen = set()
    for _ in range(200):
        key_id, key = generate_key()
        prefix, kid, secret = key.split("_", 2)
        assert prefix == "mk" and kid == key_id and len(kid) == 8 and kid.isalnum()
        assert len(secret) >= 43  # token_urlsafe(32): 32 bytes -> 43 base64url chars
        seen.add(key)
    assert len(seen) == 200


def test_file_stores_only_hashes(keyfile):
    path, keys = keyfile
    text = path.read_text()
    for key_id, key in keys.values():
        assert key not in text and key.split("_", 2)[2] not in text
        assert hashlib.sha256(key.encode()).hexdigest() in text and key_id in text
    assert json.loads(text)["version"] == 1
    assert (path.stat().st_mode & 0o077) == 0  # not world- or group-readable


# ---- authentication -----------------------------------------------------------------------
def test_good_key_gives_its_principal(keyfile):
    path, keys = keyfile
    store = _store(path)
    user = store.authenticate(keys["user"][1])
    assert user == Principal(key_id=keys["user"][0], models=frozenset({"digits"}), admin=False)
    admin = store.authenticate(keys["admin"][1])
    assert admin.admin and admin.models == frozenset({"*"})


@pytest.mark.parametrize(
    "presented",
    [None, "", "mk_", "garbage", "mk_abc_def", "Bearer x", "mk_zzzzzzzz_secret"],
)
def test_missing_malformed_and_unknown_keys_are_401(keyfile, presented):
    store = _store(keyfile[0])
    with pytest.raises(UnauthenticatedError) as info:
        store.authenticate(presented)
    assert info.value.status_code == 401


def test_wrong_secret_for_a_known_id_is_401_and_leaks_no_key_material(keyfile, caplog):
    path, keys = keyfile
    key_id, key = keys["user"]
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(UnauthenticatedError) as info:
            _store(path).authenticate(forged)
    message = str(info.value)
    assert key_id in message  # the public id helps find the key
    secret = forged.split("_", 2)[2]
    assert secret not in message and secret[:8] not in message
    assert all(secret not in r.getMessage() and key.split("_", 2)[2] not in r.getMessage() for r in caplog.records)


def test_digests_are_compared_with_compare_digest(keyfile, monkeypatch):
    """Known id or not, good key or not, the check goes through hmac.compare_digest."""
    path, keys = keyfile
    store = _store(path)
    calls = []
    real = keys_mod.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_mod.hmac, "compare_digest", spy)
    store.authenticate(keys["user"][1])
    for bad in ("mk_zzzzzzzz_nope", keys["user"][1] + "x"):
        with pytest.raises(UnauthenticatedError):
            store.authenticate(bad)
    assert len(calls) == 3
    assert all(isinstance(a, bytes) and len(a) == len(b) == 32 for a, b in calls)


def test_auth_off_is_anonymous_and_needs_no_source():
    store = KeyStore.from_config(AuthConfig())
    assert store.authenticate(None) is ANONYMOUS
    assert ANONYMOUS.admin and ANONYMOUS.may_call("anything")


def test_keys_from_the_environment(monkeypatch):
    key_id, key = generate_key()
    monkeypatch.setenv("MY_KEYS", KeyFile(keys=[_entry(key_id, key)]).dumps().decode())
    store = KeyStore.from_config(AuthConfig(enabled=True, keys_env="MY_KEYS"))
    assert store.authenticate(key).key_id == key_id


# ---- scopes -------------------------------------------------------------------------------
def test_scopes():
    user = Principal(key_id="abcd1234", models=frozenset({"digits"}), admin=False)
    user.check_model("digits")
    with pytest.raises(PermissionDeniedError, match="'abcd1234' may not call model 'text'") as info:
        user.check_model("text")
    assert info.value.status_code == 403
    with pytest.raises(PermissionDeniedError, match="admin"):
        user.check_admin()
    everything = Principal(key_id="x", models=frozenset({"*"}), admin=True)
    everything.check_model("whatever")
    everything.check_admin()
    err = pickle.loads(pickle.dumps(info.value))  # crosses Ray processes intact
    assert err.status_code == 403 and "text" in str(err)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"authorization": "Bearer mk_a_b"}, "mk_a_b"),
        ({"authorization": "bearer   mk_a_b  "}, "mk_a_b"),
        ({"x-api-key": " mk_a_b "}, "mk_a_b"),
        ({"authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"authorization": "Basic dXNlcjpwYXNz", "x-api-key": "mk_a_b"}, "mk_a_b"),
        ({"authorization": "Bearer mk_c_d", "x-api-key": "mk_a_b"}, "mk_c_d"),
        ({"authorization": "Bearer"}, None),
        ({"authorization": "Bearer a b"}, None),
        ({"x-api-key": ""}, None),
        ({}, None),
    ],
)
def test_extract_key(headers, expected):
    assert extract_key(headers) == expected


# ---- bad sources --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "key file"),
        ('{"version": 2, "keys": []}', "version"),
        ('{"version": 1, "keys": [{"id": "abcd1234", "sha256": "xyz", "models": ["a"]}]}', "sha256"),
        ('{"version": 1, "keys": [{"id": "abcd1234", "sha256": "' + "0" * 64 + '", "models": []}]}', "models"),
        ('{"version": 1, "keys": [{"id": "abcd1234", "key": "mk_abcd1234_s", "sha256": "' + "0" * 64
         + '", "models": ["a"]}]}', "key"),
    ],
)
def test_bad_files_are_config_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        _store(path)
    assert str(path) in str(info.value)
    assert "mk_abcd1234_s" not in str(info.value)  # values are never echoed: one may be a key


def test_missing_file_and_missing_env_are_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="cannot read key file .*nope.json"):
        _store(tmp_path / "nope.json")
    monkeypatch.delenv("MAAS_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match=r"\$MAAS_API_KEYS is not in the environment"):
        KeyStore.from_config(AuthConfig(enabled=True))


def test_duplicate_ids_are_rejected():
    key_id, key = generate_key()
    raw = KeyFile(keys=[_entry(key_id, key)]).model_dump(mode="json")
    raw["keys"].append(raw["keys"][0])
    with pytest.raises(ConfigError, match="listed twice"):
        KeyFile.parse(json.dumps(raw), "test")


# ---- reload -------------------------------------------------------------------------------
def test_reload_picks_up_a_revocation_and_keeps_keys_on_a_read_error(keyfile, caplog):
    path, keys = keyfile
    store = _store(path)
    user_key = keys["user"][1]
    assert store.authenticate(user_key)
    kf = read_key_file(str(path))
    kf.keys = [k for k in kf.keys if k.id != keys["user"][0]]
    write_key_file(str(path), kf)
    assert store.reload()
    with pytest.raises(UnauthenticatedError):
        store.authenticate(user_key)

    path.write_text("{broken")
    with caplog.at_level(logging.ERROR, logger="maas_ray.serving.keys"):
        assert not store.reload() and not store.reload()
    assert store.authenticate(keys["admin"][1]).admin  # the old keys still work
    assert len([r for r in caplog.records if "keeping the" in r.getMessage()]) == 1  # logged once


def test_refresh_forever_runs_off_the_loop_and_applies_revocations(keyfile):
    path, keys = keyfile
    store = _store(path, reload_interval_s=0.01)

    async def scenario():
        task = asyncio.create_task(store.refresh_forever())
        try:
            kf = read_key_file(str(path))
            kf.keys = [k for k in kf.keys if k.id != keys["admin"][0]]
            write_key_file(str(path), kf)
            for _ in range(200):
                await asyncio.sleep(0.01)
                if keys["admin"][0] not in store.key_ids:
                    return True
            return False
        finally:
            task.cancel()

    assert asyncio.run(scenario())
    with pytest.raises(UnauthenticatedError):
        store.authenticate(keys["admin"][1])


# ---- cluster switch -----------------------------------------------------------------------
def test_resolve_auth_from_environment():
    env = {"MAAS_AUTH_ENABLED": "true", "MAAS_AUTH_KEYS_FILE": "s3://b/keys.json"}
    auth = resolve_auth(AuthConfig(), env)
    assert auth.enabled and auth.keys_file == "s3://b/keys.json"
    explicit = resolve_auth(AuthConfig(enabled=False, keys_file="/k.json"), env)  # the YAML wins
    assert not explicit.enabled and explicit.keys_file == "/k.json"
    assert resolve_auth(AuthConfig(), {}) == AuthConfig()
    with pytest.raises(ConfigError, match="MAAS_AUTH_ENABLED"):
        resolve_auth(AuthConfig(), {"MAAS_AUTH_ENABLED": "maybe"})


# ---- CLI ----------------------------------------------------------------------------------
def test_cli_create_list_revoke_round_trip(tmp_path, capsys):
    path = str(tmp_path / "sub" / "keys.json")
    assert main(["keys", "create", "--file", path, "--name", "alice", "--models", "digits,text"]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("mk_") and "\n" not in key
    assert "authorization: Bearer" in out.err and key not in out.err
    assert main(["keys", "create", "--file", path, "--all-models", "--admin"]) == 0
    admin_key = capsys.readouterr().out.strip()

    file_text = open(path).read()
    assert key not in file_text and admin_key not in file_text

    assert main(["keys", "list", "--file", path]) == 0
    listing = capsys.readouterr().out
    alice_id = key.split("_")[1]
    assert f"{alice_id}\talice\tdigits,text\tno" in listing and "\t*\tyes" in listing
    assert hash_key(key) not in listing and hash_key(key)[:16] not in listing

    store = _store(path)
    assert store.authenticate(key).models == frozenset({"digits", "text"})
    assert main(["keys", "revoke", alice_id, "--file", path]) == 0
    assert f"revoked key {alice_id}" in capsys.readouterr().out
    store.reload()
    with pytest.raises(UnauthenticatedError):
        store.authenticate(key)
    assert store.authenticate(admin_key).admin


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["keys", "revoke", "abcd1234"], "error: no key with id 'abcd1234'"),
        (["keys", "list"], "error: cannot read key file"),
        (["keys", "create", "--models", "Bad Name!"], "error: "),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    path = tmp_path / "keys.json"
    if argv[1] == "revoke":
        write_key_file(str(path), KeyFile())
    assert main([*argv, "--file", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_create_needs_a_scope(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # argparse: usage error, exit 2
        main(["keys", "create", "--file", str(tmp_path / "k.json")])
    assert info.value.code == 2
