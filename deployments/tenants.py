"""API keys -> tenants for the HTTP ingress: `Authorization: Bearer <key>` says who is calling.

Configured in serve_config.yaml as a `TenantsConfig`:

    auth: keys                       # or "none": no access control at all (tests, local dev)
    tenants:
      acme:   {key_sha256: [<64 hex chars>]}   # preferred: only the hash is in the file
      globex: {keys: [sk-globex-...]}          # plaintext: hashed at load, then dropped
    admin_key_sha256: [...]          # admin callers (see `Caller`); `admin_keys` likewise
    keys_env: LORA_SERVE_API_KEYS    # optional: more keys from the environment, read once at start
    rate_limit: {requests_per_s: 5, burst: 10}   # optional, each tenant's (a tenant's own overrides it)
    queue_share: 0.5                 # the most of the app's queue one tenant holds (`max_in_flight` its own)

`keys_env` names an environment variable of comma-separated `<tenant>:<key>` entries, where the
tenant `admin` means an admin key: `LORA_SERVE_API_KEYS="acme:sk-a1b2...,admin:sk-c3d4..."`.
Spaces around entries are ignored; a key may hold ':' but no ',' or whitespace. A tenant named
there needs no entry under `tenants`. The variable is read when the `KeyRing` is built, not at
import; unset or empty means no keys from it.

Checked at load, refused with a message that says how to fix it (never showing a key):
  * tenant names are adapter-id tenant parts (`ID_PART_PATTERN`, no '..'); not `shared`, whose
    adapters every tenant sees already (nobody calls as `shared`), and not `admin` (see above);
  * keys are 8-512 visible ASCII characters (what a Bearer header carries), hashes 64 hex digits;
  * a key belongs to one caller: the same key twice (two tenants, a tenant and admin, or one
    tenant twice) is refused, since it could not say who is calling;
  * `auth: keys` with no key at all is refused: a server that answers 401 to everyone is a mistake,
    and the app (`AppArgs`) fails closed: it refuses to start with no key unless `auth: none` is set.
    `auth: none` ignores any keys and serves every request as an admin (`OPEN_ACCESS`), with a
    warning at start and in every `/healthz`.

`KeyRing.authenticate` hashes the presented key and compares it with every stored sha256 through
`hmac.compare_digest`, going on after a match, so the time taken does not tell whether or which
key matched. Only hashes are kept: the config object and the process hold no key (Ray still
shows the args as given: `PLAINTEXT_KEYS_WARNING`). sha256 is not a password hash, so keys must
be random (`secrets.token_urlsafe`), not chosen by people. Pure module: no Ray, no FastAPI.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.rate_limits import RateLimit
from lora_core.adapter_ids import ID_PART_PATTERN, SHARED_TENANT, parse_adapter_id
from lora_core.errors import UnauthorizedError

logger = logging.getLogger("deployments.tenants")

ADMIN = "admin"  # the owner of admin keys in `keys_env` and `DEMO_KEYS`; no tenant may use the name
MIN_KEY_CHARS = 8
MAX_KEY_CHARS = 512
DEMO_KEYS: dict[str, str] = {"acme": "sk-acme-demo", "globex": "sk-globex-demo", ADMIN: "sk-admin-demo"}

_TENANT = re.compile(ID_PART_PATTERN)
_KEY = re.compile(r"[\x21-\x7e]+")  # visible ASCII, no spaces
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BEARER_HINT = "send 'Authorization: Bearer <API key>'"


def key_sha256(key: str) -> str:
    """The hex sha256 of an API key: what `key_sha256:` lists in the config."""
    return hashlib.sha256(key.encode()).hexdigest()


def _check_key(key: str, where: str) -> None:
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"a key {where} has {len(key)} characters; keys need at least {MIN_KEY_CHARS} "
                         "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if len(key) > MAX_KEY_CHARS:
        raise ValueError(f"a key {where} has {len(key)} characters; at most {MAX_KEY_CHARS}")
    if not _KEY.fullmatch(key):
        raise ValueError(f"a key {where} has spaces, control or non-ASCII characters, which a Bearer "
                         "header cannot carry")


def _check_hash(value: str, where: str) -> str:
    if not _HEX_SHA256.fullmatch(value):
        raise ValueError(f"a key_sha256 {where} is not 64 hex digits; compute it with "
                         "deployments.tenants.key_sha256(key) or `printf %s KEY | sha256sum`")
    return value.lower()


def _check_tenant(name: str, where: str) -> None:
    if name == SHARED_TENANT:
        raise ValueError(f"tenant {SHARED_TENANT!r} {where} cannot hold keys: its adapters are visible to every "
                         "tenant already; give keys to the tenants that call")
    if name == ADMIN:
        raise ValueError(f"{ADMIN!r} {where} is reserved for admin keys; use admin_keys / admin_key_sha256 "
                         f"(or '{ADMIN}:<key>' in keys_env)")
    if not _TENANT.fullmatch(name) or ".." in name:
        shown = repr(name) if len(name) <= 80 else repr(name[:80] + "...")
        raise ValueError(f"tenant name {shown} {where} is not a valid adapter-id tenant: {ID_PART_PATTERN} "
                         "(lowercase, starts with a letter or digit, no '..')")


class TenantKeys(BaseModel):
    """One tenant's keys. `keys` is emptied at load, its hashes moved into `key_sha256`."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    key_sha256: list[str] = Field(default_factory=list, description="hex sha256 of each key (see key_sha256())")
    keys: list[str] = Field(default_factory=list, repr=False,
                            description="plaintext keys; hashed at load and not kept")
    rate_limit: RateLimit | None = Field(None, description="this tenant's own limit, over TenantsConfig's")
    max_in_flight: int | None = Field(None, ge=1, description="this tenant's own cap on requests in flight, "
                                      "over TenantsConfig's queue_share")

    @field_validator("key_sha256")
    @classmethod
    def _hashes(cls, values: list[str]) -> list[str]:
        return [_check_hash(v, f"(entry {i})") for i, v in enumerate(values)]

    @field_validator("keys")
    @classmethod
    def _keys(cls, values: list[str]) -> list[str]:
        for i, key in enumerate(values):
            _check_key(key, f"(entry {i})")
        return values

    @model_validator(mode="after")
    def _hash_keys(self) -> "TenantKeys":
        self.key_sha256 = [*self.key_sha256, *(key_sha256(k) for k in self.keys)]
        self.keys = []  # never kept in this object; Ray still keeps the args as they were given
        return self


