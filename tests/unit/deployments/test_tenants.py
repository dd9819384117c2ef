"""API keys -> tenants (deployments.tenants): config checks, hashing, constant-time matching, 401s."""

from __future__ import annotations

import hashlib
import hmac
import logging
import pickle

import pytest
from pydantic import ValidationError

import deployments.tenants as tenants
from deployments.tenants import (
    ADMIN_CALLER,
    DEMO_KEYS,
    OPEN_ACCESS,
    Caller,
    KeyRing,
    TenantKeys,
    TenantsConfig,
    demo_tenants_config,
    key_sha256,
    uses_demo_keys,
)
from lora_core.errors import UnauthorizedError

ACME_KEY = "sk-acme-0123456789"
GLOBEX_KEY = "sk-globex-0123456789"
ADMIN_KEY = "sk-admin-0123456789"


def config(**fields) -> TenantsConfig:
    base = {"tenants": {"acme": {"keys": [ACME_KEY]}, "globex": {"key_sha256": [key_sha256(GLOBEX_KEY)]}},
            "admin_keys": [ADMIN_KEY]}
    return TenantsConfig.model_validate({**base, **fields})


def test_public_surface_is_pinned():
    assert sorted(tenants.__all__) == sorted([
        "ADMIN", "ADMIN_CALLER", "Caller", "DEMO_KEYS", "KeyRing", "MIN_KEY_CHARS", "OPEN_ACCESS",
        "OPEN_ACCESS_WARNING", "PLAINTEXT_KEYS_WARNING", "PlaintextKeys", "TenantKeys", "TenantsConfig", "demo_tenants_config", "key_sha256", "uses_demo_keys"])


def test_key_sha256_is_the_hex_sha256_of_the_key():
    assert key_sha256("sk-acme-demo") == hashlib.sha256(b"sk-acme-demo").hexdigest()
    assert len(key_sha256("x" * 8)) == 64


def test_plaintext_keys_are_hashed_at_load_and_not_kept():
    loaded = config()
    assert loaded.tenants["acme"].key_sha256 == [key_sha256(ACME_KEY)]
    assert loaded.tenants["acme"].keys == [] and loaded.admin_keys == []
    assert loaded.admin_key_sha256 == [key_sha256(ADMIN_KEY)]
    for text in (repr(loaded), str(loaded.model_dump()), loaded.model_dump_json(), repr(KeyRing(loaded))):
        for key in (ACME_KEY, GLOBEX_KEY, ADMIN_KEY):
            assert key not in text
    # loading the dump again (Ray passes configs along) is the same config
    assert TenantsConfig.model_validate(loaded.model_dump()) == loaded


def test_uppercase_hashes_are_accepted_and_normalised():
    loaded = TenantsConfig(tenants={"acme": TenantKeys(key_sha256=[key_sha256(ACME_KEY).upper()])})
    assert loaded.tenants["acme"].key_sha256 == [key_sha256(ACME_KEY)]
    assert KeyRing(loaded).authenticate(f"Bearer {ACME_KEY}") == Caller("acme")


def test_authenticate_maps_keys_to_callers():
    ring = KeyRing(config())
    assert ring.authenticate(f"Bearer {ACME_KEY}") == Caller("acme")
    assert ring.authenticate(f"Bearer {GLOBEX_KEY}") == Caller("globex", is_admin=False)
    assert ring.authenticate(f"Bearer {ADMIN_KEY}") == ADMIN_CALLER == Caller(None, is_admin=True)
    assert ring.authenticate(f"bearer {ACME_KEY}") == Caller("acme")  # the scheme is case-insensitive
    assert ring.authenticate(f"  BEARER   {ACME_KEY}  ") == Caller("acme")
    assert ring.tenants == {"acme", "globex"} and len(ring) == 3
    assert repr(ring) == "KeyRing(auth='keys', tenants=['acme', 'globex'], keys=3)"


@pytest.mark.parametrize("header", [f"Bearer {ACME_KEY}", f"Bearer {ADMIN_KEY}", "Bearer sk-not-a-known-key"])
def test_every_stored_hash_is_compared_in_constant_time(monkeypatch, header):
    """hmac.compare_digest runs once per stored hash, whether the key matches first, last or never."""
    ring = KeyRing(config())
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    try:
        ring.authenticate(header)
    except UnauthorizedError:
        pass
    assert len(calls) == len(ring) == 3
    presented = hashlib.sha256(header.split()[1].encode()).digest()
    assert {b for _, b in calls} == {presented}
    assert sorted(a.hex() for a, _ in calls) == sorted(ring.digests())


