"""Real Redis topologies for the integration tests: a six-node Cluster, a Sentinel group, a TLS
server with its certificates, and a server whose ACL user may run only the commands a test names.

As with processes.RedisServer, every process listens on loopback on a port of its own, keeps no data
on disk, writes its output to `<name>-<port>.log` in its workdir (read it when a test fails) and is
killed by stop(). Every wait polls the servers' own account of their state (CLUSTER INFO, ROLE,
SENTINEL ...) against a generous deadline, so the launchers hold on a loaded machine and still come
up in seconds. Clients handed out by `client()` and the like are closed by stop().
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from tests.support.processes import LOOPBACK, free_port, wait_until

T = TypeVar("T")

START_TIMEOUT = 30.0
CLUSTER_SLOTS = 16384
# Redis listens for cluster gossip on the client port + 10000.
CLUSTER_BUS_OFFSET = 10000


def _binary(name: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        raise RuntimeError(f"{name} is not installed (apt-get install redis-server)")
    return binary


def _wait_for(probe: Callable[[], T | None], *, timeout: float, what: str) -> T:
    """Poll `probe` until it gives something other than None, and return that."""
    found: list[T] = []

    def ready() -> bool:
        value = probe()
        if value is not None:
            found.append(value)
        return value is not None

    wait_until(ready, timeout=timeout, interval=0.05, what=what)
    return found[-1]


def _redis_url(scheme: str, hosts: Sequence[str], *, username: str = "", password: str | None = None) -> str:
    auth = f"{quote(username, safe='')}:{quote(password, safe='')}@" if password is not None else ""
    return f"{scheme}://{auth}{','.join(hosts)}"


def probe_client(port: int, **options: Any) -> redis.Redis:
    """A client for one look at a node: short timeouts and no retries, so that a dead node costs a
    second, not redis-py's default backoff."""
    settings: dict[str, Any] = {
        "host": LOOPBACK,
        "port": port,
        "decode_responses": True,
        "socket_connect_timeout": 1,
        "socket_timeout": 3,
        "retry": Retry(NoBackoff(), 0),
        **options,
    }
    return redis.Redis(**settings)


def ask(port: int, *command: Any, **options: Any) -> Any:
    """One command on a fresh connection to `port`; None if the node does not answer or refuses."""
    try:
        with probe_client(port, **options) as client:
            return client.execute_command(*command)
    except (redis.RedisError, OSError):
        return None


Option = str | int | tuple[str | int, ...]


def as_args(options: Mapping[str, Option]) -> list[str]:
    """{"port": 1, "replicaof": ("127.0.0.1", 2)} -> ["--port", "1", "--replicaof", "127.0.0.1", "2"]."""
    args: list[str] = []
    for name, value in options.items():
        args += [f"--{name}", *(map(str, value) if isinstance(value, tuple) else [str(value)])]
    return args


def server_args(workdir: Path, port: int, extra: Mapping[str, Option] | None = None) -> list[str]:
    """redis-server arguments for a node on loopback that keeps nothing on disk: no RDB or AOF, and a
    replica loads its primary's snapshot from the socket (swapdb) instead of through a file."""
    options: dict[str, Option] = {
        "port": port,
        "bind": LOOPBACK,
        "save": "",
        "appendonly": "no",
        "dir": str(workdir),
        "dbfilename": f"dump-{port}.rdb",  # never written; distinct all the same, as nodes share a workdir
        "repl-diskless-load": "swapdb",
        "repl-diskless-sync-delay": 0,  # the default waits 5 s for more replicas before a full sync
        **(extra or {}),
    }
    return as_args(options)


