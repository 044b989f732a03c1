"""The ``mtkd`` console script: the library's commands plus the service ones.

``distill`` runs on Ray by default (``runtime.runtime=inprocess`` or ``--runtime inprocess`` for
the reference engine); ``serve-teacher`` and ``serve-agent`` expose a teacher or the agent over
gRPC; ``demo`` runs the main job end to end.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from mtkd import cli as core
from mtkd.config import ConfigError

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def cmd_distill(args: argparse.Namespace) -> dict:
    if args.runtime:
        args.overrides = [*args.overrides, f"runtime.runtime={args.runtime}"]
    if args.address:
        args.overrides = [*args.overrides, f"runtime.address={args.address}"]
    config = core.load_experiment(args)
    if config.runtime.runtime == "inprocess":
        from mtkd.runner import run_inprocess as run
    elif config.runtime.runtime == "ray":
        from services.learner.launcher import run_ray as run
    else:
        raise ConfigError(f"unknown runtime {config.runtime.runtime!r} (valid: ray, inprocess)")
    summary = run(config, resume=bool(args.resume), stop_after_epoch=args.stop_after_epoch,
                  progress=not args.quiet, overwrite=args.overwrite)
    summary.pop("history", None)
    return summary


def _token(args: argparse.Namespace) -> str | None:
    token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get("MTKD_TOKEN")
    if token is not None and not token:
        raise ConfigError(f"the token {'in ' + args.token_file if args.token_file else 'in $MTKD_TOKEN'} is empty; "
                          f"an empty token would disable authentication")
    return token


def _serve_until_signal(server, stop, what: str, port: int, args: argparse.Namespace) -> dict:
    print(f"mtkd: serving {what} on {args.host}:{port} (health: grpc.health.v1)", file=sys.stderr, flush=True)
    if args.port_file:
        Path(args.port_file).write_text(str(port))
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    stop(server, grace=5.0).wait(10)
    return {"served": what, "port": port}


def cmd_serve_teacher(args: argparse.Namespace) -> dict:
    from mtkd.teachers import load_teacher
    from services.teacher_server.grpc_server import serve, stop

    teacher = load_teacher(args.checkpoint, args.name)
    server, port = serve(teacher, host=args.host, port=args.port, token=_token(args), tls_cert=args.tls_cert,
                         tls_key=args.tls_key, max_message_bytes=args.max_message_mb << 20, max_batch=args.max_batch)
    return _serve_until_signal(server, stop, f"teacher {teacher.name!r}", port, args)


def cmd_serve_agent(args: argparse.Namespace) -> dict:
    from mtkd.engine import agent_kwargs
    from mtkd.runner import load_local_pool
    from services.agent.backend import AgentBackend
    from services.agent.grpc_server import serve, stop

    config = core.load_experiment(args)
    descriptions = load_local_pool(config).describe()
    if not descriptions:
        raise ConfigError("serve-agent needs the teacher pool (teachers=[...]) to size the agent's state")
    backend = AgentBackend([d["embedding_dim"] for d in descriptions], int(descriptions[0]["num_classes"]),
                           **agent_kwargs(config))
    server, port = serve(backend, host=args.host, port=args.port, token=_token(args), tls_cert=args.tls_cert,
                         tls_key=args.tls_key, max_message_bytes=args.max_message_mb << 20)
    return _serve_until_signal(server, stop, f"the agent ({config.agent.rule}, {config.agent.mixing})", port, args)


def cmd_demo(args: argparse.Namespace) -> dict:
    from services.demo import run_demo

    return run_demo(args.config, args.overrides, runtime=args.runtime or "ray")


def _add_server_args(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=default_port, help="TCP port (0: any free port)")
    p.add_argument("--port-file", help="write the bound port to this file")
    p.add_argument("--token-file", help="require this bearer token (default: $MTKD_TOKEN, or none)")
    p.add_argument("--tls-cert", help="PEM certificate chain (enables TLS with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--max-message-mb", type=int, default=16, help="largest gRPC message, MiB")


def build_parser() -> argparse.ArgumentParser:
    parser = core.build_parser(distill=cmd_distill)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    distill = sub.choices["distill"]
    distill.add_argument("--runtime", choices=["ray", "inprocess"], help="override runtime.runtime")
    distill.add_argument("--address", help="Ray cluster address (default: a private local Ray)")

    p = sub.add_parser("serve-teacher", help="serve one teacher checkpoint over gRPC")
    p.add_argument("checkpoint", help="teacher checkpoint folder")
    p.add_argument("--name", help="teacher name (default: its model name)")
    p.add_argument("--max-batch", type=int, default=256, help="largest accepted batch")
    _add_server_args(p, 50051)
    p.set_defaults(func=cmd_serve_teacher)

    p = sub.add_parser("serve-agent", help="serve the MTKD-RL agent over gRPC")
    core.add_config_args(p)
    _add_server_args(p, 50052)
    p.set_defaults(func=cmd_serve_agent, resume=None)

    p = sub.add_parser("demo", help="train (or reuse) teachers, distill with ce/aver/mtkd_rl, print a table")
    p.add_argument("--config", default=str(DEMO_CONFIG), help=f"demo config (default: {DEMO_CONFIG})")
    p.add_argument("--runtime", choices=["ray", "inprocess"], help="runtime of the student runs (default: ray)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides of the demo config")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    return core.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
