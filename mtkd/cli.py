"""The library's command line: ``train-teacher``, ``eval`` and ``distill --runtime inprocess``.

The installed ``mtkd`` console script (``services.cli``) extends this parser with the Ray runtime,
``serve-teacher``, ``demo`` and ``tune``; ``python -m mtkd.cli`` works without Ray.

Exit codes: 0 done; 2 a user error (:class:`mtkd.errors.UserError`: bad config, missing or corrupt
checkpoint or data, mismatched pool), one line on stderr; 3 a numeric error
(:class:`mtkd.errors.NumericError`: NaN/inf loss, failed agent update), one line; 4 a node or process
the run needed was lost (:class:`mtkd.errors.LostError`), one line naming it and how to continue; 130 (SIGINT) or
143 (SIGTERM): ``distill`` was stopped, and its last line says how to continue it; anything else is
a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from mtkd import errors
from mtkd.config import ConfigError, ExperimentConfig, TeacherTrainConfig, check_runnable, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML experiment file (configs/...)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def load_experiment(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment of ``--config`` + overrides, or of ``RUN_DIR/config.yaml`` when resuming."""
    path = args.config
    if getattr(args, "resume", None):
        if args.config:
            raise ConfigError("--resume takes the run's saved config; pass overrides only, not --config")
        path = f"{args.resume}/config.yaml"
        args.overrides = [*args.overrides, f"output_dir={args.resume}"]
    config = load_config(ExperimentConfig, path, args.overrides)
    check_runnable(config)
    return config