class RedisProcess:
    """One redis-server (or sentinel) process, its output in a log file; can be killed and started again
    with the same arguments."""

    def __init__(self, workdir: Path, name: str, port: int, args: Sequence[str]) -> None:
        self.binary = _binary("redis-server")
        self.workdir = workdir
        self.name = name
        self.port = port
        self.args = list(args)
        self.log_path = workdir / f"{name}-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} on port {self.port} is already running")
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [self.binary, *self.args], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ensure_running(self) -> None:
        """Raise, with the end of its log, if the process was started and has exited on its own."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} on port {self.port} exited with {self.process.returncode}; "
                f"{self.log_path}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_answers(self, *, timeout: float = START_TIMEOUT, **options: Any) -> None:
        """Wait until PING answers (client `options` such as password or ssl settings)."""

        def answers() -> bool:
            self.ensure_running()
            return ask(self.port, "PING", **options) is True

        wait_until(answers, timeout=timeout, what=f"{self.name} on port {self.port} to answer PING")

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to hand over or save anything."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


class _Topology:
    """What every launcher shares: its processes, the clients it handed out, `with` support."""

    def __init__(self) -> None:
        self.processes: list[RedisProcess] = []
        self._clients: list[redis.Redis | RedisCluster] = []

    def _track(self, client: T) -> T:
        self._clients.append(client)  # type: ignore[arg-type]  # T is one of the two client types
        return client

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        for process in self.processes:
            process.kill()

    def start(self) -> None:
        """Start the processes and wait until the topology is ready; if that fails, stop them all, so
        that a failed start leaves nothing running."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


# --- Cluster -------------------------------------------------------------------------------------------


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def free_cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (+10000) is free too. free_port() will not do: the kernel's
    ports (32768 and up) plus 10000 can pass 65535. Drawn below that range, so no outgoing connection
    takes either port meanwhile."""
    for _ in range(1000):
        port = random.randrange(11000, 22000)
        bus = port + CLUSTER_BUS_OFFSET
        if port in taken or bus in taken:
            continue
        if _bindable(port) and _bindable(bus):
            return port
    raise RuntimeError("found no free pair of ports for a cluster node")


@dataclass(frozen=True, slots=True)
class SlotRange:
    """One contiguous run of slots as CLUSTER SLOTS lists it: its primary and its replicas' ports."""

    start: int
    end: int
    primary: int
    replicas: tuple[int, ...]


