"""The engine's torch-free contract: options grouped by stage, the flat names of earlier
releases, and BPE token counts that agree with open_clip's tokenizer."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from open_clip.tokenizer import SimpleTokenizer
from pydantic import ValidationError

from tests.service.support import REPO
from worker.cbpt.bpe import token_count
from worker.cbpt.layout import open_clip_model_names
from worker.cbpt.options import PurifyOptions


def test_the_contract_modules_import_without_torch() -> None:
    code = (
        "import sys\n"
        "import worker.cbpt.options, worker.cbpt.attacks, worker.cbpt.outcome\n"
        "import worker.cbpt.errors, worker.cbpt.progress, worker.cbpt.layout\n"
        "import service.api.inputs, service.errors, service.broker\n"
        "from worker.cbpt.options import PurifyOptions\n"
        "from worker.cbpt.attacks import parse_attack\n"
        "PurifyOptions.model_validate({'tuning': {'context_init': 'a photo of a'}})\n"
        "parse_attack({'name': 'wanet', 'target': 'cat'})\n"
        "loaded = sorted(m for m in ('torch', 'open_clip') if m in sys.modules)\n"
        "print(','.join(loaded) or 'none')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "none"


def test_flat_names_of_earlier_releases_land_in_their_groups() -> None:
    legacy = PurifyOptions.model_validate(
        {
            "rounds": 3,
            "round_steps": 40,
            "mask_budget": 2.0,
            "blend_budget": 0.1,
            "blend_from_round": 2,
            "warp_budget": 0.05,
            "round_restarts": 2,
            "tune_when_clean": True,
            "holdout_fraction": 0.25,
            "adaptive_check": False,
        }
    )
    grouped = PurifyOptions.model_validate(
        {
            "rounds": {
                "count": 3,
                "steps": 40,
                "mask_budget": 2.0,
                "blend_budget": 0.1,
                "blend_from": 2,
                "warp_budget": 0.05,
                "restarts": 2,
            },
            "tuning": {"when_clean": True},
            "evaluation": {"holdout_fraction": 0.25, "adaptive_check": False},
        }
    )
    assert legacy == grouped
    assert PurifyOptions.model_validate(grouped.model_dump()) == grouped  # reports round-trip


@pytest.mark.parametrize(
    "options",
    [
        {"round_steps": 5, "rounds": {"steps": 5}},
        {"holdout_fraction": 0.2, "evaluation": {"holdout_fraction": 0.3}},
        {"device": "cpu"},
        {"precision": "fp32"},
        {"rounds": {"count": 2}, "mask_budget": "large"},
    ],
)
def test_options_named_twice_or_outside_the_contract_are_refused(
    options: dict[str, object],
) -> None:
    with pytest.raises(ValidationError):
        PurifyOptions.model_validate(options)


def test_a_clean_model_is_tuned_when_fitting_labels_gains_or_when_asked() -> None:
    default = PurifyOptions()
    assert default.tunes_when_clean(fits_labels=True)
    assert not default.tunes_when_clean(fits_labels=False)
    never = PurifyOptions.model_validate({"tuning": {"when_clean": False}})
    assert not never.tunes_when_clean(fits_labels=True)
    for forced in ({"context_init": None}, {"when_clean": True}):
        options = PurifyOptions.model_validate({"tuning": forced})
        assert options.tunes_when_clean(fits_labels=False)
    # A named objective settles it, whatever the cross-validation said.
    named = PurifyOptions.model_validate({"tuning": {"objective": "zero-shot"}})
    assert not named.tunes_when_clean(fits_labels=True)
    labels = PurifyOptions.model_validate({"tuning": {"objective": "labels"}})
    assert labels.tunes_when_clean(fits_labels=False)


def test_the_objective_sets_the_loss_weights_and_explicit_ones_win() -> None:
    tuning = PurifyOptions().tuning
    fitted, kept = tuning.loss_weights(True), tuning.loss_weights(False)
    assert (fitted.clean, fitted.distill, fitted.backdoor_target) == (1.0, 0.0, "label")
    assert (kept.clean, kept.distill, kept.backdoor_target) == (0.0, 1.0, "zero-shot")
    assert (fitted.regularizer, kept.regularizer) == (0.0, 2.0)
    assert fitted.fits_labels
    assert not kept.fits_labels
    mixed = PurifyOptions.model_validate(
        {"tuning": {"distill_weight": 0.5, "regularizer_weight": 1}}
    ).tuning
    assert mixed.loss_weights(True).distill == 0.5
    assert mixed.loss_weights(True).regularizer == mixed.loss_weights(False).regularizer == 1
    assert not mixed.loss_weights(True).fits_labels  # distillation still holds decisions


def test_token_counts_are_open_clips() -> None:
    tokenizer = SimpleTokenizer()
    generator = random.Random(0)
    alphabet = "abcdefghij klmnop,.!?'-0123 éüß漢字🙂&;<>"
    texts = [
        "a photo of a",
        "",
        "It's a dog's life!!",
        "&amp;lt;tag&gt;",
        "<start_of_text>a photo<end_of_text>",
        "HELLO   World\t",
        *(
            "".join(generator.choice(alphabet) for _ in range(generator.randint(0, 40)))
            for _ in range(500)
        ),
    ]
    for text in texts:
        assert token_count(text) == len(tokenizer.encode(text)), text


def test_model_names_are_open_clips() -> None:
    import open_clip

    assert open_clip_model_names() == frozenset(open_clip.list_models())


def test_a_job_queued_before_the_upgrade_still_runs(tmp_path: Path) -> None:
    """Jobs accepted while device and precision were job options may still name them; the
    worker reads them with its own settings instead of failing them."""
    code = (
        "from worker.tasks import _job_options\n"
        "options = _job_options({'device': 'cuda', 'precision': 'bf16', 'rounds': 1})\n"
        "print(options.rounds.count)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "ANTIDOTE_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "1"
