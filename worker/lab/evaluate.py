"""Measuring a lab folder: zero-shot clean accuracy and attack success rate on its test set.

The model is loaded the way any open_clip user would load it (``local-dir:``), so a passing
evaluation also proves the folder is a valid open_clip checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch

from worker.cbpt.attacks import AttackSpec, parse_attack
from worker.cbpt.imagesets import read_image_set
from worker.cbpt.options import DEFAULT_TEMPLATES
from worker.cbpt.zeroshot import Normalizer, class_embeddings, encode_images
from worker.lab.export import CONFIG_FILE


def lab_attack(directory: Path) -> AttackSpec | None:
    """The attack implanted in the lab folder (its ``attack.json``), or None for a clean one."""
    spec_file = directory / "attack.json"
    return parse_attack(spec_file.read_bytes()) if spec_file.is_file() else None


@dataclass(frozen=True)
class LabEvaluation:
    ca: float
    asr: float | None
    target: str | None
    attack: str | None
    n_test: int
    n_attacked: int
    per_class_accuracy: dict[str, float]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def load_lab_model(directory: Path) -> tuple[torch.nn.Module, Normalizer, int]:
    """The folder's CLIP through plain open_clip, its normaliser, and its input size."""
    model = open_clip.create_model(f"local-dir:{directory}", weights_only=True)
    model.eval()
    preprocess = json.loads((directory / CONFIG_FILE).read_text())["preprocess_cfg"]
    size = preprocess["size"]
    side = size if isinstance(size, int) else size[0]
    return model, Normalizer(preprocess["mean"], preprocess["std"]), int(side)


def evaluate_lab_dir(
    directory: Path,
    *,
    attack: AttackSpec | None = None,
    test_archive: Path | None = None,
) -> LabEvaluation:
    """CA with "a photo of a {}." and, where a trigger is known, its ASR.

    The trigger is ``attack`` or else the folder's ``attack.json``. ASR counts test images whose
    true class is not the target, triggered, that the model puts in the target class.
    """
    model, normalizer, size = load_lab_model(directory)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    attack = attack or lab_attack(directory)
    test = read_image_set(test_archive or directory / "test.zip", size)
    weights = class_embeddings(model, tokenizer, test.class_names, DEFAULT_TEMPLATES)
    with torch.inference_mode():
        predictions = (encode_images(model, test.images, normalizer) @ weights.T).argmax(1)
    correct = predictions == test.labels
    per_class = {
        name: round(float(correct[test.labels == index].float().mean()), 6)
        for index, name in enumerate(test.class_names)
    }
    asr, n_attacked, target = None, 0, None
    if attack is not None and attack.target is not None:
        target = attack.target
        if target not in test.class_names:
            raise ValueError(f"attack target {target!r} is not a class of the test set")
        target_index = test.class_names.index(target)
        victims = test.images[test.labels != target_index]
        with torch.inference_mode():
            features = encode_images(model, victims, normalizer, transform=attack.apply)
        hits = (features @ weights.T).argmax(1) == target_index
        asr, n_attacked = float(hits.float().mean()), len(victims)
    return LabEvaluation(
        ca=float(correct.float().mean()),
        asr=asr,
        target=target,
        attack=None if attack is None else attack.name,
        n_test=len(test),
        n_attacked=n_attacked,
        per_class_accuracy=per_class,
    )
