"""Where a Redis is and how to reach it: one server, a Cluster, or a primary that Sentinel manages,
over TCP or TLS, with a password or as an ACL user.

The topology is read from the settings once (`parse_topology`, which refuses a malformed one in
words that never quote the URL) and turned into a redis-py client (`open_client`): `redis.asyncio`'s
own Redis, RedisCluster (which follows MOVED/ASK redirects and rediscovers the slots itself) or a
Sentinel-managed Redis (which asks the sentinels for the primary on every new connection, so a
failover is followed by reconnecting). `survey` asks each node whether it answers, for /health.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

Mode = Literal["standalone", "cluster", "sentinel"]
# What open_client returns; the operations given to RedisLink.call use the commands both share.
RedisClient = aioredis.Redis | RedisCluster

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

# What an ACL user of the service must be allowed (docs/deployment.md lists it for operators; the
# tests run the service as a user with exactly these): the commands it sends, and those its Lua
# scripts call (Redis checks those against the user too). Keys: ~dspy-service:*.
ACL_COMMANDS = (
    "ping",
    "get",
    "set",
    "mget",
    "incrby",
    "incrbyfloat",
    "expire",
    "hgetall",
    "hincrby",
    "hincrbyfloat",
    "hset",
    "sadd",
    "smembers",
    "lpos",
    "lpush",
    "ltrim",
    "evalsha",
    "script|load",
)
# redis-py also names itself on connecting (CLIENT SETINFO, Redis 7.2 and later): optional, a refusal
# is ignored; allow "client|setinfo" too where the server knows it, for a clean ACL LOG.
# And on a Redis Cluster: the slot map, the command table the client routes by, and redirects.
ACL_CLUSTER_COMMANDS = ("cluster|slots", "cluster|shards", "command", "asking", "readonly")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A private CA to verify the server with, and a client certificate if the server asks for one."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class RedisTopology:
    mode: Mode
    url: str  # as configured: it may hold a password, so it is never shown
    nodes: tuple[tuple[str, int], ...]  # the server; the cluster's seed nodes; or the sentinels
    tls: bool = False
    tls_files: TlsFiles = field(default_factory=TlsFiles)
    username: str | None = None
    password: str | None = None
    db: int = 0
    master_name: str | None = None  # Sentinel's name for the primary
    sentinel_password: str | None = None  # the sentinels' own, when they require one

    def describe(self) -> dict[str, Any]:
        """The topology as configured, with nothing secret in it."""
        view: dict[str, Any] = {
            "mode": self.mode,
            "tls": self.tls,
            "user": "***" if self.username else None,
        }
        addresses = [f"{host}:{port}" for host, port in self.nodes]
        if self.mode == "sentinel":
            view["sentinels"] = addresses
            view["master_name"] = self.master_name
        elif self.mode == "cluster":
            view["seeds"] = addresses
        else:
            view["address"] = addresses[0] if addresses else self.url.partition("://")[2].split("@")[-1]
        return view


def parse_topology(
    url: str,
    *,
    variable: str = "REDIS_URL",
    cluster: bool = False,
    sentinels: str | None = None,
    master_name: str | None = None,
    sentinel_password: str | None = None,
    tls_files: TlsFiles | None = None,
) -> RedisTopology:
    """The topology that `url` and the mode settings describe.

    Cluster: the URL names one or more seed nodes, comma-separated (`redis://h1:7000,h2:7000`).
    Sentinel: the sentinels come from `sentinels` (`host:port,...`), and the URL gives the primary's
    credentials, database and scheme (rediss:// for TLS); its host, if any, is not used.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{variable} must start with redis://, rediss:// or unix://")
    if cluster and sentinels:
        raise ValueError(f"{variable}: Cluster and Sentinel cannot both be on")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user_part, colon, password_part = userinfo.partition(":")
        username = unquote(user_part) or None
        password = unquote(password_part) if colon else None
        if not colon:  # redis://password@host is not a form redis-py reads: name it clearly
            raise ValueError(
                f"{variable}: credentials must be user:password@ or :password@ (percent-encode "
                "'/', '@' and ':' inside them)"
            )
    db = _database(path.split("?")[0], variable) if scheme != "unix" else 0
    tls = scheme == "rediss"
    if scheme == "unix" and (cluster or sentinels):
        raise ValueError(f"{variable}: unix:// sockets serve a single server only")
    if sentinels:
        if not master_name:
            raise ValueError("REDIS_SENTINELS needs REDIS_SENTINEL_MASTER (the primary's name in Sentinel)")
        return RedisTopology(
            mode="sentinel",
            url=url,
            nodes=_addresses(sentinels, "REDIS_SENTINELS", DEFAULT_SENTINEL_PORT),
            tls=tls,
            tls_files=tls_files or TlsFiles(),
            username=username,
            password=password,
            db=db,
            master_name=master_name,
            sentinel_password=sentinel_password,
        )
    nodes = () if scheme == "unix" else _addresses(hostlist, variable, DEFAULT_PORT)
    if cluster and db:
        raise ValueError(f"{variable}: a Redis Cluster has database 0 only")
    if not cluster and len(nodes) > 1:
        raise ValueError(f"{variable} names several hosts: set REDIS_CLUSTER=true for a Redis Cluster")
    return RedisTopology(
        mode="cluster" if cluster else "standalone",
        url=url,
        nodes=nodes,
        tls=tls,
        tls_files=tls_files or TlsFiles(),
        username=username,
        password=password,
        db=db,
    )


def _database(path: str, variable: str) -> int:
    if not path:
        return 0
    if not path.isdigit():
        raise ValueError(f"{variable}: the path must be a database number such as /0")
    return int(path)


def _addresses(text: str, variable: str, default_port: int) -> tuple[tuple[str, int], ...]:
    found: list[tuple[str, int]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.startswith("["):  # [::1]:6379
            host, _, port_text = item[1:].partition("]")
            port_text = port_text.removeprefix(":")
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        if not host or (port_text and not port_text.isdigit()):
            raise ValueError(f"{variable}: {item!r} is not host:port")
        port = int(port_text) if port_text else default_port
        if not 0 < port < 65536:
            raise ValueError(f"{variable}: port {port} is out of range")
        found.append((host, port))
    if not found:
        raise ValueError(f"{variable} names no host")
    return tuple(found)


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
