"""How easily a small trigger reaches each class: a targeted search for every class at once.

Stage 1's contrastive inversion needs no target, and names the class its trigger sends images
to. On a model with strong natural universal patches, that class need not be the backdoor's:
any small patch that collapses the features will do, and it lands wherever the collapse points.
Neural Cleanse asks the targeted question instead: for each class ``k``, how little trigger
sends the other classes' images to ``k``? A backdoor's target is a shortcut the model was
taught, so it is reached with far less than the model's other classes.

Here every class's trigger (mask and pattern, the mask's mean held to one ``budget``) is fitted
in the same forward pass: a step stamps one batch of shots with each class's trigger and pushes
the copy stamped for ``k`` towards ``k`` under the zero-shot head. Each class's loss is its own
mean, and Adam treats every element on its own, so fitting the stacked parameters is fitting
each class's alone on the same batches, while the encoder sees one large batch instead of ``C``
small ones.

Successive halving (``keep``) spends most of the steps on the classes still in contention, as
K-Arm's bandit does: after ``warmup`` steps, only the ``keep`` classes with the lowest
cross-entropy towards themselves go on. ``Reach.margin`` compares the target with the classes
that had as many steps, never with the ones dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from worker.cbpt.inversion import Trigger, TriggerShape
from worker.cbpt.options import TargetSearchSettings
from worker.cbpt.progress import CancelledError, ShouldCancel
from worker.cbpt.zeroshot import Normalizer


@dataclass(frozen=True)
class ReachSearch:
    """One search: the mask budget (mean of a per-pixel mask, or the weight of a ``blend``),
    the steps for every class and the classes that go on after ``warmup`` (all when ``keep``
    is 0), the shots a step stamps, the learning rate, the shots each flip rate is measured
    on (at most), and the seed."""

    budget: float = 0.01
    warmup: int = 30
    steps: int = 90
    keep: int = 6
    batch_size: int = 16
    lr: float = 0.1
    measure_on: int = 96
    shape: TriggerShape = "patch"
    seed: int = 0

    @classmethod
    def of(cls, settings: TargetSearchSettings, *, lr: float, seed: int) -> ReachSearch:
        """The search a job's options ask for."""
        return cls(
            budget=settings.budget,
            warmup=settings.warmup,
            steps=settings.steps,
            keep=settings.keep,
            batch_size=settings.batch_size,
            lr=lr,
            measure_on=settings.measure_on,
            seed=seed,
        )


@dataclass(frozen=True)
class Reach:
    """Per class: the share of other classes' shots its trigger sends there (``flip``), their
    mean cross-entropy towards it (``loss``: unlike the flip rate, it neither saturates at 1 for
    the classes within reach nor sits at 0 for the others, so it still orders them), the
    trigger's mask mean (``mask``), and the steps it was fitted for; and the triggers."""

    flip: torch.Tensor  # (C,)
    loss: torch.Tensor  # (C,) mean cross-entropy towards the class, on the same shots
    early_loss: torch.Tensor  # (C,) the same after the warm-up, when every class had as many
    mask: torch.Tensor  # (C,)
    steps: torch.Tensor  # (C,) int
    masks: torch.Tensor  # (C, H, W)
    patterns: torch.Tensor  # (C, 3, H, W)

    def trigger(self, target: int) -> Trigger:
        return Trigger(self.masks[target].contiguous(), self.patterns[target].contiguous())

    @property
    def best(self) -> int:
        """The class reached most easily: the lowest cross-entropy towards it among the
        classes fitted for every step."""
        full = self.steps == self.steps.max()
        return int(self.loss.masked_fill(~full, math.inf).argmin())

    def margin(self, target: int) -> float:
        """How much more easily ``target`` is reached than the next class fitted as long:
        the log of the runner-up's cross-entropy over the target's (0 when it is not the
        best). Only the classes that had every step are compared, so the figure is fair."""
        full = self.steps == self.steps.max()
        others = self.loss[full & (torch.arange(self.loss.shape[0]) != target)]
        if others.numel() == 0 or not bool(full[target]):
            return 0.0
        ratio = float(others.min().clamp_min(1e-6) / self.loss[target].clamp_min(1e-6))
        return max(math.log(ratio), 0.0)


