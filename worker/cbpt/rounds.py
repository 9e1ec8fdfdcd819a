"""Re-inversion against the current prompts: closing the gap between inverted and real triggers.

One contrastive inversion finds *a* trigger that the backdoor answers to, but tuning against it
alone barely moves the real trigger's attack success (DESIGN section 2, probe findings). Each
round therefore inverts a new trigger against the *current* class embeddings: the smallest
mask-and-pattern that still sends non-target images to the suspected target. Its size is held
to a budget set by the first inversion, so rounds chase the backdoor rather than generic
adversarial patches, and the prompts are then re-tuned on all triggers found so far.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from worker.cbpt.inversion import (
    CancelledError,
    InversionSettings,
    Trigger,
    TriggerParameters,
    TriggerShape,
    info_nce,
    triggered_predictions,
)
from worker.cbpt.warps import AnyTrigger, WarpParameters, WarpTrigger
from worker.cbpt.zeroshot import Normalizer, encode_images


def invert_against_head(
    model: torch.nn.Module,
    normalizer: Normalizer,
    images: torch.Tensor,
    class_embeddings: torch.Tensor,
    target: int,
    mask_budget: float,
    settings: InversionSettings,
    *,
    steps: int,
    start: AnyTrigger | None,
    contrastive_weight: float = 0.0,
    shape: TriggerShape = "patch",
    warp_grid: int = 4,
    logit_scale: float,
    seed: int,
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> AnyTrigger:
    """A trigger that sends ``images`` (none of the target class) to ``target`` under the head.

    The mask's mean is held under ``mask_budget`` by a hinge penalty; within it, a small L1 term
    keeps it as small as the attack allows. ``start`` (the last round's trigger) warm-starts it.
    ``contrastive_weight`` adds stage 1's InfoNCE, so that the trigger keeps making images
    alike (what a backdoor does) rather than only fooling this head. ``shape`` picks a per-pixel
    mask or one blend weight for the whole image (``TriggerParameters``), and the budget holds
    either's mean; or a ``warp`` on a ``warp_grid`` square of control points (``warps``), and
    the budget bounds each offset, as a share of the image side.
    """
    generator = torch.Generator().manual_seed(seed)
    parameters = _parameters(shape, start, images, mask_budget, warp_grid, generator, settings.lr)
    device = images.device
    batch = min(settings.batch_size, images.shape[0])
    targets = torch.full((batch,), target, dtype=torch.int64, device=device)
    clean = encode_images(model, images, normalizer) if contrastive_weight else None
    for step in range(steps):
        if should_cancel is not None and should_cancel():
            raise CancelledError("cancelled during trigger re-inversion")
        index = torch.randperm(images.shape[0], generator=generator)[:batch].to(device)
        triggered, extent = parameters.stamp(images[index])
        features = model.encode_image(normalizer(triggered), normalize=True).float()  # type: ignore[operator]
        logits = logit_scale * features @ class_embeddings.T
        size = extent.mean()
        loss = (
            F.cross_entropy(logits, targets)
            + settings.lambda_init * size
            + 100 * F.relu(size - mask_budget)
        )
        if clean is not None:
            loss = loss + contrastive_weight * info_nce(features, clean[index], settings.tau)
        parameters.step(loss)
        if progress is not None:
            progress((step + 1) / steps)
    return parameters.trigger()


def _parameters(
    shape: TriggerShape,
    start: AnyTrigger | None,
    images: torch.Tensor,
    budget: float,
    warp_grid: int,
    generator: torch.Generator,
    lr: float,
) -> TriggerParameters | WarpParameters:
    """The parameters a re-inversion fits: from ``start`` when it has the same kind, else
    from a random start."""
    device = images.device
    if shape == "warp":
        if isinstance(start, WarpTrigger):
            return WarpParameters.starting_from(start, budget, device, lr)
        return WarpParameters.random(warp_grid, budget, generator, device, lr)
    if isinstance(start, Trigger):
        return TriggerParameters.starting_from(start, device, lr, shape)
    height, width = images.shape[-2:]
    return TriggerParameters.random(height, width, generator, device, lr, shape)


def success_under_head(
    model: torch.nn.Module,
    normalizer: Normalizer,
    images: torch.Tensor,
    class_embeddings: torch.Tensor,
    target: int,
    trigger: AnyTrigger,
) -> float:
    """Share of ``images`` (none of the target class) that ``trigger`` sends to ``target``
    under the head: what picks the strongest of a round's restarts."""
    predicted = triggered_predictions(model, normalizer, class_embeddings, images, trigger.apply)
    return float((predicted == target).float().mean()) if predicted.numel() else 0.0
