"""The launchers in tests/support/redis_topologies.py bring up what they claim: a password-protected
cluster that serves keys in every shard and survives a primary's death, a sentinel group that fails
over, TLS that a client can verify only with the test CA, and an ACL user held to its commands and keys.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from tests.support.processes import LOOPBACK
from tests.support.redis_topologies import (
    AclRedisServer,
    RedisClusterProcesses,
    SentinelGroup,
    TlsMaterial,
    TlsRedisServer,
)

PASSWORD = "cluster:pw/@"  # characters a URL must escape
# A refused login is final: redis-py's default retries it with backoff for about 3 s.
NO_RETRY = Retry(NoBackoff(), 0)


def _addresses(hosts: str) -> list[tuple[str, int]]:
    """ "h1:p1,h2:p2" -> [("h1", p1), ("h2", p2)]"""
    return [(host, int(port)) for host, port in (item.rsplit(":", 1) for item in hosts.split(","))]


def test_cluster_serves_keys_in_every_shard_and_a_replica_takes_over_a_killed_primary(
    tmp_path: Path,
) -> None:
    with RedisClusterProcesses(tmp_path, password=PASSWORD) as cluster:
        keys = [f"dspy-service:{n}" for n in range(20)]
        tagged = ["{dspy-service:tag}a", "{dspy-service:tag}b"]
        client = cluster.client()
        for key in keys + tagged:
            client.set(key, f"value of {key}")
        assert [client.get(key) for key in keys + tagged] == [f"value of {key}" for key in keys + tagged]

        owners = {key: cluster.port_for_key(key) for key in keys + tagged}
        assert len(cluster.primary_ports()) == 3
        assert set(owners.values()) == set(cluster.primary_ports())  # the keys span all three shards
        assert owners[tagged[0]] == owners[tagged[1]]
        for key, port in owners.items():  # each key is where port_for_key says: no MOVED from that node
            with redis.Redis(host=LOOPBACK, port=port, password=PASSWORD, decode_responses=True) as node:
                assert node.get(key) == f"value of {key}"
        assert cluster.keys_everywhere("dspy-service:*") == sorted(keys)

        scheme, rest = cluster.seed_url.split("://")
        credentials, hosts = rest.rsplit("@", 1)
        assert scheme == "redis"
        assert credentials == ":cluster%3Apw%2F%40"
        assert len(_addresses(hosts)) == 3
        for host, port in _addresses(hosts):
            with redis.Redis(host=host, port=port, password=PASSWORD, decode_responses=True) as seed:
                assert seed.cluster("INFO")["cluster_state"] == "ok"
        anonymous = redis.Redis(host=LOOPBACK, port=cluster.ports[0], retry=NO_RETRY)
        with anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()

        victim = owners[tagged[0]]
        replica = cluster.replica_of(victim)
        with redis.Redis(host=LOOPBACK, port=victim, password=PASSWORD, decode_responses=True) as node:
            node.set("{dspy-service:tag}durable", "kept")
            assert node.wait(1, 5000) == 1  # on the replica before the primary dies
        cluster.kill(victim)
        promoted = cluster.wait_for_failover(victim)

        assert promoted == replica
        assert victim not in cluster.primary_ports()
        assert cluster.port_for_key(tagged[0]) == promoted
        after = cluster.client()
        assert after.get("{dspy-service:tag}durable") == "kept"
        after.set(tagged[0], "written after the failover")
        assert after.get(tagged[0]) == "written after the failover"

        cluster.restart(victim)
        assert cluster.replica_of(promoted) == victim


def _sentinel(addresses: list[tuple[str, int]]) -> Any:
    """redis-py's Sentinel client (Any: redis.sentinel has no annotations)."""
    return Sentinel(addresses, socket_timeout=2, decode_responses=True)  # type: ignore[no-untyped-call]


