"""Reading a Redis topology from the settings: what each form means, and errors that never quote a
password."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dspy_service.redis_link import key_prefix, state_prefix
from dspy_service.redis_topology import TlsFiles, parse_topology
from dspy_service.settings import Settings, redact_url

SECRET = "s3cr3t-pw-9931"


def test_a_single_server_with_an_acl_user_and_database() -> None:
    topology = parse_topology(f"redis://svc-user:{SECRET}@cache.internal:6380/2")
    assert topology.mode == "standalone"
    assert topology.nodes == (("cache.internal", 6380),)
    assert (topology.username, topology.password, topology.db) == ("svc-user", SECRET, 2)
    assert SECRET not in str(topology.describe())
    assert "svc-user" not in str(topology.describe())


def test_percent_encoded_credentials_are_decoded() -> None:
    topology = parse_topology("redis://u%40x:p%2Fw%3A1@h:1/0")
    assert (topology.username, topology.password) == ("u@x", "p/w:1")


def test_cluster_seed_nodes_come_comma_separated_in_one_url() -> None:
    topology = parse_topology(f"rediss://:{SECRET}@a:7000,b:7001,[::1]:7002", cluster=True)
    assert topology.mode == "cluster"
    assert topology.nodes == (("a", 7000), ("b", 7001), ("::1", 7002))
    assert topology.tls
    assert topology.password == SECRET
    assert topology.describe()["seeds"] == ["a:7000", "b:7001", "::1:7002"]


def test_several_hosts_without_cluster_mode_are_refused() -> None:
    with pytest.raises(ValueError, match="REDIS_CLUSTER=true"):
        parse_topology("redis://a:7000,b:7001")


def test_sentinel_needs_the_primary_name_and_reads_credentials_from_the_url() -> None:
    with pytest.raises(ValueError, match="REDIS_SENTINEL_MASTER"):
        parse_topology("redis://:pw@/0", sentinels="s1:26379")
    topology = parse_topology(
        f"redis://:{SECRET}@ignored/3", sentinels="s1,s2:26380", master_name="mymaster", sentinel_password="x"
    )
    assert topology.mode == "sentinel"
    assert topology.nodes == (("s1", 26379), ("s2", 26380))
    assert (topology.password, topology.db, topology.master_name) == (SECRET, 3, "mymaster")
    assert topology.describe() == {
        "mode": "sentinel",
        "tls": False,
        "user": None,
        "sentinels": ["s1:26379", "s2:26380"],
        "master_name": "mymaster",
    }


@pytest.mark.parametrize(
    ("url", "options", "problem"),
    [
        ("http://h:1", {}, "must start with redis://"),
        ("redis://h:notaport", {}, "is not host:port"),
        ("redis://h:70000", {}, "out of range"),
        ("redis://h:1/db", {}, "database number"),
        ("redis://h:1/1", {"cluster": True}, "database 0 only"),
        ("redis://h:1", {"cluster": True, "sentinels": "s:1", "master_name": "m"}, "cannot both"),
        (f"redis://{SECRET}@h:1", {}, "user:password@"),
        ("unix:///run/redis.sock", {"cluster": True}, "single server"),
        (f"redis://:pa/{SECRET}@h:1/0", {}, "percent-encoded"),
    ],
)
def test_malformed_topologies_are_named_without_quoting_the_url(
    url: str, options: dict[str, object], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem) as raised:
        parse_topology(url, **options)  # type: ignore[arg-type]
    assert SECRET not in str(raised.value)


def test_settings_refuse_a_bad_topology_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://:{SECRET}@a:1,b:2")
    with pytest.raises(ValidationError) as raised:
        Settings()
    # What the service prints at start (serving.load_configuration): the messages, never the input.
    printed = "; ".join(error["msg"] for error in raised.value.errors(include_input=False, include_url=False))
    assert "REDIS_CLUSTER=true" in printed
    assert SECRET not in printed
    monkeypatch.setenv("REDIS_CLUSTER", "true")
    assert Settings().redis_topology().mode == "cluster"


def test_tls_files_must_exist_and_come_in_pairs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    monkeypatch.setenv("REDIS_URL", "rediss://h:6380")
    monkeypatch.setenv("REDIS_TLS_CA_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(ValidationError, match="REDIS_TLS_CA_FILE"):
        Settings()
    monkeypatch.setenv("REDIS_TLS_CA_FILE", str(ca))
    monkeypatch.setenv("REDIS_TLS_CERT_FILE", str(ca))
    with pytest.raises(ValidationError, match="go together"):
        Settings()
    monkeypatch.delenv("REDIS_TLS_CERT_FILE")
    topology = Settings().redis_topology()
    assert topology.tls
    assert topology.tls_files == TlsFiles(ca_file=ca)


def test_the_cache_role_has_its_own_topology(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://state:6379")
    monkeypatch.setenv("REDIS_CACHE_URL", "redis://c1:7000,c2:7000")
    monkeypatch.setenv("REDIS_CACHE_CLUSTER", "true")
    settings = Settings()
    assert settings.redis_topology().mode == "standalone"
    cache = settings.redis_cache_topology()
    assert cache is not None
    assert cache.mode == "cluster"


def test_secrets_of_every_form_are_redacted_and_blanked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert redact_url(f"redis://user:{SECRET}@a:7000,b:7001/0") == "redis://***@a:7000,b:7001/0"
    assert redact_url("redis://a:7000,b:7001") == "redis://a:7000,b:7001"
    assert redact_url(f"rediss://svc:{SECRET}@h:6380/0") == "rediss://***@h:6380/0"
    monkeypatch.setenv("REDIS_URL", f"redis://svc:{SECRET}@a:1,b:2")
    monkeypatch.setenv("REDIS_CLUSTER", "true")
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", "sentinel-pw-7712")
    settings = Settings()
    assert SECRET in settings.secret_values()
    assert "sentinel-pw-7712" in settings.secret_values()
    view = str(settings.public_view())
    assert SECRET not in view
    assert "sentinel-pw-7712" not in view


def test_state_keys_share_one_hash_slot_and_cache_keys_do_not() -> None:
    """Redis hashes only what is between the first { and }: every state key of a deployment lands in
    one slot, so its multi-key scripts are legal on a cluster."""
    state = state_prefix("prod svc")
    assert state == "dspy-service:v1:{prod_svc}:"
    assert key_prefix("prod svc") == "dspy-service:v1:prod_svc:"
    assert "{" not in key_prefix("{sneaky}")  # a namespace cannot make the cache keys share a slot
    assert state_prefix("") == "dspy-service:v1:{default}:"
