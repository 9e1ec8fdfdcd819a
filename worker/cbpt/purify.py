"""``purify``: one call from a suspicious checkpoint and a few clean shots to purified prompts.

Stages, each reported through ``progress(stage, fraction)`` and checked for cancellation:

``load``        the checkpoint (safely) and the image set; a seeded, stratified split
``inversion``   contrastive trigger inversion; suspected target, backdoor score, verdict
``tuning``      class-wise prompt tuning, then ``rounds`` of re-inversion against the current
                prompts and re-tuning on every trigger found so far
``evaluation``  CA and ASR before (hand-crafted prompts) and after, per class and per trigger
``artifacts``   prompts, head, trigger and report files
"""

from __future__ import annotations

import functools
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.cbpt import artifacts
from worker.cbpt.attacks import AttackSpec
from worker.cbpt.checkpoint import LoadedCheckpoint, load_checkpoint
from worker.cbpt.imagesets import ImageSet, read_image_set
from worker.cbpt.inversion import (
    CancelledError,
    InversionResult,
    InversionSettings,
    Trigger,
    TriggerShape,
    flip_statistics,
    invert_trigger,
)
from worker.cbpt.metrics import (
    attack_success_rate,
    clean_accuracy,
    fidelity,
    per_class_accuracy,
    predictions,
)
from worker.cbpt.precision import PrecisionChoice, autocast, resolve_precision
from worker.cbpt.prompts import (
    ClassPrompts,
    PromptTooLongError,
    prompt_class_embeddings,
    prompt_tokens,
)
from worker.cbpt.report import render_html
from worker.cbpt.rounds import invert_against_head, success_under_head
from worker.cbpt.tuning import TuningSettings, tune_prompts
from worker.cbpt.views import fixed_views
from worker.cbpt.warps import AnyTrigger
from worker.cbpt.zeroshot import DEFAULT_TEMPLATES, Normalizer, class_embeddings, encode_images

REPORT_SCHEMA_VERSION = 1
# A trigger the evaluation measures: name, kind, how to apply it, its target, its spec if any.
_Candidate = tuple[str, str, Callable[[torch.Tensor], torch.Tensor], int, dict[str, Any] | None]
Stage = Literal["load", "inversion", "tuning", "evaluation", "artifacts"]
Progress = Callable[[str, float], None]
ShouldCancel = Callable[[], bool]