def reach_every_class(
    model: torch.nn.Module,
    normalizer: Normalizer,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    head: torch.Tensor,
    logit_scale: float,
    search: ReachSearch,
    *,
    progress: Callable[[float], None] | None = None,
    should_cancel: ShouldCancel | None = None,
) -> Reach:
    """Fits one trigger per class of ``head`` ``(C, D)`` on ``pixels`` ``(N, 3, H, W)`` in
    [0, 1] with their ``labels``, and measures how many other classes' shots each flips."""
    device = pixels.device
    classes, (height, width) = head.shape[0], pixels.shape[-2:]
    generator = torch.Generator().manual_seed(search.seed)
    mask_side = (height, width) if search.shape == "patch" else (1, 1)
    mask_logit = (torch.randn(classes, 1, *mask_side, generator=generator) * 0.1 - 3).to(device)
    pattern_logit = torch.randn(classes, 3, height, width, generator=generator).to(device)
    mask_logit.requires_grad_(True)
    pattern_logit.requires_grad_(True)
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=search.lr, betas=(0.5, 0.9))
    measured = _measurement_set(labels, search.measure_on, generator)
    flip, loss_of = torch.zeros(classes), torch.zeros(classes)
    early: torch.Tensor | None = None
    fitted = torch.zeros(classes, dtype=torch.int64)
    active = torch.arange(classes, device=device)
    batch = min(search.batch_size, pixels.shape[0])

    def measure(classes_now: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _measure(
            model,
            normalizer,
            pixels,
            labels,
            (head, logit_scale),
            (mask_logit, pattern_logit),
            search.budget,
            classes_now,
            measured,
        )

    for step in range(search.steps):
        if should_cancel is not None and should_cancel():
            raise CancelledError("cancelled during the class-wise trigger search")
        if step == search.warmup:  # every class is still searched: measure them all
            flip, loss_of = measure(active)
            early = loss_of.clone()
            fitted[:] = step
            if 0 < search.keep < classes:
                active = torch.argsort(loss_of)[: search.keep].sort().values.to(device)
        index = torch.randperm(pixels.shape[0], generator=generator)[:batch].to(device)
        images, image_labels = pixels[index], labels[index]
        mask = _within(torch.sigmoid(mask_logit[active]), search.budget)  # (A, 1, h, w)
        stamped = (1 - mask[:, None]) * images[None] + mask[:, None] * torch.sigmoid(
            pattern_logit[active]
        )[:, None]  # (A, B, 3, H, W)
        features = model.encode_image(  # type: ignore[operator]
            normalizer(stamped.flatten(0, 1)), normalize=True
        ).float()
        logits = logit_scale * features @ head.T  # (A * B, C)
        targets = active.repeat_interleave(images.shape[0])
        victims = (image_labels.repeat(active.numel()) != targets).float()
        loss_each = (F.cross_entropy(logits, targets, reduction="none") * victims).view(
            active.numel(), -1
        )
        # each class's own loss, as if it were fitted alone: its mean over its victims; the
        # sum keeps the classes' gradients apart
        per_class = loss_each.sum(dim=1) / victims.view(active.numel(), -1).sum(dim=1).clamp_min(1)
        loss = per_class.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        if progress is not None:
            progress((step + 1) / search.steps)
    flip[active.cpu()], loss_of[active.cpu()] = measure(active)
    fitted[active.cpu()] = search.steps
    masks = _within(torch.sigmoid(mask_logit.detach()), search.budget).cpu()
    masks = masks.expand(classes, 1, height, width)[:, 0]
    return Reach(
        flip,
        loss_of,
        loss_of if early is None else early,
        masks.flatten(1).mean(dim=1),
        fitted,
        masks.contiguous(),
        torch.sigmoid(pattern_logit.detach()).cpu(),
    )


def _within(masks: torch.Tensor, budget: float) -> torch.Tensor:
    """Masks ``(A, 1, h, w)`` scaled down where their mean exceeds ``budget``: a hard limit,
    so that every class is compared at the same trigger size (a penalty lets the classes that
    are hard to reach buy their way past it)."""
    means = masks.flatten(1).mean(dim=1).clamp_min(1e-12)
    return masks * (budget / means).clamp(max=1).view(-1, 1, 1, 1)


def _measurement_set(labels: torch.Tensor, most: int, generator: torch.Generator) -> torch.Tensor:
    """A fixed, seeded subset of the shots that every flip rate is measured on."""
    order = torch.randperm(labels.shape[0], generator=generator)
    return order[:most].to(labels.device)


@torch.no_grad()
def _measure(
    model: torch.nn.Module,
    normalizer: Normalizer,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    head: tuple[torch.Tensor, float],
    parameters: tuple[torch.Tensor, torch.Tensor],
    budget: float,
    active: torch.Tensor,
    measured: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each active class, on the measured shots of other classes: the share its trigger
    sends to it, and their mean cross-entropy towards it under the head; on the CPU."""
    (embeddings, logit_scale), (mask_logit, pattern_logit) = head, parameters
    images, image_labels = pixels[measured], labels[measured]
    rates, losses = [], []
    for k in active.tolist():
        others = image_labels != k
        mask = _within(torch.sigmoid(mask_logit[k][None]), budget)[0]
        stamped = (1 - mask) * images[others] + mask * torch.sigmoid(pattern_logit[k])
        features = model.encode_image(normalizer(stamped), normalize=True).float()  # type: ignore[operator]
        logits = logit_scale * features @ embeddings.T
        targets = torch.full((logits.shape[0],), k, device=logits.device)
        rates.append(float((logits.argmax(dim=1) == k).float().mean()) if others.any() else 0.0)
        losses.append(float(F.cross_entropy(logits, targets)) if others.any() else 0.0)
    return torch.tensor(rates), torch.tensor(losses)
