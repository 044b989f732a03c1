"""The MTKD-RL agent served over gRPC (``mtkd.v1.AgentService``), and its client.

The servicer only translates: it validates each request, decodes it into tensors,
calls a backend, and encodes the result. The backend is any object with

* ``describe() -> dict`` with keys ``num_teachers``, ``state_dim``, ``version``,
  ``rule``, ``mixing``;
* ``act(states [B, state_dim]) -> (weight_logit [B, M], weight_feature [B, M], version)``;
* ``observe(states, reward [B], weight_logit=None, weight_feature=None) -> (version, updated)``;
* ``end_epoch() -> (version, updated)``;
* ``policy() -> (version, state_dict)``.

:class:`RemoteAgent` has the same methods, so it can stand wherever a local agent does.

Requests are validated before the backend sees them (dtype, shapes, finite values,
``|state| <= max_abs_state``, ``|reward| <= max_abs_reward``); the library agent then
validates the rest of an Observe (weights on the simplex, the reinforce rule's weights
present) with :class:`mtkd.distill.agent.InvalidExperience`, answered with
``INVALID_ARGUMENT``. An update that fails (:class:`mtkd.distill.agent.AgentUpdateError`:
the agent restored its policy and dropped its stored batches) is ``FAILED_PRECONDITION``.
Act's weights are checked before they are sent: never NaN with OK.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import grpc
import torch

from mtkd.distill.agent import MAX_ABS_REWARD, MAX_ABS_STATE, AgentUpdateError, InvalidExperience
from services._generated.mtkd.v1 import agent_pb2, agent_pb2_grpc
from services.convert import (
    InvalidMessage,
    agent_info_from_proto,
    agent_info_to_proto,
    decode_field,
    policy_from_proto,
    policy_to_proto,
    proto_to_tensor,
    tensor_to_proto,
)
from services.grpc_common import (
    DEFAULT_MAX_CONCURRENT_RPCS,
    DEFAULT_MAX_MESSAGE_BYTES,
    Pem,
    RpcFailure,
    Service,
    auth_metadata,
    open_channel,
    start_server,
    stop,
    translate_errors,
)

__all__ = ["SERVICE_NAME", "AgentBackend", "AgentServicer", "RemoteAgent", "serve", "stop"]

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name  # "mtkd.v1.AgentService"
DEFAULT_MAX_BATCH = 4096
REQUEST_FRAMING_BYTES = 1024
"""Room in a request for everything besides the tensors' bytes (tags, shapes, dtypes)."""
_FLOAT32 = (torch.float32,)
log = logging.getLogger(__name__)


def largest_batch(state_dim: int, num_teachers: int, max_message_bytes: int) -> int:
    """The largest B whose ``Observe`` (states [B, dim], reward [B], two [B, M] weights, float32) fits one message."""
    return (max_message_bytes - REQUEST_FRAMING_BYTES) // (4 * (state_dim + 1 + 2 * num_teachers))


def check_max_batch(max_batch: int | None, state_dim: int, num_teachers: int, max_message_bytes: int) -> int:
    """``max_batch``, or by default ``min(DEFAULT_MAX_BATCH, largest_batch(...))``.

    Raises:
        ValueError: ``max_batch`` < 1, or an Observe of ``max_batch`` samples would not
            fit one message of ``max_message_bytes``.
    """
    fits = largest_batch(state_dim, num_teachers, max_message_bytes)
    if fits < 1:
        raise ValueError(f"an Observe of one sample (state_dim {state_dim}, {num_teachers} teachers) does not fit "
                         f"the message limit of {max_message_bytes} bytes; raise the message limit")
    if max_batch is None:
        return min(DEFAULT_MAX_BATCH, fits)
    if not 1 <= max_batch <= fits:
        raise ValueError(
            f"max_batch is {max_batch}; expected 1..{fits}: an Observe of B samples takes "
            f"{4 * (state_dim + 1 + 2 * num_teachers)} * B bytes (state_dim {state_dim}, {num_teachers} teachers, "
            f"float32), and the message limit is {max_message_bytes} bytes (raise it for larger batches)"
        )
    return max_batch


