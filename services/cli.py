"""The ``mtkd`` console script: the library's commands plus the service ones.

``distill`` runs on Ray by default (``runtime.runtime=inprocess`` or ``--runtime inprocess`` for
the reference engine); ``serve-teacher`` exposes a teacher over gRPC; ``demo`` runs the main job
end to end; ``tune`` searches hyper-parameters with Ray Tune (:mod:`services.tune`).
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
from services.reaper import reaping

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def cmd_distill(args: argparse.Namespace) -> dict:
    """`mtkd distill`: on Ray (the default) or in process; returns the run's summary."""
    if args.runtime:
        args.overrides = [*args.overrides, f"runtime.runtime={args.runtime}"]
    if args.address:
        args.overrides = [*args.overrides, f"runtime.address={args.address}"]
    config = core.load_experiment(args)
    options = dict(resume=bool(args.resume), stop_after_epoch=args.stop_after_epoch, progress=not args.quiet,
                   overwrite=args.overwrite)
    run_dir = config.output_dir  # as given: the resume line repeats it
    # reaping: even killed (SIGKILL), the command leaves no process behind (a private Ray's agents, Redis);
    # SIGINT/SIGTERM: stop, then say how to continue (exit 130/143)
    with reaping(run_dir if config.runtime.runtime == "ray" else None), core.stop_on_signals():
        if config.runtime.runtime == "ray":
            from services.learner.driver import run_ray, resumable_epoch

            with core.say_how_to_resume(run_dir, lambda: resumable_epoch(config)):
                summary = run_ray(config, **options)
        else:
            from mtkd.experiment import RunDirectory
            from mtkd.runner import run_inprocess
            from services.cache import open_store

            with core.say_how_to_resume(run_dir, RunDirectory(run_dir).resumable_epoch):
                with open_store(config.cache.url, config.cache.max_memory_mb) as store:
                    summary = run_inprocess(config, store=store, **options)
    summary.pop("history", None)
    return summary


MAX_MESSAGE_MB = 2047  # gRPC sizes are signed 32-bit: 2047 MiB is the largest whole MiB below 2**31


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token of ``--token-file`` (else ``$MTKD_TOKEN``, else None); refuses an empty one."""
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as err:
            raise ConfigError(f"--token-file {args.token_file}: cannot read it ({err.strerror or err})") from err
    else:
        token = os.environ.get("MTKD_TOKEN")
    if token is not None and not token:
        raise ConfigError(f"the token {'in ' + args.token_file if args.token_file else 'in $MTKD_TOKEN'} is empty; "
                          f"an empty token would disable authentication")
    return token


def _check_server_args(args: argparse.Namespace) -> None:
    """Refuse nonsense before anything is loaded or bound: port range, message size, concurrency,
    the TLS pair, plaintext on a non-loopback address without ``--insecure``, a taken port.

    Raises:
        ConfigError: One line naming the flag, what it got and what it expects.
    """
    from services.grpc_common import BindError, check_port_free, check_tls_pair, is_loopback

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is out of range; expected 0..65535 (0: any free port)")
    if not 1 <= args.max_message_mb <= MAX_MESSAGE_MB:
        raise ConfigError(f"--max-message-mb {args.max_message_mb} is out of range; expected 1..{MAX_MESSAGE_MB} "
                          f"(gRPC message sizes are 32-bit)")
    if args.max_concurrent_rpcs < 1:
        raise ConfigError(f"--max-concurrent-rpcs {args.max_concurrent_rpcs}; expected >= 1")
    if args.max_batch is not None and args.max_batch < 1:
        raise ConfigError(f"--max-batch {args.max_batch}; expected >= 1")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError(f"TLS needs both --tls-cert and --tls-key; got only {'--tls-cert' if args.tls_cert else '--tls-key'}")
    if args.tls_cert:
        try:
            check_tls_pair(args.tls_cert, args.tls_key)
        except ValueError as err:
            raise ConfigError(f"--tls-cert/--tls-key: {err}") from err
    if not args.tls_cert and not args.insecure and not is_loopback(args.host):
        raise ConfigError(f"refusing to serve plaintext on --host {args.host}, which is not a loopback address: "
                          f"anyone on the network could read the traffic{' and the token' if _token(args) else ''}. "
                          f"Give --tls-cert and --tls-key (and a token), or --insecure to serve plaintext anyway")
    try:
        check_port_free(args.host, args.port)
    except BindError as err:
        raise ConfigError(f"--host {args.host} --port {args.port}: {err}") from err


def _server_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``serve`` for ``serve-teacher``."""
    return dict(host=args.host, port=args.port, token=_token(args), tls_cert=args.tls_cert, tls_key=args.tls_key,
                max_message_bytes=args.max_message_mb << 20, max_concurrent_rpcs=args.max_concurrent_rpcs,
                insecure=args.insecure)


