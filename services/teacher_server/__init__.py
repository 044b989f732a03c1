"""Serving one teacher: a Ray actor with batched inference, and a gRPC server/client.

The gRPC pieces live in :mod:`services.teacher_server.grpc_server` (``serve``,
``TeacherServicer``) and :mod:`services.teacher_server.grpc_client` (``RemoteTeacher``);
they are not imported here, so importing this package needs neither gRPC nor Ray.
"""