@contextlib.contextmanager
def _agent_errors() -> Iterator[None]:
    """The library agent's refusals as statuses: bad experience -> INVALID_ARGUMENT, failed update -> FAILED_PRECONDITION."""
    try:
        yield
    except InvalidExperience as err:
        raise InvalidMessage(str(err)) from err
    except AgentUpdateError as err:
        log.warning("agent update failed: %s", err)
        raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, str(err)) from err


class AgentBackend(Protocol):
    """What an :class:`AgentServicer` calls (a local agent or a RemoteAgent)."""

    def describe(self) -> dict[str, Any]: ...

    def act(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]: ...

    def observe(
        self,
        states: torch.Tensor,
        reward: torch.Tensor,
        weight_logit: torch.Tensor | None = None,
        weight_feature: torch.Tensor | None = None,
    ) -> tuple[int, bool] | tuple[int, bool, dict]: ...

    def end_epoch(self) -> tuple[int, bool] | tuple[int, bool, dict]: ...

    def policy(self) -> tuple[int, dict[str, torch.Tensor]]: ...


def _decode(msg, *, name: str, shape: tuple, dim_names: tuple[str, ...]) -> torch.Tensor:
    """A finite float32 tensor of ``shape`` (ints or ranges) from a ``Tensor`` message."""
    largest = [d.stop - 1 if isinstance(d, range) else d for d in shape]
    return proto_to_tensor(msg, allowed_dtypes=_FLOAT32, max_bytes=4 * torch.Size(largest).numel(),
                           expected_shape=shape, name=name, dim_names=dim_names)


def _decode_field(request, field: str, *, shape: tuple, dim_names: tuple[str, ...]) -> torch.Tensor:
    """The required float32 ``Tensor`` field ``field`` of ``request`` (``"states missing"`` when unset)."""
    largest = [d.stop - 1 if isinstance(d, range) else d for d in shape]
    rendered = ", ".join(f"1..{d.stop - 1}" if isinstance(d, range) else str(d) for d in shape)
    return decode_field(request, field, expected=f"a [{rendered}] DTYPE_FLOAT32 Tensor", allowed_dtypes=_FLOAT32,
                        max_bytes=4 * torch.Size(largest).numel(), expected_shape=shape, dim_names=dim_names)


