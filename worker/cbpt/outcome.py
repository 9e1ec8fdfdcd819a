"""What a purification reports: ``report.json``'s schema and the summary every surface shows.

Part of the torch-free contract. The engine builds a ``Report`` and writes it as
``report.json``; the worker copies its ``verdict``, ``suspected_target`` and ``summary`` into
the job's result, which the API serves and the client reads with these same models. Fields
are only ever added; ``schema_version`` changes when one changes meaning.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

REPORT_SCHEMA_VERSION = 1
Verdict = Literal["clean", "suspicious", "backdoored"]
TriggerKind = Literal["inverted", "known", "re-inverted"]


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True)


class Summary(_Part):
    """Clean accuracy and attack success before and after, on the held-out images.

    The ASR is that of the first known trigger the job named; without one, of a trigger
    re-inverted against the purified head (the adaptive check), since the triggers tuned
    against understate what is left; for a model found clean and left untuned, of the inverted
    trigger. Fidelity is NIST TrojAI's mitigation score, the share of attack success removed
    times the share of clean accuracy kept; None where there was no attack success to remove.
    """

    ca_before: float | None
    ca_after: float | None
    asr_before: float | None
    asr_after: float | None
    fidelity: float | None


class TriggerMeasurement(_Part):
    """One trigger's attack success on the held-out images, under the hand-crafted head
    (before) and the purified one (after). ``kind``: "inverted" (stage 1's, which tuning
    trained against), "known" (a spec the job named) or "re-inverted" (found against the
    purified head: the adaptive check)."""

    name: str
    kind: TriggerKind
    target: str
    spec: dict[str, Any] | None
    asr_before: float
    asr_after: float
    fidelity: float | None


class DetectionReport(_Part):
    """Stage 1: how it searched (``method``: the class-wise search, or with it off the
    contrastive inversion), the trigger's flip rate, mask and score, and the thresholds the
    verdict read them with. The search adds how much more easily the suspected target is
    reached than the next class (``reach_margin``, ``Reach.margin``) and every class's flip
    rate (in ``DataReport.classes`` order); the contrastive inversion, every restart's loss
    and score."""

    flip_rate: float
    mask_fraction: float
    score: float
    restart_losses: list[float]
    restart_scores: list[float]
    thresholds: dict[str, float]
    method: Literal["class-wise", "contrastive"] = "contrastive"
    reach_margin: float | None = None
    class_flip_rates: list[float] | None = None


class PerClassAccuracy(_Part):
    classes: list[str]
    before: list[float]
    after: list[float]


class DataReport(_Part):
    classes: list[str]
    n_tune: int
    n_held_out: int
    held_out_source: Literal["split", "evaluation_dataset"]


class LabelFitReport(_Part):
    """The cross-validation behind objective "auto": accuracy on held-out folds of the tuning
    shots, of the zero-shot head and of prompts fitted to the other fold's labels, and the
    margin the second had to clear."""

    zero_shot: float
    fitted: float
    margin: float


class RoundsReport(_Part):
    """Stage 2: how many rounds ran, whether the prompts were tuned at all, and each trigger
    tuned against, in order: its mask (or 0 for a warp), its displacement (0 for a mask), its
    shape, and the share of tuning images it sent to the target under the head it was found
    against. ``objective``: whether the clean and backdoor terms fitted the shots' labels or
    the zero-shot decisions, and ``label_fit`` the cross-validation that chose it (None where
    the job named it, or the shots were too few to split)."""

    count: int
    tuned: bool
    mask_fractions: list[float]
    displacements: list[float]
    shapes: list[str]
    success_rates: list[float]
    objective: Literal["labels", "zero-shot"] = "zero-shot"
    label_fit: LabelFitReport | None = None


class Report(_Part):
    """``report.json``."""

    schema_version: int = REPORT_SCHEMA_VERSION
    verdict: Verdict
    suspected_target: str
    summary: Summary
    detection: DetectionReport
    triggers: list[TriggerMeasurement]
    per_class_accuracy: PerClassAccuracy
    data: DataReport
    rounds: RoundsReport
    model_sha256: str
    options: dict[str, Any]
    runtime: dict[str, str]
    timings_s: dict[str, float]
    versions: dict[str, str]


def summary_of(triggers: list[TriggerMeasurement], ca_before: float, ca_after: float) -> Summary:
    """The summary of an evaluation: its CAs, and the ASR of the trigger ``Summary`` names."""
    by_kind: dict[str, TriggerMeasurement] = {}
    for trigger in triggers:
        by_kind.setdefault(trigger.kind, trigger)
    main = by_kind.get("known") or by_kind.get("re-inverted") or by_kind["inverted"]
    return Summary(
        ca_before=round(ca_before, 6),
        ca_after=round(ca_after, 6),
        asr_before=main.asr_before,
        asr_after=main.asr_after,
        fidelity=main.fidelity,
    )
