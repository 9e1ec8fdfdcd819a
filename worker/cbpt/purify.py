"""``purify``: one call from a suspicious checkpoint and a few clean shots to purified prompts.

A pipeline of stages, each in its own module, each reported through
``progress(stage, fraction)`` and checked for cancellation (``progress.py``):

``load``        the checkpoint (safely) and the image set; a seeded, stratified split
``inversion``   contrastive trigger inversion; suspected target, score, verdict (``verdict.py``)
``tuning``      the objective (``objective.py``: fit labels, or keep zero-shot decisions),
                class-wise prompt tuning, then rounds of re-inversion against the current
                prompts and re-tuning on every trigger found so far (``rounds.py``)
``evaluation``  CA and ASR before (hand-crafted prompts) and after, per class and per trigger
                (``evaluation.py``)
``artifacts``   prompts, head, trigger and report files (``artifacts.py``, ``outcome.Report``)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.cbpt import artifacts
from worker.cbpt.attacks import AttackSpec
from worker.cbpt.checkpoint import LoadedCheckpoint, load_checkpoint
from worker.cbpt.errors import InputMismatchError
from worker.cbpt.evaluation import (
    candidates,
    evaluate,
    read_evaluation_set,
    stratified_split,
    subset,
)
from worker.cbpt.imagesets import ImageSet, read_image_set
from worker.cbpt.objective import cross_validate_labels
from worker.cbpt.options import PurifyOptions, Runtime
from worker.cbpt.outcome import Report, Verdict
from worker.cbpt.precision import autocast, resolve_device, resolve_precision
from worker.cbpt.progress import CancelledError, Progress, ShouldCancel, Stage
from worker.cbpt.prompts import prompt_tokens
from worker.cbpt.report import ReportInputs, build_report
from worker.cbpt.rounds import Objective, tune_clean, tune_in_rounds, untuned
from worker.cbpt.tuning import ClassText
from worker.cbpt.verdict import detect
from worker.cbpt.zeroshot import FrozenClip, Normalizer, Shots, class_embeddings, encode_images

_DEFAULT_RUNTIME = Runtime()


@dataclass(frozen=True)
class PurifyResult:
    report: Report
    artifacts: dict[str, Path]

    @property
    def verdict(self) -> Verdict:
        return self.report.verdict

    @property
    def suspected_target(self) -> str:
        return self.report.suspected_target


@dataclass(frozen=True)
class Inputs:
    """What a job reads: the checkpoint, the shots, and the images it is measured on."""

    checkpoint: Path
    dataset: Path
    architecture: str | Path | dict[str, Any] | None = None
    known_triggers: tuple[AttackSpec, ...] = ()
    evaluation_dataset: Path | None = None


@dataclass(frozen=True)
class _Loaded:
    """The load stage's output: the model, the shots split into tuning and held-out parts,
    and the hand-crafted head."""

    checkpoint: LoadedCheckpoint
    clip: FrozenClip
    images: ImageSet
    tune: Shots
    held_out: ImageSet
    hand: torch.Tensor

    def report_inputs(self, *, separate_held_out: bool) -> ReportInputs:
        return ReportInputs(
            self.images.class_names,
            int(self.tune.labels.shape[0]),
            int(self.held_out.labels.shape[0]),
            "evaluation_dataset" if separate_held_out else "split",
            self.checkpoint.sha256,
        )


def purify(
    inputs: Inputs,
    options: PurifyOptions,
    *,
    out_dir: Path,
    runtime: Runtime = _DEFAULT_RUNTIME,
    progress: Progress | None = None,
    should_cancel: ShouldCancel | None = None,
) -> PurifyResult:
    """Purifies ``inputs.checkpoint`` with the clean shots in ``inputs.dataset``; artifacts go
    to ``out_dir``.

    ``inputs.evaluation_dataset`` (same classes) replaces the held-out split for measurement,
    which a benchmark with a large test set wants, and then every shot tunes; by default a
    seeded, stratified share of the dataset is held out.
    """
    clock = _StageClock(progress, should_cancel)
    clock.report("load", 0.0)
    device = resolve_device(runtime.device)
    loaded = _load(inputs, options, device)
    clock.done("load")

    precision = resolve_precision(device, runtime.precision)
    names, hand = loaded.images.class_names, loaded.hand
    with autocast(device, precision):
        detection = detect(
            loaded.clip,
            hand,
            loaded.tune,
            options,
            progress=lambda fraction: clock.report("inversion", fraction),
            should_cancel=clock.cancelled,
        )
        clock.done("inversion")
        text = ClassText(loaded.clip.model, loaded.clip.tokenizer, names, hand)
        first = (detection.trigger, detection.target, detection.flip_rate)
        clock.report("tuning", 0.0)
        objective = _objective(loaded, text, options, clock.cancelled)
        fits_labels = objective.weights.fits_labels
        # Found clean, where labels gain: CoOp alone. Asked to tune a clean model (true), it
        # is tuned as a backdoored one would be, against its inverted trigger.
        if detection.verdict == "clean" and fits_labels and options.tuning.when_clean == "auto":
            tune = tune_clean
        elif detection.verdict != "clean" or options.tunes_when_clean(fits_labels):
            tune = tune_in_rounds
        else:
            tune = None
        if tune is None:
            rounds = untuned(loaded.clip, text, first, options, objective)
        else:
            rounds = tune(
                loaded.clip,
                text,
                loaded.tune,
                first,
                options,
                objective,
                progress=clock.report,
                should_cancel=clock.cancelled,
            )
        clock.done("tuning")

    found = candidates(
        detection.trigger, detection.target, inputs.known_triggers, rounds.adaptive, names
    )
    evaluation = evaluate(loaded.clip, loaded.held_out, hand, rounds.embeddings, found)
    clock.done("evaluation")

    report = build_report(
        loaded.report_inputs(separate_held_out=inputs.evaluation_dataset is not None),
        (detection, rounds, evaluation),
        options,
        {"device": device.type, "precision": precision},
        clock.timings,
    )
    shipped = artifacts.Purified(
        rounds.context,
        rounds.embeddings,
        loaded.clip.logit_scale,
        detection.trigger,
        loaded.images.images[0].float() / 255,
        names,
        options.templates,
        loaded.checkpoint.sha256,
    )
    written = artifacts.write_all(out_dir, report, shipped)
    clock.report("artifacts", 1.0)
    return PurifyResult(report, written)


def _objective(
    loaded: _Loaded, text: ClassText, options: PurifyOptions, should_cancel: ShouldCancel
) -> Objective:
    """What stage 2 fits: the job's objective, or for "auto" what cross-validation on the
    tuning shots says (``objective.py``)."""
    settings = options.tuning
    fit = None
    if settings.objective == "auto":
        clip, tune = loaded.clip, loaded.tune
        features = encode_images(clip.model, tune.pixels, clip.normalizer)
        fit = cross_validate_labels(
            text, features, tune.labels, settings, seed=options.seed, should_cancel=should_cancel
        )
    fits_labels = fit is not None and fit.fits_labels
    return Objective(settings.loss_weights(fits_labels), fit)


def _load(inputs: Inputs, options: PurifyOptions, device: torch.device) -> _Loaded:
    """Loads the checkpoint and the shots, splits them, checks that they fit together, and
    encodes the hand-crafted head."""
    loaded = load_checkpoint(inputs.checkpoint, inputs.architecture, device=device)
    preprocess = loaded.preprocess
    clip = FrozenClip(loaded.model, Normalizer(preprocess.mean, preprocess.std), loaded.tokenizer)
    images = read_image_set(inputs.dataset, preprocess.size, interpolation=preprocess.interpolation)
    if inputs.evaluation_dataset is None:
        tune_index, held_index = stratified_split(
            images.labels, options.evaluation.holdout_fraction, options.seed
        )
        held_out = subset(images, held_index)
    else:  # measured elsewhere: every shot can tune
        tune_index = torch.arange(len(images))
        held_out = read_evaluation_set(inputs.evaluation_dataset, images, preprocess)
    names = images.class_names
    for spec in inputs.known_triggers:
        if spec.target not in names:
            raise InputMismatchError(
                f"known trigger {spec.name} targets {spec.target!r}, not a class here",
                code="TRIGGER_INVALID",
            )
    # here, while loading, rather than in tuning after the inversion's minutes
    prompt_tokens(loaded.tokenizer, names, options.tuning.n_ctx)
    hand = class_embeddings(loaded.model, loaded.tokenizer, names, options.templates)
    tune = Shots(
        images.images[tune_index].float().div(255).to(device),
        images.labels[tune_index].to(device),
    )
    return _Loaded(loaded, clip, images, tune, held_out, hand)


class _StageClock:
    """Times each stage, reports its end, and raises ``CancelledError`` between stages when
    the caller asks to stop."""

    def __init__(self, progress: Progress | None, should_cancel: ShouldCancel | None) -> None:
        self.report: Progress = progress or (lambda stage, fraction: None)
        self.cancelled: ShouldCancel = should_cancel or (lambda: False)
        self.timings: dict[str, float] = {}
        self._started = time.perf_counter()

    def done(self, stage: Stage) -> None:
        self.timings[stage] = round(time.perf_counter() - self._started, 3)
        self._started = time.perf_counter()
        self.report(stage, 1.0)
        if self.cancelled():
            raise CancelledError(f"cancelled after {stage}")