def _start(serve, backend, args: argparse.Namespace, **options):
    """``serve(backend, ...)``; a bind failure (e.g. a port taken since the check) becomes one-line ConfigError."""
    from services.grpc_common import BindError

    try:
        return serve(backend, **_server_options(args), **options)
    except BindError as err:
        raise ConfigError(f"--host {args.host} --port {args.port}: {err}") from err


def _serve_until_signal(server, stop, what: str, port: int, args: argparse.Namespace) -> dict:
    """Serve until SIGINT or SIGTERM; ``--port-file`` gets the bound port (written whole, atomically)."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"mtkd: serving {what} on {args.host}:{port} (health: grpc.health.v1)", file=sys.stderr, flush=True)
    if args.port_file:
        partial = Path(f"{args.port_file}.partial")
        partial.write_text(str(port))
        os.replace(partial, args.port_file)  # a poller never reads a half-written file
    done.wait()
    stop(server, grace=5.0).wait(10)
    return {"served": what, "port": port}


def cmd_serve_teacher(args: argparse.Namespace) -> dict:
    """`mtkd serve-teacher`: serve one teacher checkpoint over gRPC until SIGINT/SIGTERM."""
    from mtkd.teachers import load_teacher
    from services.teacher_server.grpc_server import check_max_batch, serve, stop

    _check_server_args(args)
    teacher = load_teacher(args.checkpoint, args.name)
    try:
        check_max_batch(args.max_batch, tuple(teacher.describe()["input_shape"]), args.max_message_mb << 20)
    except ValueError as err:
        raise ConfigError(f"--max-batch {args.max_batch} with --max-message-mb {args.max_message_mb}: {err}") from err
    server, port = _start(serve, teacher, args, max_batch=args.max_batch)
    return _serve_until_signal(server, stop, f"teacher {teacher.name!r}", port, args)


def cmd_demo(args: argparse.Namespace) -> dict:
    """`mtkd demo`: teachers, then ce / aver / mtkd_rl students; returns the demo's summary."""
    from services.demo import run_demo

    return run_demo(args.config, args.overrides, runtime=args.runtime or "ray")


def cmd_tune(args: argparse.Namespace) -> dict:
    """`mtkd tune`: load the tune file (or the saved search of ``--resume``) and run it."""
    from services.tune import load_saved_search, load_tune
    from services.tune.driver import run_tune

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"experiment.runtime.address={args.address}")
    if args.resume:
        if args.config:
            raise ConfigError("--resume continues the saved search; pass no --config")
        if args.overrides:
            raise ConfigError(f"--resume continues the search as it was saved; overrides are not accepted (got "
                              f"{' '.join(args.overrides)})")
        spec = load_saved_search(args.resume, overrides)
    else:
        if not args.config:
            raise ConfigError("mtkd tune needs --config TUNE_FILE (configs/tune-*.yaml) or --resume SEARCH_DIR")
        spec = load_tune(args.config, overrides)
    return run_tune(spec, resume=bool(args.resume), progress=not args.quiet, overwrite=args.overwrite)


