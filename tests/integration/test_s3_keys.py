"""The API key file on a real S3-protocol server (moto): the cluster configs' s3:// key file.

Needs no Ray: ``maas keys`` writes through pyarrow's S3 filesystem, a KeyStore reads it
and reloads after a revocation, as a running replica would.
"""

from __future__ import annotations

import uuid

import pytest

from maas_ray.cli import main
from maas_ray.errors import ConfigError, UnauthenticatedError
from maas_ray.serving.config import AuthConfig
from maas_ray.serving.keys import KeyStore, hash_key, read_key_file
from tests.helpers.s3 import BUCKET

pytestmark = pytest.mark.integration


@pytest.fixture
def keys_uri(s3_endpoint) -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/auth/keys.json?endpoint_override={s3_endpoint}&scheme=http"


def test_s3_key_file_round_trip(keys_uri, capsys):
    assert main(["keys", "create", "--file", keys_uri, "--models", "digits"]) == 0
    key = capsys.readouterr().out.strip()
    assert main(["keys", "create", "--file", keys_uri, "--all-models", "--admin"]) == 0
    admin_key = capsys.readouterr().out.strip()

    stored = read_key_file(keys_uri)
    assert [k.sha256 for k in stored.keys] == [hash_key(key), hash_key(admin_key)]
    assert key not in stored.dumps().decode()

    store = KeyStore.from_config(AuthConfig(enabled=True, keys_file=keys_uri))
    assert store.authenticate(key).models == frozenset({"digits"})
    assert main(["keys", "revoke", key.split("_")[1], "--file", keys_uri]) == 0
    assert store.reload()
    with pytest.raises(UnauthenticatedError):
        store.authenticate(key)
    assert store.authenticate(admin_key).admin


def test_missing_s3_key_file_is_a_config_error_without_the_query(keys_uri):
    with pytest.raises(ConfigError, match="cannot read key file") as info:
        KeyStore.from_config(AuthConfig(enabled=True, keys_file=keys_uri))
    assert "endpoint_override" not in str(info.value)  # the query may carry credentials
