"""What a purification job may set: the engine's options, grouped by the stage that reads them.

This module is part of the engine's torch-free contract (with ``attacks``, ``outcome``,
``errors`` and ``progress``): the API validates job requests against it without loading torch
or open_clip. Every field has a default, and what each trades is measured in docs/engine.md.

Where the job runs (device and precision) is the operator's choice, not the tenant's: it is
``Runtime``, which the worker fills from its settings, and it is not an option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.cbpt.bpe import token_count

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
PrecisionChoice = Literal["auto", "fp32", "bf16"]
DeviceChoice = Literal["auto", "cpu", "cuda"]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InversionSettings(_Settings):
    """Stage 1: contrastive inversion of a mask-and-pattern trigger (``inversion.py``)."""

    steps: int = Field(default=300, ge=1, le=20_000)
    lr: float = Field(default=0.1, gt=0, le=10, description="Adam's rate, also for re-inversion.")
    tau: float = Field(default=0.1, gt=0, le=10, description="InfoNCE temperature.")
    batch_size: int = Field(
        default=32,
        ge=4,
        le=4096,
        description="Images per step, for stage 1 and for each re-inversion. A step costs "
        "linearly in it; smaller batches make noisier draws.",
    )
    lambda_init: float = Field(default=1e-3, ge=0, le=100, description="Initial mask penalty.")
    lambda_factor: float = Field(
        default=1.5, gt=1, le=10, description="How fast the adaptive mask penalty moves."
    )
    success_loss: float = Field(
        default=0.2, gt=0, description="Contrastive loss under which the trigger 'works'."
    )
    patience: int = Field(
        default=10, ge=1, le=1000, description="Steps before the mask penalty is adapted."
    )
    restarts: int = Field(
        default=3,
        ge=1,
        le=16,
        description="Inversions from independent random starts, run until one settles the "
        "verdict; the strongest is kept. One start may settle on a generic adversarial patch.",
    )


class TargetSearchSettings(_Settings):
    """Stage 1's class-wise targeted search (``reach.py``): for every class, a trigger within
    one mask budget that sends the other classes' shots there. The class reached most easily
    is the suspected target, and how much more easily it is reached than the next class is the
    verdict's evidence. When off, stage 1 is the contrastive inversion alone (``inversion``),
    which needs no target but, on models with strong natural universal patches, names the class
    such a patch lands on rather than the backdoor's (docs/engine.md)."""

    enabled: bool = Field(default=True, description="Search class by class; else contrastive.")
    budget: float = Field(
        default=0.01, gt=0, lt=1, description="Each class's trigger: its mask's mean at most."
    )
    steps: int = Field(default=90, ge=1, le=20_000, description="Steps for the classes kept.")
    warmup: int = Field(
        default=30,
        ge=1,
        le=20_000,
        description="Steps every class gets before only the `keep` with the lowest "
        "cross-entropy towards themselves go on.",
    )
    keep: int = Field(
        default=6, ge=0, le=4096, description="Classes fitted for all `steps`; 0: all of them."
    )
    batch_size: int = Field(
        default=16,
        ge=2,
        le=4096,
        description="Shots a step stamps with every class's trigger: a step encodes "
        "batch_size times the classes still searched.",
    )
    measure_on: int = Field(
        default=96, ge=8, le=100_000, description="Shots each flip rate is measured on (most)."
    )


