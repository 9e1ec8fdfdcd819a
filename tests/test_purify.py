"""The whole engine on a tiny backdoored lab model: purify, artifacts, deployment, cancel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.suite import merged, report_of, suite_options
from worker.cbpt.deploy import load_purified_classifier
from worker.cbpt.imagesets import read_image_set
from worker.cbpt.options import (
    PurifyOptions,
    TargetSearchSettings,
    TuningSettings,
    VerdictSettings,
)
from worker.cbpt.progress import CancelledError
from worker.cbpt.purify import Inputs, PurifyResult, purify
from worker.cbpt.rounds import trigger_shapes
from worker.cbpt.verdict import backdoor_score, verdict_of
from worker.lab.defend import purify_lab
from worker.lab.make import LabModel

# The shipped inversion, tuning and rounds: a purify of a suite model takes about 5 s with them,
# and a weaker schedule leaves too little of a cut to tell from the spread between seeds.
OPTIONS = suite_options()


@pytest.fixture(scope="module")
def purified(badnets_lab: LabModel, tmp_path_factory: pytest.TempPathFactory) -> PurifyResult:
    stages: list[str] = []
    result = purify_lab(
        badnets_lab.directory,
        OPTIONS,
        tmp_path_factory.mktemp("purified"),
        progress=lambda stage, fraction: stages.append(stage),
    )
    assert stages[0] == "load"
    assert {"inversion", "tuning", "evaluation", "artifacts"} <= set(stages)
    return result


def test_purification_lowers_the_real_asr_and_keeps_ca(purified: PurifyResult) -> None:
    # bench/spread.py at seeds 0-4 on one and two intra-op threads and seeds 5-9 on two (each a
    # trajectory, as another CPU's would be): ASR 0.91-1.00 before, and the real trigger's ASR
    # after is 0.03 to 0.33 of it; CA falls by 0.02 to 0.07. The bounds keep 1.5x the widest.
    known = purified.report.triggers[1]
    assert known.name == "badnets"
    assert known.asr_before >= 0.8
    assert known.asr_after <= 0.5 * known.asr_before, known
    summary = purified.report.summary
    assert summary.ca_after is not None
    assert summary.ca_before is not None
    assert summary.ca_after >= summary.ca_before - 0.12, summary


def test_the_summary_measures_the_known_trigger_and_the_adaptive_check_is_reported(
    purified: PurifyResult,
) -> None:
    triggers = purified.report.triggers
    assert [t.kind for t in triggers] == ["inverted", "known", "re-inverted"]
    inverted, known, adaptive = triggers
    assert purified.report.summary.asr_after == known.asr_after
    assert adaptive.target == inverted.target == purified.suspected_target
    # Found against the purified head, the re-inverted trigger beats the one tuned against.
    assert adaptive.asr_after > inverted.asr_after, triggers


def test_the_class_wise_search_settles_a_clear_backdoor_alone(
    purified: PurifyResult, badnets_lab: LabModel
) -> None:
    """The suite's BadNets target leads the next class by 2.3-2.8 (tests/test_reach.py), past
    the line at which the search settles the verdict: the contrastive inversion never runs."""
    report = purified.report
    assert (report.verdict, report.suspected_target) == ("backdoored", badnets_lab.attack.target)  # type: ignore[union-attr]
    detection = report.detection
    assert detection.method == "class-wise"
    assert detection.restart_losses == detection.restart_scores == []
    assert detection.reach_margin is not None
    assert detection.reach_margin >= VerdictSettings().backdoored_margin
    flips = detection.class_flip_rates
    assert flips is not None
    assert len(flips) == len(report.data.classes)
    assert flips[report.data.classes.index(report.suspected_target)] == detection.flip_rate
    assert detection.mask_fraction <= TargetSearchSettings().budget * 1.001


def test_without_a_known_trigger_the_summary_is_the_adaptive_check(
    badnets_lab: LabModel, tmp_path: Path
) -> None:
    inputs = Inputs(badnets_lab.directory, badnets_lab.directory / "fewshot.zip")
    options = merged(OPTIONS, {"rounds": {"count": 0}})
    result = purify(inputs, options, out_dir=tmp_path)
    adaptive = result.report.triggers[-1]
    assert adaptive.kind == "re-inverted"
    assert result.report.summary.asr_after == adaptive.asr_after
    unchecked = merged(options, {"evaluation": {"adaptive_check": False}})
    result = purify(inputs, unchecked, out_dir=tmp_path / "off")
    assert [t.kind for t in result.report.triggers] == ["inverted"]
    assert result.report.summary.asr_after == result.report.triggers[0].asr_after


def test_artifact_formats(purified: PurifyResult, badnets_lab: LabModel) -> None:
    paths = purified.artifacts
    classes = list(badnets_lab.class_names)
    with safe_open(str(paths["prompts.safetensors"]), framework="pt") as handle:
        meta = handle.metadata()
        context = handle.get_tensor("context")
    assert json.loads(meta["classes"]) == classes
    assert meta["n_ctx"] == "4"
    assert json.loads(meta["templates"]) == ["a photo of a {}."]
    assert meta["model_sha256"] == purified.report.model_sha256
    assert context.shape == (10, 4, 64)
    with safe_open(str(paths["head.safetensors"]), framework="pt") as handle:
        head = handle.get_tensor("class_embeddings")
        assert handle.get_tensor("logit_scale").shape == ()
        assert json.loads(handle.metadata()["classes"]) == classes
    torch.testing.assert_close(head.norm(dim=1), torch.ones(10))
    with safe_open(str(paths["trigger.safetensors"]), framework="pt") as handle:
        mask, pattern = handle.get_tensor("mask"), handle.get_tensor("pattern")
    assert mask.shape == (16, 16)
    assert pattern.shape == (3, 16, 16)
    assert float(mask.min()) >= 0
    assert float(pattern.max()) <= 1
    assert paths["trigger.png"].read_bytes().startswith(b"\x89PNG")
    report = json.loads(paths["report.json"].read_text())
    assert report["schema_version"] == 1
    assert report == report_of(purified)
    assert report["runtime"] == {"device": "cpu", "precision": "fp32"}
    assert report["verdict"] in ("backdoored", "suspicious", "clean")
    assert set(report["summary"]) == {
        "ca_before",
        "ca_after",
        "asr_before",
        "asr_after",
        "fidelity",
    }
    html = paths["report.html"].read_text()
    assert "<script" not in html
    assert "data:image/png;base64," in html
    assert "<svg" in html


def test_deployable_from_prompts_or_head(purified: PurifyResult, badnets_lab: LabModel) -> None:
    directory = badnets_lab.directory
    from_prompts = load_purified_classifier(directory, purified.artifacts["prompts.safetensors"])
    from_head = load_purified_classifier(directory, purified.artifacts["head.safetensors"])
    images = read_image_set(directory / "test.zip", 16).images[:32].float() / 255
    with torch.no_grad():
        torch.testing.assert_close(from_prompts(images), from_head(images), atol=1e-4, rtol=1e-4)
    assert from_head.classes == list(badnets_lab.class_names)


def test_views_change_only_what_stage_2_tunes_on(
    purified: PurifyResult, badnets_lab: LabModel, tmp_path: Path
) -> None:
    options = merged(OPTIONS, {"tuning": {"views": 3}})
    result = purify_lab(badnets_lab.directory, options, tmp_path, known_triggers=())
    assert result.report.options["tuning"]["views"] == 3
    assert result.report.detection == purified.report.detection  # stage 1 is untouched

    def head(paths: dict[str, Path]) -> torch.Tensor:
        with safe_open(str(paths["head.safetensors"]), framework="pt") as handle:
            return handle.get_tensor("class_embeddings")

    assert not torch.allclose(head(result.artifacts), head(purified.artifacts), atol=1e-4)


def test_blend_rounds_add_a_whole_image_trigger_within_its_budget(
    purified: PurifyResult, badnets_lab: LabModel, tmp_path: Path
) -> None:
    options = merged(OPTIONS, {"rounds": {"blend_budget": 0.1}})
    result = purify_lab(badnets_lab.directory, options, tmp_path, known_triggers=())
    rounds, plain = report_of(result)["rounds"], report_of(purified)["rounds"]
    assert rounds["shapes"] == ["patch", "patch", "blend", "patch", "blend"]
    assert plain["shapes"] == ["patch", "patch", "patch"]
    assert rounds["count"] == 4
    blends = [
        f for f, s in zip(rounds["mask_fractions"], rounds["shapes"], strict=True) if s == "blend"
    ]
    assert all(0 < fraction <= 0.1 * 1.1 for fraction in blends)
    # The patch rounds see another head, so they differ too; the first trigger does not.
    assert rounds["mask_fractions"][0] == plain["mask_fractions"][0]
    assert result.report.detection == purified.report.detection


def test_warp_rounds_add_a_trigger_that_moves_pixels_within_its_budget(
    purified: PurifyResult, badnets_lab: LabModel, tmp_path: Path
) -> None:
    options = merged(OPTIONS, {"rounds": {"warp_budget": 0.05, "warp_grid": 3}})
    assert trigger_shapes(options) == ["patch", "patch", "warp", "patch", "warp"]
    result = purify_lab(badnets_lab.directory, options, tmp_path, known_triggers=())
    rounds, plain = report_of(result)["rounds"], report_of(purified)["rounds"]
    assert rounds["shapes"] == trigger_shapes(options)
    warps = [i for i, shape in enumerate(rounds["shapes"]) if shape == "warp"]
    # A warp overwrites nothing and moves pixels by at most its budget; a mask moves none.
    assert all(rounds["mask_fractions"][i] == 0.0 for i in warps)
    assert all(0 < rounds["displacements"][i] <= 0.05 for i in warps)
    assert all(rounds["displacements"][i] == 0.0 for i in range(5) if i not in warps)
    assert plain["displacements"] == [0.0, 0.0, 0.0]
    # Round 1's patch is the plain run's: the warp is re-inverted after it, under one head.
    assert rounds["mask_fractions"][:2] == plain["mask_fractions"][:2]
    assert result.report.options["rounds"]["warp_grid"] == 3


def test_blends_can_wait_for_the_patch_rounds(
    purified: PurifyResult, badnets_lab: LabModel, tmp_path: Path
) -> None:
    options = merged(OPTIONS, {"rounds": {"blend_budget": 0.1, "blend_from": 2}})
    assert trigger_shapes(options) == ["patch", "patch", "patch", "blend"]
    result = purify_lab(badnets_lab.directory, options, tmp_path, known_triggers=())
    rounds, plain = report_of(result)["rounds"], report_of(purified)["rounds"]
    assert rounds["shapes"] == trigger_shapes(options)
    # Round 1 is the plain run's round 1: the same head and seed re-invert the same patch.
    assert rounds["mask_fractions"][:2] == plain["mask_fractions"][:2]
    assert 0 < rounds["mask_fractions"][3] <= 0.1 * 1.1
    # Past the rounds there are no blends to wait for: every round re-inverts a patch alone.
    late = merged(options, {"rounds": {"blend_from": options.rounds.count + 1}})
    assert trigger_shapes(late) == trigger_shapes(OPTIONS)


def test_restarts_keep_the_strongest_re_inversion(
    purified: PurifyResult, badnets_lab: LabModel, tmp_path: Path
) -> None:
    options = merged(OPTIONS, {"rounds": {"restarts": 3}})
    result = purify_lab(badnets_lab.directory, options, tmp_path, known_triggers=())
    rates, plain = result.report.rounds.success_rates, report_of(purified)["rounds"]
    assert len(rates) == len(plain["success_rates"]) == len(plain["mask_fractions"])
    assert all(0 <= rate <= 1 for rate in rates)
    # Stage 1 and the first tuning are the plain run's; round 1 sees the same head, and the
    # warm start the plain run kept is among its candidates, so it is at least as strong.
    assert rates[0] == plain["success_rates"][0] == purified.report.detection.flip_rate
    assert rates[1] >= plain["success_rates"][1]


def test_head_of_another_model_is_refused(purified: PurifyResult, clean_lab: LabModel) -> None:
    with pytest.raises(ValueError, match="belongs to model"):
        load_purified_classifier(clean_lab.directory, purified.artifacts["head.safetensors"])


def test_cancel_stops_early_and_writes_nothing(badnets_lab: LabModel, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(CancelledError):
        purify(
            Inputs(badnets_lab.directory, badnets_lab.directory / "fewshot.zip"),
            OPTIONS,
            out_dir=out,
            should_cancel=lambda: True,
        )
    assert not out.exists()


@pytest.mark.parametrize("stage", ["load", "inversion", "tuning", "evaluation"])
def test_cancel_during_each_stage_stops_there(
    badnets_lab: LabModel, tmp_path: Path, stage: str
) -> None:
    """A cancel asked while a stage runs ends the job at that stage's next check."""
    seen: list[str] = []
    quick = PurifyOptions.model_validate(
        {
            "rounds": {"count": 1},
            "search": TargetSearchSettings(steps=20, warmup=10, batch_size=8),
            "tuning": TuningSettings(steps=10, when_clean=True),
        }
    )
    out = tmp_path / "out"
    with pytest.raises(CancelledError):
        purify(
            Inputs(badnets_lab.directory, badnets_lab.directory / "fewshot.zip"),
            quick,
            out_dir=out,
            progress=lambda name, fraction: seen.append(name),
            should_cancel=lambda: stage in seen,
        )
    assert seen[-1] == stage  # no later stage started
    assert not out.exists()


