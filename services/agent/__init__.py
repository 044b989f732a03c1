"""The MTKD-RL agent as a service: a Ray actor owning the policy, and a gRPC server/client.

The gRPC pieces live in :mod:`services.agent.grpc_server` (``serve``,
``AgentServicer``, ``RemoteAgent``); they are not imported here, so importing this
package needs neither gRPC nor Ray.
"""