BAD_HEADERS = [
    pytest.param(None, "no Authorization header", id="missing"),
    pytest.param("", "no Authorization header", id="empty"),
    pytest.param("   ", "no Authorization header", id="blank"),
    pytest.param(ACME_KEY, "not a Bearer token", id="no-scheme"),
    pytest.param(f"Basic {ACME_KEY}", "not a Bearer token", id="basic"),
    pytest.param(f"Bearer:{ACME_KEY}", "not a Bearer token", id="colon"),
    pytest.param(f"Bearer{ACME_KEY}", "not a Bearer token", id="no-space"),
    pytest.param("Bearer", "empty", id="bearer-only"),
    pytest.param("Bearer    ", "empty", id="bearer-spaces"),
    pytest.param(f"Bearer {ACME_KEY} extra", "malformed", id="two-tokens"),
    pytest.param(f"Bearer {ACME_KEY}\x00", "malformed", id="control-char"),
    pytest.param("Bearer sk-acme-dém0-key", "malformed", id="non-ascii"),
    pytest.param("Bearer " + "a" * 600, "malformed", id="too-long"),
    pytest.param("Bearer sk-not-a-known-key", "unknown API key", id="unknown"),
    pytest.param(f"Bearer {ACME_KEY[:-1]}", "unknown API key", id="prefix-of-a-key"),
    pytest.param(f"Bearer {key_sha256(ACME_KEY)}", "unknown API key", id="the-hash-itself"),
]


@pytest.mark.parametrize("header, message", BAD_HEADERS)
def test_bad_authorization_headers_are_401(header, message):
    with pytest.raises(UnauthorizedError, match=message) as info:
        KeyRing(config()).authenticate(header)
    assert info.value.status_code == 401 and info.value.code == "unauthorized"
    assert ACME_KEY not in str(info.value) and "Bearer <API key>" in str(info.value)
    clone = pickle.loads(pickle.dumps(info.value))  # errors cross Ray actor boundaries
    assert type(clone) is UnauthorizedError and clone.to_json() == info.value.to_json()


def test_keys_from_the_environment():
    environ = {"LS_KEYS": " acme:sk-env-acme-1 , newco:sk-env:with:colons ,,admin:sk-env-admin-1, "}
    ring = KeyRing(config(keys_env="LS_KEYS"), environ=environ)
    assert ring.authenticate("Bearer sk-env-acme-1") == Caller("acme")
    assert ring.authenticate(f"Bearer {ACME_KEY}") == Caller("acme")  # the config's keys still count
    assert ring.authenticate("Bearer sk-env:with:colons") == Caller("newco")  # a tenant from env only
    assert ring.authenticate("Bearer sk-env-admin-1") == ADMIN_CALLER
    assert ring.tenants == {"acme", "globex", "newco"} and len(ring) == 6
    environ["LS_KEYS"] = "acme:sk-later-key-1"  # read once, at build
    with pytest.raises(UnauthorizedError):
        ring.authenticate("Bearer sk-later-key-1")
    only_env = KeyRing(TenantsConfig(keys_env="LS_KEYS"), environ={"LS_KEYS": "acme:sk-env-acme-1"})
    assert only_env.authenticate("Bearer sk-env-acme-1") == Caller("acme")


def test_keys_env_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("LS_TEST_KEYS", "acme:sk-from-os-environ")
    assert KeyRing(TenantsConfig(keys_env="LS_TEST_KEYS")).authenticate("Bearer sk-from-os-environ") == Caller("acme")


def test_unset_keys_env_is_no_keys_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="deployments.tenants"):
        ring = KeyRing(config(keys_env="LS_KEYS"), environ={})
    assert len(ring) == 3
    assert any("LS_KEYS" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"no key is configured \(\$LS_KEYS, named in keys_env, is not set\)"):
        KeyRing(TenantsConfig(keys_env="LS_KEYS"), environ={})
    with pytest.raises(ValueError, match="no key is configured: "):
        KeyRing(TenantsConfig(keys_env="LS_KEYS"), environ={"LS_KEYS": " , "})