class TenantsConfig(BaseModel):
    """Who may call the ingress; see the module docstring for the format and the rules."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    auth: Literal["keys", "none"] = Field(
        "keys", description="'keys': every request needs a key; 'none': no access control (tests, local dev)")
    tenants: dict[str, TenantKeys] = Field(default_factory=dict, description="tenant name -> its keys")
    admin_key_sha256: list[str] = Field(default_factory=list, description="hex sha256 of each admin key")
    admin_keys: list[str] = Field(default_factory=list, repr=False,
                                  description="plaintext admin keys; hashed at load and not kept")
    keys_env: str | None = Field(
        None, description="environment variable with more keys: 'tenant:key,admin:key', read at start")
    rate_limit: RateLimit | None = Field(None, description="each tenant's completions rate (429 over it); "
                                         "default: none")
    queue_share: float = Field(0.5, gt=0, le=1, description="the share of the app's queue (replicas x "
                               "max_ongoing_requests + max_queued_requests) one tenant may hold in flight; 1: no cap")

    def in_flight_limit_for(self, tenant: str, queue_capacity: int | None) -> int | None:
        """How many requests `tenant` may have in flight at once (None: no cap)."""
        own = self.tenants.get(tenant)
        if own is not None and own.max_in_flight is not None:
            return own.max_in_flight
        if queue_capacity is None or self.queue_share >= 1:
            return None
        return max(1, math.ceil(self.queue_share * queue_capacity))

    def rate_limit_for(self, tenant: str) -> RateLimit | None:
        own = self.tenants.get(tenant)
        return own.rate_limit if own is not None and own.rate_limit is not None else self.rate_limit

    def names_a_key(self) -> bool:
        """False for a config that could only answer 401 (auth keys, no key, no keys_env);
        `auth: none` said explicitly counts as a choice."""
        if self.auth == "none":
            return True
        return bool(self.keys_env or self.admin_key_sha256 or self.admin_keys
                    or any(t.key_sha256 or t.keys for t in self.tenants.values()))

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, tenants: dict[str, TenantKeys]) -> dict[str, TenantKeys]:
        for name in tenants:
            _check_tenant(name, "in tenants")
        return tenants

    @field_validator("admin_key_sha256")
    @classmethod
    def _admin_hashes(cls, values: list[str]) -> list[str]:
        return [_check_hash(v, f"in admin_key_sha256 (entry {i})") for i, v in enumerate(values)]

    @field_validator("admin_keys")
    @classmethod
    def _admin_keys(cls, values: list[str]) -> list[str]:
        for i, key in enumerate(values):
            _check_key(key, f"in admin_keys (entry {i})")
        return values

    @field_validator("keys_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not _ENV_NAME.fullmatch(name):
            raise ValueError(f"keys_env {name!r} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
        return name

    @model_validator(mode="after")
    def _hash_and_check_duplicates(self) -> "TenantsConfig":
        self.admin_key_sha256 = [*self.admin_key_sha256, *(key_sha256(k) for k in self.admin_keys)]
        self.admin_keys = []
        _refuse_duplicates(_owned_hashes(self))
        return self


def _owned_hashes(config: TenantsConfig) -> list[tuple[str, str]]:
    """(owner, hex sha256) for every key in the config; the owner is a tenant or `ADMIN`."""
    owned = [(tenant, h) for tenant, keys in config.tenants.items() for h in keys.key_sha256]
    return owned + [(ADMIN, h) for h in config.admin_key_sha256]


def _label(owner: str) -> str:
    return "admin" if owner == ADMIN else f"tenant {owner!r}"


def _refuse_duplicates(owned: list[tuple[str, str]]) -> None:
    seen: dict[str, str] = {}
    for owner, digest in owned:
        if digest in seen:
            first = seen[digest]
            whom = f"{_label(first)} twice" if first == owner else f"both {_label(first)} and {_label(owner)}"
            raise ValueError(f"one key (sha256 {digest[:8]}...) is given for {whom}; a key must name "
                             "exactly one caller: give each its own key")
        seen[digest] = owner


def _keys_from_env(text: str, variable: str) -> list[tuple[str, str]]:
    """(owner, hex sha256) for each `<tenant>:<key>` entry of `text` (from `variable`)."""
    owned = []
    for i, entry in enumerate(e.strip() for e in text.split(",")):
        if not entry:
            continue
        owner, sep, key = entry.partition(":")
        where = f"in ${variable} (entry {i})"
        if not sep:
            raise ValueError(f"entry {i} of ${variable} has no ':'; the format is 'tenant:key,{ADMIN}:key'")
        if owner != ADMIN:
            _check_tenant(owner, where)
        _check_key(key, where)
        owned.append((owner, key_sha256(key)))
    return owned


class _PlaintextTenant(BaseModel):
    keys: list[str] = []


class PlaintextKeys(BaseModel):
    """The plaintext keys of a tenants config as given, before `TenantsConfig` hashes them (the
    args Ray keeps are that raw form: see `PLAINTEXT_KEYS_WARNING`)."""

    admin_keys: list[str] = []
    tenants: dict[str, _PlaintextTenant] = {}

    def any(self) -> bool:
        return bool(self.admin_keys) or any(t.keys for t in self.tenants.values())


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a tenant (`tenant` set), or an admin (`tenant=None, is_admin=True`),
    who sees every tenant's adapters and may use admin operations. Exactly one of the two."""

    tenant: str | None
    is_admin: bool = False

    def __post_init__(self) -> None:
        if (self.tenant is None) != self.is_admin:
            raise ValueError(f"a caller is a tenant or an admin, not {self}")

    def can_see(self, adapter_id: str) -> bool:
        """A tenant sees its own adapters and `shared/*`; an admin sees all."""
        return self.is_admin or parse_adapter_id(adapter_id).visible_to(self.tenant or "")