# ------------------------------------------------------------------------------ interrupts
class Interrupted(BaseException):
    """SIGINT or SIGTERM stopped a command; the CLI exits ``128 + signum`` after printing ``line``
    (a BaseException like KeyboardInterrupt, so that no ``except Exception`` swallows it)."""

    def __init__(self, signum: int, line: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.line = line


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread; one that
    arrives while a checkpoint is being written or deleted is held until that is done
    (:func:`mtkd.checkpoint.uninterrupted`). The previous handlers are restored on exit."""
    from mtkd.checkpoint import hold_interrupt

    def handler(signum, frame):
        error = Interrupted(signum)
        if not hold_interrupt(error):
            raise error

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def resume_line(run_dir: str | Path, epoch: int | None, what: str = "stopped") -> str:
    """The last line of a stopped ``distill``: ``what`` happened (``stopped``, ``lost the agent
    actor``...), the last checkpointed epoch and the command that continues the run (``epoch``
    None: no checkpoint yet)."""
    if epoch is None:
        return f"{what} before the first checkpoint; nothing to continue in {run_dir}: run the same command again"
    return f"{what} after epoch {epoch}; continue with: mtkd distill --resume {shlex.quote(str(run_dir))}"


@contextmanager
def say_how_to_resume(run_dir: str | Path, last_epoch: Callable[[], int | None]) -> Iterator[None]:
    """Give an :class:`Interrupted`, a :class:`mtkd.errors.LostError` or an unwritable run folder or
    storage (an ``OSError`` of :data:`mtkd.errors.UNWRITABLE_ERRNOS`, raised as :class:`mtkd.errors.UnwritableError`)
    that leaves this block its :func:`resume_line` (``last_epoch``: the epoch of the run's newest
    valid checkpoint, or None)."""
    try:
        try:
            yield
        except OSError as error:
            if error.errno not in errors.UNWRITABLE_ERRNOS or isinstance(error, errors.UnwritableError):
                raise
            raise errors.UnwritableError(f"cannot write the run: {one_line(error)}") from error
    except (Interrupted, errors.LostError, errors.UnwritableError) as stop:
        what = ("stopped" if isinstance(stop, Interrupted) else f"lost {one_line(stop)}"
                if isinstance(stop, errors.LostError) else f"{one_line(stop)}; stopped")
        try:
            epoch = last_epoch()
        except Exception:  # noqa: BLE001 - the run folder cannot be read: say so, still stop
            stop.line = f"{what}; the checkpoints of {run_dir} could not be read"
        else:
            stop.line = resume_line(run_dir, epoch, what)
        raise


def cmd_train_teacher(args: argparse.Namespace) -> dict:
    from mtkd.teacher_training import train_teacher

    cfg = load_config(TeacherTrainConfig, args.config, args.overrides)
    return train_teacher(cfg, progress=not args.quiet, overwrite=args.overwrite)


def cmd_eval(args: argparse.Namespace) -> dict:
    from mtkd.teacher_training import evaluate_checkpoint

    return evaluate_checkpoint(args.checkpoint, args.dataset, args.root, device=args.device)


def cmd_distill_inprocess(args: argparse.Namespace) -> dict:
    from mtkd.runner import run_inprocess

    config = load_experiment(args)
    if config.runtime.runtime != "inprocess":
        raise ConfigError(f"runtime {config.runtime.runtime!r} needs the service package: run the installed `mtkd` "
                          f"command, or pass runtime.runtime=inprocess")
    from mtkd.experiment import RunDirectory

    run_dir = config.output_dir
    with stop_on_signals(), say_how_to_resume(run_dir, RunDirectory(run_dir).resumable_epoch):
        summary = run_inprocess(config, resume=bool(args.resume), stop_after_epoch=args.stop_after_epoch,
                                progress=not args.quiet, overwrite=args.overwrite)
    summary.pop("history", None)
    return summary


def cmd_probe(args: argparse.Namespace) -> None:
    """Print what ``auto`` does for the config on this machine: per teacher and setting, ms per batch
    and agreement with exact fp32, and the setting used; the student's row (a training step, when
    ``student_precision`` is auto); and what ``compile_teachers: auto`` would do for each teacher
    (nothing is compiled or trained)."""
    from mtkd.precision_probe import probe_pool

    config = load_experiment(args)
    _, table = probe_pool(config, fresh=args.fresh)
    print(table)


def build_parser(distill: Callable[[argparse.Namespace], dict] = cmd_distill_inprocess) -> argparse.ArgumentParser:
    """The parser; each sub-command sets ``func`` (returns a JSON-able summary)."""
    parser = argparse.ArgumentParser(prog="mtkd", description="Multi-teacher knowledge distillation with RL (MTKD-RL)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-teacher", help="train one network on a dataset; write a teacher checkpoint")
    add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("eval", help="test accuracy of a checkpoint folder")
    p.add_argument("checkpoint", help="a teacher or exported student folder")
    p.add_argument("--dataset", help="dataset name (default: the one in the checkpoint's metadata)")
    p.add_argument("--root", help="dataset folder (default: the dataset's default location)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("distill", help="distill a student from a teacher pool")
    add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its newest checkpoint")
    p.add_argument("--stop-after-epoch", type=int, help="stop after this epoch (checkpoint written; resumable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=distill)

    p = sub.add_parser("probe", help="time each teacher's and the student's settings (fp32, channels_last, "
                                     "bf16...) as the auto settings do, say what compile_teachers auto would do, "
                                     "and print what the run will use; no training")
    add_config_args(p)
    p.add_argument("--fresh", action="store_true", help="measure again instead of reading the cached decisions")
    p.set_defaults(func=cmd_probe)
    return parser


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (its lines joined with ``; ``)."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse, run, print the JSON summary. A user error prints one line and returns 2, a numeric
    error (NaN loss, failed agent update) one line and 3, a lost node or process one line (what,
    and how to continue) and 4, a command stopped by SIGINT/SIGTERM its resume line and 130/143;
    any other exception is a bug and propagates with its traceback."""
    args = parser.parse_args(argv)
    try:
        summary = args.func(args)
    except Interrupted as stop:
        print(stop.line or f"mtkd: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    except errors.LOST_ERRORS as exc:
        print(f"mtkd: error: {getattr(exc, 'line', None) or 'lost ' + one_line(exc)}", file=sys.stderr, flush=True)
        return errors.LOST_EXIT
    except errors.NUMERIC_ERRORS as exc:
        print(f"mtkd: error: {one_line(exc)} (the last good checkpoint is kept)", file=sys.stderr)
        return errors.NUMERIC_EXIT
    except errors.USER_ERRORS as exc:
        print(f"mtkd: error: {getattr(exc, 'line', None) or one_line(exc)}", file=sys.stderr)
        return errors.USER_EXIT
    if summary is not None:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
