"""Plumbing shared by the runtimes: data from a config, loaders, and the run directory
(resolved config, metrics as JSON lines, per-step losses, checkpoints, plot)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import torch

from mtkd.checkpoint import (DIGESTS_KEY, META_FILE, TRAINER_STATE_FILE, WEIGHTS_FILE, CheckpointError, file_digests,
                             fsync_dir, fsync_file, join_prefixed, load_trainer_state, load_weights, read_json,
                             save_trainer_state, save_weights, split_prefixed, uninterrupted, verify_files,
                             write_json)
from mtkd.config import DataConfig
from mtkd.data import BatchLoader, ImageDataset, subset, train_test
from mtkd.models import create_model
from mtkd.teachers import save_teacher

CHECKPOINTS = "checkpoints"
RAY_RUN_FILE = "ray_run.json"  # the Ray runtime's record of its Ray Train run: {"name", "storage_path"}
T = TypeVar("T")
R = TypeVar("R")


def load_data(cfg: DataConfig, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Train and test splits of ``cfg``, subsets taken with ``seed`` when configured: in memory, or
    for ``cityscapes``/``ade20k``/``pascal_voc`` file lists read batch by batch (``SegmentationFileSet``)."""
    train, test = train_test(cfg.name, cfg.root, **cfg.options)
    if cfg.train_subset:
        train = subset(train, min(cfg.train_subset, len(train)), seed)
    if cfg.test_subset:
        test = subset(test, min(cfg.test_subset, len(test)), seed)
    return train, test


def train_loader(dataset: ImageDataset, cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1) -> BatchLoader:
    """Shuffled, augmented training batches (last partial batch dropped: BN needs > 1 sample); a
    file-backed segmentation split gives random scale/crop/flip crops of ``options.crop_size``."""
    return BatchLoader(dataset, cfg.batch_size, shuffle=True, augment=cfg.augment, crop_padding=cfg.crop_padding,
                       hflip=cfg.hflip, seed=seed, drop_last=True, rank=rank, world_size=world_size,
                       augment_bank=cfg.augment_bank)


def eval_loader(dataset: ImageDataset, cfg: DataConfig) -> BatchLoader:
    """The whole split in order, unaugmented, in batches of ``eval_batch_size`` (a file-backed
    segmentation split: whole images at full resolution, padded to the batch's largest)."""
    return BatchLoader(dataset, cfg.eval_batch_size, shuffle=False, augment=False)


# ------------------------------------------------------------------------------ choosing a checkpoint
def print_warning(message: str) -> None:
    """One ``[mtkd] warning: ...`` line on stderr."""
    print(f"[mtkd] warning: {message}", file=sys.stderr, flush=True)


