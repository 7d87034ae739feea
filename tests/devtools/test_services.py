"""The embedded servers: real redis-server and postgres processes, killed and started again."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import asyncpg
import pytest
import redis
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

import devtools.services
from devtools.services import (
    DevServiceError,
    PostgresServer,
    RedisCluster,
    RedisSentinel,
    RedisServer,
    find_postgres_bindir,
    find_redis_cli,
    find_redis_server,
    free_port,
    tcp_reachable,
)

needs_redis = pytest.mark.skipif(find_redis_server() is None, reason="no redis-server binary")
needs_redis_cli = pytest.mark.skipif(
    find_redis_server() is None or find_redis_cli() is None, reason="no redis-server or redis-cli"
)
needs_postgres = pytest.mark.skipif(find_postgres_bindir() is None, reason="no PostgreSQL binaries")
LINUX = sys.platform.startswith("linux")


def children(pid: int) -> list[int]:
    """Direct children of pid, from /proc ([] elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def remaining(pids: list[int]) -> list[int]:
    """Those of pids that still exist, zombies included."""
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def client_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, retry=Retry(NoBackoff(), 0))


def test_free_port_prefers_the_given_port_when_free() -> None:
    port = free_port()
    assert free_port(port) == port
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert tcp_reachable("127.0.0.1", port)
        assert free_port(port) != port
    assert not tcp_reachable("127.0.0.1", port, timeout=0.2)


