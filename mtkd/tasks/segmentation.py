"""Semantic segmentation: per-image units, or per-region units (cells of a ``G x G`` grid).

Logits are maps ``[B, K, h, w]`` at the head's own stride, labels ``[B, H, W]`` with 255 ignored
(conventions of :mod:`mtkd.distill.dense_losses`). Per unit and teacher: the pixel KL at
temperature T and the feature MSE, averaged over the unit's pixels; the student's pixel
cross-entropy at the label size is the task loss.

What strategies read (:class:`~mtkd.distill.strategies.StepInputs`) comes as *rows*: one per valid
pixel of the student's logit grid (teacher logits resized there, bilinear; labels nearest-sampled),
each with the unit it belongs to. A strategy that scores teachers per sample (``ebkd``, ``camkd``,
the ``meta`` rule) scores each row and averages over the unit's rows. The ``meta`` rule's
similarity between pixels reads the student's backbone feature there (the head's input), the
closest per-pixel counterpart of the classifier's input it reads in classification.
"""
from __future__ import annotations

import torch
from torch import nn

from mtkd.dense_metrics import SegmentationMeter
from mtkd.devices import autocast
from mtkd.distill.dense_losses import (_masked_image_mean, cell_ids, cell_mean, cwd_cells, cwd_loss,
                                       dense_feature_mse, dense_feature_mse_cells, downsample_labels, pixel_ce_map,
                                       pixel_kd_kl, pixel_kd_kl_cells, resize_logits)
from mtkd.distill.dense_state import dense_agent_state
from mtkd.distill.projector import resize_feature_map
from mtkd.distill.state import AgentState
from mtkd.distill.strategies import StepInputs
from mtkd.models import Outputs
from mtkd.models.segmentation.outputs import upsample_logits
from mtkd.tasks.base import DistillTerms, StudentTerms, Task

IGNORE_INDEX = 255


