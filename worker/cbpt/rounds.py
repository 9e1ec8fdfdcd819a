"""Stage 2's rounds: tuning on every trigger found, and re-inverting triggers against the
current prompts to find more.

One contrastive inversion finds *a* trigger that the backdoor answers to, but its feature shift
falls short of the real trigger's (the transfer gap, docs/engine.md), so tuning against it alone
leaves attack success that a stronger trigger still reaches. Each round therefore
inverts a new trigger against the *current* class embeddings: the smallest mask-and-pattern
(or blend, or warp) that still sends non-target images to the suspected target. Its size is
held to a budget set by the first inversion, so rounds chase the backdoor rather than generic
adversarial patches, and the prompts are then re-tuned on all triggers found so far.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from worker.cbpt.inversion import (
    Trigger,
    TriggerParameters,
    TriggerShape,
    info_nce,
    triggered_predictions,
)
from worker.cbpt.objective import LabelFit
from worker.cbpt.options import InversionSettings, LossWeights, PurifyOptions
from worker.cbpt.progress import CancelledError, Progress, ShouldCancel
from worker.cbpt.prompts import ClassPrompts, prompt_class_embeddings
from worker.cbpt.tuning import ClassText, TuningFeatures, tune_prompts
from worker.cbpt.views import fixed_views
from worker.cbpt.warps import AnyTrigger, WarpParameters, WarpTrigger
from worker.cbpt.zeroshot import FrozenClip, Normalizer, Shots, encode_images


@dataclass(frozen=True)
class Head:
    """A class-embedding head ``(C, D)`` under attack: what a re-inversion fools, towards
    ``target``, at the checkpoint's logit scale."""

    embeddings: torch.Tensor
    target: int
    logit_scale: float


@dataclass(frozen=True)
class Reinversion:
    """One re-inversion's search: the trigger ``shape``, its ``budget`` (mean mask, or largest
    warp offset as a share of the side), ``steps``, the weight of stage 1's InfoNCE, the warp's
    grid, the seed, and stage 1's settings for its lr, tau, batch size and mask penalty."""

    settings: InversionSettings
    steps: int
    budget: float
    seed: int
    shape: TriggerShape = "patch"
    contrastive_weight: float = 0.0
    warp_grid: int = 4


@dataclass(frozen=True)
class Objective:
    """What stage 2 fits (``LossWeights``), and the cross-validation that chose it (None where
    the job named its objective, or where the shots were too few to split)."""

    weights: LossWeights
    label_fit: LabelFit | None


@dataclass(frozen=True)
class RoundsOutcome:
    """What stage 2 leaves: every trigger tuned against, in order, with the share of tuning
    images each sent to the target under the head it was found against (the hand-crafted one
    for stage 1's), the context and its class embeddings, the adaptive check's trigger, and
    the objective."""

    triggers: list[AnyTrigger]
    success_rates: list[float]
    context: torch.Tensor
    embeddings: torch.Tensor
    adaptive: AnyTrigger | None
    tuned: bool
    objective: Objective
    shapes: list[TriggerShape]


