"""redis-py clients for a RedisTopology: `redis.asyncio`'s own Redis, RedisCluster (which follows
MOVED/ASK redirects and rediscovers the slots itself) or a Sentinel-managed Redis (which asks the
sentinels for the primary on every new connection, so a failover is followed by reconnecting), and
what RedisLink asks of each (reset, ping, survey: whether each node answers, for /health)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from dspy_service.redis_topology import RedisTopology

# What open_client returns; the operations given to RedisLink.call use the commands both share.
RedisClient = aioredis.Redis | RedisCluster


def _tls_options(topology: RedisTopology) -> dict[str, Any]:
    if not topology.tls:
        return {}
    files = topology.tls_files
    return {
        "ssl_cert_reqs": "required",  # verified against the system's CAs, or REDIS_TLS_CA_FILE's
        "ssl_ca_certs": str(files.ca_file) if files.ca_file else None,
        "ssl_certfile": str(files.cert_file) if files.cert_file else None,
        "ssl_keyfile": str(files.key_file) if files.key_file else None,
    }


def open_client(topology: RedisTopology, *, timeout: float, max_connections: int) -> RedisClient:
    """A client for `topology` that fails fast: no retries of its own (RedisLink decides), the same
    timeout for connecting and for each reply."""
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "username": topology.username,
        "password": topology.password,
    }
    if topology.mode == "cluster":
        tls = _tls_options(topology)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in topology.nodes],
            max_connections=max_connections,  # per node
            ssl=topology.tls,
            **common,
            **tls,
        )
    if topology.mode == "sentinel":
        return _sentinel_primary(topology, common, max_connections)
    client: aioredis.Redis = aioredis.Redis.from_url(
        topology.url, max_connections=max_connections, **common, **_tls_options(topology)
    )
    return client


def _sentinel_primary(
    topology: RedisTopology, common: dict[str, Any], max_connections: int
) -> aioredis.Redis:
    tls = _tls_options(topology)
    sentinel_options: dict[str, Any] = {
        "socket_timeout": common["socket_timeout"],
        "socket_connect_timeout": common["socket_connect_timeout"],
        "password": topology.sentinel_password,
    }
    if topology.tls:
        sentinel_options.update(ssl=True, **tls)
    sentinel = Sentinel(list(topology.nodes), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    if topology.tls:
        common = {**common, "ssl": True, **tls}
    primary: aioredis.Redis = sentinel.master_for(
        topology.master_name or "",
        redis_class=aioredis.Redis,
        db=topology.db,
        max_connections=max_connections,
        **common,
    )
    return primary


@dataclass(frozen=True, slots=True)
class NodeStatus:
    address: str
    role: str  # primary, replica, sentinel
    reachable: bool

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "role": self.role, "reachable": self.reachable}


async def reset(client: RedisClient) -> None:
    """Drop pooled connections (and, for a cluster, the slot map) so that the next command
    reconnects to whoever serves now."""
    if isinstance(client, RedisCluster):
        await client.aclose()  # the next command re-reads the topology from the nodes it knows
    else:
        await client.connection_pool.disconnect()


async def ping(client: RedisClient) -> bool:
    """Whether the Redis answers; for a cluster, every primary (a replica that is down is not an
    outage: its primary serves)."""
    if isinstance(client, RedisCluster):
        return bool(await client.ping(target_nodes=RedisCluster.PRIMARIES))
    return bool(await client.ping())


async def survey(client: RedisClient, topology: RedisTopology, wait_secs: float) -> list[NodeStatus]:
    """Each node the client knows, and whether it answered a PING within `wait_secs`; never raises."""
    if isinstance(client, RedisCluster):
        nodes = client.get_nodes()
        answers = await asyncio.gather(*(_answers(node.execute_command("PING"), wait_secs) for node in nodes))
        return [
            NodeStatus(address=node.name, role=node.server_type or "unknown", reachable=answer)
            for node, answer in zip(nodes, answers, strict=True)
        ]
    if topology.mode == "sentinel":
        return await _survey_sentinel(client, topology, wait_secs)
    if not topology.nodes:  # a unix socket
        return [
            NodeStatus(address="unix", role="primary", reachable=await _answers(client.ping(), wait_secs))
        ]
    host, port = topology.nodes[0]
    return [
        NodeStatus(
            address=f"{host}:{port}", role="primary", reachable=await _answers(client.ping(), wait_secs)
        )
    ]


async def _survey_sentinel(
    client: aioredis.Redis, topology: RedisTopology, wait_secs: float
) -> list[NodeStatus]:
    pool: Any = client.connection_pool
    manager: Sentinel = pool.sentinel_manager
    answers = await asyncio.gather(*(_answers(s.ping(), wait_secs) for s in manager.sentinels))
    found = [
        NodeStatus(address=f"{host}:{port}", role="sentinel", reachable=answer)
        for (host, port), answer in zip(topology.nodes, answers, strict=True)
    ]
    primary: tuple[str, int] | None = None
    with contextlib.suppress(Exception):
        async with asyncio.timeout(wait_secs):
            primary = await manager.discover_master(topology.master_name or "")
    if primary is not None:
        reachable = await _answers(client.ping(), wait_secs)
        found.append(NodeStatus(address=f"{primary[0]}:{primary[1]}", role="primary", reachable=reachable))
    return found


async def _answers(reply: Any, wait_secs: float) -> bool:
    try:
        async with asyncio.timeout(wait_secs):
            return bool(await reply)
    except Exception:  # any failure means: not answering now
        return False