ADMIN_CALLER = Caller(tenant=None, is_admin=True)
OPEN_ACCESS = ADMIN_CALLER  # every request under `auth: none`
PLAINTEXT_KEYS_WARNING = (
    "the tenants config holds plaintext keys (`keys` / `admin_keys`): they are hashed here, but Ray keeps the "
    "app's args as given, readable with `serve config` and on the dashboard; use key_sha256 / admin_key_sha256 "
    "or keys_env for real keys")
OPEN_ACCESS_WARNING = ("auth is 'none': there is no access control, every caller is an admin "
                       "(set tenants' keys for anything but a test)")


def _bearer_key(authorization: str | None) -> str:
    """The key from `Bearer <key>` (scheme case-insensitive, RFC 7235); messages never echo it."""
    if authorization is None or not authorization.strip():
        raise UnauthorizedError(f"no Authorization header; {_BEARER_HINT}")
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise UnauthorizedError(f"the Authorization header is not a Bearer token; {_BEARER_HINT}")
    key = key.strip()
    if not key:
        raise UnauthorizedError(f"the Bearer token is empty; {_BEARER_HINT}")
    if len(key) > MAX_KEY_CHARS or not _KEY.fullmatch(key):
        raise UnauthorizedError(f"the Bearer token is malformed; {_BEARER_HINT}")
    return key


