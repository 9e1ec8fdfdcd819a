"""Poisoned training sets: which images carry the trigger, and which caption they get.

Dirty-label attacks stamp the trigger on a share of images from other classes and caption them
as the target class. The label-consistent attack only touches target-class images and keeps
their captions; it first perturbs them adversarially (PGD against the clean model) so that their
content no longer explains their caption and the model has to learn the patch instead.
The optimised patch is found against the clean model before poisoning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from worker.cbpt.attack_ops import encode_pattern_png
from worker.cbpt.attacks import (
    AttackSpec,
    BadNets,
    LabelConsistent,
    OptimizedPatch,
)
from worker.cbpt.zeroshot import Normalizer


@dataclass(frozen=True)
class PoisonedSet:
    images: torch.Tensor  # (N, 3, S, S) uint8, poisoned images in place
    labels: torch.Tensor  # (N,) the class each caption names
    poisoned: torch.Tensor  # (N,) bool

    @property
    def rate(self) -> float:
        """Share of the training set that carries the trigger."""
        return float(self.poisoned.float().mean())


def poison(
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: AttackSpec,
    target: int,
    rate: float,
    *,
    seed: int,
    model: torch.nn.Module | None = None,
    normalizer: Normalizer | None = None,
    class_embeddings: torch.Tensor | None = None,
) -> PoisonedSet:
    """Returns the training set with ``rate`` of it poisoned by ``spec``.

    Dirty-label attacks relabel images of other classes in place. The label-consistent attack
    adds perturbed, stamped copies of target-class images beside their clean originals (an
    attacker publishing doctored photos of the target): replacing the originals would leave no
    clean target image and the target class would become "images with the patch". Its rate is
    capped by the target class's share, and it needs the clean ``model`` for the perturbation.
    """
    generator = torch.Generator().manual_seed(seed)
    clean_label = isinstance(spec, LabelConsistent)
    pool = torch.nonzero(labels == target if clean_label else labels != target).flatten()
    count = min(len(pool), round(rate * len(labels)))
    chosen = pool[torch.randperm(len(pool), generator=generator)[:count]].sort().values
    chosen_images = images[chosen].float() / 255
    if clean_label:
        if model is None or normalizer is None or class_embeddings is None:
            raise ValueError("the label-consistent attack needs the clean model")
        assert isinstance(spec, LabelConsistent)
        chosen_images = adversarial_away(
            model, normalizer, class_embeddings, chosen_images, target, spec.adversarial_eps
        )
    stamped = (spec.apply(chosen_images) * 255).round().to(torch.uint8)
    if clean_label:
        return PoisonedSet(
            torch.cat([images, stamped]),
            torch.cat([labels, torch.full((count,), target, dtype=labels.dtype)]),
            torch.cat(
                [torch.zeros(len(labels), dtype=torch.bool), torch.ones(count, dtype=torch.bool)]
            ),
        )
    out_images, out_labels = images.clone(), labels.clone()
    out_images[chosen] = stamped
    out_labels[chosen] = target
    poisoned = torch.zeros(len(labels), dtype=torch.bool)
    poisoned[chosen] = True
    return PoisonedSet(out_images, out_labels, poisoned)


def adversarial_away(
    model: torch.nn.Module,
    normalizer: Normalizer,
    class_embeddings: torch.Tensor,
    images: torch.Tensor,
    label: int,
    eps: float,
    *,
    steps: int = 5,
    batch_size: int = 256,
) -> torch.Tensor:
    """L-inf PGD that pushes images away from their (shared) true class under zero-shot CLIP."""
    step_size = 2.5 * eps / steps
    targets = torch.full((batch_size,), label, dtype=torch.int64)
    out = []
    for start in range(0, len(images), batch_size):
        clean = images[start : start + batch_size]
        adversarial = clean.clone()
        for _ in range(steps):
            adversarial.requires_grad_(True)
            features = model.encode_image(normalizer(adversarial), normalize=True)  # type: ignore[operator]
            loss = F.cross_entropy(100 * features @ class_embeddings.T, targets[: len(clean)])
            (grad,) = torch.autograd.grad(loss, adversarial)
            with torch.no_grad():
                adversarial = adversarial + step_size * grad.sign()
                adversarial = (clean + (adversarial - clean).clamp(-eps, eps)).clamp(0, 1)
        out.append(adversarial.detach())
    return torch.cat(out)


def optimize_patch(
    model: torch.nn.Module,
    normalizer: Normalizer,
    target_embedding: torch.Tensor,
    images: torch.Tensor,
    *,
    size: float,
    target: str,
    seed: int,
    steps: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
) -> OptimizedPatch:
    """Optimises a centre patch that pulls images' features towards the target's text feature.

    As TrojVQA and BadCLIP do, against the clean model, on images of other classes; the pattern
    lives in sigmoid space so it stays a valid image.
    """
    generator = torch.Generator().manual_seed(seed)
    placement = BadNets(size=size, position="center")
    side = placement.patch_side(*images.shape[-2:])
    logits = torch.randn(3, side, side, generator=generator).mul_(0.1).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            index = torch.randint(0, len(images), (batch_size,), generator=generator)
            batch = images[index].float() / 255
            stamped = placement.paste(batch, torch.sigmoid(logits))
            features = model.encode_image(normalizer(stamped), normalize=True)  # type: ignore[operator]
            loss = -(features @ target_embedding).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    pattern = torch.sigmoid(logits.detach())
    return OptimizedPatch(
        target=target,
        seed=seed,
        size=size,
        position="center",
        pattern_png=encode_pattern_png(pattern),
    )