@pytest.mark.parametrize(
    ("flip_rate", "mask_fraction", "expected"),
    [
        (0.91, 0.0068, "backdoored"),  # lab BadNets: score 134
        (0.389, 0.0151, "backdoored"),  # lab label-consistent, the weakest backdoor: 25.8
        (0.40, 0.0168, "suspicious"),  # 23.8
        (0.50, 0.0223, "clean"),  # the clean lab model at seed 0: 22.4
        (0.15, 0.0001, "clean"),  # flips too few images, however small the mask
        (0.99, 0.2, "clean"),  # a fifth of the image is no trigger
    ],
)
def test_verdict_thresholds(flip_rate: float, mask_fraction: float, expected: str) -> None:
    assert verdict_of(flip_rate, mask_fraction, VerdictSettings()) == expected
    assert backdoor_score(flip_rate, 0.0) > 1e4  # an empty mask does not divide by zero


def test_a_model_found_clean_keeps_its_hand_crafted_prompts(
    badnets_lab: LabModel, tmp_path: Path
) -> None:
    never = VerdictSettings(backdoored_score=1e9, suspicious_score=1e9)
    options = merged(
        OPTIONS,
        {
            "verdict": never.model_dump(),
            "search": {"enabled": False},  # the contrastive inversion: its restarts are reported
            "tuning": {"when_clean": False},
        },
    )
    result = purify_lab(badnets_lab.directory, options, tmp_path, known_triggers=())
    assert result.verdict == "clean"
    report = report_of(result)
    detection = report["detection"]
    # No start settles a verdict that is never reached, so every restart ran; the best one is
    # the trigger the verdict read.
    assert len(detection["restart_scores"]) == len(detection["restart_losses"]) == 3
    assert detection["score"] == max(detection["restart_scores"])
    rounds = report["rounds"]
    # Four shots a class are too few to cross-validate: the zero-shot objective stands.
    assert rounds.pop("objective") == "zero-shot"
    assert rounds.pop("label_fit") is None
    assert rounds == {
        "count": 0,
        "tuned": False,
        "mask_fractions": [detection["mask_fraction"]],
        "displacements": [0.0],
        "shapes": ["patch"],
        "success_rates": [detection["flip_rate"]],
    }
    assert report["summary"]["ca_after"] == report["summary"]["ca_before"]
    assert [t["kind"] for t in report["triggers"]] == ["inverted"]  # nothing was tuned
    with safe_open(str(result.artifacts["prompts.safetensors"]), framework="pt") as handle:
        context = handle.get_tensor("context")
    # The context is the init's token embeddings, the same for every class.
    torch.testing.assert_close(context, context[:1].expand_as(context))


