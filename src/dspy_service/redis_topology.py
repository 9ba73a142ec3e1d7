"""Where a Redis is and how to reach it: one server, a Cluster, or a primary that Sentinel manages,
over TCP or TLS, with a password or as an ACL user.

The topology is read from the settings once (`parse_topology`, which refuses a malformed one in
words that never quote the URL); redis_clients.py turns it into a client. This module imports
nothing of redis-py: the settings use it, and redis-py loads OpenTelemetry when imported, which
`serve` keeps from happening while tracing is off (tracing.keep_opentelemetry_unloaded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

Mode = Literal["standalone", "cluster", "sentinel"]

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
    if "@" in path:  # a '/' inside the password cut the URL short
        raise ValueError(
            f"{variable} cannot be parsed (a password containing '/', '@' or ':' must be "
            "percent-encoded, e.g. '/' as %2F)"
        )
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