class RedisClusterProcesses(_Topology):
    """Six redis-server nodes joined by `redis-cli --cluster create` into three primaries with one
    replica each. `password` sets requirepass and masterauth on every node."""

    NODES = 6

    def __init__(self, workdir: Path, *, password: str | None = None, node_timeout_ms: int = 1000) -> None:
        super().__init__()
        self.workdir = workdir
        self.password = password
        taken: set[int] = set()
        self.ports: list[int] = []
        for _ in range(self.NODES):
            port = free_cluster_port(taken)
            taken |= {port, port + CLUSTER_BUS_OFFSET}
            self.ports.append(port)
        auth: dict[str, Option] = {"requirepass": password, "masterauth": password} if password else {}
        self.nodes: dict[int, RedisProcess] = {}
        for port in self.ports:
            cluster_options: dict[str, Option] = {
                "cluster-enabled": "yes",
                "cluster-config-file": f"nodes-{port}.conf",
                "cluster-node-timeout": node_timeout_ms,
                # A replica stands for election however long ago it last heard from its primary (on a
                # loaded machine a shard must not stay without a primary).
                "cluster-replica-validity-factor": 0,
                # CLUSTER SLOTS leaves out a replica until its replication offset passes 0, which on an
                # idle primary takes one replication ping: every 10 s by default.
                "repl-ping-replica-period": 1,
            }
            args = server_args(workdir, port, {**cluster_options, **auth})
            self.nodes[port] = RedisProcess(workdir, "cluster-node", port, args)
        self.processes = list(self.nodes.values())
        self._lost_slots: dict[int, list[int]] = {}  # killed primary -> the first slot of each range

    @property
    def seed_url(self) -> str:
        """redis://[:password@]127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3 (three of the nodes)."""
        return _redis_url("redis", [f"{LOOPBACK}:{port}" for port in self.ports[:3]], password=self.password)

    def _start(self) -> None:
        for node in self.processes:
            node.start()
        for node in self.processes:
            node.wait_answers(password=self.password)
        self._create()
        _wait_for(self._formed, timeout=START_TIMEOUT, what=f"the cluster to form (logs in {self.workdir})")

    def _create(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
        if self.password is not None:
            env["REDISCLI_AUTH"] = self.password  # not -a: keeps it off the process list
        command = [_binary("redis-cli"), "--cluster", "create"]
        command += [f"{LOOPBACK}:{port}" for port in self.ports]
        command += ["--cluster-replicas", "1", "--cluster-yes"]
        done = subprocess.run(command, env=env, capture_output=True, timeout=120, check=False)
        log = self.workdir / "cluster-create.log"
        log.write_bytes(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}); see {log}")

    def _ask(self, port: int, *command: Any) -> Any:
        return ask(port, *command, password=self.password)

    def live_ports(self) -> list[int]:
        for node in self.processes:
            node.ensure_running()
        return [node.port for node in self.processes if node.running]

    def _slot_map(self, port: int) -> list[SlotRange] | None:
        reply = self._ask(port, "CLUSTER SLOTS")
        if not reply:
            return None
        ranges = [
            SlotRange(
                start=int(entry[0]),
                end=int(entry[1]),
                primary=int(entry[2][1]),
                replicas=tuple(sorted(int(replica[1]) for replica in entry[3:])),
            )
            for entry in reply
        ]
        return sorted(ranges, key=lambda r: r.start)

    def _agreed_slot_map(self) -> list[SlotRange] | None:
        """The slot map, if every live node reports the cluster ok with all slots served, and lists
        the same map."""
        maps = []
        for port in self.live_ports():
            info = self._ask(port, "CLUSTER INFO")
            if not info or info.get("cluster_state") != "ok":
                return None
            if int(info.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS:
                return None
            slots = self._slot_map(port)
            if slots is None or sum(r.end - r.start + 1 for r in slots) != CLUSTER_SLOTS:
                return None
            maps.append(slots)
        if not maps or any(m != maps[0] for m in maps[1:]):
            return None
        return maps[0]

    def slot_map(self) -> list[SlotRange]:
        """The slot map as the first live node that answers sees it."""
        for port in self.live_ports():
            slots = self._slot_map(port)
            if slots is not None:
                return slots
        raise RuntimeError("no live cluster node answers CLUSTER SLOTS")

    def _replica_in_sync(self, port: int, primary: int) -> bool:
        role = self._ask(port, "ROLE")
        return bool(role) and role[0] == "slave" and int(role[2]) == primary and role[3] == "connected"

    def _formed(self) -> list[SlotRange] | None:
        slots = self._agreed_slot_map()
        if slots is None or len({r.primary for r in slots}) != self.NODES // 2:
            return None
        for r in slots:
            if len(r.replicas) != 1 or not self._replica_in_sync(r.replicas[0], r.primary):
                return None
        return slots

    def primary_ports(self) -> list[int]:
        """The primaries that serve slots, as the cluster sees them (a killed primary stays listed until
        its replica takes over)."""
        return sorted({r.primary for r in self.slot_map()})

    def replica_of(self, primary_port: int) -> int:
        """The live node that reports (ROLE) replicating from `primary_port`."""
        for port in self.live_ports():
            role = self._ask(port, "ROLE")
            if role and role[0] == "slave" and int(role[2]) == primary_port:
                return port
        raise LookupError(f"no live node replicates from port {primary_port}")

    def key_slot(self, key: str) -> int:
        for port in self.live_ports():
            slot = self._ask(port, "CLUSTER KEYSLOT", key)
            if slot is not None:
                return int(slot)
        raise RuntimeError("no live cluster node answers CLUSTER KEYSLOT")

    def port_for_key(self, key: str) -> int:
        """The primary serving `key`'s slot ({hash tags} honoured: Redis computes the slot)."""
        slot = self.key_slot(key)
        return next(r.primary for r in self.slot_map() if r.start <= slot <= r.end)

    def kill(self, port: int) -> None:
        """SIGKILL one node; wait_for_failover(port) then waits for its replica to take over."""
        others = [p for p in self.live_ports() if p != port]
        slots = next((s for s in map(self._slot_map, others) if s is not None), [])
        self._lost_slots[port] = [r.start for r in slots if r.primary == port]
        self.nodes[port].kill()

    def wait_for_failover(self, killed_port: int, timeout: float = 30) -> int:
        """Wait until one live node, reporting itself a primary, serves every slot `killed_port` served,
        with the cluster ok on every surviving node; return its port."""
        lost = self._lost_slots.get(killed_port)
        if not lost:
            raise ValueError(f"port {killed_port} was not a primary when kill() stopped it")

        def promoted() -> int | None:
            slots = self._agreed_slot_map()
            if slots is None:
                return None
            owners = {r.primary for r in slots for start in lost if r.start <= start <= r.end}
            if len(owners) != 1:
                return None
            (owner,) = owners
            if owner == killed_port or owner not in self.live_ports():
                return None
            role = self._ask(owner, "ROLE")
            return owner if role and role[0] == "master" else None

        return _wait_for(promoted, timeout=timeout, what=f"a replica to take over from port {killed_port}")

    def restart(self, port: int, timeout: float = START_TIMEOUT) -> None:
        """Start a killed node again on its port with its cluster config; wait until it has rejoined as
        a replica in sync (a primary that lost its slots comes back as its successor's replica)."""
        node = self.nodes[port]
        node.start()
        node.wait_answers(password=self.password)

        def rejoined() -> bool | None:
            slots = self._agreed_slot_map()
            if slots is None:
                return None
            primary = next((r.primary for r in slots if port in r.replicas), None)
            return True if primary is not None and self._replica_in_sync(port, primary) else None

        _wait_for(rejoined, timeout=timeout, what=f"port {port} to rejoin the cluster as a replica")
        self._lost_slots.pop(port, None)

    def move_slot(self, slot: int, to_port: int, *, pause_secs: float = 0.0) -> None:
        """Migrate one slot to the primary on `to_port` the way resharding does (IMPORTING and
        MIGRATING, MIGRATE key by key, then SETSLOT NODE everywhere), pausing `pause_secs` after each
        key, so that clients meet ASK and TRYAGAIN replies while it runs and MOVED afterwards."""
        source = next(r.primary for r in self.slot_map() if r.start <= slot <= r.end)
        if source == to_port:
            return
        source_id, target_id = self._ask(source, "CLUSTER MYID"), self._ask(to_port, "CLUSTER MYID")
        self._ask(to_port, "CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        self._ask(source, "CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        while keys := self._ask(source, "CLUSTER GETKEYSINSLOT", slot, 1):
            auth = ["AUTH", self.password] if self.password else []
            self._ask(source, "MIGRATE", LOOPBACK, to_port, "", 0, 5000, *auth, "KEYS", *keys)
            time.sleep(pause_secs)
        for port in self.primary_ports():
            self._ask(port, "CLUSTER SETSLOT", slot, "NODE", target_id)

    def keys_everywhere(self, pattern: str = "*") -> list[str]:
        """Every key matching `pattern` on every live primary (SCAN on each node), sorted."""
        keys: list[str] = []
        live = self.live_ports()
        for port in self.primary_ports():
            if port in live:
                with probe_client(port, password=self.password) as client:
                    keys.extend(client.scan_iter(match=pattern, count=1000))
        return sorted(keys)

    def client(self, **options: Any) -> RedisCluster:
        """A redis-py cluster client (decode_responses=True unless `options` say otherwise)."""
        settings: dict[str, Any] = {"decode_responses": True, "password": self.password, **options}
        # ClusterNode has no annotations in redis-py 8.
        nodes = [ClusterNode(LOOPBACK, port) for port in self.live_ports()]  # type: ignore[no-untyped-call]
        return self._track(RedisCluster(startup_nodes=nodes, **settings))


# --- Sentinel ------------------------------------------------------------------------------------------


# Sentinel's timers (ms) for a test: it learns of the other sentinels and of role changes in about a
# second instead of ten (INFO, hello and down-votes more often); a stalled timer sends it into TILT (no
# failovers) only after 10 s, for 1 s, not after 2 s for 30 s. And it pings every 250 ms: at the default
# (every second, capped at down-after-milliseconds) a sentinel that has just switched to a new primary
# sends its first PING a full down-after period after the switch, and with down-after 1000 it then
# finds that primary subjectively down and fails over again, straight back.
SENTINEL_TIMERS = {
    "info-period": 1000,
    "publish-period": 500,
    "ask-period": 500,
    "ping-period": 250,
    "tilt-trigger": 10000,
    "tilt-period": 1000,
}


def as_args_flat(options: Mapping[str, int]) -> list[str | int]:
    return [part for name, value in options.items() for part in (name, value)]


class SentinelGroup(_Topology):
    """A primary, one replica and three sentinels (quorum 2) watching them under `master_name`.

    The sentinels' own timers are shortened with SENTINEL DEBUG, see SENTINEL_TIMERS.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        master_name: str = "mymaster",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        super().__init__()
        self.workdir = workdir
        self.master_name = master_name
        first, second = free_port(), free_port()
        while second == first:
            second = free_port()
        self.data_ports = [first, second]
        self.data_nodes = {
            first: RedisProcess(workdir, "sentinel-data", first, server_args(workdir, first)),
            second: RedisProcess(
                workdir,
                "sentinel-data",
                second,
                server_args(workdir, second, {"replicaof": (LOOPBACK, first)}),
            ),
        }
        self.sentinel_ports: list[int] = []
        while len(self.sentinel_ports) < 3:
            port = free_port()
            if port not in self.data_ports and port not in self.sentinel_ports:
                self.sentinel_ports.append(port)
        self.sentinel_nodes = []
        for port in self.sentinel_ports:
            config = workdir / f"sentinel-{port}.conf"  # the sentinel rewrites it as it learns
            config.write_text(
                f"port {port}\n"
                f"bind {LOOPBACK}\n"
                f'dir "{workdir}"\n'
                f"sentinel monitor {master_name} {LOOPBACK} {first} 2\n"
                f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
                f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {master_name} 1\n"
            )
            self.sentinel_nodes.append(RedisProcess(workdir, "sentinel", port, [str(config), "--sentinel"]))
        self.processes = [*self.data_nodes.values(), *self.sentinel_nodes]

    @property
    def sentinels(self) -> str:
        """The sentinels' addresses: 127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3"""
        return ",".join(f"{LOOPBACK}:{port}" for port in self.sentinel_ports)

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """For redis.sentinel.Sentinel(...)."""
        return [(LOOPBACK, port) for port in self.sentinel_ports]

    def _start(self) -> None:
        primary, replica = self.data_ports
        for node in self.data_nodes.values():
            node.start()
        for node in self.data_nodes.values():
            node.wait_answers()
        wait_until(
            lambda: self._replica_in_sync(replica, primary),
            timeout=START_TIMEOUT,
            what=f"port {replica} to replicate from {primary}",
        )
        for node in self.sentinel_nodes:
            node.start()
        for node in self.sentinel_nodes:
            node.wait_answers()
            with probe_client(node.port) as client:
                client.execute_command("SENTINEL DEBUG", *as_args_flat(SENTINEL_TIMERS))
        wait_until(
            lambda: self._watched(primary, [replica]),
            timeout=START_TIMEOUT,
            what=f"all three sentinels to watch {primary} and its replica (logs in {self.workdir})",
        )

    def _replica_in_sync(self, port: int, primary: int) -> bool:
        role = ask(port, "ROLE")
        return bool(role) and role[0] == "slave" and int(role[2]) == primary and role[3] == "connected"

    def _sentinel_view(self, port: int) -> tuple[int, list[int]] | None:
        """(primary, healthy replicas) as one sentinel reports them, if it knows the other two
        sentinels and sees the primary up; None otherwise."""
        master = ask(port, "SENTINEL MASTER", self.master_name)
        replicas = ask(port, "SENTINEL REPLICAS", self.master_name)
        if not isinstance(master, dict) or replicas is None:
            return None
        if master.get("flags") != "master" or int(master.get("num-other-sentinels", 0)) != 2:
            return None
        healthy = [
            int(entry["port"])
            for entry in map(_pairs, replicas)
            if entry.get("flags") == "slave" and entry.get("master-link-status") == "ok"
        ]
        return int(master["port"]), sorted(healthy)

    def _watched(self, primary: int, replicas: list[int]) -> bool:
        views = [self._sentinel_view(port) for port in self.sentinel_ports]
        return all(view == (primary, sorted(replicas)) for view in views)

    def _reported_primary(self, port: int) -> int | None:
        address = ask(port, "SENTINEL GET-MASTER-ADDR-BY-NAME", self.master_name)
        return int(address[1]) if address else None

    def primary_port(self) -> int:
        """The primary as the sentinels report it (GET-MASTER-ADDR-BY-NAME on the first that answers)."""
        for port in self.sentinel_ports:
            primary = self._reported_primary(port)
            if primary is not None:
                return primary
        raise RuntimeError("no sentinel reports a primary")

    def _wait_promoted(self, old: int, timeout: float) -> int:
        def promoted() -> int | None:
            for node in self.processes:
                node.ensure_running()
            reported = {self._reported_primary(port) for port in self.sentinel_ports}
            if len(reported) != 1:
                return None
            (new,) = reported
            if new is None or new == old:
                return None
            role = ask(new, "ROLE")
            return new if role and role[0] == "master" else None

        return _wait_for(promoted, timeout=timeout, what=f"the sentinels to promote a node in place of {old}")

    def failover(self, timeout: float = 30) -> int:
        """SENTINEL FAILOVER on one sentinel; wait until all three report the other node as primary
        and it answers ROLE as a master, then until the old primary replicates from it; return the new
        primary's port."""
        old = self.primary_port()
        with probe_client(self.sentinel_ports[0]) as client:
            client.execute_command("SENTINEL FAILOVER", self.master_name)
        new = self._wait_promoted(old, timeout)
        wait_until(
            lambda: self._watched(new, [old]) and self._replica_in_sync(old, new),
            timeout=timeout,
            what=f"the old primary {old} to replicate from {new}",
        )
        return new

    def kill_primary(self, timeout: float = 30) -> int:
        """SIGKILL the current primary; wait until all three sentinels report the replica promoted and
        it answers ROLE as a master; return its port."""
        old = self.primary_port()
        self.data_nodes[old].kill()
        return self._wait_promoted(old, timeout)

    def restart(self, port: int, timeout: float = START_TIMEOUT) -> None:
        """Start a killed data node again as a replica of the current primary; wait until it is in sync
        and every sentinel sees it healthy."""
        node = self.data_nodes[port]
        primary = self.primary_port()
        node.args = server_args(self.workdir, port, {"replicaof": (LOOPBACK, primary)})
        node.start()
        node.wait_answers()
        wait_until(
            lambda: self._replica_in_sync(port, primary) and self._watched(primary, [port]),
            timeout=timeout,
            what=f"port {port} to come back as a replica of {primary}",
        )

    def role(self, port: int) -> list[Any]:
        """ROLE of one data node: ["master", offset, replicas] or ["slave", host, port, state, offset]."""
        reply = ask(port, "ROLE")
        if reply is None:
            raise ConnectionError(f"data node {port} does not answer ROLE")
        return list(reply)

    def client(self, port: int, **options: Any) -> redis.Redis:
        """A plain client for one data node (decode_responses=True unless `options` say otherwise)."""
        settings: dict[str, Any] = {"host": LOOPBACK, "port": port, "decode_responses": True, **options}
        return self._track(redis.Redis(**settings))


def _pairs(entry: Any) -> dict[str, Any]:
    """SENTINEL REPLICAS lists each replica as a flat [field, value, ...] list under RESP2."""
    if isinstance(entry, dict):
        return entry
    return dict(zip(entry[::2], entry[1::2], strict=True))


# --- TLS -----------------------------------------------------------------------------------------------

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = dspy-service test
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """A test CA, a server certificate it signed (IP:127.0.0.1, DNS:localhost), a client certificate
    it signed, and an unrelated CA that trusts neither. Files only, in PEM."""

    ca_file: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca_file: Path
    wrong_ca_key: Path

    @classmethod
    def create(cls, directory: Path) -> TlsMaterial:
        """Write the keys and certificates into `directory` with the openssl CLI (EC P-256 keys, valid
        for two days)."""
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "openssl.cnf"
        config.write_text(_OPENSSL_CONFIG)
        material = cls(
            ca_file=directory / "ca.crt",
            ca_key=directory / "ca.key",
            server_cert=directory / "server.crt",
            server_key=directory / "server.key",
            client_cert=directory / "client.crt",
            client_key=directory / "client.key",
            wrong_ca_file=directory / "wrong-ca.crt",
            wrong_ca_key=directory / "wrong-ca.key",
        )
        for cert, key, name in (
            (material.ca_file, material.ca_key, "dspy-service test CA"),
            (material.wrong_ca_file, material.wrong_ca_key, "unrelated test CA"),
        ):
            _openssl(
                *("req", "-x509", "-new", *_NEW_EC_KEY, "-keyout", str(key), "-out", str(cert)),
                *("-days", "2", "-subj", f"/CN={name}", "-config", str(config), "-extensions", "ca"),
            )
        for cert, key, name, section in (
            (material.server_cert, material.server_key, "localhost", "server"),
            (material.client_cert, material.client_key, "dspy-service test client", "client"),
        ):
            request = directory / f"{section}.csr"
            _openssl(
                *("req", "-new", *_NEW_EC_KEY, "-keyout", str(key), "-out", str(request)),
                *("-subj", f"/CN={name}", "-config", str(config)),
            )
            _openssl(
                *("x509", "-req", "-in", str(request), "-out", str(cert), "-days", "2"),
                *("-CA", str(material.ca_file), "-CAkey", str(material.ca_key)),
                *("-set_serial", str(secrets.randbits(63))),
                *("-extfile", str(config), "-extensions", section),
            )
        return material


_NEW_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str) -> None:
    done = subprocess.run([_binary("openssl"), *args], capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.decode(errors='replace')}")


class TlsRedisServer(_Topology):
    """A redis-server that speaks only TLS (plain port 0) with the material's server certificate;
    with `require_client_cert` it refuses clients without a certificate signed by the test CA."""

    def __init__(
        self,
        workdir: Path,
        material: TlsMaterial,
        *,
        require_client_cert: bool = False,
        password: str | None = None,
    ) -> None:
        super().__init__()
        self.material = material
        self.require_client_cert = require_client_cert
        self.password = password
        self.port = free_port()
        tls: dict[str, Option] = {
            "port": 0,  # no plain-text port
            "tls-port": self.port,
            "tls-cert-file": str(material.server_cert),
            "tls-key-file": str(material.server_key),
            "tls-ca-cert-file": str(material.ca_file),
            "tls-auth-clients": "yes" if require_client_cert else "no",
        }
        if password is not None:
            tls["requirepass"] = password
        self.server = RedisProcess(workdir, "tls-redis", self.port, server_args(workdir, self.port, tls))
        self.processes = [self.server]

    @property
    def url(self) -> str:
        """rediss://[:password@]127.0.0.1:p/0"""
        return _redis_url("rediss", [f"{LOOPBACK}:{self.port}"], password=self.password) + "/0"

    def ssl_options(self, *, ca_file: Path | None = None, client_cert: bool | None = None) -> dict[str, Any]:
        """redis-py keywords for a verified TLS connection: the test CA (or `ca_file`) and, when the
        server asks for one (or `client_cert` says so), the client certificate."""
        options: dict[str, Any] = {
            "ssl": True,
            "ssl_ca_certs": str(ca_file or self.material.ca_file),
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,
        }
        if self.require_client_cert if client_cert is None else client_cert:
            options["ssl_certfile"] = str(self.material.client_cert)
            options["ssl_keyfile"] = str(self.material.client_key)
        return options

    def _start(self) -> None:
        self.server.start()
        self.server.wait_answers(password=self.password, **self.ssl_options())

    def kill(self) -> None:
        self.server.kill()

    def client(self, **options: Any) -> redis.Redis:
        """A verified TLS client (decode_responses=True unless `options` say otherwise)."""
        settings: dict[str, Any] = {
            "host": LOOPBACK,
            "port": self.port,
            "password": self.password,
            "decode_responses": True,
            **self.ssl_options(),
            **options,
        }
        return self._track(redis.Redis(**settings))


# --- ACL -----------------------------------------------------------------------------------------------


class AclRedisServer(_Topology):
    """A redis-server whose default user needs `admin_password` (for the test's own look inside), and
    one user that may run only `commands` on keys matching `key_pattern`.

    The user is made with `ACL SETUSER <user> on ><password> resetkeys <key_pattern> resetchannels
    -@all +<command>...`, then `extra_rules`. A command is given as "get" or "script|load"; one that
    starts with + or - (e.g. "+@read", "-flushall") is passed as written.
    """

    def __init__(
        self,
        workdir: Path,
        user: str,
        password: str,
        commands: Sequence[str],
        *,
        key_pattern: str = "~dspy-service:*",
        extra_rules: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.user = user
        self.password = password
        self.admin_password = secrets.token_hex(16)
        self.port = free_port()
        permissions = [c if c[:1] in "+-" else f"+{c}" for c in commands]
        self.rules = ["on", f">{password}", "resetkeys", key_pattern, "resetchannels", "-@all", *permissions]
        self.rules += extra_rules
        args = server_args(workdir, self.port, {"requirepass": self.admin_password})
        self.server = RedisProcess(workdir, "acl-redis", self.port, args)
        self.processes = [self.server]

    @property
    def url(self) -> str:
        """redis://user:password@127.0.0.1:p/0"""
        address = f"{LOOPBACK}:{self.port}"
        return _redis_url("redis", [address], username=self.user, password=self.password) + "/0"

    def _start(self) -> None:
        self.server.start()
        self.server.wait_answers(password=self.admin_password)
        with probe_client(self.port, password=self.admin_password) as admin:
            admin.execute_command("ACL SETUSER", self.user, *self.rules)

    def admin_client(self, **options: Any) -> redis.Redis:
        """A client as the default user, which may do anything."""
        settings: dict[str, Any] = {
            "host": LOOPBACK,
            "port": self.port,
            "password": self.admin_password,
            "decode_responses": True,
            **options,
        }
        return self._track(redis.Redis(**settings))

    def client(self, **options: Any) -> redis.Redis:
        """A client as the limited user."""
        return self.admin_client(username=self.user, password=self.password, **options)

    def acl_log(self) -> list[dict[str, Any]]:
        """What the server refused and why (ACL LOG, newest first), as redis-py parses it: each entry
        has "username", "reason" ("command", "key", "channel" or "auth"), "object" (the command or
        key), "context" and "count"."""
        with probe_client(self.port, password=self.admin_password) as admin:
            entries: list[dict[str, Any]] = admin.acl_log()
            return entries

    def acl_log_reset(self) -> None:
        with probe_client(self.port, password=self.admin_password) as admin:
            admin.acl_log_reset()