class RoundSettings(_Settings):
    """Stage 2's rounds: re-inverting triggers against the current prompts and re-tuning on
    every trigger found so far (``rounds.py``). Re-inversion uses ``inversion``'s lr, tau and
    batch size."""

    count: int = Field(default=2, ge=0, le=10, description="Rounds after the first tuning.")
    steps: int = Field(
        default=150,
        ge=1,
        le=20_000,
        description="Steps of each re-inversion; it starts from the last trigger found.",
    )
    mask_budget: float = Field(
        default=1.2, gt=0, le=10, description="Re-inverted masks, relative to the first one."
    )
    contrastive_weight: float = Field(
        default=0.0, ge=0, le=100, description="Weight of stage 1's InfoNCE in re-inversion."
    )
    restarts: int = Field(
        default=1,
        ge=1,
        le=8,
        description="Re-inversions per trigger each round: the first starts from the last "
        "trigger, the others from random ones, and the one that sends the most tuning images "
        "to the suspected target under the current head is kept. Each costs `steps` more.",
    )
    blend_budget: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="When above 0, each round from `blend_from` also re-inverts a blend "
        "trigger, (1 - a) * x + a * p with one weight a <= blend_budget for the whole image: "
        "the shape of triggers spread over every pixel. Helps on blended and sinusoidal "
        "backdoors, costs on patches, and one more re-inversion a round.",
    )
    blend_from: int = Field(
        default=1,
        ge=1,
        le=10,
        description="The first round that re-inverts a blend trigger (with blend_budget above "
        "0); the rounds before it chase patches alone.",
    )
    warp_budget: float = Field(
        default=0.0,
        ge=0,
        le=0.5,
        description="When above 0, each round also re-inverts a warp trigger: a smooth field "
        "that moves every pixel and overwrites none (the shape of WaNet), each control point "
        "moved by at most warp_budget of the image side. Helps on warps, costs on sinusoids.",
    )
    warp_grid: int = Field(
        default=4, ge=2, le=32, description="Control points per side of a re-inverted warp."
    )


@dataclass(frozen=True)
class LossWeights:
    """Stage 2's terms once the objective is settled: the weight of clean cross-entropy on
    labels, of distillation from the zero-shot predictions, what triggered images are pulled
    to, and the weight of the regulariser towards the hand-crafted features."""

    clean: float
    distill: float
    backdoor_target: Literal["zero-shot", "label"]
    regularizer: float

    @property
    def fits_labels(self) -> bool:
        return self.clean > 0 and self.distill == 0