@pytest.mark.parametrize("value, message", [
    ("acme-sk-no-colon-here", "has no ':'"),
    ("shared:sk-shared-key-1", "'shared' in \\$LS_KEYS"),
    ("Acme:sk-acme-env-key-1", "not a valid adapter-id tenant"),
    ("acme:short", "at least 8"),
    ("acme:", "at least 8"),
    (f"globex:{ACME_KEY}", "both tenant 'acme' and tenant 'globex'"),
    (f"admin:{ACME_KEY}", "both tenant 'acme' and admin"),
    ("acme:sk-env-twice-1,acme:sk-env-twice-1", "tenant 'acme' twice"),
])
def test_bad_environment_keys_are_refused_without_showing_them(value, message):
    with pytest.raises(ValueError, match=message) as info:
        KeyRing(config(keys_env="LS_KEYS"), environ={"LS_KEYS": value})
    key = value.rpartition(":")[2] if ":" in value else value
    assert not key or key not in str(info.value)


@pytest.mark.parametrize("fields, message", [
    ({"tenants": {"acme": {"keys": [ACME_KEY]}, "globex": {"keys": [ACME_KEY]}}},
     "both tenant 'acme' and tenant 'globex'"),
    ({"tenants": {"acme": {"keys": [ACME_KEY, ACME_KEY]}}}, "tenant 'acme' twice"),
    ({"tenants": {"acme": {"keys": [ACME_KEY], "key_sha256": [key_sha256(ACME_KEY)]}}}, "tenant 'acme' twice"),
    ({"tenants": {"acme": {"keys": [ACME_KEY]}}, "admin_key_sha256": [key_sha256(ACME_KEY)]},
     "both tenant 'acme' and admin"),
])
def test_the_same_key_for_two_callers_is_refused(fields, message):
    with pytest.raises(ValidationError, match=message) as info:
        TenantsConfig.model_validate(fields)
    assert ACME_KEY not in str(info.value)


@pytest.mark.parametrize("name, message", [
    ("shared", "cannot hold keys: its adapters are visible to every tenant"),
    ("admin", "reserved for admin keys"),
    ("Acme", "not a valid adapter-id tenant"),
    ("a..b", "no '..'"),
    (".acme", "not a valid adapter-id tenant"),
    ("-acme", "not a valid adapter-id tenant"),
    ("ac me", "not a valid adapter-id tenant"),
    ("acme/bot", "not a valid adapter-id tenant"),
    ("acmé", "not a valid adapter-id tenant"),
    ("", "not a valid adapter-id tenant"),
    ("a" * 65, "not a valid adapter-id tenant"),
])
def test_bad_tenant_names_are_pydantic_errors(name, message):
    with pytest.raises(ValidationError, match=message):
        TenantsConfig.model_validate({"tenants": {name: {"keys": [ACME_KEY]}}})


def test_tenant_names_follow_the_adapter_id_rule():
    names = ["a", "0", "acme-corp", "acme_corp.eu", "a" * 64]
    loaded = TenantsConfig.model_validate({"tenants": {n: {"keys": [f"sk-key-for-{n}"]} for n in names}})
    assert KeyRing(loaded).tenants == set(names)


@pytest.mark.parametrize("fields, message", [
    ({"tenants": {"acme": {"keys": ["sk-1234"]}}}, "has 7 characters; keys need at least 8"),
    ({"tenants": {"acme": {"keys": ["x" * 513]}}}, "at most 512"),
    ({"admin_keys": ["sk admin key"]}, "in admin_keys .* spaces"),
    ({"tenants": {"acme": {"key_sha256": ["abc"]}}}, "not 64 hex digits"),
    ({"admin_key_sha256": ["g" * 64]}, "not 64 hex digits"),
    ({"tenants": {"acme": {"kyes": [ACME_KEY]}}}, "Extra inputs are not permitted"),
    ({"admin_keys": [ADMIN_KEY], "keys_env": "NOT-A-NAME"}, "not an environment variable name"),
    ({"admin_keys": [ADMIN_KEY], "auth": "basic"}, "'keys' or 'none'"),
])
def test_bad_config_fields_are_pydantic_errors_that_hide_the_input(fields, message):
    with pytest.raises(ValidationError, match=message) as info:
        TenantsConfig.model_validate(fields)
    assert "sk-1234" not in str(info.value) and "sk admin key" not in str(info.value)


def test_eight_character_keys_are_the_minimum():
    ring = KeyRing(TenantsConfig.model_validate({"tenants": {"acme": {"keys": ["12345678"]}}}))
    assert ring.authenticate("Bearer 12345678") == Caller("acme")


