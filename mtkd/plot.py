"""PNG plots of a run's metrics (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(metrics: list[dict], path: str | Path, title: str = "") -> None:
    """Accuracy per epoch (train/test) and the mean logit/feature weight per teacher.

    Args:
        metrics: epoch records as written to ``metrics.jsonl``.
        path: PNG file to write.
    """
    if not metrics:
        return
    epochs = [m["epoch"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    dense = any("test/miou" in m for m in metrics)  # segmentation: pixel accuracy and mIoU
    series = (("train/acc", "train"), ("test/acc", "test")) + ((("test/miou", "test mIoU"),) if dense else ())
    for key, label in series:
        axes[0].plot(epochs, [m.get(key) for m in metrics], marker="o", label=label)
    axes[0].set(title="pixel accuracy and mIoU" if dense else "top-1 accuracy", xlabel="epoch", ylabel="accuracy")
    axes[0].legend()
    for axis, kind in ((axes[1], "logit"), (axes[2], "feature")):
        keys = sorted({k for m in metrics for k in m if k.startswith(f"weights/{kind}/")})
        for key in keys:
            axis.plot(epochs, [m.get(key) for m in metrics], marker="o", label=key.split("/", 2)[2])
        axis.set(title=f"mean {kind}-KD weight per teacher", xlabel="epoch", ylabel="weight")
        if keys:
            axis.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_comparison(histories: dict[str, list[dict]], path: str | Path) -> None:
    """Test accuracy per epoch of several runs, and the mean logit weight per teacher of each.

    Args:
        histories: strategy name -> its epoch records.
        path: PNG file to write.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    dense = any("test/miou" in m for h in histories.values() for m in h)  # segmentation: mIoU
    boxes = any("test/map" in m for h in histories.values() for m in h)  # detection: COCO mAP
    key, what = ("test/miou", "mIoU") if dense else ("test/map", "mAP") if boxes else ("test/acc", "top-1")
    for name, history in histories.items():
        axes[0].plot([m["epoch"] for m in history], [m.get(key) for m in history], marker="o", label=name)
    axes[0].set(title=f"student test {what if dense or boxes else 'accuracy'}", xlabel="epoch", ylabel=what)
    axes[0].legend()
    for name, history in histories.items():
        for key in sorted({k for m in history for k in m if k.startswith("weights/logit/")}):
            axes[1].plot([m["epoch"] for m in history], [m.get(key) for m in history], marker=".",
                         label=f"{name}: {key.split('/', 2)[2]}")
    axes[1].set(title="mean logit-KD weight per teacher", xlabel="epoch", ylabel="weight")
    if axes[1].lines:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_class_trust(class_weights: list[list[float]], teacher_names: list[str], class_names: list[str] | None,
                     path: str | Path, title: str = "") -> None:
    """A heat map of which teacher the student learnt each class from: the mean logit-KD weight of
    every teacher (columns) over the samples of every class (rows).

    Args:
        class_weights: ``[C][M]`` mean weights (``class_weights/logit`` of an epoch's metrics).
        teacher_names: M names.
        class_names: C names (None: class indices).
        path: PNG file to write.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    weights = np.asarray(class_weights, dtype=float)
    rows = class_names or [str(c) for c in range(weights.shape[0])]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * weights.shape[1], 0.9 + 0.4 * weights.shape[0]))
    image = ax.imshow(weights, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(teacher_names)), teacher_names)
    ax.set_yticks(range(len(rows)), rows)
    for (r, c), value in np.ndenumerate(weights):
        ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="black" if value > weights.mean() else "white")
    ax.set(title=title or "mean logit-KD weight per teacher and class", xlabel="teacher", ylabel="class")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_segmentation_examples(images: torch.Tensor, masks: torch.Tensor, predictions: dict[str, torch.Tensor],
                               class_names: list[str], path: str | Path, title: str = "") -> None:
    """Test images with their ground truth and each model's predicted mask side by side (one row per
    image, one column per model), in one colour per class with a legend.

    Args:
        images: ``[N, H, W]`` grey images (any scale; shown min-max).
        masks: ``[N, H, W]`` ground-truth class ids (255: ignored, shown black).
        predictions: column title -> ``[N, H, W]`` predicted class ids.
        class_names: K names (colour ``k`` is class ``k``).
        path: PNG file to write.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = plt.get_cmap("tab20")(range(len(class_names)))
    colours[0] = (0.12, 0.12, 0.12, 1.0)  # class 0 (background) dark
    cmap = ListedColormap(colours)
    columns = [("image", None), ("ground truth", masks), *predictions.items()]
    rows = images.shape[0]
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.7 * len(columns), 1.7 * rows + 0.9), squeeze=False)
    for r in range(rows):
        for c, (name, value) in enumerate(columns):
            axis = axes[r][c]
            if value is None:
                axis.imshow(images[r].float().numpy(), cmap="gray")
            else:
                shown = value[r].clone()
                shown[shown == 255] = 0
                axis.imshow(shown.numpy(), cmap=cmap, vmin=0, vmax=len(class_names) - 1, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(name, fontsize=8)
    fig.legend(handles=[Patch(color=colours[k], label=n) for k, n in enumerate(class_names)], loc="lower center",
               ncol=min(6, len(class_names)), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_detection_examples(images: torch.Tensor, targets: torch.Tensor, detections: dict[str, tuple],
                            class_names: list[str], path: str | Path, title: str = "",
                            min_score: float = 0.3) -> None:
    """Test images with their ground-truth boxes and each model's detections side by side (one row per
    image, one column per model), one colour per class, each box labelled with its class (and score).

    Args:
        images: ``[N, H, W]`` grey images (any scale; shown min-max).
        targets: ``[N, G, 5]`` ground truth ``(class, x0, y0, x1, y1)`` in pixels, class -1 for padding.
        detections: column title -> ``(boxes [N, k, 4] xyxy, scores [N, k], labels [N, k])`` (a
            :class:`~mtkd.detection.decode.Detections`); label -1 is padding.
        class_names: K names (colour ``k`` is class ``k``).
        path: PNG file to write.
        min_score: detections scoring below this are not drawn.
    """
    from matplotlib.patches import Patch, Rectangle

    if images.ndim != 3 or targets.ndim != 3 or targets.shape[0] != images.shape[0] or targets.shape[-1] != 5:
        raise ValueError(f"images [N, H, W] and targets [N, G, 5] expected; got {tuple(images.shape)} and "
                         f"{tuple(targets.shape)}")
    colours = plt.get_cmap("tab10")(range(len(class_names)))
    columns = [("ground truth", None), *detections.items()]
    rows = images.shape[0]
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.0 * len(columns), 2.0 * rows + 0.9), squeeze=False)

    def draw(axis, boxes, labels, scores) -> None:
        for (x0, y0, x1, y1), label, score in zip(boxes.tolist(), labels.tolist(), scores):
            if label < 0 or (score is not None and score < min_score):
                continue
            colour = colours[int(label) % len(colours)]
            # pixel edges: a box [x0, x1) covers pixel centres x0 .. x1 - 1
            axis.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, lw=1.2))
            text = class_names[int(label)] + ("" if score is None else f" {score:.2f}")
            axis.text(x0 - 0.5, y0 - 0.5, text, fontsize=5, color="white", va="bottom", ha="left",
                      bbox={"facecolor": colour, "edgecolor": "none", "pad": 0.5, "alpha": 0.8}, clip_on=True)

    for r in range(rows):
        for c, (name, value) in enumerate(columns):
            axis = axes[r][c]
            axis.imshow(images[r].float().numpy(), cmap="gray")
            if value is None:
                draw(axis, targets[r, :, 1:], targets[r, :, 0].long(), [None] * targets.shape[1])
            else:
                boxes, scores, labels = value
                draw(axis, boxes[r], labels[r], scores[r].tolist())
            axis.set_xlim(-0.5, images.shape[-1] - 0.5)
            axis.set_ylim(images.shape[-2] - 0.5, -0.5)
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(name, fontsize=8)
    fig.legend(handles=[Patch(color=colours[k], label=n) for k, n in enumerate(class_names)], loc="lower center",
               ncol=min(5, len(class_names)), fontsize=7, frameon=False)
    fig.suptitle((title + "\n" if title else "") + f"detections scoring at least {min_score:g}", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
