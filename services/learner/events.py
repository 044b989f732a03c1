"""What the learners tell the driver while they train, and what the driver does with it.

The driver shares no disk with the learners: rank 0 sends the run's log lines (per-step losses,
per-epoch metrics) through a Ray queue, and the driver writes them into the run folder, draws the
plot and shows the progress. A restarted learner first says where it resumes, and the driver drops
the lines of the work that will be done again, so each step and epoch appears once.
"""
from __future__ import annotations

import sys
import threading
import time
from queue import Empty

from ray.util.queue import Queue
from tqdm import tqdm

from mtkd.experiment import RunDirectory
from mtkd.plot import plot_run
from mtkd.runner import epoch_line

FLUSH_EVERY_S = 1.0


class EventSender:
    """Rank 0's side: buffers step records and sends them at most once a second (and at epoch ends)."""

    def __init__(self, queue: Queue | None):
        self._queue = queue
        self._steps: list[dict] = []
        self._last_flush = time.monotonic()

    def start(self, epoch: int, global_step: int, steps_per_epoch: int, restored: dict | None = None) -> None:
        """This attempt trains from ``epoch`` (0-based, the next to train) and ``global_step``;
        ``restored``: the metrics of the epoch its checkpoint ends, if it restored one."""
        self._send({"kind": "start", "epoch": epoch, "global_step": global_step, "steps_per_epoch": steps_per_epoch,
                    "restored": restored or None})

    def step(self, record: dict) -> None:
        self._steps.append(record)
        if time.monotonic() - self._last_flush >= FLUSH_EVERY_S:
            self.flush()

    def epoch(self, metrics: dict) -> None:
        self.flush()
        self._send({"kind": "epoch", "metrics": metrics})

    def flush(self) -> None:
        if self._steps:
            self._send({"kind": "steps", "records": self._steps})
            self._steps = []
        self._last_flush = time.monotonic()

    def _send(self, event: dict) -> None:
        if self._queue is not None:
            self._queue.put(event)


class EventWriter:
    """The driver's side: a thread that turns events into the run folder's files and the progress.

    Args:
        queue: the queue rank 0 sends to.
        run: the run folder (on the driver's disk).
        epochs: the run's epoch count (for the progress line).
        title: the plot's title.
        progress: show a progress bar and one line per epoch on stderr.
    """

    def __init__(self, queue: Queue, run: RunDirectory, epochs: int, title: str, progress: bool):
        self.queue, self.run, self.epochs, self.title, self.progress = queue, run, epochs, title, progress
        self.history: list[dict] = run.read(run.metrics_path)
        self._bar: tqdm | None = None
        self._steps_per_epoch: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mtkd-run-events", daemon=True)

    def __enter__(self) -> "EventWriter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._thread.is_alive():  # never write from two threads at once
            print("[mtkd] warning: the run's event writer did not stop within 30 s; the last events may be "
                  "missing from the run folder", file=sys.stderr)
        else:
            self._drain()
        if self._bar is not None:
            self._bar.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                event = self.queue.get(timeout=0.5)
            except Empty:
                continue
            self._handle_safely(event)

    def _drain(self) -> None:
        while True:
            try:
                event = self.queue.get_nowait()
            except Empty:
                return
            self._handle_safely(event)

    def _handle_safely(self, event: dict) -> None:
        """:meth:`handle`, with a failure (a full disk, a plot that cannot be drawn) reported and the
        thread kept alive for the next events."""
        try:
            self.handle(event)
        except Exception as error:  # noqa: BLE001 - one lost record must not stop the others
            print(f"[mtkd] warning: could not record a {event.get('kind')!r} event in {str(self.run.path)!r}: "
                  f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)

    def handle(self, event: dict) -> None:
        """Apply one event to the run folder and the progress output."""
        kind = event["kind"]
        if kind == "start":
            self.run.truncate(self.run.metrics_path, "epoch", event["epoch"])
            self.run.truncate(self.run.steps_path, "step", event["global_step"])
            self.history = [m for m in self.history if m["epoch"] <= event["epoch"]]
            self._restore_lost_epoch(event.get("restored"))
            self._steps_per_epoch = event["steps_per_epoch"]
            self._new_bar(event["epoch"])
        elif kind == "steps":
            for record in event["records"]:
                self.run.append(self.run.steps_path, record)
            if self._bar is not None:
                self._bar.update(len(event["records"]))
                last = event["records"][-1]
                self._bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
        elif kind == "epoch":
            metrics = event["metrics"]
            self.history.append(metrics)
            self.run.append(self.run.metrics_path, metrics)
            plot_run(self.history, self.run.plot_path, title=self.title)
            if self.progress:
                if self._bar is not None:
                    self._bar.close()
                    self._bar = None
                print(epoch_line(metrics, self.epochs), file=sys.stderr, flush=True)
                self._new_bar(metrics["epoch"])

    def _restore_lost_epoch(self, metrics: dict | None) -> None:
        """Write the line of the epoch a resumed checkpoint ends when the folder lacks it: Ray Train
        persisted that checkpoint, but the driver died (or lost Ray) before its event reached the
        folder. The checkpoint keeps the epoch's metrics, so no completed epoch goes missing."""
        if not metrics or "epoch" not in metrics or any(m["epoch"] == metrics["epoch"] for m in self.history):
            return
        self.history.append(metrics)
        self.run.append(self.run.metrics_path, metrics)
        plot_run(self.history, self.run.plot_path, title=self.title)

    def _new_bar(self, epoch: int) -> None:
        """A progress bar for the epoch after ``epoch`` (0-based count of epochs done)."""
        if self._bar is not None:
            self._bar.close()
        self._bar = None
        if self.progress and epoch < self.epochs:
            self._bar = tqdm(total=self._steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                             file=sys.stderr, mininterval=1.0, disable=None)  # None: no bar when not a terminal