class TuningSettings(_Settings):
    """Stage 2's class-wise prompt tuning on cached image features (``tuning.py``)."""

    steps: int = Field(default=150, ge=1, le=20_000)
    lr: float = Field(default=5e-3, gt=0, le=1)
    n_ctx: int = Field(default=4, ge=1, le=32, description="Learnable context tokens a class.")
    context_init: str | None = Field(
        default="a photo of a",
        max_length=200,
        description="Words the context starts from (exactly n_ctx tokens), or null for random.",
    )
    objective: Literal["auto", "labels", "zero-shot"] = Field(
        default="auto",
        description="What the clean and backdoor terms fit. 'labels' (CBPT's own losses): "
        "clean shots and their triggered versions take their true class, which gains "
        "accuracy where the checkpoint's zero-shot head is not already the best the shots "
        "allow. 'zero-shot': clean shots keep their zero-shot predictions and triggered ones "
        "take their clean version's, which keeps accuracy where zero-shot is the best. "
        "'auto' cross-validates on the tuning shots (two folds) and picks 'labels' when prompts "
        "fitted to labels beat the zero-shot head there by labels_margin.",
    )
    labels_margin: float = Field(
        default=0.02,
        ge=-1,
        le=1,
        description="How much higher the cross-validated accuracy of label-fitted prompts must "
        "be than the zero-shot head's for objective 'auto' to fit labels.",
    )
    backdoor_weight: float = Field(default=1.0, ge=0, le=100)
    backdoor_target: Literal["zero-shot", "label"] | None = Field(
        default=None,
        description="What triggered images are pulled to: their clean version's zero-shot "
        "prediction (distillation) or their label (cross-entropy); null: as the objective says.",
    )
    clean_weight: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Cross-entropy of clean shots on their labels; null: 1 when the objective "
        "fits labels, else 0.",
    )
    distill_weight: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="KL of clean predictions from the zero-shot ones (clean decisions stay); "
        "null: 1 when the objective keeps zero-shot decisions, else 0.",
    )
    target_clean_weight: float = Field(
        default=1.0,
        ge=0,
        le=100,
        description="Weight of the suspected target class's own clean images in the clean "
        "terms, the other classes' being 1. Most of the accuracy tuning costs is the target's; "
        "a higher weight keeps more of it and leaves more attack success.",
    )
    regularizer_weight: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Holds each class's text feature near its hand-crafted one. Distilling "
        "zero-shot decisions, few shots overfit without it; fitting labels, it holds the "
        "prompts where a broadly pretrained model's backdoor sends triggered images. null: 2 "
        "when keeping zero-shot decisions, 0 when fitting labels.",
    )
    views: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Augmented views of each tuning image whose features are cached (the "
        "first is the image itself). More keeps clean accuracy and leaves more attack success.",
    )
    shift_scales: tuple[float, ...] = Field(
        default=(1.0,),
        min_length=1,
        max_length=8,
        description="Scales s of each triggered feature's shift from its clean image's: the "
        "backdoor term sees normalize(f(x) + s * (f(T(x)) - f(x))) for every s. Above 1 "
        "extrapolates towards where a stronger (real) trigger lands.",
    )
    when_clean: bool | Literal["auto"] = Field(
        default="auto",
        description="Whether a model found clean is tuned. 'auto': when the objective fits "
        "labels (they beat zero-shot on held-out shots, so tuning gains accuracy); otherwise "
        "it keeps its hand-crafted prompts (the context init), and so its accuracy. true: "
        "always; false: never. A random context init is always tuned.",
    )

    def loss_weights(self, fits_labels: bool) -> LossWeights:
        """The clean and backdoor terms' weights for a model whose objective is settled:
        ``fits_labels`` is what 'auto' decided (ignored for the other objectives), and fields
        set explicitly override what the objective says."""
        labels = self.objective == "labels" or (self.objective == "auto" and fits_labels)
        return LossWeights(
            clean=self.clean_weight if self.clean_weight is not None else float(labels),
            distill=self.distill_weight if self.distill_weight is not None else float(not labels),
            backdoor_target=self.backdoor_target or ("label" if labels else "zero-shot"),
            regularizer=(
                self.regularizer_weight
                if self.regularizer_weight is not None
                else (0.0 if labels else 2.0)
            ),
        )

    @field_validator("shift_scales")
    @classmethod
    def _scales_are_positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < scale <= 10 for scale in value):
            raise ValueError("every shift scale must be in (0, 10]")
        return value

    @model_validator(mode="after")
    def _context_init_fills_n_ctx(self) -> TuningSettings:
        """The init's tokens become the ``n_ctx`` context vectors one for one, so the counts
        must agree; checked here, so that the API refuses the pair, not the tuning stage."""
        if self.context_init is not None:
            tokens = token_count(self.context_init)
            if tokens != self.n_ctx:
                raise ValueError(
                    f"context_init {self.context_init!r} is {tokens} tokens, not n_ctx={self.n_ctx}"
                )
        return self


class VerdictSettings(_Settings):
    """Where detection draws its lines (``verdict.py``).

    With the class-wise search (the default), the verdict reads the margin by which the
    suspected target is reached more easily than the next class: relative to the model's own
    classes, it needs no calibration per family. With the search off, it reads the contrastive
    trigger's score: the share of other classes' images it sends to its class, per unit of
    mask, since a backdoor is a shortcut that does more with less than the universal
    adversarial patches every model has. Those thresholds are calibrated on the first lab
    family (docs/engine.md); another family of models needs its own.
    """

    backdoored_margin: float = Field(
        default=0.7,
        ge=0,
        description="With the class-wise search: how much more easily the suspected target is "
        "reached than the next class (the log of the runner-up's cross-entropy over the "
        "target's; 0.7 is half the loss) from which the model is backdoored.",
    )
    suspicious_margin: float = Field(
        default=0.35, ge=0, description="...and suspicious (tuned as a backdoored one is)."
    )
    backdoored_score: float = Field(
        default=25.0,
        ge=0,
        description="With the search off: the contrastive trigger's score from which the "
        "model is backdoored.",
    )
    suspicious_score: float = Field(default=23.0, ge=0)
    min_flip_rate: float = Field(
        default=0.2, ge=0, le=1, description="A trigger that flips fewer images is no backdoor."
    )
    max_mask_fraction: float = Field(default=0.1, gt=0, le=1)