def _add_tune_parser(sub) -> None:
    """The ``tune`` sub-command (its work is in :mod:`services.tune`)."""
    p = sub.add_parser("tune", help="search hyper-parameters with Ray Tune and ASHA over one shared teacher pool")
    p.add_argument("--config", help="tune file: experiment, search_space, tune (configs/tune-*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted overrides of the tune file, e.g. tune.num_samples=8 experiment.optim.epochs=4")
    p.add_argument("--resume", metavar="SEARCH_DIR", help="continue an interrupted search (its tune.output_dir)")
    p.add_argument("--address", help="Ray cluster to join (as for mtkd distill: default $RAY_ADDRESS, or a cluster "
                                     "started with `ray start` here, else a private local Ray; 'local' forces a "
                                     "private one)")
    p.add_argument("--overwrite", action="store_true", help="replace a search already in tune.output_dir")
    p.add_argument("--quiet", action="store_true", help="no per-trial progress lines on stderr")
    p.set_defaults(func=cmd_tune)


def _add_server_args(p: argparse.ArgumentParser, default_port: int, default_max_batch: int) -> None:
    from services.grpc_common import DEFAULT_MAX_CONCURRENT_RPCS

    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=default_port, help="TCP port, 0..65535 (0: any free port)")
    p.add_argument("--port-file", help="write the bound port to this file")
    p.add_argument("--token-file", help="require this bearer token (default: $MTKD_TOKEN, or none)")
    p.add_argument("--tls-cert", help="PEM certificate chain (enables TLS with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key (unencrypted) matching --tls-cert")
    p.add_argument("--insecure", action="store_true",
                   help="allow plaintext (no TLS) on a --host that is not loopback (refused otherwise)")
    p.add_argument("--max-message-mb", type=int, default=16, help=f"largest gRPC message, MiB, 1..{MAX_MESSAGE_MB}")
    p.add_argument("--max-batch", type=int, default=None,
                   help=f"largest accepted batch (default: {default_max_batch}, or fewer if such a batch would not "
                        "fit one message)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=DEFAULT_MAX_CONCURRENT_RPCS,
                   help="calls accepted at once; more get RESOURCE_EXHAUSTED (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The `mtkd` command line: the library's sub-commands plus the service ones."""
    parser = core.build_parser(distill=cmd_distill)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    distill = sub.choices["distill"]
    distill.add_argument("--runtime", choices=["ray", "inprocess"], help="override runtime.runtime")
    distill.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, the cluster of the ray job "
                                           "this runs in, or one started with `ray start` here; else a private "
                                           "local Ray; 'local' forces a private one)")

    p = sub.add_parser("serve-teacher", help="serve one teacher checkpoint over gRPC")
    p.add_argument("checkpoint", help="teacher checkpoint folder")
    p.add_argument("--name", help="teacher name (default: its model name)")
    _add_server_args(p, 50051, 256)
    p.set_defaults(func=cmd_serve_teacher)

    p = sub.add_parser("demo", help="train (or reuse) teachers, distill with ce/aver/mtkd_rl, print a table")
    p.add_argument("--config", default=str(DEMO_CONFIG), help=f"demo config (default: {DEMO_CONFIG})")
    p.add_argument("--runtime", choices=["ray", "inprocess"], help="runtime of the student runs (default: ray)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides of the demo config")
    p.set_defaults(func=cmd_demo)
    _add_tune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mtkd`: returns the exit code: 0, 2 for a user error (``mtkd.errors.UserError``),
    3 for a numeric one (``mtkd.errors.NumericError``), each reported in one line; 130/143 for a
    ``distill`` stopped by SIGINT/SIGTERM (its last line: how to continue); any other error is a bug
    and propagates with its traceback."""
    return core.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
