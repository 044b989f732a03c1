"""What every mtkd gRPC server and client shares: setup, security, health, errors.

Servers (:func:`start_server`) bind to loopback unless told otherwise, can use TLS
and a bearer token, limit message sizes, and register the standard
``grpc.health.v1.Health`` service with each service SERVING; :func:`stop` flips them
to NOT_SERVING before shutting down. Servicer methods wrapped in
:func:`translate_errors` answer ``INVALID_ARGUMENT`` for malformed requests,
``INTERNAL`` for backend failures, and keep serving.
"""
from __future__ import annotations

import functools
import hmac
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, NamedTuple, Union

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.convert import InvalidMessage

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Pem",
    "RpcFailure",
    "Service",
    "auth_metadata",
    "open_channel",
    "start_server",
    "stop",
    "translate_errors",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Default send and receive limit for one message, servers and clients (gRPC's is 4 MiB)."""

Pem = Union[str, os.PathLike, bytes]
"""A PEM file's path, or its contents as bytes."""

_HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
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


class RpcFailure(Exception):
    """Raised in a servicer to end the call with a given status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _status_for(err: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(err, RpcFailure):
        return err.code, str(err)
    if isinstance(err, InvalidMessage):
        return grpc.StatusCode.INVALID_ARGUMENT, str(err)
    log.exception("%s failed", method)
    return grpc.StatusCode.INTERNAL, f"{method} failed on the server: {type(err).__name__}: {err}"


def translate_errors(method: Callable) -> Callable:
    """Wrap a servicer method (unary or server-streaming) so exceptions become statuses.

    :class:`~services.convert.InvalidMessage` -> ``INVALID_ARGUMENT``,
    :class:`RpcFailure` -> its code, any other exception -> ``INTERNAL`` (logged with
    its traceback). The message always says what went wrong.
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
) -> tuple[grpc.Server, int]:
    """Create, configure and start a gRPC server for ``services`` plus health checking.

    Args:
        services: The servicers to register.
        host: Interface to bind; loopback by default. Use ``"0.0.0.0"`` (with TLS and a
            token) to expose the server.
        port: TCP port; 0 picks a free one.
        max_message_bytes: Largest message the server sends or receives.
        tls_cert: Server certificate chain (PEM path or bytes); with ``tls_key``
            enables TLS.
        tls_key: Server private key (PEM path or bytes).
        token: If set, every call except health checks must carry metadata
            ``authorization: Bearer <token>``, else it fails with UNAUTHENTICATED.
        max_workers: Threads serving calls.

    Returns:
        ``(server, bound_port)``; the server is started.

    Raises:
        ValueError: Only one of ``tls_cert`` and ``tls_key`` given.
        RuntimeError: The address could not be bound.
    """
    if (tls_cert is None) != (tls_key is None):
        given = "tls_cert" if tls_cert is not None else "tls_key"
        raise ValueError(f"TLS needs both tls_cert and tls_key; got only {given}")
    if host not in _LOOPBACK_HOSTS and (tls_cert is None or token is None):
        log.warning("gRPC server on %s without %s: anyone who can reach it can use it",
                    host, "TLS" if tls_cert is None else "a token")
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
    ]
    interceptors = [_BearerTokenInterceptor(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=interceptors, options=options)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in services:
        service.add_to_server(service.servicer, server)
    address = _address(host, port)
    if tls_cert is None:
        bound = server.add_insecure_port(address)
    else:
        credentials = grpc.ssl_server_credentials([(_read_pem(tls_key), _read_pem(tls_cert))])
        bound = server.add_secure_port(address, credentials)
    if not bound:
        raise RuntimeError(f"could not bind a gRPC server to {address}")
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
