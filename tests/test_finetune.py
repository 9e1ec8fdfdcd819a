"""The weight-tuning baseline (CleanCLIP on the shots) that the efficacy benchmark runs beside
CBPT: it tunes a copy of both towers, fits the shots, and leaves the checkpoint as it was."""

from __future__ import annotations

import torch

from worker.cbpt.metrics import clean_accuracy, predictions
from worker.cbpt.zeroshot import class_embeddings, encode_images
from worker.lab.finetune import FinetuneSettings, finetune_on_shots
from worker.lab.folder import open_lab_folder
from worker.lab.make import LabModel


def test_finetuning_fits_the_shots_and_leaves_the_checkpoint_untouched(
    badnets_lab: LabModel,
) -> None:
    lab = open_lab_folder(badnets_lab.directory)
    shots = lab.shot_tensors()
    tokenizer = lab.loaded.tokenizer
    before = {name: value.clone() for name, value in lab.model.state_dict().items()}

    def shot_accuracy(model: torch.nn.Module) -> float:
        head = class_embeddings(model, tokenizer, lab.class_names)
        features = encode_images(model, shots.pixels, lab.normalizer)
        return clean_accuracy(predictions(features, head), shots.labels)

    settings = FinetuneSettings(steps=60, lr=5e-4)
    tuned = finetune_on_shots(
        lab.model, lab.normalizer, tokenizer, shots, lab.class_names, settings, seed=0
    )
    again = finetune_on_shots(
        lab.model, lab.normalizer, tokenizer, shots, lab.class_names, settings, seed=0
    )

    for name, value in lab.model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert not tuned.training
    # What the training loss asks of the shots, with room for another CPU's rounding: the
    # 16 px suite model starts at about 0.6 on its own shots.
    zero_shot, fitted = shot_accuracy(lab.model), shot_accuracy(tuned)
    assert fitted >= min(zero_shot + 0.1, 0.95), (zero_shot, fitted)
    # Seeded: one machine gives the same weights twice.
    for (name, value), other in zip(
        tuned.state_dict().items(), again.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(value, other, msg=name)
