"""API keys: parsed from `API_KEYS` and `API_KEYS_FILE`, kept only as SHA-256 digests, checked in
constant time.

A key line is `<key> [tenant] [role:operator]` or `sha256:<64 hex digits> [tenant] [role:...]`; `#`
starts a comment. Keys have roles: `client` (the default) sees its own tenant's `/costs` rows and
nothing of `/config`; `operator` (ADMIN_API_KEYS, or `role:operator` in the keys file) sees everything.
The plain key never leaves this module: not in errors, not in logs, not in `/config` (which shows the
number of keys and the tenant names only).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dspy_service.errors import ConfigError
from dspy_service.models_config import TENANT_NAME_PATTERN
from dspy_service.settings import Settings

MIN_KEY_CHARS = 16
TENANT_PATTERN = re.compile(TENANT_NAME_PATTERN)
_HASHED = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


Role = Literal["client", "operator"]
_ROLES: tuple[Role, ...] = ("client", "operator")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One accepted key: its digest, the tenant it belongs to (if named), its role, a short public id."""

    digest: bytes
    tenant: str | None
    role: Role = "client"

    @property
    def key_id(self) -> str:
        """A stable, non-secret name for the key (for rate-limit buckets): a prefix of its digest."""
        return self.digest.hex()[:16]


class Keyring:
    """The accepted keys. `identify` hashes the presented key once and compares it against every
    digest with `hmac.compare_digest`, without stopping at a match, so a wrong key, a missing key and
    the right key all take the same time."""

    def __init__(self, keys: list[ApiKey]) -> None:
        if not keys:
            raise ConfigError("API keys are configured but none was found")
        self.keys = tuple(keys)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def tenants(self) -> list[str]:
        return sorted({key.tenant for key in self.keys if key.tenant is not None})

    def identify(self, presented: bytes) -> ApiKey | None:
        digest = hashlib.sha256(presented).digest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest) and presented:
                found = key
        return found


def parse_key_line(line: str, where: str, role: Role = "client") -> ApiKey | None:
    """One line of a keys file (or one item of API_KEYS / ADMIN_API_KEYS, whose `role` is given);
    None for blank and comment lines."""
    text = line.split(" #", 1)[0].split("\t#", 1)[0].strip()
    if not text or text.startswith("#"):
        return None
    parts = text.split()
    named = [part for part in parts[1:] if part.startswith("role:")]
    if named:
        wanted = named[0].removeprefix("role:")
        if len(named) > 1 or wanted not in _ROLES:
            raise ConfigError(f"{where}: a role is role:client or role:operator")
        role = "operator" if wanted == "operator" else "client"
        parts = [part for part in parts if not part.startswith("role:")]
    if len(parts) > 2:
        raise ConfigError(f"{where}: expected '<key> [tenant] [role:operator]', found {len(parts)} words")
    secret, tenant = parts[0], (parts[1] if len(parts) == 2 else None)
    if tenant is not None and not TENANT_PATTERN.match(tenant):
        raise ConfigError(f"{where}: tenant names are letters, digits and ._- (up to 64 characters)")
    hashed = _HASHED.match(secret)
    if hashed is not None:
        return ApiKey(bytes.fromhex(hashed[1]), tenant, role)
    if secret.lower().startswith("sha256:"):
        raise ConfigError(f"{where}: a hashed key is 'sha256:' followed by 64 hex digits")
    if len(secret) < MIN_KEY_CHARS:
        raise ConfigError(f"{where}: keys must be at least {MIN_KEY_CHARS} characters long")
    return ApiKey(hashlib.sha256(secret.encode()).digest(), tenant, role)


def load_keyring(settings: Settings) -> Keyring | None:
    """The keys from API_KEYS and API_KEYS_FILE together, or None when neither is set (auth off).

    Problems raise ConfigError naming the source and line, never the key itself.
    """
    if settings.api_keys is None and settings.api_keys_file is None and settings.admin_api_keys is None:
        return None
    keys: list[ApiKey] = []
    for variable, value, role in (
        ("API_KEYS", settings.api_keys, "client"),
        ("ADMIN_API_KEYS", settings.admin_api_keys, "operator"),
    ):
        if value is None:
            continue
        for number, item in enumerate(value.get_secret_value().split(","), start=1):
            key = parse_key_line(item, f"{variable} item {number}", role)  # type: ignore[arg-type]
            if key is not None:
                keys.append(key)
    if settings.api_keys_file is not None:
        keys.extend(_read_keys_file(settings.api_keys_file))
    seen: set[bytes] = set()
    for key in keys:
        if key.digest in seen:
            raise ConfigError("the same API key is listed twice (tenant names could not tell them apart)")
        seen.add(key.digest)
    if not keys:
        raise ConfigError("API_KEYS / API_KEYS_FILE are set but name no key: refusing to start locked")
    return Keyring(keys)


def _read_keys_file(path: Path) -> list[ApiKey]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the API keys file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the API keys file is not UTF-8 text") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = parse_key_line(line, f"{path}:{number}")
        if key is not None:
            keys.append(key)
    return keys