def test_demo_config():
    demo = demo_tenants_config()
    ring = KeyRing(demo)
    assert DEMO_KEYS == {"acme": "sk-acme-demo", "globex": "sk-globex-demo", "admin": "sk-admin-demo"}
    assert ring.authenticate("Bearer sk-acme-demo") == Caller("acme")
    assert ring.authenticate("Bearer sk-globex-demo") == Caller("globex")
    assert ring.authenticate("Bearer sk-admin-demo") == ADMIN_CALLER
    assert uses_demo_keys(demo) and uses_demo_keys(ring)
    assert not uses_demo_keys(config()) and not uses_demo_keys(KeyRing(config()))
    from_env = KeyRing(config(keys_env="LS_KEYS"), environ={"LS_KEYS": "globex:sk-globex-demo"})
    assert uses_demo_keys(from_env)  # the KeyRing includes the environment's keys
    assert not uses_demo_keys(demo.model_copy(update={"auth": "none"}))  # nothing is checked anyway


def test_auth_none_lets_everyone_in_as_admin():
    for open_config in (TenantsConfig(auth="none"), config(auth="none")):
        ring = KeyRing(open_config)
        for header in (None, "", "Basic x", "Bearer sk-not-a-known-key", f"Bearer {ACME_KEY}"):
            assert ring.authenticate(header) is OPEN_ACCESS
    assert OPEN_ACCESS.is_admin and OPEN_ACCESS.tenant is None
    with pytest.raises(ValueError, match="auth is 'keys' but no key is configured"):
        KeyRing(TenantsConfig())
    with pytest.raises(ValueError, match="auth is 'keys' but no key is configured"):
        KeyRing(TenantsConfig(tenants={"acme": TenantKeys()}))  # a tenant with no key is no key


def test_caller_is_a_tenant_or_an_admin():
    acme = Caller("acme")
    assert not acme.is_admin and pickle.loads(pickle.dumps(acme)) == acme
    with pytest.raises(ValueError):
        Caller("acme", is_admin=True)
    with pytest.raises(ValueError):
        Caller(None)
    with pytest.raises(Exception):
        acme.tenant = "globex"  # frozen
    assert acme.can_see("acme/bot") and acme.can_see("shared/sql")
    assert not acme.can_see("globex/bot")
    assert ADMIN_CALLER.can_see("globex/bot") and ADMIN_CALLER.can_see("shared/sql")


def test_the_app_fails_closed_without_a_key_unless_auth_none_is_said():
    from deployments.app import AppArgs

    replica = {"base_model": "tiny-random-llama"}
    for unkeyed in ({}, {"tenants": {"acme": {}}}, {"auth": "keys"}):
        with pytest.raises(ValueError, match="no API key is configured"):
            AppArgs.model_validate({"tenants": unkeyed, "replica": replica})
    with pytest.raises(ValueError, match="no API key is configured"):
        AppArgs.model_validate({"replica": replica})  # tenants left out: no default open door
    assert AppArgs.model_validate({"tenants": {"auth": "none"}, "replica": replica}).tenants.auth == "none"
    for keyed in ({"keys_env": "LS_KEYS"}, {"admin_keys": ["sk-admin-12345"]},
                  {"tenants": {"acme": {"key_sha256": [key_sha256(ACME_KEY)]}}}):
        assert AppArgs.model_validate({"tenants": keyed, "replica": replica}).tenants.names_a_key()


def test_plaintext_keys_in_the_args_warn_at_build_and_hashes_do_not(caplog):
    """Ray keeps the app's args as given (`serve config`, the dashboard): plaintext keys stay readable there."""
    from deployments.app import build_app
    from deployments.tenants import PLAINTEXT_KEYS_WARNING, PlaintextKeys

    replica = {"base_model": "tiny-random-llama", "compile": "off"}
    plain = ({"tenants": {"acme": {"keys": [ACME_KEY]}}}, {"admin_keys": ["sk-admin-12345"]})
    for given in plain:
        assert PlaintextKeys.model_validate(given).any()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deployments.app"):
            build_app({"tenants": given, "replica": replica})
        assert [r.getMessage() for r in caplog.records] == [PLAINTEXT_KEYS_WARNING]
    hashed = {"tenants": {"acme": {"key_sha256": [key_sha256(ACME_KEY)]}}, "keys_env": "LS_KEYS"}
    assert not PlaintextKeys.model_validate(hashed).any()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deployments.app"):
        build_app({"tenants": hashed, "replica": replica})
        build_app({"tenants": demo_tenants_config().model_dump(mode="json"), "replica": replica})  # its own warning
    assert caplog.records == []