def _check_magnitude(name: str, tensor: torch.Tensor, limit: float, info_field: str) -> None:
    """Raise InvalidMessage unless ``|x| <= limit`` everywhere in ``tensor`` (finite already)."""
    largest = float(tensor.abs().max()) if tensor.numel() else 0.0
    if largest > limit:
        raise InvalidMessage(f"{name} has values up to {largest:.4g} in magnitude; expected |x| <= {limit:g} "
                             f"(AgentInfo.{info_field})")


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """Translates ``AgentService`` calls to a backend; holds no agent logic.

    Backend calls are serialised (one at a time, like a Ray actor's methods), so
    Act, Observe and EndEpoch see the agent in a consistent state.

    Args:
        backend: See the module docstring. ``describe()`` is called here for the
            sizes (state_dim, num_teachers), which must not change afterwards.
        max_batch: Largest accepted batch B; an Observe of B samples must fit
            ``max_message_bytes``. None: ``min(4096, the largest that fits)``.
        max_message_bytes: The server's message limit.
        max_abs_state: Largest accepted ``|x|`` in a state (the library agent's bound).
        max_abs_reward: Largest accepted ``|r|`` in a reward (the library agent's bound).

    Raises:
        ValueError: ``describe()`` lacks a key, or ``max_batch`` is out of range.
    """

    def __init__(
        self,
        backend: AgentBackend,
        *,
        max_batch: int | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_abs_state: float = MAX_ABS_STATE,
        max_abs_reward: float = MAX_ABS_REWARD,
    ) -> None:
        self._backend = backend
        self._limits = dict(max_abs_state=max_abs_state, max_abs_reward=max_abs_reward)
        info = agent_info_to_proto(backend.describe(), max_batch=0)
        self._state_dim, self._num_teachers = info.state_dim, info.num_teachers
        self._max_batch = check_max_batch(max_batch, info.state_dim, info.num_teachers, max_message_bytes)
        self._lock = threading.Lock()

    def _states(self, request) -> torch.Tensor:
        """``[B, state_dim]`` finite float32 states within ``max_abs_state``."""
        states = _decode_field(request, "states", shape=(range(1, self._max_batch + 1), self._state_dim),
                               dim_names=("batch", "features"))
        _check_magnitude("states", states, self._limits["max_abs_state"], "max_abs_state")
        return states

    def _weights(self, request, field: str, batch: int) -> torch.Tensor | None:
        if not request.HasField(field):
            return None
        return _decode(getattr(request, field), name=field, shape=(batch, self._num_teachers),
                       dim_names=("batch", "teachers"))

    @translate_errors
    def Describe(self, request, context):
        with self._lock:
            info = self._backend.describe()
        return agent_info_to_proto(info, max_batch=self._max_batch, **self._limits)

    @translate_errors
    def Act(self, request, context):
        states = self._states(request)
        with self._lock:
            weight_logit, weight_feature, version = self._backend.act(states)
        for name, weights in (("weight_logit", weight_logit), ("weight_feature", weight_feature)):
            bad = int((~torch.isfinite(weights)).sum())
            if bad:
                raise InvalidMessage(f"the policy's {name} for these states has {bad} NaN or infinite values; "
                                     f"the states reach |x| = {float(states.abs().max()):.4g} (expected the states "
                                     f"the learner computes, |x| <= {self._limits['max_abs_state']:g})")
        return agent_pb2.ActResponse(weight_logit=tensor_to_proto(weight_logit),
                                     weight_feature=tensor_to_proto(weight_feature),
                                     policy_version=version)

    @translate_errors
    def Observe(self, request, context):
        states = self._states(request)
        batch = states.shape[0]
        reward = _decode_field(request, "reward", shape=(batch,), dim_names=("batch",))
        _check_magnitude("reward", reward, self._limits["max_abs_reward"], "max_abs_reward")
        weight_logit = self._weights(request, "weight_logit", batch)
        weight_feature = self._weights(request, "weight_feature", batch)
        with self._lock, _agent_errors():
            version, updated, *_ = self._backend.observe(states, reward, weight_logit=weight_logit,
                                                         weight_feature=weight_feature)
        return agent_pb2.ObserveResponse(policy_version=version, updated=updated)

    @translate_errors
    def EndEpoch(self, request, context):
        with self._lock, _agent_errors():
            version, updated, *_ = self._backend.end_epoch()
        return agent_pb2.ObserveResponse(policy_version=version, updated=updated)

    @translate_errors
    def GetPolicy(self, request, context):
        with self._lock:
            version, state_dict = self._backend.policy()
        return policy_to_proto(version, state_dict)


