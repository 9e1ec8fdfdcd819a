"""Everything about a job request that can be checked before it is accepted.

Runs in the API process, so it stays cheap, never executes the upload and never loads torch:
checkpoint headers and archive directories are read (``service.validation``), options and
attack specs go through the engine's torch-free contract (``worker.cbpt.options``,
``worker.cbpt.attacks``), and the architecture must be one open_clip ships a config for.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from service.api.schemas import JobRequest
from service.errors import Problem, problem_of
from service.validation import InputError, check_checkpoint, check_dataset
from worker.cbpt.attacks import parse_attack
from worker.cbpt.layout import open_clip_model_names
from worker.cbpt.options import PurifyOptions

MAX_CONFIG_BYTES = 1024 * 1024


def check_job_inputs(body: JobRequest, paths: dict[str, Path]) -> None:
    """Raises a 422 ``Problem`` naming the first thing wrong with the request."""
    try:
        checkpoint = check_checkpoint(paths["checkpoint_file"])
        check_dataset(paths["dataset_file"])
    except InputError as exc:
        raise problem_of(exc) from exc
    config = paths.get("model_config_file")
    if config is not None:
        _check_model_config(config)
    if body.model is not None and body.model not in open_clip_model_names():
        raise Problem(
            422, "MODEL_UNKNOWN", f"{body.model!r} is not an open_clip model name", field="model"
        )
    if checkpoint.format != "archive" and body.model is None and config is None:
        raise Problem(
            422,
            "MODEL_REQUIRED",
            "a bare weights file needs 'model' (an open_clip name) or 'model_config_file'",
        )
    try:
        PurifyOptions.model_validate(body.options)
    except ValidationError as exc:
        raise problem_of(exc) from exc
    for index, spec in enumerate(body.known_triggers):
        try:
            parse_attack(spec)
        except (ValueError, ValidationError) as exc:
            raise Problem(
                422,
                "TRIGGER_INVALID",
                f"known_triggers[{index}] is not a valid attack spec: {exc}",
            ) from exc


def _check_model_config(path: Path) -> None:
    bad = Problem(422, "MODEL_CONFIG_INVALID", "model_config_file must be a JSON object")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise Problem(422, "MODEL_CONFIG_INVALID", "model_config_file is over 1 MiB")
    try:
        loaded = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # deep nesting
        raise bad from exc
    if not isinstance(loaded, dict):
        raise bad
