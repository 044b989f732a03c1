"""What every mtkd gRPC server and client shares: setup, security, health, errors.

Servers (:func:`start_server`) bind to loopback unless told otherwise (plaintext on
another address only with ``insecure=True``), can use TLS and a bearer token, limit
message sizes and concurrent calls, and register the standard
``grpc.health.v1.Health`` service with each service SERVING; :func:`stop` flips them
to NOT_SERVING before shutting down. Every setting is checked before anything is
bound, with a ``ValueError`` (or :class:`BindError`) that says what was wrong.
Servicer methods wrapped in :func:`translate_errors` answer ``INVALID_ARGUMENT`` for
malformed requests, the code of an :class:`RpcFailure`, ``INTERNAL`` (with a logged
traceback) only for server faults, and keep serving.
"""
from __future__ import annotations

import errno
import functools
import hmac
import inspect
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, NamedTuple, Union

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mtkd.errors import UserError

from services.convert import InvalidMessage

__all__ = [
    "DEFAULT_MAX_CONCURRENT_RPCS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_MESSAGE_BYTES_LIMIT",
    "BindError",
    "Pem",
    "RpcFailure",
    "Service",
    "auth_metadata",
    "check_port_free",
    "check_tls_pair",
    "is_loopback",
    "open_channel",
    "start_server",
    "stop",
    "translate_errors",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Default send and receive limit for one message, servers and clients (gRPC's is 4 MiB)."""
MAX_MESSAGE_BYTES_LIMIT = 2**31 - 1
"""Largest message limit gRPC takes (its sizes are signed 32-bit integers)."""
DEFAULT_MAX_CONCURRENT_RPCS = 64
"""Calls a server accepts at once (running or queued); more get RESOURCE_EXHAUSTED."""
MAX_PORT = 65535

Pem = Union[str, os.PathLike, bytes]
"""A PEM file's path, or its contents as bytes."""

_HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
_health_of: weakref.WeakKeyDictionary[grpc.Server, health.HealthServicer] = weakref.WeakKeyDictionary()


class Service(NamedTuple):
    """A servicer and how to register it.

    Attributes:
        name: Full service name for health checking, e.g. ``"mtkd.v1.TeacherService"``.
        add_to_server: The generated ``add_<Name>Servicer_to_server`` function.
        servicer: The servicer instance.
    """

    name: str
    add_to_server: Callable[[Any, grpc.Server], None]
    servicer: Any


class RpcFailure(UserError):
    """Raised in a servicer to end the call with a given status code and message (a user error: the
    caller asked for something the server refuses)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class BindError(RuntimeError):
    """The server could not listen on its address (port in use, or address not local)."""


def _status_for(err: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The status of a failed call. Only server faults (INTERNAL) log a traceback."""
    if isinstance(err, RpcFailure):
        code, message = err.code, str(err)
    elif isinstance(err, InvalidMessage):
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(err)
    else:
        log.exception("%s failed", method)
        return grpc.StatusCode.INTERNAL, f"{method} failed on the server: {type(err).__name__}: {err}"
    log.debug("%s refused with %s: %s", method, code.name, message)
    return code, message


def translate_errors(method: Callable) -> Callable:
    """Wrap a servicer method (unary or server-streaming) so exceptions become statuses.

    :class:`~services.convert.InvalidMessage` -> ``INVALID_ARGUMENT``,
    :class:`RpcFailure` -> its code (both logged at DEBUG level, no traceback), any
    other exception -> ``INTERNAL`` (logged with its traceback). The message always
    says what went wrong.
    """
    name = method.__name__
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as err:  # noqa: BLE001 - every failure becomes a status
                context.abort(*_status_for(err, name))

        return stream_wrapper

    @functools.wraps(method)
    def unary_wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as err:  # noqa: BLE001 - every failure becomes a status
            context.abort(*_status_for(err, name))

    return unary_wrapper


# (request streaming, response streaming) -> factory of a handler of that kind
_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class _BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without metadata ``authorization: Bearer <token>`` (health exempt)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_HEALTH_METHOD_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        got = metadata.get("authorization", "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self._expected):
            return handler
        message = (
            "invalid bearer token" if got else
            "missing bearer token; expected metadata 'authorization: Bearer <token>'"
        )

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        make = _HANDLER_FACTORIES[handler.request_streaming, handler.response_streaming]
        return make(deny, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def _read_pem(pem: Pem) -> bytes:
    return pem if isinstance(pem, bytes) else Path(pem).read_bytes()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_tls_pair(tls_cert: Pem, tls_key: Pem) -> None:
    """Check that ``tls_cert`` is a PEM certificate chain and ``tls_key`` its unencrypted private key.

    The pair is loaded with ``ssl.SSLContext.load_cert_chain``, which verifies that
    the key matches the chain's first certificate.

    Raises:
        ValueError: A file cannot be read, is not PEM, the key is encrypted, or the
            key does not match the certificate.
    """
    def label(pem: Pem, what: str) -> str:
        return f"{what} ({len(pem)} bytes)" if isinstance(pem, bytes) else f"{what} {os.fspath(pem)!r}"

    contents = {}
    for what, pem in (("tls_cert", tls_cert), ("tls_key", tls_key)):
        try:
            contents[what] = _read_pem(pem)
        except OSError as err:
            raise ValueError(f"cannot read {label(pem, what)}: {err.strerror or err}") from err
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:  # load_cert_chain reads files; the folder is private (0700)
        paths = {what: Path(tmp, what + ".pem") for what in contents}
        for what, path in paths.items():
            path.write_bytes(contents[what])
        try:
            context.load_cert_chain(paths["tls_cert"], paths["tls_key"], password=lambda: b"")
        except ssl.SSLError as err:
            if err.reason == "KEY_VALUES_MISMATCH":
                raise ValueError(f"{label(tls_key, 'tls_key')} does not match the certificate in "
                                 f"{label(tls_cert, 'tls_cert')}; expected the private key of that certificate") from err
            raise ValueError(f"cannot load the TLS pair {label(tls_cert, 'tls_cert')}, {label(tls_key, 'tls_key')}: "
                             f"{err.reason or err}; expected a PEM certificate chain and its unencrypted PEM private "
                             "key") from err


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`BindError` if ``host:port`` cannot be listened on (port 0 is always free).

    A probe before gRPC binds, so that a taken port is one clear error rather than
    gRPC's core log lines; gRPC's own bind failure is still caught after it.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise BindError(f"Failed to bind {_address(host, port)}: cannot resolve host {host!r} ({err.strerror})") from err
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: ignore TIME_WAIT leftovers
            try:
                probe.bind(sockaddr)
            except OSError as err:
                reason = "the port is in use" if err.errno == errno.EADDRINUSE else err.strerror
                raise BindError(f"Failed to bind {_address(host, port)}: {reason}") from err


def _check_settings(host: str, port: int, max_message_bytes: int, max_workers: int, max_concurrent_rpcs: int,
                    tls_cert: Pem | None, tls_key: Pem | None, token: str | None, insecure: bool) -> None:
    """Every :func:`start_server` setting, before anything is bound; see there for the errors."""
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"port {port} is out of range; expected 0..{MAX_PORT} (0: any free port)")
    if not 1 <= max_message_bytes <= MAX_MESSAGE_BYTES_LIMIT:
        raise ValueError(f"max_message_bytes is {max_message_bytes}; expected 1..{MAX_MESSAGE_BYTES_LIMIT} "
                         "(gRPC sizes are 32-bit)")
    if max_workers < 1 or max_concurrent_rpcs < 1:
        raise ValueError(f"max_workers is {max_workers} and max_concurrent_rpcs {max_concurrent_rpcs}; "
                         "expected both >= 1")
    if (tls_cert is None) != (tls_key is None):
        given = "tls_cert" if tls_cert is not None else "tls_key"
        raise ValueError(f"TLS needs both tls_cert and tls_key; got only {given}")
    if token is not None and not token:
        raise ValueError("token is empty; an empty token would disable authentication (pass None for no token)")
    if tls_cert is not None:
        check_tls_pair(tls_cert, tls_key)
    if is_loopback(host):
        return
    if tls_cert is None and not insecure:
        raise ValueError(f"refusing a plaintext server on {host}, which is not a loopback address: anyone on the "
                         "network could read its traffic. Give tls_cert and tls_key (and a token), or pass "
                         "insecure=True (--insecure) to serve plaintext anyway")
    if tls_cert is None:
        log.warning(
            "plaintext gRPC server on %s: %s", host,
            "the bearer token and all data cross the network unencrypted (use TLS)" if token else
            "anyone who can reach it can use it (no token), and all data cross the network unencrypted (no TLS)",
        )
    elif token is None:
        log.warning("gRPC server on %s uses TLS but no token: anyone who can reach it can use it", host)


def start_server(
    services: Sequence[Service],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls_cert: Pem | None = None,
    tls_key: Pem | None = None,
    token: str | None = None,
    max_workers: int = 4,
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    insecure: bool = False,
) -> tuple[grpc.Server, int]:
    """Create, configure and start a gRPC server for ``services`` plus health checking.

    Args:
        services: The servicers to register.
        host: Interface to bind; loopback by default. Use ``"0.0.0.0"`` (with TLS and a
            token) to expose the server.
        port: TCP port, 0..65535; 0 picks a free one.
        max_message_bytes: Largest message the server sends or receives, 1..2**31 - 1.
        tls_cert: Server certificate chain (PEM path or bytes); with ``tls_key``
            enables TLS.
        tls_key: Server private key (PEM path or bytes), unencrypted, matching ``tls_cert``.
        token: If set, every call except health checks must carry metadata
            ``authorization: Bearer <token>``, else it fails with UNAUTHENTICATED.
        max_workers: Threads serving calls.
        max_concurrent_rpcs: Calls accepted at once (running or waiting for a
            thread); further calls fail at once with RESOURCE_EXHAUSTED instead of
            queueing without bound.
        insecure: Allow plaintext (no TLS) on an address that is not loopback; a
            warning is logged. Without it such a server is refused.

    Returns:
        ``(server, bound_port)``; the server is started.

    Raises:
        ValueError: A setting out of range, only one of ``tls_cert`` and ``tls_key``,
            a TLS key that does not match its certificate, an empty token, or
            plaintext on a non-loopback address without ``insecure``.
        BindError: The address could not be bound (a ``RuntimeError``).
    """
    _check_settings(host, port, max_message_bytes, max_workers, max_concurrent_rpcs, tls_cert, tls_key, token,
                    insecure)
    check_port_free(host, port)
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
    ]
    interceptors = [_BearerTokenInterceptor(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors,
                         options=options, maximum_concurrent_rpcs=max_concurrent_rpcs)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in services:
        service.add_to_server(service.servicer, server)
    address = _address(host, port)
    try:
        if tls_cert is None:
            bound = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials([(_read_pem(tls_key), _read_pem(tls_cert))])
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as err:  # gRPC: "Failed to bind to address ..."
        raise BindError(f"Failed to bind {address}: the port is in use or the address is not local") from err
    if not bound:
        raise BindError(f"Failed to bind {address}: the port is in use or the address is not local")
    server.start()
    for name in ("", *(s.name for s in services)):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _health_of[server] = health_servicer
    log.info("gRPC %s listening on %s (%s)", [s.name for s in services], _address(host, bound),
             "TLS" if tls_cert else "plaintext")
    return server, bound


def stop(server: grpc.Server, grace: float | None = 5.0, *, drain: float = 0.0) -> threading.Event:
    """Report NOT_SERVING for every service, then stop the server.

    Args:
        server: A server from :func:`start_server`.
        grace: Seconds in-flight calls may still run (None: cancel them at once).
        drain: Seconds to keep accepting calls after flipping health, so that load
            balancers and probes can see NOT_SERVING first.

    Returns:
        The event that is set once the server has stopped.
    """
    health_servicer = _health_of.pop(server, None)
    if health_servicer is not None:
        health_servicer.enter_graceful_shutdown()
    if drain > 0:
        time.sleep(drain)
    return server.stop(grace)


def open_channel(
    address: str,
    *,
    root_cert: Pem | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    """A client channel; TLS when ``root_cert`` (the CA or self-signed cert) is given."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if root_cert is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=_read_pem(root_cert))
    return grpc.secure_channel(address, credentials, options=options)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` as a bearer token (empty without a token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()
