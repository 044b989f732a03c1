"""``canvases_det``: the garment canvases as a detection set (a box per visible garment), registered
in ``DATASETS`` with ``task = "detection"`` (:mod:`mtkd.detection.canvas_boxes` makes the boxes,
:class:`mtkd.detection.dataset.DetectionSet` the batches)."""
from __future__ import annotations

import dataclasses

from mtkd.data.dataset import DataError, channel_stats
from mtkd.data.registry import DATASETS


@DATASETS.register(name="canvases_det")
def canvas_detection_split(root=None, split="train", *, mean=None, std=None, num_canvases: int | dict | None = None,
                           seed: int = 0, cache_dir: str | None = None, min_visible: float = 0.3,
                           augment_scale: list[float] | None = None, **params):
    """A split of garment canvases with their boxes (10 classes, Fashion-MNIST's; no background class).

    Args:
        root: the Fashion-MNIST folder (default ``/usr/share/datasets/fashion-mnist``).
        split: ``"train"`` or ``"test"``.
        mean, std: normalisation; default the train canvases' own statistics.
        num_canvases: canvases in the split, or per split ``{train: 4000, test: 1000}``.
        seed: the canvases' seed (the data's; independent of the run's seed).
        cache_dir: a folder for safetensors copies of the canvases and their boxes.
        min_visible: drop a garment whose visible pixels are fewer than this fraction of its coverage.
        augment_scale: ``[lo, hi]`` random scale of augmented training batches (None: shift and flip only;
            ``scale`` is the canvases' garment scale, a :class:`~mtkd.data.canvases.CanvasParams` field).
        **params: :class:`~mtkd.data.canvases.CanvasParams` fields (``size``, ``garments``, ``scale``...).

    Returns:
        A :class:`~mtkd.detection.dataset.DetectionSet` (targets ``[S, garments[1], 5]``).

    Example YAML:
        data: {name: canvases_det, options: {size: 64, num_canvases: {train: 4000, test: 1000}}}
    """
    from mtkd.data.canvases import CanvasParams
    from mtkd.detection.canvas_boxes import CANVAS_DET_CLASSES, DetectionCanvases
    from mtkd.detection.dataset import DetectionSet

    try:
        canvas_params = CanvasParams(**params)
    except TypeError as err:
        raise DataError(f"canvases_det: {err}; the options are num_canvases, seed, cache_dir, min_visible, "
                        f"augment_scale and "
                        f"{', '.join(f.name for f in dataclasses.fields(CanvasParams))}") from None

    def make(which: str) -> DetectionCanvases:
        count = num_canvases.get(which) if isinstance(num_canvases, dict) else num_canvases
        return DetectionCanvases(which, num_canvases=count, seed=seed, params=canvas_params, root=root,
                                 cache_dir=cache_dir, min_visible=min_visible)

    data = make(split)
    if mean is None or std is None:
        mean, std = channel_stats((data if split == "train" else make("train")).images)
    return DetectionSet(data.images, data.targets, len(CANVAS_DET_CLASSES), "canvases_det", split, mean, std,
                        CANVAS_DET_CLASSES, augment_scale, content_key=data.key)


def check_options(options: dict) -> None:
    """Refuse, before any canvas is made, an option ``canvases_det`` does not take or a bad canvas
    parameter (``DataError`` naming it): what ``DataConfig`` calls at load."""
    from mtkd.data.canvases import CanvasParams

    own = {"num_canvases", "seed", "cache_dir", "min_visible", "augment_scale", "root", "mean", "std"}
    params = {k: v for k, v in options.items() if k not in own}
    try:
        CanvasParams(**params)
    except TypeError as err:
        raise DataError(f"canvases_det: {err}; the options are {', '.join(sorted(own - {'root', 'mean', 'std'}))} and "
                        f"{', '.join(f.name for f in dataclasses.fields(CanvasParams))}") from None


canvas_detection_split.task = "detection"  # read by mtkd.tasks.dataset_task before any canvas is made
canvas_detection_split.check_options = check_options  # read by DataConfig at load
