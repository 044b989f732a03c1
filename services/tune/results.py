"""The results of a search: one row per trial, the table on stdout, ``results.jsonl`` and
``best_config.yaml`` in the search folder (no Ray here: the rows are made from a Tune
``ResultGrid`` and each trial's Tune status, which the driver reads)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtkd.config import save_config
from mtkd.errors import UserError
from services.tune.spec import BEST_CONFIG_FILE, RESULTS_FILE, TuneSpec, plain_value, trial_config


class SearchFailedError(UserError, ValueError):
    """No trial of a search reported its metric (every one failed): the command exits 2."""


def trial_rows(grid, spec: TuneSpec, statuses: dict[str, str]) -> list[dict]:
    """One record per trial of a Tune ``ResultGrid``: id, sampled values, epochs, final and best metric,
    status (done: trained all its epochs; stopped: ASHA stopped it; error; pending: never trained;
    unfinished: the search was interrupted while it trained). ``statuses``: Tune's status of each
    trial (``TERMINATED``, ``ERROR``, ``PENDING``, ...) by trial id."""
    metric, sign = spec.settings.metric, (1.0 if spec.settings.mode == "max" else -1.0)
    rows = []
    for result in grid:
        trial = Path(result.path).name.removeprefix("trial_")
        tune_status = statuses.get(trial)
        params = {k: plain_value(result.config.get(k)) for k in spec.search}
        epochs = trial_config(spec.experiment, params).optim.epochs
        last = result.metrics or {}
        history = []
        frame = result.metrics_dataframe
        if frame is not None and metric in frame and "epoch" in frame:
            history = [(int(e), float(v)) for e, v in zip(frame["epoch"], frame[metric]) if v == v]
        final = last.get(metric)
        if final is not None and not any(e == last.get("epoch") for e, _ in history):
            history.append((int(last["epoch"]), float(final)))
        best = max(history, key=lambda item: sign * item[1]) if history else (None, None)
        run = int(last.get("epoch", 0) or 0)
        if result.error or tune_status == "ERROR":
            status = "error"
        elif tune_status not in (None, "TERMINATED"):  # the search was interrupted
            status = "pending" if tune_status == "PENDING" and not run else "unfinished"
        else:
            status = "done" if run >= epochs else "stopped" if run else "pending"
        rows.append({"trial": trial, "params": params, "status": status,
                     "epochs_run": run, "epochs": epochs, "step": int(last.get("step", 0) or 0), "metric": metric,
                     "final": float(final) if final is not None else None, "best": best[1], "best_epoch": best[0],
                     "error": _error_line(result.error) if result.error else None, "path": result.path})
    return sorted(rows, key=lambda row: row["trial"])


def _error_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".strip()


def best_row(rows: list[dict], mode: str) -> dict | None:
    """The trial with the best final metric (the first of equals), None if no trial reported one."""
    scored = [row for row in rows if row["final"] is not None]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda row: sign * row["final"])  # max keeps the first of equals


def format_value(value: Any) -> str:
    """A sampled value as the table and the progress lines show it."""
    value = plain_value(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict], search_keys: list[str], metric: str, best: dict | None) -> str:
    """The results table: one row per trial; the best one is marked with ``*``."""
    header = ["trial", *search_keys, "epochs", f"{metric} final", f"{metric} best", "status"]
    body = []
    for row in rows:
        mark = "*" if best is not None and row["trial"] == best["trial"] else " "
        body.append([f"{mark}{row['trial']}", *(format_value(row["params"].get(k)) for k in search_keys),
                     f"{row['epochs_run']}/{row['epochs']}",
                     "-" if row["final"] is None else f"{row['final']:.4f}",
                     "-" if row["best"] is None else f"{row['best']:.4f}", row["status"]])
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "-" * len(lines[0]))
    for row in rows:
        if row["error"]:
            lines.append(f"trial {row['trial']} failed: {row['error']}")
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """``path`` relative to the current folder when it lies below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def finish_search(spec: TuneSpec, search_dir: Path, experiment_path: Path, outcome: dict) -> dict:
    """Write results.jsonl, print the table, write best_config.yaml; returns the search's summary.

    Raises:
        SearchFailedError: no trial reported the metric (the table is printed first).
    """
    rows, settings = outcome["rows"], spec.settings
    with open(search_dir / RESULTS_FILE, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, default=str) + "\n")
    best = best_row(rows, settings.mode)
    print(format_table(rows, list(spec.search), settings.metric, best))
    counts = {status: sum(row["status"] == status for row in rows)
              for status in ("done", "stopped", "error", "pending", "unfinished")}
    if counts["pending"] or counts["unfinished"]:
        print(f"\nthe search was interrupted ({counts['pending']} trial(s) pending, {counts['unfinished']} unfinished); "
              f"continue it with: mtkd tune --resume {_shown(search_dir)}")
    summary = {"search_dir": str(search_dir), "tune_dir": str(experiment_path), "trials": len(rows), **counts,
               "metric": settings.metric, "mode": settings.mode, "results": str(search_dir / RESULTS_FILE),
               "teachers": outcome["teachers"]}
    if best is None:
        first = next((row["error"] for row in rows if row["error"]), "no trial reported a result")
        raise SearchFailedError(f"no trial of the search reported {settings.metric}; {first}")
    config = trial_config(spec.experiment, best["params"])
    config.output_dir = str(search_dir / "best")
    save_config(config, search_dir / BEST_CONFIG_FILE)
    shown = _shown(search_dir / BEST_CONFIG_FILE)
    print(f"\nbest: trial {best['trial']} {settings.metric} {best['final']:.4f} -> {shown} "
          f"(mtkd distill --config {shown})")
    return {**summary, "best_trial": best["trial"], "best_value": best["final"], "best_params": best["params"],
            "best_config": str(search_dir / BEST_CONFIG_FILE)}