def is_valid_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a valid checkpoint: its files match the digests in its meta.json
    (checked when it was written: it loaded then), or, written before digests, it loads."""
    try:
        meta = read_json(Path(folder) / META_FILE)
        if isinstance(meta, dict) and DIGESTS_KEY in meta:
            verify_files(folder, meta)
        else:
            load_checkpoint(folder)
    except CheckpointError:
        return False
    return True


def newest_loadable(candidates: Iterable[T], load: Callable[[T], R], warn: Callable[[str], None] | None = None,
                    name: Callable[[T], str] = str) -> tuple[T, R] | None:
    """The first of ``candidates`` (newest first) that ``load`` loads without :class:`CheckpointError`:
    ``(candidate, what load returned)``, or None. For each one passed over, ``warn`` gets one line:
    the file and why, and the checkpoint used instead (once it is known)."""
    skipped: list[tuple[T, CheckpointError]] = []
    for candidate in candidates:
        try:
            loaded = load(candidate)
        except CheckpointError as error:
            skipped.append((candidate, error))
            continue
        if warn is not None:
            for bad, error in skipped:
                warn(f"checkpoint {name(bad)} is not usable: {_one_line(error)}; "
                     f"resuming from {name(candidate)} instead")
        return candidate, loaded
    return None


def no_valid_checkpoint(run_path: Path, tried: list, name: Callable = lambda f: Path(f).name) -> str:
    """The one-line message of a run folder without a valid checkpoint (``tried``: those that failed)."""
    shown = f" (none of {len(tried)} checkpoint(s) is valid: {', '.join(name(f) for f in tried)})" if tried else ""
    return (f"run folder {str(run_path)!r} has no valid checkpoint to resume from{shown}; "
            f"start it again with --overwrite")


def _one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


# ------------------------------------------------------------------------------ run folder
class RunDirectory:
    """The files of one run::

        config.yaml        resolved config
        metrics.jsonl      one line per epoch
        steps.jsonl        one line per step (loss parts)
        plot.png           accuracy and mean teacher weights over epochs
        checkpoints/epoch_0003/{weights.safetensors, trainer_state.pt, meta.json}
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def steps_path(self) -> Path:
        return self.path / "steps.jsonl"

    @property
    def plot_path(self) -> Path:
        return self.path / "plot.png"

    def create(self) -> None:
        (self.path / CHECKPOINTS).mkdir(parents=True, exist_ok=True)

    def append(self, path: Path, record: dict) -> None:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self, path: Path) -> list[dict]:
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate(self, path: Path, key: str, last: int) -> None:
        """Drop records whose ``key`` is beyond ``last`` (work done after the checkpoint resumed from)."""
        kept = [r for r in self.read(path) if r.get(key, 0) <= last]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_dir(self, epoch: int) -> Path:
        return self.path / CHECKPOINTS / f"epoch_{epoch:04d}"

    def complete_checkpoints(self) -> list[Path]:
        """The complete checkpoints (their meta.json is written last), oldest first. Complete is not
        valid: :meth:`newest_valid_checkpoint` checks their files."""
        return [f for f in sorted((self.path / CHECKPOINTS).glob("epoch_*")) if (f / META_FILE).is_file()]

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (not checked: see :meth:`newest_valid_checkpoint`)."""
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def recorded_ray_run(self) -> Path | None:
        """The folder of the Ray Train run that :data:`RAY_RUN_FILE` records (``storage_path/name``),
        when its storage is a local path; None without a readable record or for a remote URI."""
        try:
            record = read_json(self.path / RAY_RUN_FILE)
            name, storage = str(record["name"]), str(record["storage_path"])
        except (CheckpointError, KeyError, TypeError):
            return None
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            return None
        if storage.startswith("file://"):
            storage = storage[len("file://"):]
        elif "://" in storage:
            return None
        return Path(storage) / name

    def held_checkpoints(self) -> list[Path]:
        """Every checkpoint of either runtime this run folder holds: the in-process runtime's complete
        ``checkpoints/epoch_*``, Ray Train's ``ray/<run>/checkpoint_*`` (the default storage) and those
        of the Ray Train run recorded in :data:`RAY_RUN_FILE`, wherever its local storage is."""
        ray_runs = {f for f in (self.path / "ray").glob("*/checkpoint_*") if f.is_dir()}
        recorded = self.recorded_ray_run()
        if recorded is not None:
            ray_runs |= {f for f in recorded.glob("checkpoint_*") if f.is_dir()}
        return self.complete_checkpoints() + sorted(ray_runs, key=lambda f: (f.name, str(f)))

    def newest_valid_checkpoint(self, warn: Callable[[str], None] | None = None) -> tuple[Path, dict, dict] | None:
        """The newest checkpoint whose files match their digests and load: ``(folder, engine state,
        meta)``, or None. Each newer one passed over is reported to ``warn`` in one line (which
        file, why, which checkpoint is used instead)."""
        found = newest_loadable(reversed(self.complete_checkpoints()), load_checkpoint, warn)
        return None if found is None else (found[0], *found[1])

    def load_resumable(self, warn: Callable[[str], None] | None = print_warning) -> tuple[Path, dict, dict]:
        """:meth:`newest_valid_checkpoint`, required: ``(folder, engine state, meta)``.

        Raises:
            CheckpointError: no checkpoint of this run folder is valid (one line naming the folder).
        """
        found = self.newest_valid_checkpoint(warn)
        if found is None:
            raise CheckpointError(no_valid_checkpoint(self.path, self.complete_checkpoints()))
        return found

    def checkpoint_to_resume(self, warn: Callable[[str], None] | None = print_warning) -> Path:
        """The newest valid checkpoint (see :meth:`load_resumable`); raises :class:`CheckpointError`
        when there is none."""
        return self.load_resumable(warn)[0]

    def resumable_epoch(self) -> int | None:
        """The epoch of the newest valid checkpoint (what ``--resume`` continues after), or None."""
        found = self.newest_valid_checkpoint()
        return None if found is None else int(found[2].get("epoch", 0))

    def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` valid checkpoints and any folder newer than them; delete the
        older ones. Nothing is deleted while no checkpoint is valid, so a valid checkpoint is never
        given up for corrupt ones. Unfinished writes (``.epoch_*`` folders) are removed."""
        with uninterrupted():
            root = self.path / CHECKPOINTS
            for leftover in root.glob(".epoch_*"):  # a write or a deletion cut short
                shutil.rmtree(leftover, ignore_errors=True)
            folders = sorted(root.glob("epoch_*"), reverse=True)
            valid: list[Path] = []
            for folder in folders:
                if len(valid) >= max(1, keep):
                    break
                if is_valid_checkpoint(folder):
                    valid.append(folder)
            if not valid:
                return
            for folder in folders:
                if folder.name < valid[-1].name:
                    remove_checkpoint(folder)


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder: first renamed away (one step), so a deletion cut short never
    leaves a folder that looks complete."""
    trash = folder.with_name(f".{folder.name}.deleting-{os.getpid()}")
    os.replace(folder, trash)
    fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def write_checkpoint_folder(folder: Path, fill: Callable[[Path], None]) -> None:
    """Write a checkpoint folder as a whole: ``fill`` writes its files into a hidden sibling
    (``.epoch_0003.partial``), which is flushed, verified (:func:`load_checkpoint`) and renamed to
    ``folder`` (an existing ``folder`` is replaced). A write cut short leaves only the hidden folder.

    Raises:
        CheckpointError: what ``fill`` wrote does not verify.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.partial")
    with uninterrupted():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        fill(partial)
        for path in partial.iterdir():
            fsync_file(path)
        fsync_dir(partial)
        try:
            load_checkpoint(partial)
        except CheckpointError as error:
            raise CheckpointError(f"checkpoint written to {str(folder)!r} does not verify: "
                                  f"{_one_line(error)}") from error
        if folder.exists():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()  # an empty folder made for it (a TemporaryDirectory)
            else:
                remove_checkpoint(folder)  # an earlier (or corrupt) checkpoint of the same epoch
        os.replace(partial, folder)
        fsync_dir(folder.parent)


