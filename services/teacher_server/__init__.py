"""Serving one teacher: a Ray actor with batched inference, and a gRPC server/client.

The gRPC pieces live in :mod:`services.teacher_server.grpc_server` (``serve``,
``TeacherServicer``) and :mod:`services.teacher_server.grpc_client` (``RemoteTeacher``),
which convert the teacher's messages with :mod:`services.teacher_server.messages`; they
are not imported here, so importing this package needs neither gRPC nor Ray.
"""
