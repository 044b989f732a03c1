"""Semantic-segmentation metrics: mIoU, per-class IoU and pixel accuracy from a confusion matrix
accumulated over batches.

Convention (the standard one of mmsegmentation and of torchmetrics'
``MulticlassJaccardIndex(num_classes, average="macro", ignore_index=255)``, which this matches):

* pixels whose label is ``ignore_index`` are dropped, whatever was predicted there;
* the confusion matrix is summed over the whole evaluation set (dataset-level IoU, not a mean of
  per-image IoUs, which is what torchmetrics' ``segmentation.MeanIoU`` computes instead);
* ``IoU_k = TP_k / (TP_k + FP_k + FN_k)``; a class absent from both the ground truth and the
  predictions (union 0) has no IoU (NaN in ``iou``) and is left out of the mean. A class that is
  predicted but never in the ground truth has IoU 0 and counts.
"""
from __future__ import annotations

import math

import torch

from mtkd.models.segmentation.outputs import upsample_logits

__all__ = ["SegmentationMeter"]


class SegmentationMeter:
    """Accumulates a ``[K, K]`` confusion matrix (rows: ground truth, columns: prediction, int64).

    Args:
        num_classes: K.
        ignore_index: label of the pixels that are not scored.

    Usage::

        meter = SegmentationMeter(19)
        for images, labels in loader:
            meter.update(model(images), labels)   # logits [B, K, h, w] or labels [B, H, W]
        meter.reduce()                            # sums over processes under torch.distributed
        metrics = meter.compute()
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.confusion: torch.Tensor | None = None  # created on the device of the first update

    def reset(self) -> None:
        self.confusion = None

    @torch.no_grad()
    def update(self, pred_logits_or_labels: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch.

        Args:
            pred_logits_or_labels: either logits ``[B, K, h, w]`` (floating point; upsampled to the
                label size with bilinear interpolation, ``align_corners=False``, then arg-maxed) or
                predicted labels ``[B, H, W]`` (integers in ``[0, K)``).
            labels: ``[B, H, W]`` integers in ``[0, K)`` or ``ignore_index``.
        """
        K = self.num_classes
        if labels.ndim != 3 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer [B, H, W], got {labels.dtype} {tuple(labels.shape)}")
        pred = pred_logits_or_labels
        if pred.is_floating_point():
            if pred.ndim != 4 or pred.shape[1] != K:
                raise ValueError(f"logits must be [B, {K}, h, w], got {tuple(pred.shape)}")
            if pred.shape[0] != labels.shape[0]:
                raise ValueError(f"logits have batch {pred.shape[0]}, the labels {labels.shape[0]}")
            if tuple(pred.shape[-2:]) != tuple(labels.shape[-2:]):
                pred = upsample_logits(pred, labels)
            pred = pred.argmax(dim=1)
        elif pred.shape != labels.shape:
            raise ValueError(f"predicted labels {tuple(pred.shape)} and labels {tuple(labels.shape)} differ")
        labels, pred = labels.long(), pred.long()
        valid = labels != self.ignore_index
        gt, pr = labels[valid], pred[valid]
        if gt.numel() and (gt.min() < 0 or gt.max() >= K):
            raise ValueError(f"labels outside [0, {K}) other than ignore_index={self.ignore_index}")
        if pr.numel() and (pr.min() < 0 or pr.max() >= K):
            raise ValueError(f"predicted labels outside [0, {K})")
        counts = torch.bincount(gt * K + pr, minlength=K * K).view(K, K)
        if self.confusion is None:
            self.confusion = torch.zeros(K, K, dtype=torch.int64, device=counts.device)
        self.confusion += counts.to(self.confusion.device)

    def reduce(self) -> "SegmentationMeter":
        """Sum the confusion matrix over all processes when ``torch.distributed`` is initialised (a
        collective: every rank must call it, once, before :meth:`compute`); nothing otherwise. A rank
        that saw no batch takes part with zeros. Under NCCL a CPU matrix is reduced on the current CUDA
        device and brought back."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        nccl = dist.get_backend() == "nccl"
        comm_device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        if self.confusion is None:
            zeros_device = comm_device or torch.device("cpu")
            self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=zeros_device)
        home = self.confusion.device
        # NCCL reduces CUDA tensors only: a matrix accumulated on the CPU travels there and back
        buffer = self.confusion.to(comm_device) if nccl and home.type != "cuda" else self.confusion
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        self.confusion = buffer.to(home)
        return self

    def compute(self) -> dict:
        """The metrics as Python numbers.

        Returns:
            ``{"miou", "pixel_acc", "macc", "iou": [K], "acc": [K], "pixels"}``: mean IoU over the
            classes present in the ground truth or the predictions; overall pixel accuracy; mean class
            accuracy (recall) over the classes present in the ground truth; per-class IoU and accuracy
            (NaN where undefined); the number of scored pixels. ``miou``, ``macc`` and ``pixel_acc`` are
            NaN when nothing was scored.
        """
        K = self.num_classes
        conf = self.confusion if self.confusion is not None else torch.zeros(K, K, dtype=torch.int64)
        conf = conf.double().cpu()
        tp = conf.diag()
        gt_total, pred_total = conf.sum(1), conf.sum(0)
        union = gt_total + pred_total - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(gt_total > 0, tp / gt_total.clamp(min=1), nan)
        pixels = conf.sum().item()
        present = union > 0
        return {
            "miou": iou[present].mean().item() if present.any() else math.nan,
            "pixel_acc": tp.sum().item() / pixels if pixels else math.nan,
            "macc": acc[gt_total > 0].mean().item() if (gt_total > 0).any() else math.nan,
            "iou": iou.tolist(),
            "acc": acc.tolist(),
            "pixels": int(pixels),
        }
