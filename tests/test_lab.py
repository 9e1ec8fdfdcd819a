"""The lab: real backdoored checkpoints, loadable by plain open_clip, made deterministically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from service.cli.main import app
from worker.cbpt.attacks import BadNets, parse_attack
from worker.cbpt.imagesets import read_image_set
from worker.lab.evaluate import evaluate_lab_dir
from worker.lab.folder import NotBackdooredError, backdoored_folders, open_lab_folder
from worker.lab.make import LabModel, LabSettings, make_lab_model


def test_backdoor_is_implanted_and_clean_model_has_none(
    clean_lab: LabModel, badnets_lab: LabModel
) -> None:
    assert isinstance(badnets_lab.attack, BadNets)
    backdoored = evaluate_lab_dir(badnets_lab.directory)
    on_clean = evaluate_lab_dir(clean_lab.directory, attack=badnets_lab.attack)
    chance = 1 / len(clean_lab.class_names)
    assert backdoored.asr is not None
    assert on_clean.asr is not None
    assert backdoored.asr >= 0.8, backdoored
    assert on_clean.asr <= 3 * chance, on_clean
    assert on_clean.ca >= 0.85  # 0.93 to 0.98 over seeds 0 to 4 (bench/spread.py)
    assert backdoored.ca >= on_clean.ca - 0.1
    assert backdoored.n_attacked == backdoored.n_test - round(backdoored.n_test * chance)


def test_checkpoint_loads_with_plain_open_clip(badnets_lab: LabModel) -> None:
    directory = badnets_lab.directory
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    saved = load_file(directory / "open_clip_model.safetensors")
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    config = json.loads((directory / "open_clip_config.json").read_text())
    normalize = preprocess.transforms[-1]
    assert list(normalize.mean) == config["preprocess_cfg"]["mean"]
    tokens = open_clip.get_tokenizer(f"local-dir:{directory}")(["a photo of a zero."])
    size = config["model_cfg"]["vision_cfg"]["image_size"]
    with torch.no_grad():
        image = model.encode_image(torch.zeros(1, 3, size, size))
        text = model.encode_text(tokens)
    assert image.shape == text.shape == (1, config["model_cfg"]["embed_dim"])


def test_folder_holds_the_service_inputs(badnets_lab: LabModel, lab_settings: LabSettings) -> None:
    directory = badnets_lab.directory
    fewshot = read_image_set(directory / "fewshot.zip", 16)
    assert fewshot.class_names == badnets_lab.class_names
    assert torch.bincount(fewshot.labels).tolist() == [lab_settings.shots] * 10
    spec = parse_attack((directory / "attack.json").read_bytes())
    assert spec == badnets_lab.attack
    assert spec.target == badnets_lab.class_names[lab_settings.target]
    provenance = json.loads((directory / "lab.json").read_text())
    assert provenance["attack"] == "badnets"
    assert provenance["poison_rate"] == pytest.approx(lab_settings.poison_rate, abs=0.01)


def test_lab_folder_opens_as_a_job_reads_it(
    clean_lab: LabModel, badnets_lab: LabModel, lab_settings: LabSettings
) -> None:
    lab = open_lab_folder(badnets_lab.directory)
    assert lab.class_names == badnets_lab.class_names
    assert lab.test.class_names == badnets_lab.class_names
    assert torch.bincount(lab.shots.labels).tolist() == [lab_settings.shots] * 10
    assert lab.hand.shape == (10, lab.loaded.model_cfg["embed_dim"])
    assert torch.allclose(lab.hand.norm(dim=1), torch.ones(10), atol=1e-5)
    assert lab.logit_scale == pytest.approx(float(lab.model.logit_scale.exp()))
    attack, target = lab.backdoor()
    assert attack == badnets_lab.attack
    assert target == lab_settings.target
    clean = open_lab_folder(clean_lab.directory)
    assert clean.attack is None
    with pytest.raises(NotBackdooredError, match="no backdoored lab model"):
        clean.backdoor()


def test_backdoored_folders_checks_every_name_first(
    clean_lab: LabModel, badnets_lab: LabModel
) -> None:
    lab = badnets_lab.directory.parent
    assert backdoored_folders(lab, "badnets,") == [("badnets", badnets_lab.directory)]
    with pytest.raises(NotBackdooredError, match="missing"):
        backdoored_folders(lab, "badnets,missing")
    with pytest.raises(NotBackdooredError, match="clean"):
        backdoored_folders(clean_lab.directory.parent, "clean")


def test_clean_base_is_cached(
    tmp_path: Path, lab_settings: LabSettings, lab_cache: Path, clean_lab: LabModel
) -> None:
    again = make_lab_model(None, tmp_path / "clean", lab_settings, cache_dir=lab_cache)
    assert again.seconds["clean"] < 5
    assert again.model_sha256 == clean_lab.model_sha256


def test_same_seed_same_bytes(
    tmp_path: Path, lab_settings: LabSettings, badnets_lab: LabModel
) -> None:
    # A fresh cache: the clean base is trained again, then the attack implanted again.
    again = make_lab_model("badnets", tmp_path / "badnets", lab_settings, cache_dir=tmp_path / "c")
    for name in (
        "open_clip_model.safetensors",
        "open_clip_config.json",
        "fewshot.zip",
        "attack.json",
    ):
        assert _sha(again.directory / name) == _sha(badnets_lab.directory / name), name


def test_cli_eval_prints_json_last(badnets_lab: LabModel) -> None:
    result = CliRunner().invoke(app, ["lab", "eval", str(badnets_lab.directory), "--json"])
    assert result.exit_code == 0, result.output
    last = json.loads(result.output.strip().splitlines()[-1])
    assert 0.85 <= last["ca"] <= 1
    assert last["asr"] >= 0.8
    assert last["attack"] == "badnets"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_purify_writes_the_artifacts_and_prints_a_summary(
    badnets_lab: LabModel, tmp_path: Path
) -> None:
    directory, out = badnets_lab.directory, tmp_path / "purified"
    arguments = ["purify", "--checkpoint", str(directory), "--data", str(directory / "fewshot.zip")]
    arguments += ["--out", str(out), "--known-trigger", str(directory / "attack.json")]
    result = CliRunner().invoke(app, [*arguments, "--rounds", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "verdict:" in result.output
    assert "badnets" in result.output  # the known trigger's row
    report = json.loads((out / "report.json").read_text())
    assert report["runtime"] == {"device": "cpu", "precision": "fp32"}
    assert report["rounds"]["count"] == 0
    for name in ("prompts.safetensors", "head.safetensors", "trigger.png", "report.html"):
        assert (out / name).is_file(), name


def test_cli_purify_refuses_an_unknown_precision(badnets_lab: LabModel, tmp_path: Path) -> None:
    directory = badnets_lab.directory
    arguments = ["purify", "--checkpoint", str(directory), "--data", str(directory / "fewshot.zip")]
    result = CliRunner().invoke(
        app, [*arguments, "--out", str(tmp_path / "out"), "--precision", "fp16"]
    )
    assert result.exit_code == 2
    assert "--precision" in result.output
    assert not (tmp_path / "out").exists()