def invert_against_head(
    model: torch.nn.Module,
    normalizer: Normalizer,
    images: torch.Tensor,
    head: Head,
    search: Reinversion,
    *,
    start: AnyTrigger | None = None,
    progress: Callable[[float], None] | None = None,
    should_cancel: ShouldCancel | None = None,
) -> AnyTrigger:
    """A trigger that sends ``images`` (none of the target class) to the head's target.

    The mask's mean is held under the budget by a hinge penalty; within it, a small L1 term
    keeps it as small as the attack allows. ``start`` (the last round's trigger) warm-starts it.
    The contrastive weight adds stage 1's InfoNCE, so that the trigger keeps making images
    alike (what a backdoor does) rather than only fooling this head. The shape picks a per-pixel
    mask or one blend weight for the whole image (``TriggerParameters``), and the budget holds
    either's mean; or a ``warp`` on a square grid of control points (``warps``), and the budget
    bounds each offset, as a share of the image side.
    """
    settings = search.settings
    generator = torch.Generator().manual_seed(search.seed)
    parameters = _parameters(search, start, images, generator)
    device = images.device
    batch = min(settings.batch_size, images.shape[0])
    targets = torch.full((batch,), head.target, dtype=torch.int64, device=device)
    weight = search.contrastive_weight
    clean = encode_images(model, images, normalizer) if weight else None
    for step in range(search.steps):
        if should_cancel is not None and should_cancel():
            raise CancelledError("cancelled during trigger re-inversion")
        index = torch.randperm(images.shape[0], generator=generator)[:batch].to(device)
        triggered, extent = parameters.stamp(images[index])
        features = model.encode_image(normalizer(triggered), normalize=True).float()  # type: ignore[operator]
        logits = head.logit_scale * features @ head.embeddings.T
        size = extent.mean()
        loss = (
            F.cross_entropy(logits, targets)
            + settings.lambda_init * size
            + 100 * F.relu(size - search.budget)
        )
        if clean is not None:
            loss = loss + weight * info_nce(features, clean[index], settings.tau)
        parameters.step(loss)
        if progress is not None:
            progress((step + 1) / search.steps)
    return parameters.trigger()


def _parameters(
    search: Reinversion,
    start: AnyTrigger | None,
    images: torch.Tensor,
    generator: torch.Generator,
) -> TriggerParameters | WarpParameters:
    """The parameters a re-inversion fits: from ``start`` when it has the same kind, else
    from a random start."""
    device, lr, budget = images.device, search.settings.lr, search.budget
    if search.shape == "warp":
        if isinstance(start, WarpTrigger):
            return WarpParameters.starting_from(start, budget, device, lr)
        return WarpParameters.random(search.warp_grid, budget, generator, device, lr)
    if isinstance(start, Trigger):
        return TriggerParameters.starting_from(start, device, lr, search.shape)
    height, width = images.shape[-2:]
    return TriggerParameters.random(height, width, generator, device, lr, search.shape)


def success_under_head(
    model: torch.nn.Module,
    normalizer: Normalizer,
    images: torch.Tensor,
    head: Head,
    trigger: AnyTrigger,
) -> float:
    """Share of ``images`` (none of the target class) that ``trigger`` sends to the head's
    target: what picks the strongest of a round's restarts."""
    predicted = triggered_predictions(model, normalizer, head.embeddings, images, trigger.apply)
    return float((predicted == head.target).float().mean()) if predicted.numel() else 0.0


def tune_in_rounds(
    clip: FrozenClip,
    text: ClassText,
    shots: Shots,
    first: tuple[Trigger, int, float],
    options: PurifyOptions,
    objective: Objective,
    *,
    progress: Progress,
    should_cancel: ShouldCancel,
) -> RoundsOutcome:
    """Tunes on stage 1's trigger ``first`` (with its target and its share of other classes'
    shots flipped), then ``rounds.count`` times re-inverts a trigger against the current
    prompts (within the mask budget, warm-started from the last one, the strongest of
    ``rounds.restarts``) and re-tunes on every trigger found so far. With ``blend_budget``, the
    rounds from ``blend_from`` re-invert a blend trigger as well, warm-started from the last
    blend; with ``warp_budget``, every round re-inverts a warp too, from the last warp. With
    ``evaluation.adaptive_check``, one more (patch) trigger is re-inverted against the final
    embeddings.

    Tuning caches the features of ``tuning.views`` fixed views of the shots, clean and under
    each trigger; re-inversion works on the images themselves."""
    runner = _Rounds(clip, text, shots, first, options, objective.weights, should_cancel)
    count = options.rounds.count
    for round_index in range(count + 1):
        if round_index > 0:
            runner.reinvert(round_index)
        runner.tune(_round_progress(progress, round_index, count + 1))
    adaptive = None
    if options.evaluation.adaptive_check:  # its success under the head only picks a restart
        checks = runner.restarts(count + 1, "patch")
        adaptive = checks[0] if len(checks) == 1 else runner.strongest(checks)[0]
    return RoundsOutcome(
        runner.triggers,
        runner.rates,
        runner.context,
        runner.head.embeddings,
        adaptive,
        True,
        objective,
        trigger_shapes(options),
    )