def test_sentinel_group_serves_through_the_sentinels_and_fails_over(tmp_path: Path) -> None:
    with SentinelGroup(tmp_path) as group:
        first, second = group.data_ports
        assert group.primary_port() == first
        sentinel = _sentinel(_addresses(group.sentinels))
        try:
            primary = sentinel.master_for(group.master_name)
            primary.set("dspy-service:k", "before")
            assert primary.get("dspy-service:k") == "before"
            assert primary.wait(1, 5000) == 1
            assert sentinel.slave_for(group.master_name).get("dspy-service:k") == "before"

            promoted = group.failover()
            assert promoted == second
            assert group.primary_port() == second
            assert sentinel.discover_master(group.master_name) == (LOOPBACK, second)
            after = sentinel.master_for(group.master_name)
            assert after.get("dspy-service:k") == "before"
            after.set("dspy-service:k", "after")
            assert group.client(second).get("dspy-service:k") == "after"
            assert group.role(first)[:4] == ["slave", LOOPBACK, second, "connected"]

            assert group.kill_primary() == first
            assert sentinel.discover_master(group.master_name) == (LOOPBACK, first)
            group.restart(second)
            assert group.role(second)[:4] == ["slave", LOOPBACK, first, "connected"]
        finally:
            for connection in sentinel.sentinels:
                connection.close()


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return TlsMaterial.create(tmp_path_factory.mktemp("tls"))


def _verification_failure(error: BaseException) -> ssl.SSLCertVerificationError | None:
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    return cause


def test_tls_server_is_trusted_with_the_test_ca_and_not_with_another(
    tmp_path: Path, tls_material: TlsMaterial
) -> None:
    with TlsRedisServer(tmp_path, tls_material) as server:
        assert server.url == f"rediss://{LOOPBACK}:{server.port}/0"
        ca_file = str(tls_material.ca_file)
        with redis.Redis.from_url(server.url, ssl_ca_certs=ca_file, decode_responses=True) as trusted:
            trusted.set("dspy-service:tls", "yes")
            assert trusted.get("dspy-service:tls") == "yes"

        wrong = redis.Redis.from_url(server.url, ssl_ca_certs=str(tls_material.wrong_ca_file))
        with wrong, pytest.raises(redis.ConnectionError) as refused:
            wrong.ping()
        failure = _verification_failure(refused.value)
        assert failure is not None
        assert "certificate verify failed" in str(failure)


def test_tls_server_with_client_certificates_refuses_a_client_without_one(
    tmp_path: Path, tls_material: TlsMaterial
) -> None:
    with TlsRedisServer(tmp_path, tls_material, require_client_cert=True, password="tls-pw") as server:
        assert server.url == f"rediss://:tls-pw@{LOOPBACK}:{server.port}/0"
        with redis.Redis.from_url(
            server.url,
            ssl_ca_certs=str(tls_material.ca_file),
            ssl_certfile=str(tls_material.client_cert),
            ssl_keyfile=str(tls_material.client_key),
        ) as with_certificate:
            assert with_certificate.ping() is True

        without = redis.Redis.from_url(server.url, ssl_ca_certs=str(tls_material.ca_file))
        with without, pytest.raises(redis.ConnectionError):
            without.ping()


def test_acl_user_may_run_only_its_commands_on_its_keys(tmp_path: Path) -> None:
    with AclRedisServer(tmp_path, "dspy", "user:pw", ["get", "set", "script|load"]) as server:
        assert server.url == f"redis://dspy:user%3Apw@{LOOPBACK}:{server.port}/0"
        with redis.Redis.from_url(server.url, decode_responses=True) as user:
            user.set("dspy-service:a", "1")
            assert user.get("dspy-service:a") == "1"
            assert len(user.script_load("return 1")) == 40
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.flushall()
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.script_flush()
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.get("elsewhere")

        denied = {(entry["username"], entry["reason"], entry["object"]) for entry in server.acl_log()}
        assert denied == {
            ("dspy", "command", "flushall"),
            ("dspy", "command", "script|flush"),
            ("dspy", "key", "elsewhere"),
        }
        assert server.admin_client().get("dspy-service:a") == "1"
        with (
            redis.Redis(host=LOOPBACK, port=server.port, retry=NO_RETRY) as anonymous,
            pytest.raises(redis.AuthenticationError),
        ):
            anonymous.ping()
