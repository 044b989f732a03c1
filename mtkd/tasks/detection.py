"""Object detection (CenterNet): per-image units, or per-object units (each box, and each image's
background, a decision unit).

Outputs are :class:`~mtkd.detection.models.DetectionOutputs` (``logits [B, K + 4, h, w]``: K heatmap
logits, box size and offset); targets are packed boxes ``[B, N, 5]`` (N fixed per dataset, padding
class -1), encoded on the student's map (:func:`~mtkd.detection.encode.encode_centernet`: Gaussian
heatmaps, centre cells, the ``owner`` partition of the cells into objects and background).

* **Task loss**: CenterNet's (focal heatmap loss + size and offset L1), per image.
* **Logit distillation** per (unit, teacher): the heatmap binary KL at T averaged over the unit's cells
  (per image: objects share ``fg_share`` of the image equally, the background the rest, FGD's
  weighting), plus the L1 between the box channels at the objects' centre cells (per image: the mean
  over its objects).
* **Feature distillation**: PKD (each channel standardised per image, then MSE) on the projected
  student neck map, reduced per unit like the heatmap KL.
* **Units** with ``units = "object"``: U = B * (N + 1), unit ``b * (N + 1) + n`` is object slot ``n``
  of image ``b`` (``n = N``: its background). Its mass (:class:`~mtkd.tasks.base.DistillTerms`) is its
  share of its image's value divided by B, so equal weights give back the per-image loss exactly. A
  padding slot, or an object that owns no cell, has mass 0 and mirrors its image's background unit
  (losses, state, reward), so fixed-size agent buffers see no made-up values.
* **Rows** for ``ebkd``, ``camkd`` and the ``meta`` rule: one per (cell, class) of the student's map
  (:mod:`mtkd.detection.rows`), each with its unit; unit labels are the object's class, ``K`` for a
  background or padding unit, an image's most frequent class (``K`` without objects).
* **Metric**: COCO mAP (``test/map``, also ``test/acc``) and mAP@0.5 (``test/map50``) of the decoded
  peaks (:mod:`mtkd.detection.metrics`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.detection.decode import decode_centernet
from mtkd.detection.encode import CenterNetTargets, encode_centernet
from mtkd.detection.losses import centernet_loss, heatmap_kd, pkd_loss, regression_kd
from mtkd.detection.metrics import DetectionMeter
from mtkd.detection.models import OUTPUT_STRIDE, split_logits
from mtkd.detection.rows import binary_rows, row_labels
from mtkd.detection.state import state_parts
from mtkd.devices import autocast
from mtkd.distill.projector import resize_feature_map
from mtkd.distill.state import AgentState
from mtkd.distill.strategies import StepInputs
from mtkd.models import Outputs
from mtkd.tasks.base import DistillTerms, StudentTerms, Task


class DetectionTask(Task):
    """CenterNet detection on packed boxes (see the module docstring).

    Args:
        num_classes: K (no background class).
        max_objects: N, object slots per image (the dataset's ``max_objects``).
        units: ``"image"`` or ``"object"`` (objects + background per image).
        fg_share: the objects' share of an image's distillation losses (FGD's foreground weighting).
        stride: the detectors' output stride.
        positive: a (cell, class) row is a positive where the target heatmap is at least this.
    """

    name = "detection"
    UNITS = ("image", "object")

    def __init__(self, num_classes: int, max_objects: int, units: str = "image", fg_share: float = 0.5,
                 stride: int = OUTPUT_STRIDE, positive: float = 0.5):
        if units not in self.UNITS:
            raise ValueError(f"units={units!r}; expected one of {self.UNITS}")
        if not 0 < fg_share < 1:
            raise ValueError(f"fg_share={fg_share}; expected 0 < fg_share < 1")
        self.num_classes, self.max_objects = int(num_classes), int(max_objects)
        self.units, self.fg_share, self.stride, self.positive = units, float(fg_share), int(stride), float(positive)
        self._memo: tuple | None = None  # (targets, size, encoded): the step's targets are encoded once

    @property
    def per_object(self) -> bool:
        return self.units == "object"

    @property
    def units_per_image(self) -> int:
        return self.max_objects + 1 if self.per_object else 1

    def unit_classes(self, num_classes: int) -> int:
        return num_classes + 1  # label K: a background (or padding) unit

    def check_teachers(self, descriptions: list[dict]) -> None:
        from mtkd.detection.models import DET_MODELS
        from mtkd.engine import PoolMismatchError

        for d in descriptions:
            if d["model"] not in DET_MODELS:
                raise PoolMismatchError(f"teacher {d['name']!r} is a {d['model']!r}, not a detector; a detection set "
                                        f"needs detector teachers (valid: {', '.join(DET_MODELS.names())})")

    # ---------------------------------------------------------------- helpers
    def encode(self, logits: torch.Tensor, targets: torch.Tensor) -> CenterNetTargets:
        """``targets [B, N, 5]`` encoded on the map of ``logits [B, K + 4, h, w]`` (once per step)."""
        size = tuple(logits.shape[-2:])
        if self._memo is not None and self._memo[0] is targets and self._memo[1] == size:
            return self._memo[2]
        encoded = encode_centernet(targets, self.num_classes, self.stride, size)
        self._memo = (targets, size, encoded)
        return encoded

    def _empty(self, encoded: CenterNetTargets) -> torch.Tensor:
        """``[B, N + 1]`` bool: units that own no cell (padding slots, hidden objects)."""
        unit = torch.where(encoded.owner < 0, self.max_objects, encoded.owner).flatten(1)
        count = torch.zeros(unit.shape[0], self.max_objects + 1, dtype=torch.int64, device=unit.device)
        return count.scatter_add_(1, unit, torch.ones_like(unit)) == 0

    @staticmethod
    def _mirror(values: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        """``[B, N + 1, ...]``: each empty unit takes its image's background values (the last unit)."""
        shape = (*empty.shape, *([1] * (values.dim() - 2)))
        return torch.where(empty.view(shape), values[:, -1:].expand_as(values), values)

    def _check_slots(self, targets: torch.Tensor) -> None:
        if targets.ndim != 3 or targets.shape[1:] != (self.max_objects, 5):
            raise ValueError(f"detection targets {tuple(targets.shape)}; expected [B, {self.max_objects}, 5]")

    # ---------------------------------------------------------------- losses
    def student_terms(self, student: Outputs, targets: torch.Tensor) -> StudentTerms:
        self._check_slots(targets)
        encoded = self.encode(student.logits, targets)
        loss = centernet_loss(student.logits, encoded)
        if self.per_object:
            units = torch.cat([loss.per_object, loss.background[:, None]], 1)  # [B, N + 1]
            unit_loss = self._mirror(units, self._empty(encoded)).flatten()
        else:
            unit_loss = loss.per_image
        with torch.no_grad():  # an object is found when its class scores above 0.5 at its centre cell
            heat = split_logits(student.logits.detach()).heatmap.flatten(1)  # [B, K*h*w]
            cells = heat.shape[1] // self.num_classes
            label = targets[..., 0].long().clamp(min=0)
            found = (heat.gather(1, label * cells + encoded.centre) > 0) & encoded.valid
        return StudentTerms(loss.per_image.mean(), unit_loss, found.sum(), encoded.valid.sum())

    def distill_terms(self, student: Outputs, projected: list[torch.Tensor], teachers: list[Outputs],
                      targets: torch.Tensor, temperature: float) -> DistillTerms:
        encoded = self.encode(student.logits, targets)
        owner, n = encoded.owner, self.max_objects
        empty = self._empty(encoded)
        kls, mses, mass = [], [], None
        for p, t in zip(projected, teachers):
            kd = heatmap_kd(student.logits, t.logits, temperature, owner, n, self.fg_share)
            _, reg = regression_kd(student.logits, t.logits, encoded)  # [B, N]
            feature = pkd_loss(p, t.feature, owner, n, self.fg_share)
            if self.per_object:
                fg = kd.mass[:, :n].sum(1, keepdim=True)  # [B, 1] the objects' share of their image
                box = torch.where(empty[:, :n], torch.zeros_like(reg), reg / fg.clamp(min=1e-12))
                kls.append(self._mirror(kd.units + F.pad(box, (0, 1)), empty).flatten())
                mses.append(self._mirror(feature.units, empty).flatten())
                mass = kd.mass.flatten() / owner.shape[0]
            else:
                found = ~empty[:, :n]  # objects that own cells (a hidden one owns none)
                box = (reg * found).sum(1) / found.sum(1).clamp(min=1)
                kls.append(kd.per_image + box)
                mses.append(feature.per_image)
        return DistillTerms(torch.stack(kls, 1), torch.stack(mses, 1), mass)

    # ------------------------------------------------------------ agent state
    def agent_state(self, student: Outputs, projected: list[torch.Tensor], teachers: list[Outputs],
                    targets: torch.Tensor, temperature: float) -> AgentState:
        encoded = self.encode(student.logits, targets)
        parts = state_parts(student.logits.detach(), [p.detach() for p in projected], [t.logits for t in teachers],
                            [t.feature for t in teachers], encoded, targets[..., 1:], self.stride, temperature,
                            self.per_object, self.fg_share)
        if self.per_object:
            empty = self._empty(encoded)
            for name in ("cos", "kl", "ce", "loc"):
                setattr(parts, name, self._mirror(getattr(parts, name), empty))
        flat = lambda v: v.flatten(0, 1)  # noqa: E731  [B, U_b, M] -> [U, M]
        return AgentState(vector=parts.vector(), teacher_ce=flat(parts.ce), logit_gap=flat(parts.kl),
                          feature_gap=flat(parts.cos))

    def state_layout(self, descriptions: list[dict], num_classes: int) -> tuple[list[int], int]:
        # per teacher [cos, KL, focal, loc]: the block [cos, KL, CE, D_m values] with D_m = 1, C = 0
        return [1] * len(descriptions), 0

    # ---------------------------------------------------------- strategy view
    @torch.no_grad()
    def step_inputs(self, student: Outputs, teachers: list[Outputs], targets: torch.Tensor, state: AgentState | None,
                    warmup: bool, temperature: float) -> StepInputs:
        logits = student.logits.detach()
        batch, _, height, width = logits.shape
        encoded = self.encode(logits, targets)
        k = self.num_classes
        teacher_rows = []
        for t in teachers:
            heat = split_logits(t.logits).heatmap
            if tuple(heat.shape[-2:]) != (height, width):
                heat = F.interpolate(heat, size=(height, width), mode="bilinear", align_corners=False)
            teacher_rows.append(binary_rows(heat))
        if self.per_object:
            cell_unit = (torch.arange(batch, device=logits.device)[:, None, None] * (self.max_objects + 1)
                         + torch.where(encoded.owner < 0, self.max_objects, encoded.owner))  # [B, h, w]
        else:
            cell_unit = torch.arange(batch, device=logits.device)[:, None, None].expand(batch, height, width)
        unit = cell_unit.flatten().repeat_interleave(k)  # rows are (b, y, x, class)
        feature = resize_feature_map(student.feature.detach(), (height, width))
        embedding = feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1]).repeat_interleave(k, 0)
        return StepInputs(teacher_rows, row_labels(encoded.heatmap, self.positive), state, warmup,
                          student_logits=binary_rows(split_logits(logits).heatmap), student_embedding=embedding,
                          temperature=temperature, unit_of_row=unit,
                          num_units=batch * self.units_per_image, unit_targets=self._unit_labels(targets))

    def _unit_labels(self, targets: torch.Tensor) -> torch.Tensor:
        """``[U]``: an object unit's class, ``K`` for background and padding; per image its most frequent class."""
        label = targets[..., 0].long()
        valid = label >= 0
        background = torch.full_like(label[:, :1], self.num_classes)
        if self.per_object:
            return torch.cat([torch.where(valid, label, background), background], 1).flatten()
        votes = torch.zeros(label.shape[0], self.num_classes, device=label.device)
        votes.scatter_add_(1, label.clamp(min=0), valid.to(votes.dtype))
        return torch.where(valid.any(1), votes.argmax(1), background[:, 0])

    # ----------------------------------------------------------------- metric
    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32") -> dict:
        """``test/map`` (COCO mAP@[.5:.95], also ``test/acc``), ``test/map50`` and ``test/loss`` (CenterNet's
        loss, mean per image) of ``model`` over ``loader``."""
        was_training = model.training
        model.eval()
        meter = DetectionMeter(self.num_classes)
        loss_sum, images_seen = torch.zeros((), dtype=torch.float64, device=device), 0
        for batch in loader:
            images, targets = batch.images.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = Outputs(*model(images)).logits.float()
            encoded = encode_centernet(targets, self.num_classes, self.stride, tuple(logits.shape[-2:]))
            loss_sum += centernet_loss(logits, encoded).per_image.sum()
            images_seen += images.shape[0]
            meter.update(decode_centernet(logits, self.stride, tuple(images.shape[-2:])), targets)
        model.train(was_training)
        scores = meter.compute()
        return {"test/map": scores["map"], "test/map50": scores["map50"], "test/acc": scores["map"],
                "test/loss": float(loss_sum) / max(images_seen, 1)}