class VerdictSettings(BaseModel):
    """Where detection draws its lines.

    The score is the share of other classes' images the inverted trigger sends to the suspected
    target, per unit of mask: a backdoor is a shortcut the model was taught, so its trigger does
    more with less than the universal adversarial patches every model has. Flip rate or mask
    size alone do not separate them on the lab models (the clean one's patch flips 24 to 53%
    of images, a label-consistent backdoor's 29 to 54%); their ratio mostly does. One inversion
    is a draw: on the Fashion-MNIST lab the clean model's draws score 11.8 to 25.8, the
    label-consistent model's 15.2 to 28.6, BadNets' 20.5 to 133 (docs/engine.md). The verdict
    reads the best of stage 1's restarts. Another family of models needs its own calibration.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backdoored_score: float = Field(default=25.0, ge=0)
    suspicious_score: float = Field(default=23.0, ge=0)
    min_flip_rate: float = Field(
        default=0.2, ge=0, le=1, description="A trigger that flips fewer images is no backdoor."
    )
    max_mask_fraction: float = Field(default=0.1, gt=0, le=1)


class PurifyOptions(BaseModel):
    """Everything a job may set; every field has a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(default=0, ge=0, lt=2**31)
    holdout_fraction: float = Field(default=0.5, gt=0, lt=1)
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: PrecisionChoice = Field(
        default="auto",
        description="Precision of the frozen towers' forward passes: 'auto' is bf16 autocast "
        "on CUDA and fp32 elsewhere; prompts, triggers and artifacts are fp32 either way.",
    )
    inversion: InversionSettings = InversionSettings()
    tuning: TuningSettings = TuningSettings()
    rounds: int = Field(default=2, ge=0, le=10)
    round_steps: int = Field(
        default=150,
        ge=1,
        le=20_000,
        description="Steps of each re-inversion; it starts from the last trigger found.",
    )
    mask_budget: float = Field(
        default=1.2, gt=0, le=10, description="Re-inverted masks, relative to the first one."
    )
    round_contrastive_weight: float = Field(
        default=0.0, ge=0, le=100, description="Weight of stage 1's InfoNCE in re-inversion."
    )
    blend_budget: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="When above 0, each round also re-inverts a blend trigger, (1 - a) * x + "
        "a * p with one weight a <= blend_budget for the whole image, and tunes against it too: "
        "the shape of triggers spread over every pixel, which a small per-pixel mask imitates "
        "poorly. Each costs one more re-inversion of round_steps. Measured at 0.1 on the lab "
        "(seed 0): ASR after 0.23 -> 0.17 on Blended, 0.22 -> 0.20 on SIG, 0.42 -> 0.32 on "
        "WaNet, but 0.007 -> 0.045 on BadNets; 0.2 is worse on Blended and SIG (docs/engine.md).",
    )
    blend_from_round: int = Field(
        default=1,
        ge=1,
        le=10,
        description="The first round that re-inverts a blend trigger (with blend_budget above "
        "0); the rounds before it re-invert patches alone, so that a patch backdoor is chased "
        "by patches first. Measured at 2 with blend_budget 0.1 (seed 0): BadNets 0.277 ASR "
        "after, against 0.045 from round 1 on an earlier build, so 1 stays the default "
        "(docs/engine.md).",
    )
    warp_budget: float = Field(
        default=0.0,
        ge=0,
        le=0.5,
        description="When above 0, each round also re-inverts a warp trigger: a smooth field "
        "that moves every pixel and overwrites none (the shape of WaNet), each of its "
        "warp_grid x warp_grid control points moved by at most warp_budget of the image side. "
        "Each costs one more re-inversion of round_steps. Measured at 0.1 on the lab (seed 0): "
        "WaNet's ASR after 0.42 -> 0.23, but SIG 0.22 -> 0.69 and the mean over six attacks "
        "0.17 -> 0.29, so it stays off unless a warp backdoor is suspected (docs/engine.md).",
    )
    warp_grid: int = Field(
        default=4,
        ge=2,
        le=32,
        description="Control points per side of a re-inverted warp's field (WaNet's k).",
    )
    round_restarts: int = Field(
        default=1,
        ge=1,
        le=8,
        description="Re-inversions per trigger each round: the first starts from the last "
        "trigger, the others from random ones; the one that sends the most tuning images to "
        "the suspected target under the current head is kept. Each costs round_steps more. "
        "Measured at 3 on the lab (seed 0): the mean ASR after is unchanged for twice the time.",
    )
    verdict: VerdictSettings = VerdictSettings()
    adaptive_check: bool = Field(
        default=True,
        description="After tuning, re-invert a trigger once more against the purified head "
        "(within the mask budget) and report its attack success on the held-out images: what "
        "an attacker who knows the new prompts still gets, which the triggers tuned against "
        "understate.",
    )
    tune_when_clean: bool = Field(
        default=False,
        description="Tune the prompts even when the verdict is clean; by default a model found "
        "clean keeps its hand-crafted prompts (the context init), and so its accuracy. A random "
        "context init is always tuned.",
    )

    @field_validator("templates")
    @classmethod
    def _templates_take_a_name(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one template is needed")
        for template in value:
            if template.count("{}") != 1 or len(template) > 200:
                raise ValueError(f"template {template!r} must hold exactly one '{{}}'")
        return value

    @field_validator("tuning")
    @classmethod
    def _context_init_fills_n_ctx(cls, value: TuningSettings) -> TuningSettings:
        """The init's tokens become the ``n_ctx`` context vectors one for one, so the counts
        must agree; checked here, so that the API refuses the pair, not the tuning stage."""
        if value.context_init is not None:
            words = len(_bpe().encode(value.context_init))
            if words != value.n_ctx:
                raise ValueError(
                    f"context_init {value.context_init!r} is {words} tokens, "
                    f"not n_ctx={value.n_ctx}"
                )
        return value


@functools.cache
def _bpe() -> Any:
    """open_clip's BPE tokenizer, the one every checkpoint here is read with."""
    return open_clip.tokenizer.SimpleTokenizer()


class InputMismatchError(ValueError):
    """Inputs valid one by one that do not fit together (a class name too long for the model's
    text context, a trigger aimed at no class), found once both are loaded; ``code`` is the
    stable problem code a job fails with."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


@dataclass(frozen=True)
class PurifyResult:
    verdict: str
    suspected_target: str
    summary: dict[str, float | None]
    report: dict[str, Any]
    artifacts: dict[str, Path]


def purify(
    checkpoint: Path,
    dataset: Path,
    options: PurifyOptions,
    *,
    out_dir: Path,
    architecture: str | Path | dict[str, Any] | None = None,
    known_triggers: tuple[AttackSpec, ...] = (),
    evaluation_dataset: Path | None = None,
    progress: Progress | None = None,
    should_cancel: ShouldCancel | None = None,
) -> PurifyResult:
    """Purifies ``checkpoint`` with the clean shots in ``dataset``; artifacts go to ``out_dir``.

    ``evaluation_dataset`` (same classes) replaces the held-out split for measurement, which a
    benchmark with a large test set wants, and then every shot in ``dataset`` tunes; by default
    a seeded, stratified share of ``dataset`` is held out.
    """
    report: Progress = progress or (lambda stage, fraction: None)
    cancelled = should_cancel or (lambda: False)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def stage_done(stage: Stage) -> None:
        nonlocal clock
        timings[stage] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()
        report(stage, 1.0)
        if cancelled():
            raise CancelledError(f"cancelled after {stage}")

    report("load", 0.0)
    device = _device(options.device)
    loaded = load_checkpoint(checkpoint, architecture, device=device)
    model, normalizer = loaded.model, Normalizer(loaded.preprocess.mean, loaded.preprocess.std)
    images = read_image_set(
        dataset, loaded.preprocess.size, interpolation=loaded.preprocess.interpolation
    )
    if evaluation_dataset is None:
        tune_index, holdout_index = stratified_split(
            images.labels, options.holdout_fraction, options.seed
        )
    else:  # measured elsewhere: every shot can tune
        tune_index, holdout_index = torch.arange(len(images)), torch.arange(0)
    held_out = _held_out(images, holdout_index, evaluation_dataset, loaded)
    names = images.class_names
    for spec in known_triggers:
        if spec.target not in names:
            raise InputMismatchError(
                "TRIGGER_INVALID",
                f"known trigger {spec.name} targets {spec.target!r}, not a class here",
            )
    tokenizer = loaded.tokenizer
    try:  # here, while loading, rather than in tuning after the inversion's minutes
        prompt_tokens(tokenizer, names, options.tuning.n_ctx)
    except PromptTooLongError as exc:
        raise InputMismatchError("PROMPT_TOO_LONG", str(exc)) from exc
    hand = class_embeddings(model, tokenizer, names, options.templates)
    tune_pixels = images.images[tune_index].float().div(255).to(device)
    tune_labels = images.labels[tune_index].to(device)
    stage_done("load")

    precision = resolve_precision(device, options.precision)
    with autocast(device, precision):
        inversion = invert_for_verdict(
            model,
            normalizer,
            hand,
            tune_pixels,
            tune_labels.cpu(),
            options.inversion,
            options.verdict,
            seed=options.seed,
            progress=lambda f: report("inversion", f),
            should_cancel=cancelled,
        )
        first = inversion.trigger
        target, tune_flip = flip_statistics(
            model, normalizer, hand, tune_pixels, tune_labels.cpu(), first
        )
        verdict = verdict_of(tune_flip, first.mask_fraction, options.verdict)
        stage_done("inversion")

        scale = float(model.logit_scale.exp())
        tune = verdict != "clean" or options.tune_when_clean or options.tuning.context_init is None
        if not tune:
            context, embeddings = _hand_crafted_prompts(model, tokenizer, names, options, device)
            rounds = _Rounds([first], [tune_flip], context, embeddings, adaptive=None)
        else:
            rounds = _tune_in_rounds(
                model,
                normalizer,
                tokenizer,
                names,
                hand,
                tune_pixels,
                tune_labels,
                first,
                tune_flip,
                target,
                scale,
                options,
                progress=report,
                should_cancel=cancelled,
            )
        triggers, context, embeddings = rounds.triggers, rounds.context, rounds.embeddings
        stage_done("tuning")

    # Measured in float32, as load_purified_classifier deploys the head.
    evaluation = _evaluate(
        model,
        normalizer,
        held_out,
        hand,
        embeddings,
        target,
        first,
        rounds.adaptive,
        known_triggers,
    )
    stage_done("evaluation")

    summary = _summary(evaluation)
    report_data = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "verdict": verdict,
        "suspected_target": names[target],
        "summary": summary,
        "detection": {
            "flip_rate": round(tune_flip, 6),
            "mask_fraction": round(first.mask_fraction, 6),
            "score": round(backdoor_score(tune_flip, first.mask_fraction), 3),
            "restart_losses": [round(v, 6) for v in inversion.losses],
            "restart_scores": [round(v, 3) for v in inversion.strengths],
            "thresholds": options.verdict.model_dump(),
        },
        "triggers": evaluation["triggers"],
        "per_class_accuracy": {
            "classes": list(names),
            "before": evaluation["per_class_before"],
            "after": evaluation["per_class_after"],
        },
        "data": {
            "classes": list(names),
            "n_tune": len(tune_index),
            "n_held_out": int(held_out.labels.shape[0]),
            "held_out_source": "evaluation_dataset" if evaluation_dataset else "split",
        },
        "rounds": {
            "count": len(triggers) - 1,
            "tuned": tune,
            "mask_fractions": [round(t.mask_fraction, 6) for t in triggers],
            "displacements": [round(t.displacement, 6) for t in triggers],
            "shapes": trigger_shapes(options) if tune else ["patch"],
            "success_rates": [round(rate, 6) for rate in rounds.success_rates],
        },
        "model_sha256": loaded.sha256,
        "options": options.model_dump(mode="json"),
        "runtime": {"device": device.type, "precision": precision},
        "timings_s": timings,
        "versions": _versions(),
    }
    written = _write_artifacts(
        out_dir, report_data, context, embeddings, scale, first, images, loaded, options
    )
    timings["artifacts"] = round(time.perf_counter() - clock, 3)
    report("artifacts", 1.0)
    return PurifyResult(verdict, names[target], summary, report_data, written)


@dataclass(frozen=True)
class _Rounds:
    """What stage 2 leaves: every trigger tuned against, in order, with the share of tuning
    images each sent to the target under the head it was found against (the hand-crafted one
    for stage 1's), the context and its class embeddings, and the adaptive check's trigger."""

    triggers: list[AnyTrigger]
    success_rates: list[float]
    context: torch.Tensor
    embeddings: torch.Tensor
    adaptive: AnyTrigger | None


def invert_for_verdict(
    model: torch.nn.Module,
    normalizer: Normalizer,
    hand: torch.Tensor,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    settings: InversionSettings,
    verdict: VerdictSettings,
    *,
    seed: int,
    progress: Callable[[float], None] | None = None,
    should_cancel: ShouldCancel | None = None,
) -> InversionResult:
    """Stage 1 as a job runs it: each restart is judged by the verdict's score under the
    zero-shot head ``hand``, and one that reaches ``backdoored_score`` ends the search.

    Benchmarks call this too, so that what they measure is the trigger a job would find.
    """

    def strength(trigger: Trigger) -> float:
        _, flip = flip_statistics(model, normalizer, hand, pixels, labels, trigger)
        return detection_strength(flip, trigger.mask_fraction, verdict)

    return invert_trigger(
        model,
        normalizer,
        pixels,
        settings,
        seed=seed,
        judge=strength,
        enough=verdict.backdoored_score,
        progress=progress,
        should_cancel=should_cancel,
    )


def _tune_in_rounds(
    model: open_clip.CLIP,
    normalizer: Normalizer,
    tokenizer: Any,
    names: tuple[str, ...],
    hand: torch.Tensor,
    tune_pixels: torch.Tensor,
    tune_labels: torch.Tensor,
    first: Trigger,
    first_success: float,
    target: int,
    scale: float,
    options: PurifyOptions,
    *,
    progress: Progress,
    should_cancel: ShouldCancel,
) -> _Rounds:
    """Tunes on the first trigger, then ``rounds`` times re-inverts a trigger against the
    current prompts (within the mask budget, warm-started from the last one, the strongest of
    ``round_restarts``) and re-tunes on every trigger found so far. With ``blend_budget``, the
    rounds from ``blend_from_round`` re-invert a blend trigger as well, warm-started from the
    last blend; with ``warp_budget``, every round re-inverts a warp too, from the last warp.
    With ``adaptive_check``, one more (patch) trigger is re-inverted against the final
    embeddings.

    Stage 2 caches the features of ``tuning.views`` fixed views of the tuning images, clean and
    under each trigger; re-inversion works on the images themselves."""
    viewed = [
        view(tune_pixels)
        for view in fixed_views(options.tuning.views, tune_pixels.shape[0], seed=options.seed)
    ]
    view_labels = tune_labels.repeat(len(viewed))
    clean_features = torch.cat([encode_images(model, pixels, normalizer) for pixels in viewed])
    triggers: list[AnyTrigger] = [first]
    success_rates = [first_success]
    triggered_features: list[torch.Tensor] = []  # one block per trigger, computed once
    victims = tune_pixels[tune_labels != target]
    embeddings, context = hand, torch.empty(0)
    last: dict[TriggerShape, AnyTrigger | None] = {"patch": first, "blend": None, "warp": None}
    budgets: dict[TriggerShape, float] = {
        "patch": options.mask_budget * first.mask_fraction,
        "blend": options.blend_budget,
        "warp": options.warp_budget,
    }

    def restarts(round_index: int, shape: TriggerShape = "patch") -> list[AnyTrigger]:
        return [
            invert_against_head(
                model,
                normalizer,
                victims,
                embeddings,
                target,
                budgets[shape],
                options.inversion,
                steps=options.round_steps,
                start=last[shape] if restart == 0 else None,
                contrastive_weight=options.round_contrastive_weight,
                shape=shape,
                warp_grid=options.warp_grid,
                logit_scale=scale,
                seed=_round_seed(options.seed, round_index, shape, restart),
                should_cancel=should_cancel,
            )
            for restart in range(options.round_restarts)
        ]

    def strongest(candidates: list[AnyTrigger]) -> tuple[AnyTrigger, float]:
        rates = [
            success_under_head(model, normalizer, victims, embeddings, target, trigger)
            for trigger in candidates
        ]
        best = rates.index(max(rates))  # the first of equals: the warm start
        return candidates[best], rates[best]

    for round_index in range(options.rounds + 1):
        found: list[AnyTrigger] = [first]
        if round_index > 0:
            shapes = _round_shapes(options, round_index)
            found_and_rates = [strongest(restarts(round_index, shape)) for shape in shapes]
            found = [trigger for trigger, _ in found_and_rates]
            triggers.extend(found)
            success_rates.extend(rate for _, rate in found_and_rates)
            last.update(zip(shapes, found, strict=True))
        for trigger in found:
            triggered_features.append(
                torch.cat(
                    [
                        encode_images(model, pixels, normalizer, transform=trigger.apply)
                        for pixels in viewed
                    ]
                )
            )
        tuned = tune_prompts(
            model,
            tokenizer,
            names,
            hand,
            clean_features,
            view_labels,
            torch.cat(triggered_features),
            view_labels.repeat(len(triggers)),
            options.tuning,
            seed=options.seed,
            target=target,
            should_cancel=should_cancel,
            progress=_round_progress(progress, round_index, options.rounds + 1),
        )
        embeddings, context = tuned.class_embeddings, tuned.prompts.context.detach()
    adaptive = None
    if options.adaptive_check:  # its success under the head matters only to pick a restart
        checks = restarts(options.rounds + 1)
        adaptive = checks[0] if len(checks) == 1 else strongest(checks)[0]
    return _Rounds(triggers, success_rates, context, embeddings, adaptive)


def _round_seed(seed: int, round_index: int, shape: TriggerShape, restart: int) -> int:
    """Each re-inversion's own seed; restart 0 keeps the seed runs had before restarts."""
    return seed + round_index + _SHAPE_SEED_OFFSETS[shape] + 104_729 * restart


_SHAPE_SEED_OFFSETS: dict[TriggerShape, int] = {"patch": 0, "blend": 7919, "warp": 15_013}


def _round_shapes(options: PurifyOptions, round_index: int) -> tuple[TriggerShape, ...]:
    """The triggers round ``round_index`` (from 1) re-inverts, in order."""
    shapes: tuple[TriggerShape, ...] = ("patch",)
    if options.blend_budget and round_index >= options.blend_from_round:
        shapes += ("blend",)
    if options.warp_budget:
        shapes += ("warp",)
    return shapes


def trigger_shapes(options: PurifyOptions) -> list[TriggerShape]:
    """The shape of every trigger stage 2 tunes against when it tunes: stage 1's, then each
    round's, in the order ``report.json`` lists them under ``rounds``."""
    shapes: list[TriggerShape] = ["patch"]
    for round_index in range(1, options.rounds + 1):
        shapes.extend(_round_shapes(options, round_index))
    return shapes


@torch.no_grad()
def _hand_crafted_prompts(
    model: open_clip.CLIP,
    tokenizer: Any,
    names: tuple[str, ...],
    options: PurifyOptions,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The untuned context (its init) and the class embeddings it gives: what a model found
    clean ships, so that its prompts and head still load like any other job's."""
    settings = options.tuning
    prompts = ClassPrompts(
        model,
        tokenizer,
        names,
        n_ctx=settings.n_ctx,
        init=settings.context_init,
        seed=options.seed,
    ).to(device)
    return prompts.context.detach(), prompt_class_embeddings(model, prompts)


def stratified_split(
    labels: torch.Tensor, holdout_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the tuning and held-out parts: per class, at least one image on each side."""
    generator = torch.Generator().manual_seed(seed)
    tune, held = [], []
    for label in sorted(set(labels.tolist())):
        pool = torch.nonzero(labels == label).flatten()
        pool = pool[torch.randperm(len(pool), generator=generator)]
        if len(pool) < 2:
            raise ValueError(f"class {label} has {len(pool)} image; at least 2 are needed")
        n_held = min(len(pool) - 1, max(1, round(len(pool) * holdout_fraction)))
        held.append(pool[:n_held])
        tune.append(pool[n_held:])
    return torch.cat(tune).sort().values, torch.cat(held).sort().values


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA device is available")
    return torch.device(choice)


def _held_out(
    images: ImageSet,
    holdout: torch.Tensor,
    evaluation_dataset: Path | None,
    loaded: LoadedCheckpoint,
) -> ImageSet:
    if evaluation_dataset is None:
        return ImageSet(
            images.images[holdout],
            images.labels[holdout],
            images.folders,
            images.class_names,
            tuple(images.files[i] for i in holdout.tolist()),
        )
    other = read_image_set(
        evaluation_dataset, loaded.preprocess.size, interpolation=loaded.preprocess.interpolation
    )
    if other.class_names != images.class_names:
        raise ValueError("the evaluation set's classes differ from the dataset's")
    return other


def backdoor_score(flip_rate: float, mask_fraction: float) -> float:
    """Images flipped per unit of mask: what the verdict compares with its thresholds."""
    return flip_rate / max(mask_fraction, 1e-6)


def _gated(flip_rate: float, mask_fraction: float, settings: VerdictSettings) -> bool:
    """A trigger too large or too weak to be a backdoor's, whatever its score."""
    return mask_fraction > settings.max_mask_fraction or flip_rate < settings.min_flip_rate


def detection_strength(flip_rate: float, mask_fraction: float, settings: VerdictSettings) -> float:
    """How strongly a trigger speaks for a backdoor: its score, or 0 where the verdict's gates
    call it clean. Stage 1's restarts keep the strongest."""
    return (
        0.0
        if _gated(flip_rate, mask_fraction, settings)
        else backdoor_score(flip_rate, mask_fraction)
    )


def verdict_of(flip_rate: float, mask_fraction: float, settings: VerdictSettings) -> str:
    if _gated(flip_rate, mask_fraction, settings):
        return "clean"
    score = backdoor_score(flip_rate, mask_fraction)
    if score >= settings.backdoored_score:
        return "backdoored"
    if score >= settings.suspicious_score:
        return "suspicious"
    return "clean"


def _evaluate(
    model: torch.nn.Module,
    normalizer: Normalizer,
    held_out: ImageSet,
    before: torch.Tensor,
    after: torch.Tensor,
    target: int,
    inverted: Trigger,
    adaptive: AnyTrigger | None,
    known: tuple[AttackSpec, ...],
) -> dict[str, Any]:
    """CA, per-class accuracy, and ASR of every trigger before and after. Each trigger's
    ``kind``: "inverted" (stage 1's, which tuning trained against), "known" (a spec the job
    named) or "re-inverted" (found against the purified head, the adaptive check)."""
    device = before.device
    labels = held_out.labels
    clean = encode_images(model, held_out.images.to(device), normalizer)
    predicted_before, predicted_after = predictions(clean, before), predictions(clean, after)
    ca_before, ca_after = (
        clean_accuracy(predicted_before, labels),
        clean_accuracy(predicted_after, labels),
    )
    triggers = []
    candidates: list[_Candidate] = [("inverted", "inverted", inverted.apply, target, None)]
    candidates += [
        (
            spec.name,
            "known",
            spec.apply,
            held_out.class_names.index(spec.target or ""),
            spec.model_dump(mode="json"),
        )
        for spec in known
    ]
    if adaptive is not None:
        candidates.append(("re-inverted", "re-inverted", adaptive.apply, target, None))
    for name, kind, apply, trigger_target, spec in candidates:
        features = encode_images(model, held_out.images.to(device), normalizer, transform=apply)
        asr_before = attack_success_rate(predictions(features, before), labels, trigger_target)
        asr_after = attack_success_rate(predictions(features, after), labels, trigger_target)
        triggers.append(
            {
                "name": name,
                "kind": kind,
                "target": held_out.class_names[trigger_target],
                "spec": spec,
                "asr_before": round(asr_before, 6),
                "asr_after": round(asr_after, 6),
                "fidelity": _round(fidelity(asr_before, asr_after, ca_before, ca_after)),
            }
        )
    n_classes = len(held_out.class_names)
    return {
        "ca_before": ca_before,
        "ca_after": ca_after,
        "triggers": triggers,
        "per_class_before": [
            round(v, 6) for v in per_class_accuracy(predicted_before, labels, n_classes)
        ],
        "per_class_after": [
            round(v, 6) for v in per_class_accuracy(predicted_after, labels, n_classes)
        ],
    }


def _summary(evaluation: dict[str, Any]) -> dict[str, float | None]:
    """CA and ASR before and after. The ASR is the first known trigger's; without one, the
    re-inverted trigger's, since the inverted one was tuned against and understates what is
    left; without that either (a model found clean), the inverted one's."""
    by_kind: dict[str, dict[str, Any]] = {}
    for trigger in evaluation["triggers"]:
        by_kind.setdefault(trigger["kind"], trigger)
    main = by_kind.get("known") or by_kind.get("re-inverted") or by_kind["inverted"]
    return {
        "ca_before": round(evaluation["ca_before"], 6),
        "ca_after": round(evaluation["ca_after"], 6),
        "asr_before": main["asr_before"],
        "asr_after": main["asr_after"],
        "fidelity": main["fidelity"],
    }


def _write_artifacts(
    out_dir: Path,
    report_data: dict[str, Any],
    context: torch.Tensor,
    embeddings: torch.Tensor,
    scale: float,
    trigger: Trigger,
    images: ImageSet,
    loaded: LoadedCheckpoint,
    options: PurifyOptions,
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    names, sha = list(images.class_names), loaded.sha256
    paths = {
        name: out_dir / name
        for name in (
            artifacts.PROMPTS_FILE,
            artifacts.HEAD_FILE,
            artifacts.TRIGGER_FILE,
            artifacts.TRIGGER_PNG,
            "report.json",
            "report.html",
        )
    }
    artifacts.write_prompts(paths[artifacts.PROMPTS_FILE], context, names, sha, options.templates)
    artifacts.write_head(paths[artifacts.HEAD_FILE], embeddings, scale, names, sha)
    artifacts.write_trigger(paths[artifacts.TRIGGER_FILE], trigger, sha)
    picture = artifacts.trigger_png(trigger, images.images[0].float() / 255)
    artifacts.write_bytes(paths[artifacts.TRIGGER_PNG], picture)
    text = json.dumps(report_data, indent=2, sort_keys=True) + "\n"
    artifacts.write_bytes(paths["report.json"], text.encode())
    artifacts.write_bytes(paths["report.html"], render_html(report_data, picture).encode())
    return paths


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("clip-antidote")
    except PackageNotFoundError:
        ours = "unknown"
    return {
        "clip_antidote": ours,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
    }


def _round_progress(report: Progress, round_index: int, rounds: int) -> Callable[[float], None]:
    return lambda fraction: report("tuning", (round_index + fraction) / rounds)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
