"""API keys: the file format, the keyring's lookups, and that a key never shows in an error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dspy_service.api_keys import Keyring, load_keyring, parse_key_line
from dspy_service.errors import ConfigError
from dspy_service.settings import Settings

KEY = "sk-live-0123456789abcdef"
OTHER = "sk-live-fedcba9876543210"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No stray .env or API_KEYS from the runner."""
    monkeypatch.chdir(tmp_path)
    for name in ("API_KEYS", "API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_no_keys_means_auth_off(settings_env: Path) -> None:
    """Neither API_KEYS nor API_KEYS_FILE (or blank ones): no keyring, authentication is off."""
    assert load_keyring(Settings()) is None
    assert load_keyring(Settings(api_keys="  ", api_keys_file="")) is None


def test_file_lines_plain_hashed_tenants_and_comments(settings_env: Path) -> None:
    """Plain and sha256: keys, optional tenants, full-line and trailing comments, blank lines."""
    keys_file = settings_env / "keys"
    keys_file.write_text(
        f"# production keys\n\n{KEY} acme  # rotated monthly\nsha256:{sha(OTHER)}\tbeta\n"
        f"sha256:{sha('sk-no-tenant-000000000').upper()}\n"
    )
    keyring = load_keyring(Settings(api_keys_file=keys_file))
    assert keyring is not None
    assert len(keyring) == 3
    assert keyring.tenants == ["acme", "beta"]
    found = keyring.identify(KEY.encode())
    assert found is not None
    assert found.tenant == "acme"
    other = keyring.identify(OTHER.encode())
    assert other is not None
    assert other.tenant == "beta"
    no_tenant = keyring.identify(b"sk-no-tenant-000000000")
    assert no_tenant is not None
    assert no_tenant.tenant is None
    assert len(no_tenant.key_id) == 16


def test_env_and_file_keys_are_merged(settings_env: Path) -> None:
    """API_KEYS (comma-separated) and API_KEYS_FILE together."""
    keys_file = settings_env / "keys"
    keys_file.write_text(f"{OTHER} beta\n")
    keyring = load_keyring(Settings(api_keys=f" {KEY} acme , ", api_keys_file=keys_file))
    assert keyring is not None
    assert len(keyring) == 2
    assert keyring.tenants == ["acme", "beta"]


def test_wrong_missing_and_prefixed_keys_are_not_found() -> None:
    """Only the exact key matches: not empty, not a prefix, not the hash itself."""
    keyring = Keyring([key for key in [parse_key_line(KEY, "t")] if key is not None])
    assert keyring.identify(KEY.encode()) is not None
    for wrong in (b"", KEY[:-1].encode(), (KEY + "x").encode(), sha(KEY).encode(), b"\x00" * 64):
        assert keyring.identify(wrong) is None


def test_an_empty_hash_cannot_admit_a_missing_key() -> None:
    """A file listing sha256 of the empty string does not let requests without a key in."""
    keyring = Keyring([key for key in [parse_key_line(f"sha256:{sha('')}", "t")] if key is not None])
    assert keyring.identify(b"") is None


@pytest.mark.parametrize(
    ("line", "mention"),
    [
        ("short-key", "at least 16"),
        ("sha256:abcd", "64 hex digits"),
        (f"{KEY} acme extra", "3 words"),
        (f"{KEY} bad/tenant", "tenant names"),
    ],
)
def test_bad_lines_name_the_place_never_the_key(line: str, mention: str) -> None:
    """A bad line stops start-up with its location and problem; the key is not in the message."""
    with pytest.raises(ConfigError) as caught:
        parse_key_line(line, "keys:7")
    message = str(caught.value)
    assert "keys:7" in message
    assert mention in message
    assert line.split()[0] not in message


def test_a_keys_file_without_keys_or_with_duplicates_stops_start_up(settings_env: Path) -> None:
    """A file of comments only would lock everyone out; a key listed twice is ambiguous."""
    only_comments = settings_env / "empty"
    only_comments.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError, match="name no key"):
        load_keyring(Settings(api_keys_file=only_comments))
    duplicated = settings_env / "dup"
    duplicated.write_text(f"{KEY} acme\nsha256:{sha(KEY)} beta\n")
    with pytest.raises(ConfigError, match="twice") as caught:
        load_keyring(Settings(api_keys_file=duplicated))
    assert KEY not in str(caught.value)


def test_an_unreadable_keys_file_is_named(settings_env: Path) -> None:
    """A missing or non-UTF-8 file stops start-up naming the file."""
    missing = settings_env / "nope"
    with pytest.raises(ConfigError, match="nope"):
        load_keyring(Settings(api_keys_file=missing))
    binary = settings_env / "binary"
    binary.write_bytes(b"\xff\xfe" + KEY.encode())
    with pytest.raises(ConfigError, match="UTF-8"):
        load_keyring(Settings(api_keys_file=binary))


def test_settings_view_hides_keys(settings_env: Path) -> None:
    """The /config view of the settings never holds the keys."""
    view = str(Settings(api_keys=f"{KEY} acme,{OTHER}").public_view())
    assert KEY not in view
    assert OTHER not in view


def test_keys_have_roles_from_the_file_or_admin_api_keys(tmp_path: Path) -> None:
    """`role:operator` in the keys file, or ADMIN_API_KEYS, makes an operator; the default is client."""
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-client-0123456789abcd acme\nsk-operator-0123456789ab role:operator\n")
    settings = Settings(_env_file=None, api_keys_file=keys, admin_api_keys="sk-admin-0123456789abcdef ops")
    keyring = load_keyring(settings)
    assert keyring is not None
    roles = {key.tenant: key.role for key in keyring.keys}
    assert roles == {"acme": "client", None: "operator", "ops": "operator"}
    with pytest.raises(ConfigError, match="role:client or role:operator"):
        parse_key_line("sk-client-0123456789abcd role:root", "keys.txt:1")
