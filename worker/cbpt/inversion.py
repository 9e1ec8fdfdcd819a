"""Stage 1: contrastive trigger inversion on the frozen image encoder (no target label needed).

The trigger is ``T(x) = (1 - m) * x + m * p`` with a mask ``m`` ``(H, W)`` and a pattern ``p``
``(3, H, W)``, both in [0, 1] through a sigmoid, applied to pixels before the model's
normalisation. A backdoor makes every triggered image embed alike whatever its content, so the
loss is InfoNCE with the other triggered images as positives and the clean images as negatives::

    L = -mean_i log( P_i / (P_i + N_i) ) + lambda * mean(m)
    P_i = sum_{j != i} exp(z_i . z_j / tau)    z = f(T(x)), normalised
    N_i = sum_k exp(z_i . c_k / tau)           c = f(x), normalised, computed once

``lambda`` adapts as DECREE's does: it grows while the contrastive term is already low (the
trigger works: make it smaller) and shrinks while it is high (let the mask grow). Several
restarts may run, one after another. Without a judge the lowest final loss wins; the engine
passes the verdict's score as the judge, so the strongest trigger wins and one strong enough to
settle the verdict ends the search (``invert_trigger``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from worker.cbpt.metrics import predictions
from worker.cbpt.options import InversionSettings
from worker.cbpt.progress import CancelledError
from worker.cbpt.zeroshot import Normalizer, encode_images

TriggerShape = Literal["patch", "blend", "warp"]


@dataclass(frozen=True)
class Trigger:
    """An inverted trigger: mask ``(H, W)`` and pattern ``(3, H, W)``, both in [0, 1]."""

    mask: torch.Tensor
    pattern: torch.Tensor

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(images.device, images.dtype)
        pattern = self.pattern.to(images.device, images.dtype)
        return (1 - mask) * images + mask * pattern

    @property
    def mask_fraction(self) -> float:
        """Mean mask value: the share of the image the trigger overwrites."""
        return float(self.mask.mean())

    @property
    def displacement(self) -> float:
        """A mask moves no pixel: 0, the counterpart of a warp's ``mask_fraction``."""
        return 0.0


