"""The Redis side of the teacher-output cache (:mod:`mtkd.cache`): a store over redis-py, a private
``redis-server`` for ``cache.url: local``, and :func:`open_store` that picks one from the config.

The cache only accelerates. A Redis that cannot be reached (at start-up or mid-run) is logged once
per outage; lookups are then misses and writes are dropped, and the store tries again after
``retry_after_s``, so a Redis that comes back is used again. A Redis that refuses the password
(wrong or missing) is handled the same way, with a warning that says so. Memory is bounded by Redis
itself (``maxmemory`` with ``allkeys-lru``).

The password of a shared Redis comes from the environment variable ``MTKD_REDIS_PASSWORD`` of each
process that connects (driver, teacher actors, learners), so that no config, command line or Ray
job entrypoint holds it; a password in the URL itself still wins.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mtkd.config import ConfigError
from mtkd.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")
_OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
PASSWORD_ENV = "MTKD_REDIS_PASSWORD"  # the password of a Redis whose URL has none


class RedisServerError(UserError, ValueError):  # the CLI prints one line, exits 2
    """A private ``redis-server`` could not be started; the message says why and how to fix it."""


def redacted(url: str) -> str:
    """``url`` without its password (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def env_credentials(url: str) -> dict:
    """redis-py keyword arguments for the password in ``$MTKD_REDIS_PASSWORD``: none when the
    variable is unset or empty, or when ``url`` holds a password itself (which wins).

    The user is ``default`` unless ``url`` names one (a username in the URL wins too): Redis accepts
    ``AUTH default <password>`` both from a server with that password and from one without any (a
    private ``cache.url: local`` server), where a bare ``AUTH <password>`` is an error.
    """
    password = os.environ.get(PASSWORD_ENV)
    if not password or urlsplit(url).password:
        return {}
    return {"password": password, "username": "default"}  # redis-py: options in the URL override these


class RedisStore:
    """An :class:`mtkd.cache.OutputStore` over redis-py.

    Args:
        url: ``redis://[:password@]host:port[/db]``, ``rediss://...`` (TLS) or ``unix:///path.sock``.
            Without a password in it, the password is ``$MTKD_REDIS_PASSWORD`` of this process, if
            set (:func:`env_credentials`). It is read where the store is built: a pickled copy (a
            Ray actor's) reads the environment of its own process, and the password never travels.
        timeout_s: connect and read timeout of every call.
        retry_after_s: after a failure, calls return misses at once for this long, then try again.
        chunk: keys per MGET (the pipeline of one ``get_many`` holds ``ceil(B / chunk)`` MGETs).

    Never raises on Redis errors: ``get_many`` returns misses, ``put_many`` drops the writes,
    ``used_bytes`` returns None; one warning is logged per outage, where a server that refuses the
    password (wrong or missing: ``AuthenticationError``) counts as one, and says so. Thread-safe.
    Picklable (a copy connects anew), so it can be handed to a Ray actor.
    """

    def __init__(self, url: str, *, timeout_s: float = 2.0, retry_after_s: float = 5.0, chunk: int = 1024):
        if chunk < 1:
            raise ValueError(f"RedisStore: chunk={chunk}; expected >= 1")
        self.url, self.timeout_s, self.retry_after_s, self.chunk = url, timeout_s, retry_after_s, chunk
        # one immediate retry on a fresh connection (a pooled one may be stale after a restart); the
        # outage logic below does the rest, so a dead server costs one refused connect per retry_after_s
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry=Retry(NoBackoff(), 1), decode_responses=False,
                                           **env_credentials(url))
        self._lock = threading.Lock()
        self._down_until: float | None = None  # monotonic time of the next try while down
        self._warned_errors: set[str] = set()

    def __getstate__(self) -> dict:
        return {"url": self.url, "timeout_s": self.timeout_s, "retry_after_s": self.retry_after_s, "chunk": self.chunk}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state.pop("url"), **state)

    def __repr__(self) -> str:
        return f"RedisStore({redacted(self.url)!r})"

    @property
    def available(self) -> bool:
        """False during an outage (until the next try)."""
        return self._down_until is None

    # ------------------------------------------------------------------ OutputStore
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` (None where absent), in one pipeline of MGETs of ``chunk`` keys."""
        keys = list(keys)
        if not keys:
            return []

        def read() -> list[bytes | None]:
            pipe = self.client.pipeline(transaction=False)
            for start in range(0, len(keys), self.chunk):
                pipe.mget(keys[start : start + self.chunk])
            return [value for part in pipe.execute() for value in part]

        return self._call(read, [None] * len(keys))

    def put_many(self, items: Mapping[str, bytes]) -> None:
        """Store every ``key: value`` (one pipeline of SETs); dropped when Redis cannot be reached."""
        if not items:
            return

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(key, value)
            pipe.execute()

        self._call(write, None)

    def used_bytes(self) -> int | None:
        """``INFO memory`` ``used_memory`` of the server, or None when it cannot be reached."""
        return self._call(lambda: int(self.client.info("memory")["used_memory"]), None)

    # ------------------------------------------------------------------ more
    def ping(self) -> bool:
        """Whether the server answers now (an outage is logged as by any call)."""
        return bool(self._call(self.client.ping, False, force=True))

    def memory_policy(self) -> tuple[int, str] | None:
        """``(maxmemory in bytes, maxmemory_policy)`` of the server, or None when it cannot be reached."""
        def read() -> tuple[int, str]:
            info = self.client.info("memory")
            return int(info["maxmemory"]), str(info["maxmemory_policy"])

        return self._call(read, None)

    def close(self) -> None:
        """Close the connections (the store may still be used: it reconnects)."""
        self.client.close()

    def _call(self, call: Callable[[], T], fallback: T, force: bool = False) -> T:
        with self._lock:
            down_until = self._down_until
        if down_until is not None and time.monotonic() < down_until and not force:
            return fallback
        try:
            result = call()
        except _OUTAGE_ERRORS as exc:
            with self._lock:
                first = self._down_until is None
                self._down_until = time.monotonic() + self.retry_after_s
            if first and isinstance(exc, redis.AuthenticationError):  # WRONGPASS, NOAUTH, ... (a ConnectionError)
                log.warning("redis at %s: authentication failed (%s: %s); set %s to the server's password on "
                            "every node; computing teacher outputs without the cache (retrying every %gs)",
                            redacted(self.url), type(exc).__name__, exc, PASSWORD_ENV, self.retry_after_s)
            elif first:
                log.warning("redis at %s is unreachable (%s: %s); computing teacher outputs without the cache "
                            "(retrying every %gs)", redacted(self.url), type(exc).__name__, exc, self.retry_after_s)
            return fallback
        except redis.RedisError as exc:  # an answer, but an error (e.g. OOM under noeviction): not an outage
            kind = f"{type(exc).__name__}: {str(exc).split(' ', 1)[0]}"
            with self._lock:
                first = kind not in self._warned_errors
                self._warned_errors.add(kind)
            if first:
                log.warning("redis at %s answered with an error (%s: %s); the cache skips that call and carries on",
                            redacted(self.url), type(exc).__name__, exc)
            return fallback
        with self._lock:
            was_down, self._down_until = self._down_until is not None, None
        if was_down:
            log.info("redis at %s is reachable again; using the cache", redacted(self.url))
        return result


# ----------------------------------------------------------------------------- local server
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it; never a fixed one such as 6379)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalRedisServer:
    """A private ``redis-server`` on a free loopback port, for ``cache.url: local``.

    No persistence (``--save '' --appendonly no``), memory bounded by ``maxmemory`` with
    ``allkeys-lru``. Use as a context manager (stopped on exit, and at interpreter exit if the
    caller forgets); ``url`` is ``redis://127.0.0.1:<port>/0``.

    Args:
        max_memory_mb: the server's ``maxmemory`` in MiB.
        port: a port to use (default: a free one, picked again if another process takes it first).
        binary: the ``redis-server`` executable (name on PATH or path).
        start_timeout_s: how long to wait for the first PING answer.
    """

    def __init__(self, max_memory_mb: int = 2048, *, port: int | None = None, binary: str = "redis-server",
                 start_timeout_s: float = 20.0):
        if not isinstance(max_memory_mb, int) or max_memory_mb < 1:
            raise ValueError(f"LocalRedisServer: max_memory_mb={max_memory_mb!r}; expected an int >= 1")
        self.max_memory_mb, self.binary, self.start_timeout_s = max_memory_mb, binary, start_timeout_s
        self.requested_port = port
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._folder: str | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("LocalRedisServer: not started; use it as a context manager or call start()")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> "LocalRedisServer":
        """Start the server and wait until it answers PING.

        Raises:
            RedisServerError: the binary is missing, exits, or does not answer in ``start_timeout_s``.
        """
        if self.process is not None:
            return self
        executable = shutil.which(self.binary)
        if executable is None:
            raise RedisServerError(f"cannot start a local Redis for cache.url=local: {self.binary!r} was not found on "
                                   f"PATH; install it (apt-get install redis-server) or set cache.url to a running "
                                   f"redis://host:port")
        attempts = 1 if self.requested_port else 3  # a free port can be taken by someone else before we bind it
        for attempt in range(attempts):
            self._folder = tempfile.mkdtemp(prefix="mtkd-redis-")
            try:
                self._launch(executable, self.requested_port or free_port())
                break
            except RedisServerError:
                taken = self._port_taken()
                self.stop()
                if attempt == attempts - 1 or not taken:
                    raise
        atexit.register(self.stop)
        return self

    def _launch(self, executable: str, port: int) -> None:
        log_path = Path(self._folder, "redis.log")
        command = [executable, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                   "--maxmemory", f"{self.max_memory_mb}mb", "--maxmemory-policy", "allkeys-lru",
                   "--dir", self._folder, "--logfile", str(log_path), "--daemonize", "no", "--protected-mode", "yes"]
        self.port = port
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=1.0,
                             retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                if self.process.poll() is not None:
                    raise RedisServerError(f"{executable} exited with code {self.process.returncode} while starting on "
                                           f"127.0.0.1:{port}: {_tail(log_path)}")
                try:  # answered by this process (not by another server that holds the port)?
                    if int(client.info("server")["process_id"]) == self.process.pid:
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RedisServerError(f"{executable} on 127.0.0.1:{port} did not answer PING within "
                                           f"{self.start_timeout_s:g}s: {_tail(log_path)}")
                time.sleep(0.02)
        finally:
            client.close()

    def _port_taken(self) -> bool:
        return "Address already in use" in _tail(Path(self._folder or "/nonexistent", "redis.log"))

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its folder; idempotent."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        atexit.unregister(self.stop)

    def __enter__(self) -> "LocalRedisServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port {self.port}, pid {self.pid}" if self.process is not None else "stopped"
        return f"LocalRedisServer({self.max_memory_mb} MiB, {state})"


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


# ---------------------------------------------------------------------------- from the config
@contextlib.contextmanager
def open_store(url: str | None, max_memory_mb: int) -> Iterator[RedisStore | None]:
    """The store of ``cache.url``: None -> None; ``local`` -> a :class:`LocalRedisServer` of
    ``max_memory_mb`` and a store on it (both stopped on exit); ``redis://...``, ``rediss://...``,
    ``unix://...`` -> a store on that server, with the password of ``$MTKD_REDIS_PASSWORD`` when the
    URL has none (:class:`RedisStore`; the private ``local`` server has none and needs none). An
    unreachable server at start-up, or one that refuses the password, is a warning, not an error; a
    server without a memory bound or with an evicting policy other than LRU is a warning too.

    Raises:
        ConfigError: ``url`` is none of the above.
        RedisServerError: ``local`` and the server cannot be started.
    """
    if url is None:
        yield None
        return
    if url == "local":
        with LocalRedisServer(max_memory_mb) as server:
            store = RedisStore(server.url)
            try:
                yield store
            finally:
                store.close()
        return
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"cache.url: {redacted(url)!r}; expected local, redis://host:port[/db], rediss://... or "
                         f"unix:///path/to/redis.sock")
    store = RedisStore(url)
    try:
        if store.ping():
            _check_memory_policy(store)
        yield store
    finally:
        store.close()


def _check_memory_policy(store: RedisStore) -> None:
    policy = store.memory_policy()
    if policy is None:
        return
    maxmemory, name = policy
    if maxmemory == 0:
        log.warning("redis at %s has no maxmemory: the teacher-output cache will grow without bound; set "
                    "maxmemory and maxmemory-policy allkeys-lru on that server", redacted(store.url))
    elif name != "allkeys-lru":
        log.warning("redis at %s evicts with maxmemory-policy %s, not allkeys-lru (the cache sets no TTLs)%s",
                    redacted(store.url), name, "; writes will fail once it is full" if name == "noeviction" else "")
