"""Objective "auto": cross-validation on the tuning shots says whether fitting their labels
generalises better than the checkpoint's zero-shot head."""

from __future__ import annotations

import torch

from worker.cbpt.objective import cross_validate_labels
from worker.cbpt.options import TuningSettings
from worker.cbpt.tuning import ClassText
from worker.cbpt.zeroshot import class_embeddings, encode_images
from worker.lab.folder import open_lab_folder
from worker.lab.make import LabModel


def test_label_fitting_wins_where_the_class_names_mislead(clean_lab: LabModel) -> None:
    """With every class named as the next one, zero-shot is wrong wherever the model is right,
    and prompts fitted to the labels recover: what the cross-validation must notice."""
    lab = open_lab_folder(clean_lab.directory)
    names = lab.class_names
    misnamed = names[1:] + names[:1]
    tokenizer = lab.loaded.tokenizer
    hand = class_embeddings(lab.model, tokenizer, misnamed)
    text = ClassText(lab.model, tokenizer, misnamed, hand)
    features = encode_images(lab.model, lab.shots.images, lab.normalizer)
    settings = TuningSettings()

    # The suite's model has 4 shots a class, under what a job cross-validates on.
    labels = lab.shots.labels
    assert cross_validate_labels(text, features, labels, settings, seed=0) is None
    fit = cross_validate_labels(text, features, labels, settings, seed=0, min_shots=4)
    again = cross_validate_labels(text, features, labels, settings, seed=0, min_shots=4)

    assert fit is not None
    assert fit == again
    assert fit.margin == settings.labels_margin
    # Chance is 0.1; the misnamed head scores the model's confusions into the next class.
    assert fit.zero_shot <= 0.3, fit
    assert fit.fitted >= fit.zero_shot + 0.2, fit
    assert fit.fits_labels


def test_a_class_with_one_shot_leaves_nothing_to_cross_validate(clean_lab: LabModel) -> None:
    lab = open_lab_folder(clean_lab.directory)
    labels = lab.shots.labels
    lone = int(labels[0])
    keep = torch.ones_like(labels, dtype=torch.bool)
    keep[torch.nonzero(labels == lone).flatten()[1:]] = False
    features = encode_images(lab.model, lab.shots.images[keep], lab.normalizer)
    text = ClassText(lab.model, lab.loaded.tokenizer, lab.class_names, lab.hand)
    kept = labels[keep]
    fit = cross_validate_labels(text, features, kept, TuningSettings(), seed=0, min_shots=2)
    assert fit is None