def save_checkpoint(folder: Path, state: dict, meta: dict) -> None:
    """Write an engine ``state_dict()``: weights (module + agent policy) to safetensors, the rest
    to a weights-only torch file, ``meta`` (epoch, manifest, metrics) to JSON last, with the sha256
    and size of the other two (``files``). The folder appears whole or not at all
    (:func:`write_checkpoint_folder`)."""
    strategy = dict(state["strategy"])
    agent = strategy.pop("agent", None)
    weights = {"module": state["module"]}
    rest = {k: v for k, v in state.items() if k not in ("module", "strategy")}
    if agent is not None:
        weights["policy"] = agent["policy"]
        rest["agent"] = {k: v for k, v in agent.items() if k != "policy"}

    def fill(partial: Path) -> None:
        save_weights(partial / WEIGHTS_FILE, join_prefixed(**weights))
        save_trainer_state(partial / TRAINER_STATE_FILE, rest)
        digests = file_digests(partial, [WEIGHTS_FILE, TRAINER_STATE_FILE])
        write_json(partial / META_FILE, {**meta, DIGESTS_KEY: digests})

    write_checkpoint_folder(folder, fill)


def load_checkpoint(folder: Path) -> tuple[dict, dict]:
    """Inverse of :func:`save_checkpoint`: ``(engine state, meta)``. The files are checked against
    the digests in meta.json first (a checkpoint written before digests: only that they load).

    Raises:
        CheckpointError: a file is missing, truncated, altered or does not load (naming it).
    """
    folder = Path(folder)
    meta = read_json(folder / META_FILE)
    if not isinstance(meta, dict):
        raise CheckpointError(f"metadata file {str(folder / META_FILE)!r} is not a JSON object")
    verify_files(folder, meta)
    weights = load_weights(folder / WEIGHTS_FILE)
    rest = load_trainer_state(folder / TRAINER_STATE_FILE)
    if not isinstance(rest, dict):
        raise CheckpointError(f"trainer state {str(folder / TRAINER_STATE_FILE)!r} is not a mapping")
    state = {k: v for k, v in rest.items() if k != "agent"}
    state["module"] = split_prefixed(weights, "module")
    state["strategy"] = {}
    if "agent" in rest:
        state["strategy"] = {"agent": {**rest["agent"], "policy": split_prefixed(weights, "policy")}}
    if not state["module"]:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: no student weights")
    return state, meta


def export_student(folder: Path, module_state: dict[str, torch.Tensor], meta: dict) -> None:
    """Write the student alone as a teacher-format checkpoint (loadable by ``mtkd eval``)."""
    model = create_model(meta["model"], num_classes=meta["num_classes"], in_channels=meta["in_channels"])
    model.load_state_dict(split_prefixed(module_state, "student"))
    save_teacher(folder, model, meta)