def test_a_model_found_clean_where_labels_gain_is_tuned_on_its_clean_shots_alone(
    badnets_lab: LabModel, tmp_path: Path
) -> None:
    """Objective "labels" stands for a cross-validation that found label fitting better: the
    prompts are tuned (when_clean "auto"), on the clean shots alone, with no rounds."""
    never = VerdictSettings(backdoored_margin=1e9, suspicious_margin=1e9)
    options = merged(
        OPTIONS,
        {"verdict": never.model_dump(), "tuning": {"when_clean": "auto", "objective": "labels"}},
    )
    result = purify_lab(badnets_lab.directory, options, tmp_path, known_triggers=())
    assert result.verdict == "clean"
    report = report_of(result)
    rounds = report["rounds"]
    assert rounds["tuned"]
    assert rounds["objective"] == "labels"
    assert rounds["label_fit"] is None  # named, not cross-validated
    assert (rounds["count"], rounds["shapes"]) == (0, ["patch"])
    assert [t["kind"] for t in report["triggers"]] == ["inverted"]  # no adaptive check
    with safe_open(str(result.artifacts["prompts.safetensors"]), framework="pt") as handle:
        context = handle.get_tensor("context")
    assert not torch.allclose(context, context[:1].expand_as(context))  # class-wise, tuned
    page = result.artifacts["report.html"].read_text()
    assert "tuned to the shots' labels alone" in page