@needs_redis
def test_redis_killed_then_started_again_on_the_same_port(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = client_for(server.url)
        try:
            client.set("greeting", "hello")
            assert client.get("greeting") == b"hello"
            pid = server.pid
            assert pid is not None

            server.kill()
            assert not server.running
            assert remaining([pid]) == []
            with pytest.raises(redis.ConnectionError):
                client.ping()

            server.start()
            assert client.ping()
            assert client.get("greeting") is None  # persist=False: nothing saved
        finally:
            client.close()
    assert not server.running
    assert not tcp_reachable("127.0.0.1", server.port, timeout=0.2)


@needs_redis
def test_redis_persist_keeps_data_across_a_stop(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", persist=True)
    with server:
        client = client_for(server.url)
        try:
            client.set("kept", "yes")
        finally:
            client.close()
    with server:
        client = client_for(server.url)
        try:
            assert client.get("kept") == b"yes"
        finally:
            client.close()


@needs_redis
def test_redis_start_stops_a_server_left_in_its_workdir(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as first, RedisServer(tmp_path / "redis") as second:
        assert not first.running
        assert not tcp_reachable("127.0.0.1", first.port, timeout=0.2)
        client = client_for(second.url)
        try:
            assert client.ping()
        finally:
            client.close()


# Adds ARGV[1] to the counter at KEYS[1] and answers the new value with the key's slot owner.
COUNTER_SCRIPT = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
return {value, redis.call('CLUSTER', 'MYID')}
"""


@needs_redis_cli
async def test_redis_cluster_serves_keys_and_scripts_in_every_slot_range(tmp_path: Path) -> None:
    with RedisCluster(tmp_path / "cluster") as cluster:
        ports = cluster.ports
        assert len(ports) == len(set(ports)) == 3
        assert cluster.url == f"redis://127.0.0.1:{ports[0]}/0"
        assert [node.port for node in cluster.nodes] == ports
        pids = [node.pid for node in cluster.nodes]
        client = ClusterClient.from_url(cluster.url, socket_timeout=2)
        try:
            await client.initialize()
            owners: dict[int, str] = {}  # one key per node, so per slot range
            for n in range(100):
                owner = client.get_node_from_key(f"counter:{n}")
                assert owner is not None
                owners.setdefault(int(owner.port), f"counter:{n}")
            assert sorted(owners) == sorted(ports)
            keys = list(owners.values())
            assert len({client.keyslot(key) for key in keys}) == 3

            for key in keys:
                assert await client.set(key, 1)
                assert await client.get(key) == b"1"

            sha = await client.script_load(COUNTER_SCRIPT)
            node_ids: dict[int, bytes] = {}
            for node in cluster.nodes:  # SCRIPT LOAD went to every primary
                direct = client_for(node.url)
                try:
                    assert direct.script_exists(sha) == [True]
                    node_ids[node.port] = direct.execute_command("CLUSTER MYID")  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                finally:
                    direct.close()

            # redis-py blocks ClusterPipeline.evalsha() (it raises RedisClusterException); the
            # command itself is fine, and routed to the node of its first key.
            pipe = client.pipeline()
            for key in keys:
                pipe.execute_command("EVALSHA", sha, 1, key, 41)
            replies = await pipe.execute()
            assert replies == [[42, node_ids[port]] for port in owners]
            for key in keys:
                assert await client.get(key) == b"42"
        finally:
            await client.aclose()
    assert not cluster.running
    assert remaining([pid for pid in pids if pid is not None]) == []
    for port in ports:  # neither the client port nor the cluster bus answers any more
        assert not tcp_reachable("127.0.0.1", port, timeout=0.2)
        assert not tcp_reachable("127.0.0.1", port + 10000, timeout=0.2)


def test_redis_cluster_without_redis_cli_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devtools.services, "find_redis_cli", lambda: None)
    cluster = RedisCluster(tmp_path / "cluster")
    with pytest.raises(DevServiceError, match="no redis-cli"):
        cluster.start()
    assert not any(node.running for node in cluster.nodes)


@needs_redis
async def test_redis_sentinel_hands_clients_the_master(tmp_path: Path) -> None:
    with (
        RedisServer(tmp_path / "master") as master,
        RedisSentinel(tmp_path / "sentinel", master) as sentinel,
    ):
        assert sentinel.service == "mymaster"
        assert sentinel.address == f"127.0.0.1:{sentinel.port}"
        pid = sentinel.pid
        sentinels = Sentinel([("127.0.0.1", sentinel.port)], socket_timeout=2)
        client = sentinels.master_for("mymaster", socket_timeout=2)
        try:
            assert await sentinels.discover_master("mymaster") == ("127.0.0.1", master.port)
            assert await client.set("greeting", "hello")
            assert await client.get("greeting") == b"hello"
        finally:
            await client.aclose()
            await sentinels.aclose()
    assert "sentinel myid" in sentinel.config.read_text()  # its rewrite of our config
    assert not sentinel.running
    assert remaining([pid] if pid is not None else []) == []
    assert not tcp_reachable("127.0.0.1", sentinel.port, timeout=0.2)


@needs_postgres
async def test_postgres_stopped_killed_and_started_again(tmp_path: Path) -> None:
    with PostgresServer(tmp_path / "pg") as server:
        url = server.create_database("demo")
        assert url == f"postgresql://postgres@127.0.0.1:{server.port}/demo"
        assert server.create_database("demo") == url
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT current_database()") == "demo"
            await conn.execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
        finally:
            await conn.close()

        server.stop()
        assert not server.running
        with pytest.raises(OSError):
            await asyncpg.connect(url, timeout=2)

        server.start()
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT v FROM t") == 1
            pid = server.pid
            assert pid is not None
            tree = [pid, *children(pid)]
            assert len(tree) > 1 or not LINUX  # checkpointer, walwriter, this backend, ...

            server.kill()
            assert remaining(tree) == []
            with pytest.raises((asyncpg.PostgresConnectionError, OSError)):
                await conn.fetchval("SELECT 1")
        finally:
            conn.terminate()
        with pytest.raises(OSError):
            await asyncpg.connect(url, timeout=2)

        server.start()  # crash recovery, stale postmaster.pid
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT v FROM t") == 1
        finally:
            await conn.close()
    assert not tcp_reachable("127.0.0.1", server.port, timeout=0.2)