class SegmentationTask(Task):
    """Dense logits and masks; units are images (``region_grid = 0``) or ``G x G`` cells of each
    image (``region_grid = G``: U = B * G * G, cell-major within an image).

    Args:
        num_classes: K (background included).
        region_grid: G, or 0 for per-image units.
        ignore_index: the mask value of pixels that take no part.
        logit_kd: ``"kl"`` (per-pixel KL at temperature T over the valid pixels) or ``"cwd"``
            (channel-wise distillation: each class channel a distribution over the unit's positions).
    """

    name = "segmentation"
    LOGIT_KD = ("kl", "cwd")

    def __init__(self, num_classes: int, region_grid: int = 0, ignore_index: int = IGNORE_INDEX,
                 logit_kd: str = "kl"):
        if logit_kd not in self.LOGIT_KD:
            raise ValueError(f"logit_kd={logit_kd!r}; expected one of {self.LOGIT_KD}")
        self.num_classes = int(num_classes)
        self.grid = int(region_grid)
        self.ignore_index = ignore_index
        self.logit_kd = logit_kd

    @property
    def per_region(self) -> bool:
        return self.grid > 0

    # ------------------------------------------------------------------ losses
    def student_terms(self, student: Outputs, targets: torch.Tensor) -> StudentTerms:
        logits = upsample_logits(student.logits, targets)  # [B, K, H, W]: once, for the loss and the count
        ce, valid = pixel_ce_map(logits, targets, self.ignore_index)  # [B, H, W] each
        per_image = _masked_image_mean(ce, valid)  # [B]
        unit_loss = cell_mean(ce, self.grid, valid).value.flatten() if self.per_region else per_image
        with torch.no_grad():
            correct = ((logits.detach().argmax(1) == targets) & valid).sum()
        return StudentTerms(per_image.mean(), unit_loss, correct, valid.sum())

    def distill_terms(self, student: Outputs, projected: list[torch.Tensor], teachers: list[Outputs],
                      targets: torch.Tensor, temperature: float) -> DistillTerms:
        valid = self._valid(student, targets)  # [B, h, w] at the student's logit size
        cwd = self.logit_kd == "cwd"
        if not self.per_region:
            kd = cwd_loss if cwd else lambda s, t, T: pixel_kd_kl(s, t, T, valid)
            kl = torch.stack([kd(student.logits, t.logits, temperature) for t in teachers], 1)
            mse = torch.stack([dense_feature_mse(p, t.feature) for p, t in zip(projected, teachers)], 1)
            return DistillTerms(kl, mse)
        if cwd:
            cells = [cwd_cells(student.logits, t.logits, temperature, self.grid) for t in teachers]
        else:
            cells = [pixel_kd_kl_cells(student.logits, t.logits, temperature, self.grid, valid) for t in teachers]
        kl = torch.stack([c.value.flatten() for c in cells], 1)  # [B*G*G, M]
        mse = torch.stack([dense_feature_mse_cells(p, t.feature, self.grid).value.flatten()
                           for p, t in zip(projected, teachers)], 1)
        count = cells[0].count.flatten(1).to(kl.dtype)  # [B, G*G] valid pixels (cwd: positions) per cell
        mass = count / count.sum(1, keepdim=True).clamp(min=1) / count.shape[0]  # each image 1/B, by pixels
        return DistillTerms(kl, mse, mass.flatten())

    # -------------------------------------------------------------- agent state
    def agent_state(self, student: Outputs, projected: list[torch.Tensor], teachers: list[Outputs],
                    targets: torch.Tensor, temperature: float) -> AgentState:
        state = dense_agent_state(projected, [t.feature for t in teachers], student.logits,
                                  [t.logits for t in teachers], targets, temperature,
                                  grid=self.grid or None, ignore_index=self.ignore_index)
        if self.per_region:
            cells = state.cells
            m = state.num_teachers
            return AgentState(vector=cells.vector.reshape(-1, 4 * m), teacher_ce=cells.teacher_ce_mean.reshape(-1, m),
                              logit_gap=cells.logit_gap.reshape(-1, m), feature_gap=cells.feature_gap.reshape(-1, m))
        return AgentState(vector=state.vector, teacher_ce=state.teacher_ce_mean, logit_gap=state.logit_gap,
                          feature_gap=state.feature_gap)

    def state_layout(self, descriptions: list[dict], num_classes: int) -> tuple[list[int], int]:
        # per teacher [cos, KL, CE mean, CE tail]: the block [cos, KL, CE, D_m values] with D_m = 1, C = 0
        return [1] * len(descriptions), 0

    # ------------------------------------------------------------ strategy view
    @torch.no_grad()
    def step_inputs(self, student: Outputs, teachers: list[Outputs], targets: torch.Tensor, state: AgentState | None,
                    warmup: bool, temperature: float) -> StepInputs:
        logits = student.logits.detach()
        batch, _, height, width = logits.shape
        small = downsample_labels(targets, (height, width))  # [B, h, w]
        keep = (small != self.ignore_index).flatten()  # [B*h*w]

        def rows(maps: torch.Tensor) -> torch.Tensor:  # [B, K, h, w] -> [R, K]
            return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])[keep]

        if self.per_region:
            cell = cell_ids(height, width, self.grid, logits.device)  # [h, w]
            unit = (torch.arange(batch, device=logits.device)[:, None, None] * self.grid**2 + cell).flatten()[keep]
            num_units = batch * self.grid**2
        else:
            unit = torch.arange(batch, device=logits.device).repeat_interleave(height * width)[keep]
            num_units = batch
        row_targets = small.flatten()[keep]
        votes = torch.zeros(num_units, self.num_classes, device=logits.device)
        votes.index_put_((unit, row_targets), torch.ones_like(row_targets, dtype=votes.dtype), accumulate=True)
        embedding = resize_feature_map(student.feature.detach(), (height, width))
        return StepInputs([rows(resize_logits(t.logits, (height, width))) for t in teachers], row_targets, state,
                          warmup, student_logits=rows(logits), student_embedding=rows(embedding),
                          temperature=temperature, unit_of_row=unit, num_units=num_units,
                          unit_targets=votes.argmax(1))

    # ------------------------------------------------------------------ metric
    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str = "fp32") -> dict:
        """``test/miou`` (dataset-level), ``test/acc`` (pixel accuracy) and ``test/loss`` (pixel CE)."""
        was_training = model.training
        model.eval()
        meter = SegmentationMeter(self.num_classes, self.ignore_index)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        pixels = torch.zeros((), dtype=torch.int64, device=device)
        for batch in loader:
            images, labels = batch.images.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = upsample_logits(Outputs(*model(images)).logits.float(), labels)  # once, for both
            ce, valid = pixel_ce_map(logits, labels, self.ignore_index)
            loss_sum += ce[valid].sum()
            pixels += valid.sum()
            meter.update(logits, labels)
        model.train(was_training)
        scores = meter.compute()
        return {"test/miou": scores["miou"], "test/acc": scores["pixel_acc"],
                "test/loss": float(loss_sum) / max(int(pixels), 1)}

    # ------------------------------------------------------------------ helpers
    def _valid(self, student: Outputs, targets: torch.Tensor) -> torch.Tensor:
        return downsample_labels(targets, tuple(student.logits.shape[-2:])) != self.ignore_index