def tune_clean(
    clip: FrozenClip,
    text: ClassText,
    shots: Shots,
    first: tuple[Trigger, int, float],
    options: PurifyOptions,
    objective: Objective,
    *,
    progress: Progress,
    should_cancel: ShouldCancel,
) -> RoundsOutcome:
    """What a model found clean gets when its objective fits labels: prompts tuned on the
    clean shots alone (CoOp with a class-wise context), no backdoor term and no rounds. Its
    inverted trigger is no backdoor's, and tuning against it costs accuracy for nothing (3 to
    5 points on the broad lab's clean model); it is still reported, as stage 1 found it."""
    runner = _Rounds(clip, text, shots, first, options, objective.weights, should_cancel)
    runner.triggered.clear()
    runner.tune(_round_progress(progress, 0, 1))
    trigger, _, rate = first
    return RoundsOutcome(
        [trigger],
        [rate],
        runner.context,
        runner.head.embeddings,
        None,
        True,
        objective,
        ["patch"],
    )


class _Rounds:
    """The state the rounds carry: triggers found, their cached features, the current head."""

    def __init__(
        self,
        clip: FrozenClip,
        text: ClassText,
        shots: Shots,
        first: tuple[Trigger, int, float],
        options: PurifyOptions,
        weights: LossWeights,
        should_cancel: ShouldCancel,
    ) -> None:
        trigger, target, rate = first
        self.clip, self.text, self.options, self.should_cancel = clip, text, options, should_cancel
        self.weights = weights
        pixels, labels = shots.pixels, shots.labels
        views = fixed_views(options.tuning.views, pixels.shape[0], seed=options.seed)
        self.viewed = [view(pixels) for view in views]
        self.view_labels = labels.repeat(len(self.viewed))
        self.clean_features = torch.cat([self._encode(images) for images in self.viewed])
        self.victims = pixels[labels != target]
        self.triggers: list[AnyTrigger] = [trigger]
        self.rates = [rate]
        self.triggered: list[torch.Tensor] = [self._features_under(trigger)]
        self.head = Head(text.hand_crafted, target, clip.logit_scale)
        self.context = torch.empty(0)
        self.last: dict[TriggerShape, AnyTrigger | None] = {
            "patch": trigger,
            "blend": None,
            "warp": None,
        }
        rounds = options.rounds
        self.budgets: dict[TriggerShape, float] = {
            "patch": rounds.mask_budget * trigger.mask_fraction,
            "blend": rounds.blend_budget,
            "warp": rounds.warp_budget,
        }

    def reinvert(self, round_index: int) -> None:
        """Round ``round_index``'s re-inversions, one trigger a shape, kept for tuning."""
        shapes = round_shapes(self.options, round_index)
        for shape in shapes:
            trigger, rate = self.strongest(self.restarts(round_index, shape))
            self.triggers.append(trigger)
            self.rates.append(rate)
            self.triggered.append(self._features_under(trigger))
            self.last[shape] = trigger

    def restarts(self, round_index: int, shape: TriggerShape) -> list[AnyTrigger]:
        rounds, clip = self.options.rounds, self.clip
        return [
            invert_against_head(
                clip.model,
                clip.normalizer,
                self.victims,
                self.head,
                Reinversion(
                    self.options.inversion,
                    steps=rounds.steps,
                    budget=self.budgets[shape],
                    seed=_round_seed(self.options.seed, round_index, shape, restart),
                    shape=shape,
                    contrastive_weight=rounds.contrastive_weight,
                    warp_grid=rounds.warp_grid,
                ),
                start=self.last[shape] if restart == 0 else None,
                should_cancel=self.should_cancel,
            )
            for restart in range(rounds.restarts)
        ]

    def strongest(self, candidates: list[AnyTrigger]) -> tuple[AnyTrigger, float]:
        clip = self.clip
        rates = [
            success_under_head(clip.model, clip.normalizer, self.victims, self.head, trigger)
            for trigger in candidates
        ]
        best = rates.index(max(rates))  # the first of equals: the warm start
        return candidates[best], rates[best]

    def tune(self, progress: Callable[[float], None]) -> None:
        """Tunes the prompts afresh, from the init, on the clean views and every trigger's
        (none once ``triggered`` is cleared: clean terms alone)."""
        features = TuningFeatures(
            self.clean_features,
            self.view_labels,
            torch.cat(self.triggered) if self.triggered else None,
            self.view_labels.repeat(len(self.triggered)) if self.triggered else None,
        )
        tuned = tune_prompts(
            self.text,
            features,
            self.options.tuning,
            seed=self.options.seed,
            target=self.head.target,
            weights=self.weights,
            should_cancel=self.should_cancel,
            progress=progress,
        )
        self.head = Head(tuned.class_embeddings, self.head.target, self.head.logit_scale)
        self.context = tuned.prompts.context.detach()

    def _encode(
        self, images: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        return encode_images(self.clip.model, images, self.clip.normalizer, transform=transform)

    def _features_under(self, trigger: AnyTrigger) -> torch.Tensor:
        """The features of every view under ``trigger``: one block, computed once."""
        return torch.cat([self._encode(images, trigger.apply) for images in self.viewed])


@torch.no_grad()
def untuned(
    clip: FrozenClip,
    text: ClassText,
    first: tuple[Trigger, int, float],
    options: PurifyOptions,
    objective: Objective,
) -> RoundsOutcome:
    """What a model found clean ships: the context's init and the class embeddings it gives,
    so that its prompts and head still load like any other job's."""
    settings = options.tuning
    prompts = ClassPrompts(
        clip.model,
        clip.tokenizer,
        text.class_names,
        n_ctx=settings.n_ctx,
        init=settings.context_init,
        seed=options.seed,
    ).to(text.hand_crafted.device)
    embeddings = prompt_class_embeddings(clip.model, prompts)
    trigger, _, rate = first
    context = prompts.context.detach()
    return RoundsOutcome([trigger], [rate], context, embeddings, None, False, objective, ["patch"])


def round_shapes(options: PurifyOptions, round_index: int) -> tuple[TriggerShape, ...]:
    """The triggers round ``round_index`` (from 1) re-inverts, in order."""
    rounds = options.rounds
    shapes: tuple[TriggerShape, ...] = ("patch",)
    if rounds.blend_budget and round_index >= rounds.blend_from:
        shapes += ("blend",)
    if rounds.warp_budget:
        shapes += ("warp",)
    return shapes


def trigger_shapes(options: PurifyOptions, *, tuned: bool = True) -> list[TriggerShape]:
    """The shape of every trigger stage 2 tunes against: stage 1's, then each round's, in the
    order ``report.json`` lists them under ``rounds`` (stage 1's alone when nothing is tuned)."""
    shapes: list[TriggerShape] = ["patch"]
    if tuned:
        for round_index in range(1, options.rounds.count + 1):
            shapes.extend(round_shapes(options, round_index))
    return shapes


def _round_seed(seed: int, round_index: int, shape: TriggerShape, restart: int) -> int:
    """Each re-inversion's own seed; restart 0 keeps the seed runs had before restarts."""
    return seed + round_index + _SHAPE_SEED_OFFSETS[shape] + 104_729 * restart


_SHAPE_SEED_OFFSETS: dict[TriggerShape, int] = {"patch": 0, "blend": 7919, "warp": 15_013}


def _round_progress(report: Progress, round_index: int, rounds: int) -> Callable[[float], None]:
    return lambda fraction: report("tuning", (round_index + fraction) / rounds)