class KeyRing:
    """Every key's sha256 with its caller, built once from a `TenantsConfig` (and `keys_env`).

    `environ` is read here, once (default: os.environ), never at authentication. Invariants: each
    hash names one caller; with `auth="keys"` there is at least one. Read-only after `__init__`,
    so one KeyRing serves concurrent requests."""

    def __init__(self, config: TenantsConfig, *, environ: Mapping[str, str] | None = None) -> None:
        self.auth = config.auth
        owned = _owned_hashes(config)
        env_note = ""
        if config.keys_env is not None:
            environ = os.environ if environ is None else environ
            text = environ.get(config.keys_env)
            if text is None:
                env_note = f" (${config.keys_env}, named in keys_env, is not set)"
                logger.warning("$%s, named in keys_env, is not set: no API keys from the environment",
                               config.keys_env)
            owned += _keys_from_env(text or "", config.keys_env)
        _refuse_duplicates(owned)
        if self.auth == "keys" and not owned:
            raise ValueError(
                f"auth is 'keys' but no key is configured{env_note}: add tenants' keys or key_sha256, "
                "admin_keys, keys_env, or set auth: none for a server without access control (tests only)")
        self._entries: tuple[tuple[bytes, Caller], ...] = tuple(
            (bytes.fromhex(digest), ADMIN_CALLER if owner == ADMIN else Caller(owner)) for owner, digest in owned)
        self.tenants = frozenset(c.tenant for _, c in self._entries if c.tenant is not None)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"KeyRing(auth={self.auth!r}, tenants={sorted(self.tenants)}, keys={len(self)})"

    def digests(self) -> frozenset[str]:
        """The hex sha256 of every key (for checks such as `uses_demo_keys`)."""
        return frozenset(digest.hex() for digest, _ in self._entries)

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller for an `Authorization` header value, or UnauthorizedError (401)."""
        if self.auth == "none":
            return OPEN_ACCESS
        presented = hashlib.sha256(_bearer_key(authorization).encode()).digest()
        found: Caller | None = None
        for digest, caller in self._entries:
            # Every stored hash, no break on a match: the time depends on how many keys there
            # are, not on whether or which one matched.
            if hmac.compare_digest(digest, presented):
                found = caller
        if found is None:
            raise UnauthorizedError(f"unknown API key; {_BEARER_HINT} with a key this server was given")
        return found


def demo_tenants_config() -> TenantsConfig:
    """Tenants acme and globex and an admin with the well-known `DEMO_KEYS` (local demos only)."""
    return TenantsConfig(
        tenants={t: TenantKeys(keys=[k]) for t, k in DEMO_KEYS.items() if t != ADMIN},
        admin_keys=[DEMO_KEYS[ADMIN]],
    )


_DEMO_DIGESTS = frozenset(key_sha256(k) for k in DEMO_KEYS.values())


def uses_demo_keys(config: TenantsConfig | KeyRing) -> bool:
    """Whether any `DEMO_KEYS` key would be accepted (the ingress warns at start: they are public).

    Pass the KeyRing to include keys from `keys_env`."""
    digests = config.digests() if isinstance(config, KeyRing) else {h for _, h in _owned_hashes(config)}
    return config.auth == "keys" and not _DEMO_DIGESTS.isdisjoint(digests)


__all__ = [
    "ADMIN",
    "ADMIN_CALLER",
    "Caller",
    "DEMO_KEYS",
    "KeyRing",
    "MIN_KEY_CHARS",
    "OPEN_ACCESS",
    "OPEN_ACCESS_WARNING",
    "PLAINTEXT_KEYS_WARNING",
    "PlaintextKeys",
    "TenantKeys",
    "TenantsConfig",
    "demo_tenants_config",
    "key_sha256",
    "uses_demo_keys",
]
