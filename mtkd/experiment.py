"""Plumbing shared by the runtimes: data from a config, loaders, and the run directory
(resolved config, metrics as JSON lines, per-step losses, checkpoints, plot)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mtkd.checkpoint import (META_FILE, TRAINER_STATE_FILE, WEIGHTS_FILE, CheckpointError, join_prefixed,
                             load_trainer_state, load_weights, read_json, save_trainer_state, save_weights,
                             split_prefixed, write_json)
from mtkd.config import DataConfig
from mtkd.data import BatchLoader, ImageDataset, subset, train_test
from mtkd.models import create_model
from mtkd.teachers import save_teacher

CHECKPOINTS = "checkpoints"


def load_data(cfg: DataConfig, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Train and test splits of ``cfg``, subsets taken with ``seed`` when configured."""
    train, test = train_test(cfg.name, cfg.root)
    if cfg.train_subset:
        train = subset(train, min(cfg.train_subset, len(train)), seed)
    if cfg.test_subset:
        test = subset(test, min(cfg.test_subset, len(test)), seed)
    return train, test


def train_loader(dataset: ImageDataset, cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1) -> BatchLoader:
    """Shuffled, augmented training batches (last partial batch dropped: BN needs > 1 sample)."""
    return BatchLoader(dataset, cfg.batch_size, shuffle=True, augment=cfg.augment, crop_padding=cfg.crop_padding,
                       hflip=cfg.hflip, seed=seed, drop_last=True, rank=rank, world_size=world_size,
                       augment_bank=cfg.augment_bank)


def eval_loader(dataset: ImageDataset, cfg: DataConfig) -> BatchLoader:
    return BatchLoader(dataset, cfg.eval_batch_size, shuffle=False, augment=False)


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
        """The complete checkpoints (their meta.json is written last), oldest first."""
        return [f for f in sorted((self.path / CHECKPOINTS).glob("epoch_*")) if (f / META_FILE).is_file()]

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint."""
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def held_checkpoints(self) -> list[Path]:
        """Every checkpoint of either runtime under this folder: the in-process runtime's complete
        ``checkpoints/epoch_*`` and Ray Train's ``ray/<run>/checkpoint_*`` (the default storage)."""
        return self.complete_checkpoints() + sorted(f for f in (self.path / "ray").glob("*/checkpoint_*") if f.is_dir())

    def checkpoint_to_resume(self) -> Path:
        """The newest complete checkpoint; raises :class:`CheckpointError` when there is none."""
        folder = self.latest_checkpoint()
        if folder is None:
            raise CheckpointError(f"no complete checkpoint under {str(self.path / CHECKPOINTS)!r} to resume from")
        return folder

    def prune(self, keep: int) -> None:
        folders = sorted((self.path / CHECKPOINTS).glob("epoch_*"))
        for folder in folders[: max(0, len(folders) - keep)]:
            shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(folder: Path, state: dict, meta: dict) -> None:
    """Write an engine ``state_dict()``: weights (module + agent policy) to safetensors, the rest
    to a weights-only torch file, ``meta`` (epoch, manifest, metrics) to JSON last."""
    folder.mkdir(parents=True, exist_ok=True)
    strategy = dict(state["strategy"])
    agent = strategy.pop("agent", None)
    weights = {"module": state["module"]}
    rest = {k: v for k, v in state.items() if k not in ("module", "strategy")}
    if agent is not None:
        weights["policy"] = agent["policy"]
        rest["agent"] = {k: v for k, v in agent.items() if k != "policy"}
    save_weights(folder / WEIGHTS_FILE, join_prefixed(**weights))
    save_trainer_state(folder / TRAINER_STATE_FILE, rest)
    write_json(folder / META_FILE, meta)


def load_checkpoint(folder: Path) -> tuple[dict, dict]:
    """Inverse of :func:`save_checkpoint`: ``(engine state, meta)``."""
    meta = read_json(folder / META_FILE)
    weights = load_weights(folder / WEIGHTS_FILE)
    rest = load_trainer_state(folder / TRAINER_STATE_FILE)
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
