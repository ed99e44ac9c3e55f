"""Private key files that group or others can read are refused, unless the deployment says otherwise."""

import logging
import os

import pytest

from silotune.crypto import CryptoError, Identity
from silotune.crypto.certs import make_tls
from silotune.crypto.identity import read_private_key
from silotune.deploy import make_keys

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "identity.pem"
    Identity.generate().save(path)
    return path


def test_world_readable_identity_key_is_refused(key):
    key.chmod(0o644)
    with pytest.raises(CryptoError, match=rf"private key {key} has mode 0644 .*fix: chmod 600 {key}") as err:
        Identity.load(key)
    assert "\n" not in str(err.value) and "deploy.allow_insecure_keys" in str(err.value)


def test_override_loads_an_insecure_key_with_a_warning(key, caplog):
    key.chmod(0o640)
    with caplog.at_level(logging.WARNING):
        ident = Identity.load(key, allow_insecure=True)
    assert ident.public
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(key) in warnings[0] and "mode 0640" in warnings[0] and "chmod 600" in warnings[0]


def test_private_key_with_mode_0600_loads_silently(key, caplog):
    with caplog.at_level(logging.DEBUG):
        Identity.load(key)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_group_writable_key_is_refused(key):
    key.chmod(0o620)
    with pytest.raises(CryptoError, match="mode 0620"):
        Identity.load(key)


def test_tls_private_key_is_checked_as_deploy_reads_it(tmp_path, caplog):
    path = tmp_path / "tls.key"
    path.write_bytes(make_tls(["localhost"], 0)["server.key"])
    path.chmod(0o604)
    with pytest.raises(CryptoError, match=rf"private key {path} has mode 0604 .*chmod 600"):
        read_private_key(path)
    with caplog.at_level(logging.WARNING):
        assert read_private_key(path, allow_insecure=True) == path.read_bytes()
    assert any(str(path) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    path.chmod(0o600)
    assert read_private_key(path).startswith(b"-----BEGIN")


def test_keys_written_by_make_keys_pass_the_check(tmp_path):
    keys = make_keys(tmp_path / "keys", 1, ["localhost"])
    Identity.load(keys / "server" / "identity.pem")
    Identity.load(keys / "clients" / "client-0.pem")
    read_private_key(keys / "server" / "tls.key")
    read_private_key(keys / "clients" / "client-0.key")


def test_key_owned_by_another_user_is_refused(key, monkeypatch):
    monkeypatch.setattr(os, "getuid", lambda: key.stat().st_uid + 1)
    with pytest.raises(CryptoError, match=rf"private key {key} is owned by uid \d+, not the current user"):
        Identity.load(key)