def serve(
    backend: AgentBackend,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls_cert: Pem | None = None,
    tls_key: Pem | None = None,
    token: str | None = None,
    max_workers: int = 4,
    max_batch: int | None = None,
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    insecure: bool = False,
) -> tuple[grpc.Server, int]:
    """Serve ``backend`` as ``mtkd.v1.AgentService`` with health checking.

    Args:
        backend: See the module docstring.
        host: Interface to bind; loopback unless told otherwise.
        port: TCP port; 0 picks a free one.
        max_message_bytes: Largest message sent or received.
        tls_cert: Server certificate chain (PEM path or bytes); TLS with ``tls_key``.
        tls_key: Server private key (PEM path or bytes).
        token: Require metadata ``authorization: Bearer <token>`` (health exempt).
        max_workers: Threads serving calls (backend calls are serialised anyway).
        max_batch: Largest accepted batch (None: 4096, or fewer if an Observe of
            4096 samples does not fit ``max_message_bytes``).
        max_concurrent_rpcs: Calls accepted at once; more get RESOURCE_EXHAUSTED.
        insecure: Allow plaintext on a non-loopback ``host`` (refused otherwise).

    Returns:
        ``(server, bound_port)``, started. Stop it with :func:`stop`.

    Raises:
        ValueError: A setting is invalid (see :class:`AgentServicer` and
            :func:`services.grpc_common.start_server`).
        services.grpc_common.BindError: The address could not be bound.
    """
    servicer = AgentServicer(backend, max_batch=max_batch, max_message_bytes=max_message_bytes)
    return start_server(
        [Service(SERVICE_NAME, agent_pb2_grpc.add_AgentServiceServicer_to_server, servicer)],
        host=host, port=port, max_message_bytes=max_message_bytes, tls_cert=tls_cert,
        tls_key=tls_key, token=token, max_workers=max_workers, max_concurrent_rpcs=max_concurrent_rpcs,
        insecure=insecure,
    )


class RemoteAgent:
    """Client of ``mtkd.v1.AgentService`` with the agent backend's methods.

    Args:
        address: ``host:port`` of the server.
        token: Bearer token, if the server requires one.
        root_cert: PEM (path or bytes) of the certificate that signed the server's;
            enables TLS.
        timeout: Deadline of each call, in seconds.
        max_message_bytes: Largest message sent or received.

    Errors of the server arrive as ``grpc.RpcError``; a malformed response raises
    :class:`~services.convert.InvalidMessage`.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        root_cert: Pem | None = None,
        timeout: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.address = address
        self._call = dict(timeout=timeout, metadata=auth_metadata(token))
        self._channel = open_channel(address, root_cert=root_cert, max_message_bytes=max_message_bytes)
        self._stub = agent_pb2_grpc.AgentServiceStub(self._channel)
        self._num_teachers: int | None = None

    def describe(self) -> dict[str, Any]:
        """The agent's ``describe()`` dict (fetched anew: the version changes), plus ``max_batch``."""
        info = agent_info_from_proto(self._stub.Describe(agent_pb2.DescribeAgentRequest(), **self._call))
        self._num_teachers = info["num_teachers"]
        return info

    def act(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Teacher weights ``(weight_logit [B, M], weight_feature [B, M], policy_version)``."""
        if self._num_teachers is None:
            self.describe()
        reply = self._stub.Act(agent_pb2.ActRequest(states=tensor_to_proto(states)), **self._call)
        shape = (states.shape[0], self._num_teachers)
        weights = [_decode(getattr(reply, f), name=f, shape=shape, dim_names=("batch", "teachers"))
                   for f in ("weight_logit", "weight_feature")]
        return weights[0], weights[1], reply.policy_version

    def observe(
        self,
        states: torch.Tensor,
        reward: torch.Tensor,
        weight_logit: torch.Tensor | None = None,
        weight_feature: torch.Tensor | None = None,
    ) -> tuple[int, bool]:
        """Send ``(states [B, state_dim], reward [B])`` and, optionally, the weights used."""
        request = agent_pb2.ObserveRequest(states=tensor_to_proto(states), reward=tensor_to_proto(reward))
        for field, value in (("weight_logit", weight_logit), ("weight_feature", weight_feature)):
            if value is not None:
                getattr(request, field).CopyFrom(tensor_to_proto(value))
        reply = self._stub.Observe(request, **self._call)
        return reply.policy_version, reply.updated

    def end_epoch(self) -> tuple[int, bool]:
        """Tell the agent an epoch ended; returns ``(policy_version, updated)``."""
        reply = self._stub.EndEpoch(agent_pb2.EndEpochRequest(), **self._call)
        return reply.policy_version, reply.updated

    def policy(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The current policy as ``(version, state_dict)`` (read from safetensors)."""
        return policy_from_proto(self._stub.GetPolicy(agent_pb2.GetPolicyRequest(), **self._call))

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> RemoteAgent:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteAgent({self.address!r})"