class TriggerParameters:
    """Mask and pattern in sigmoid space with their optimiser: what every inversion fits.

    A ``patch`` mask has one value per pixel. A ``blend`` mask has one value for the whole image,
    ``(1 - a) * x + a * p``: the shape of triggers spread over every pixel (Blended, SIG, and
    roughly WaNet), which a per-pixel mask fitted under a small budget imitates poorly.
    """

    def __init__(self, mask_logit: torch.Tensor, pattern_logit: torch.Tensor, lr: float) -> None:
        self.mask_logit = mask_logit.detach().clone().requires_grad_(True)
        self.pattern_logit = pattern_logit.detach().clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam(
            [self.mask_logit, self.pattern_logit], lr=lr, betas=(0.5, 0.9)
        )

    @classmethod
    def random(
        cls,
        height: int,
        width: int,
        generator: torch.Generator,
        device: torch.device,
        lr: float,
        shape: TriggerShape = "patch",
    ) -> TriggerParameters:
        # A faint start (sigmoid(-3) ~ 5%) lets the mask grow where the loss wants it.
        mask_size = (height, width) if shape == "patch" else (1, 1)
        mask_logit = torch.randn(*mask_size, generator=generator) * 0.1 - 3
        pattern_logit = torch.randn(3, height, width, generator=generator)
        return cls(mask_logit.to(device), pattern_logit.to(device), lr)

    @classmethod
    def starting_from(
        cls, trigger: Trigger, device: torch.device, lr: float, shape: TriggerShape = "patch"
    ) -> TriggerParameters:
        """Parameters that begin where ``trigger`` is: a warm start for re-inversion, which
        then needs a fraction of the steps of one from scratch."""
        mask = trigger.mask if shape == "patch" else trigger.mask.mean().reshape(1, 1)
        mask_logit = torch.logit(mask.clamp(1e-4, 1 - 1e-4))
        pattern_logit = torch.logit(trigger.pattern.clamp(1e-4, 1 - 1e-4))
        return cls(mask_logit.to(device), pattern_logit.to(device), lr)

    def stamp(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Triggered images and the mask, differentiable in both parameters."""
        mask, pattern = torch.sigmoid(self.mask_logit), torch.sigmoid(self.pattern_logit)
        return (1 - mask) * images + mask * pattern, mask

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()

    def trigger(self) -> Trigger:
        """The fitted trigger, its mask always ``(H, W)``: a blend is stored like any other."""
        pattern = torch.sigmoid(self.pattern_logit).detach().cpu()
        mask = torch.sigmoid(self.mask_logit).detach().cpu().expand(pattern.shape[-2:])
        return Trigger(mask.contiguous(), pattern)


@dataclass(frozen=True)
class Judge:
    """Rates each restart's trigger (``rate``); one rated ``enough`` or more ends the search."""

    rate: Callable[[Trigger], float]
    enough: float = math.inf


@dataclass(frozen=True)
class InversionResult:
    trigger: Trigger
    loss: float  # final contrastive loss of the chosen restart
    losses: tuple[float, ...]  # final contrastive loss of every restart that ran
    strengths: tuple[float, ...]  # the judge's figure for each restart that ran; () without one


def invert_trigger(
    model: torch.nn.Module,
    normalizer: Normalizer,
    images: torch.Tensor,
    settings: InversionSettings,
    *,
    seed: int,
    judge: Judge | None = None,
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> InversionResult:
    """Inverts a trigger from clean images ``(N, 3, H, W)`` (uint8 or [0, 1]).

    Without ``judge``, every restart runs and the lowest final loss wins. With it, the restart
    the judge rates highest wins, and one rated its ``enough`` or more ends the search: the final
    loss says how alike the triggered images embed, not whether a small mask did it, and a
    restart caught on a generic adversarial patch can end as low as one on the backdoor.
    """
    device = next(model.parameters()).device
    pixels = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    pixels = pixels.to(device)
    clean_features = encode_images(model, pixels, normalizer)  # (N, D), constant: cached
    results: list[tuple[Trigger, float]] = []
    strengths: list[float] = []
    total = settings.steps * settings.restarts
    for restart in range(settings.restarts):
        generator = torch.Generator().manual_seed(seed * 7919 + restart)
        results.append(
            _invert_once(
                model,
                normalizer,
                pixels,
                clean_features,
                settings,
                generator,
                progress=_scaled(progress, restart * settings.steps, total),
                should_cancel=should_cancel,
            )
        )
        if judge is not None:
            strengths.append(judge.rate(results[-1][0]))
            if strengths[-1] >= judge.enough:
                break
    if judge is None:
        trigger, loss = min(results, key=lambda result: result[1])
    else:  # the first of equals: the earliest restart
        trigger, loss = results[strengths.index(max(strengths))]
    return InversionResult(trigger, loss, tuple(r[1] for r in results), tuple(strengths))


def _scaled(
    progress: Callable[[float], None] | None, offset: int, total: int
) -> Callable[[int], None] | None:
    if progress is None:
        return None
    report = progress
    return lambda step: report((offset + step) / total)


def _invert_once(
    model: torch.nn.Module,
    normalizer: Normalizer,
    pixels: torch.Tensor,
    clean_features: torch.Tensor,
    settings: InversionSettings,
    generator: torch.Generator,
    *,
    progress: Callable[[int], None] | None,
    should_cancel: Callable[[], bool] | None,
) -> tuple[Trigger, float]:
    height, width = pixels.shape[-2:]
    device = pixels.device
    parameters = TriggerParameters.random(height, width, generator, device, settings.lr)
    weight, above, below = settings.lambda_init, 0, 0
    contrastive = torch.tensor(float("inf"))
    batch = min(settings.batch_size, pixels.shape[0])
    for step in range(settings.steps):
        if should_cancel is not None and should_cancel():
            raise CancelledError("cancelled during trigger inversion")
        index = torch.randperm(pixels.shape[0], generator=generator)[:batch].to(device)
        triggered, mask = parameters.stamp(pixels[index])
        features = model.encode_image(normalizer(triggered), normalize=True).float()  # type: ignore[operator]
        contrastive = info_nce(features, clean_features[index], settings.tau)
        parameters.step(contrastive + weight * mask.mean())
        if contrastive.item() < settings.success_loss:
            above, below = above + 1, 0
        else:
            above, below = 0, below + 1
        if above >= settings.patience:
            weight, above = weight * settings.lambda_factor, 0
        elif below >= settings.patience:
            weight, below = weight / settings.lambda_factor, 0
        if progress is not None:
            progress(step + 1)
    return parameters.trigger(), contrastive.item()


def info_nce(triggered: torch.Tensor, clean: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE with the other triggered images as positives and the clean images as negatives."""
    batch = triggered.shape[0]
    to_triggered = triggered @ triggered.T / tau  # (B, B)
    to_clean = triggered @ clean.T / tau  # (B, B)
    self_mask = torch.eye(batch, dtype=torch.bool, device=triggered.device)
    positives = to_triggered.masked_fill(self_mask, float("-inf")).logsumexp(dim=1)
    everything = torch.logsumexp(torch.stack([positives, to_clean.logsumexp(dim=1)]), dim=0)
    return (everything - positives).mean()


@torch.no_grad()
def triggered_predictions(
    model: torch.nn.Module,
    normalizer: Normalizer,
    class_embeddings: torch.Tensor,
    images: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The class the head gives each image under ``transform`` (a trigger's ``apply``), on the
    CPU: what the verdict's flip rate and the choice among a round's restarts both count."""
    features = encode_images(model, images, normalizer, transform=transform)
    return predictions(features, class_embeddings).cpu()


def flip_statistics(
    model: torch.nn.Module,
    normalizer: Normalizer,
    class_embeddings: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    trigger: Trigger,
) -> tuple[int, float]:
    """The class a trigger sends most images to, and the share of the others it sends there."""
    predicted = triggered_predictions(model, normalizer, class_embeddings, images, trigger.apply)
    counts = torch.bincount(predicted, minlength=class_embeddings.shape[0])
    target = int(counts.argmax())
    others = labels != target
    rate = float((predicted[others] == target).float().mean()) if bool(others.any()) else 0.0
    return target, rate