class EvaluationSettings(_Settings):
    """What the report measures on (``evaluation.py``)."""

    holdout_fraction: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="Share of each class's shots held out to measure on (at least one a side).",
    )
    adaptive_check: bool = Field(
        default=True,
        description="After tuning, re-invert a trigger once more against the purified head "
        "and report its attack success on the held-out images: what an attacker who knows the "
        "new prompts still gets. Costs one re-inversion.",
    )


# Flat names the options had before they were grouped, still accepted on input.
_LEGACY_NAMES: dict[str, tuple[str, str]] = {
    "round_steps": ("rounds", "steps"),
    "mask_budget": ("rounds", "mask_budget"),
    "round_contrastive_weight": ("rounds", "contrastive_weight"),
    "round_restarts": ("rounds", "restarts"),
    "blend_budget": ("rounds", "blend_budget"),
    "blend_from_round": ("rounds", "blend_from"),
    "warp_budget": ("rounds", "warp_budget"),
    "warp_grid": ("rounds", "warp_grid"),
    "tune_when_clean": ("tuning", "when_clean"),
    "holdout_fraction": ("evaluation", "holdout_fraction"),
    "adaptive_check": ("evaluation", "adaptive_check"),
}


class PurifyOptions(_Settings):
    """Everything a job may set; every field has a default.

    The flat names of earlier releases (``"rounds": 2``, ``round_steps``, ``mask_budget``,
    ``tune_when_clean``, ``holdout_fraction``, ...) are still read, into their groups; naming
    one both ways is refused.
    """

    seed: int = Field(default=0, ge=0, lt=2**31, description="Seeds split, inversion, tuning.")
    templates: tuple[str, ...] = Field(
        default=DEFAULT_TEMPLATES,
        description="Hand-crafted prompts: the zero-shot head measured before, and what the "
        "regulariser holds each class near.",
    )
    inversion: InversionSettings = InversionSettings()
    search: TargetSearchSettings = TargetSearchSettings()
    rounds: RoundSettings = RoundSettings()
    tuning: TuningSettings = TuningSettings()
    verdict: VerdictSettings = VerdictSettings()
    evaluation: EvaluationSettings = EvaluationSettings()

    @model_validator(mode="before")
    @classmethod
    def _read_legacy_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        grouped = dict(data)
        if isinstance(grouped.get("rounds"), int) and not isinstance(grouped["rounds"], bool):
            grouped["rounds"] = {"count": grouped["rounds"]}
        for name, (group, field) in _LEGACY_NAMES.items():
            if name not in grouped:
                continue
            section = grouped.get(group, {})
            if isinstance(section, BaseModel):
                section = section.model_dump()
            if not isinstance(section, dict) or field in section:
                raise ValueError(f"{name!r} is {group}.{field}; name it once")
            grouped[group] = {**section, field: grouped.pop(name)}
        return grouped

    @field_validator("templates")
    @classmethod
    def _templates_take_a_name(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one template is needed")
        for template in value:
            if template.count("{}") != 1 or len(template) > 200:
                raise ValueError(f"template {template!r} must hold exactly one '{{}}'")
        return value

    def tunes_when_clean(self, fits_labels: bool) -> bool:
        """Whether a model found clean is tuned: on request, when 'auto' and its objective fits
        labels (``fits_labels``: tuning then gains accuracy), or when there is no hand-crafted
        context to keep."""
        when = self.tuning.when_clean
        if self.tuning.context_init is None or when is True:
            return True
        return when == "auto" and self.tuning.loss_weights(fits_labels).fits_labels


@dataclass(frozen=True)
class Runtime:
    """Where a job runs: the worker's settings, not the job's. ``auto`` is CUDA when there is
    one, and bfloat16 autocast there (fp32 elsewhere: see ``precision.py``)."""

    device: DeviceChoice = "auto"
    precision: PrecisionChoice = "auto"
