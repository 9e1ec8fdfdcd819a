"""The report: ``report.json`` built from the stages' results (``outcome.Report``), and
``report.html``, one self-contained page (no scripts, no external files) for a human reader.

Every string that came from a client (class names, trigger names) is escaped; images are inline
``data:`` URIs and the chart is inline SVG, so the page opens offline and safely anywhere.
"""

from __future__ import annotations

import base64
import math
import platform
from dataclasses import dataclass
from html import escape
from typing import Any, Literal

import open_clip
import torch

from worker.cbpt.evaluation import Evaluation
from worker.cbpt.objective import LabelFit
from worker.cbpt.options import PurifyOptions
from worker.cbpt.outcome import (
    DataReport,
    DetectionReport,
    LabelFitReport,
    PerClassAccuracy,
    Report,
    RoundsReport,
)
from worker.cbpt.rounds import RoundsOutcome
from worker.cbpt.verdict import Detection

_BAR_COLOURS = {"before": "#9aa5b1", "after": "#2f7d5b"}


def render_html(report: dict[str, Any], trigger_png: bytes) -> str:
    summary = report["summary"]
    image = base64.b64encode(trigger_png).decode("ascii")
    detection = report["detection"]
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{_pct(before)}</td><td>{_pct(after)}</td></tr>"
        for name, before, after in zip(
            report["per_class_accuracy"]["classes"],
            report["per_class_accuracy"]["before"],
            report["per_class_accuracy"]["after"],
            strict=True,
        )
    )
    trigger_rows = "".join(
        f"<tr><td>{escape(t['name'])}</td><td>{escape(t['target'])}</td>"
        f"<td>{_pct(t['asr_before'])}</td><td>{_pct(t['asr_after'])}</td>"
        f"<td>{_number(t['fidelity'])}</td></tr>"
        for t in report["triggers"]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>clip-antidote report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 56rem; color: #1f2933; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
td, th {{ border: 1px solid #cbd2d9; padding: .3rem .7rem; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.verdict {{ font-size: 1.4rem; font-weight: 600; }}
img {{ image-rendering: pixelated; border: 1px solid #cbd2d9; }}
</style></head><body>
<h1>Backdoor purification report</h1>
<p class="verdict">Verdict: {escape(report["verdict"])}; suspected target:
{escape(report["suspected_target"])}</p>
<p>{_detection_sentence(detection)}
{_tuning_sentence(report["rounds"], report["verdict"])}
Model sha256 <code>{escape(report["model_sha256"])}</code>.</p>
<h2>Clean accuracy and attack success, before and after</h2>
{_bar_chart(summary)}
<table><tr><th>trigger</th><th>target</th><th>ASR before</th><th>ASR after</th>
<th>fidelity</th></tr>{trigger_rows}</table>
<h2>Inverted trigger</h2>
<p>Masked pattern, mask, and a triggered example.</p>
<img alt="inverted trigger" src="data:image/png;base64,{image}">
<h2>Per-class accuracy</h2>
<table><tr><th>class</th><th>before</th><th>after</th></tr>{rows}</table>
<p>Held-out images: {report["data"]["n_held_out"]}; tuning images: {report["data"]["n_tune"]}.</p>
</body></html>
"""


def _bar_chart(summary: dict[str, float | None]) -> str:
    bars = []
    groups = (("CA", "ca_before", "ca_after"), ("ASR", "asr_before", "asr_after"))
    for group_index, (label, before_key, after_key) in enumerate(groups):
        for bar_index, (when, key) in enumerate((("before", before_key), ("after", after_key))):
            value = summary.get(key) or 0.0
            x = 40 + group_index * 180 + bar_index * 70
            height = 160 * value
            bars.append(
                f'<rect x="{x}" y="{180 - height:.1f}" width="60" height="{height:.1f}" '
                f'fill="{_BAR_COLOURS[when]}"><title>{label} {when}: {value:.3f}</title></rect>'
                f'<text x="{x + 30}" y="{175 - height:.1f}" text-anchor="middle" '
                f'font-size="12">{value:.1%}</text>'
                f'<text x="{x + 30}" y="196" text-anchor="middle" font-size="12">{when}</text>'
            )
        bars.append(
            f'<text x="{105 + group_index * 180}" y="214" text-anchor="middle" '
            f'font-weight="600">{label}</text>'
        )
    return (
        '<svg role="img" aria-label="CA and ASR before and after" width="420" height="222" '
        'xmlns="http://www.w3.org/2000/svg"><line x1="30" y1="180" x2="400" y2="180" '
        f'stroke="#52606d"/>{"".join(bars)}</svg>'
    )


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.1%}"


def _detection_sentence(detection: dict[str, Any]) -> str:
    """What stage 1 found, in the terms its verdict read."""
    found = (
        f"Inverted trigger: mask {detection['mask_fraction']:.2%} of the image, sends "
        f"{detection['flip_rate']:.1%} of other classes' images to the suspected target"
    )
    thresholds = detection["thresholds"]
    if detection.get("method") == "class-wise":
        margin = detection["reach_margin"]
        return (
            f"{found}. A trigger of that size reaches it with {math.exp(margin):.1f} times less "
            f"cross-entropy than the next class: a margin of {margin:.2f} (backdoored from "
            f"{thresholds['backdoored_margin']:g})."
        )
    return (
        f"{found}: a score of {detection['score']:.1f} "
        f"(backdoored from {thresholds['backdoored_score']:g})."
    )


def _tuning_sentence(rounds: dict[str, Any], verdict: str) -> str:
    if not rounds["tuned"]:
        return "No backdoor was found, so the prompts stay the hand-crafted ones."
    if verdict == "clean" and rounds["count"] == 0:
        return (
            "No backdoor was found; the prompts were tuned to the shots' labels alone, which "
            "cross-validation on the shots found more accurate than the hand-crafted prompts."
        )
    fitted = (
        "the shots' labels"
        if rounds.get("objective") == "labels"
        else "the hand-crafted prompts' decisions"
    )
    return (
        f"Prompts tuned to {fitted}, against the inverted trigger and {rounds['count']} "
        "re-inverted ones."
    )


@dataclass(frozen=True)
class ReportInputs:
    """What the report says of a job's inputs."""

    classes: tuple[str, ...]
    n_tune: int
    n_held_out: int
    held_out_source: Literal["split", "evaluation_dataset"]
    model_sha256: str


def build_report(
    inputs: ReportInputs,
    stages: tuple[Detection, RoundsOutcome, Evaluation],
    options: PurifyOptions,
    runtime: dict[str, str],
    timings: dict[str, float],
) -> Report:
    """``report.json``'s content from what the stages left."""
    detection, rounds, evaluation = stages
    names = list(inputs.classes)
    return Report(
        verdict=detection.verdict,
        suspected_target=names[detection.target],
        summary=evaluation.summary,
        detection=_detection_report(detection, options),
        triggers=evaluation.triggers,
        per_class_accuracy=PerClassAccuracy(
            classes=names, before=evaluation.per_class_before, after=evaluation.per_class_after
        ),
        data=DataReport(
            classes=names,
            n_tune=inputs.n_tune,
            n_held_out=inputs.n_held_out,
            held_out_source=inputs.held_out_source,
        ),
        rounds=RoundsReport(
            count=len(rounds.triggers) - 1,
            tuned=rounds.tuned,
            mask_fractions=[round(t.mask_fraction, 6) for t in rounds.triggers],
            displacements=[round(t.displacement, 6) for t in rounds.triggers],
            shapes=list(rounds.shapes),
            success_rates=[round(rate, 6) for rate in rounds.success_rates],
            objective="labels" if rounds.objective.weights.fits_labels else "zero-shot",
            label_fit=_label_fit(rounds.objective.label_fit),
        ),
        model_sha256=inputs.model_sha256,
        options=options.model_dump(mode="json"),
        runtime=runtime,
        timings_s=timings,
        versions=_versions(),
    )


def _detection_report(detection: Detection, options: PurifyOptions) -> DetectionReport:
    inversion, reach = detection.inversion, detection.reach
    return DetectionReport(
        flip_rate=round(detection.flip_rate, 6),
        mask_fraction=round(detection.trigger.mask_fraction, 6),
        score=round(detection.score, 3),
        restart_losses=[] if inversion is None else [round(v, 6) for v in inversion.losses],
        restart_scores=[] if inversion is None else [round(v, 3) for v in inversion.strengths],
        thresholds=options.verdict.model_dump(),
        method="contrastive" if reach is None else "class-wise",
        reach_margin=None if detection.margin is None else round(detection.margin, 3),
        class_flip_rates=None if reach is None else [round(v, 6) for v in reach.flip.tolist()],
    )


def _label_fit(fit: LabelFit | None) -> LabelFitReport | None:
    if fit is None:
        return None
    return LabelFitReport(
        zero_shot=round(fit.zero_shot, 6), fitted=round(fit.fitted, 6), margin=fit.margin
    )


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
