"""Efficacy benchmark: no defence vs prompt tuning without inversion (CoOp) vs tuning the
weights (CleanCLIP on the shots, ``worker/lab/finetune.py``) vs CBPT.

For the clean lab model and each backdoored one (made by, or shared with, ``bench/lab.py``),
purifies with the 16-shot ``fewshot.zip`` and measures on the lab's held-out ``test.zip``: CA,
the real trigger's ASR (the clean model is measured against the BadNets trigger), TrojAI's
fidelity, and the verdict. Targets for CBPT on every attack: ASR after <= 1% (mean <= 0.5%),
CA after >= CA before, fidelity >= 0.98; the verdict flags every backdoored model and not the
clean one.

Two reference columns use the *real* trigger's features of the same shots, as if inversion
were perfect. "oracle" tunes the prompts once on them with CBPT's losses (no rounds). "linear
ceiling" fits a free linear head (C x D, what any prompts finally give) with the same losses
for 1000 steps: no purification through the text side can do much better on that model.
"re-inv. after" is the job's own adaptive check: the held-out ASR of a trigger re-inverted
against the purified head, what a job with no known trigger reports as its ASR after.

    .venv/bin/python bench/efficacy.py [--attacks badnets,sig] [--seeds 0,1]
    .venv/bin/python bench/efficacy.py --cbpt-only --options '{"rounds": {"count": 4}}'  # a variant
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.suite import merged
from worker.cbpt.attacks import ATTACK_NAMES, AttackSpec
from worker.cbpt.metrics import attack_success_rate, clean_accuracy, predictions
from worker.cbpt.options import LossWeights, PurifyOptions, TuningSettings
from worker.cbpt.tuning import (
    ClassText,
    TuningFeatures,
    TuningObjective,
    tune_prompts,
)
from worker.cbpt.zeroshot import class_embeddings, encode_images
from worker.lab.datasets import default_dataset
from worker.lab.defend import purify_lab
from worker.lab.evaluate import lab_attack
from worker.lab.finetune import FinetuneSettings, finetune_on_shots
from worker.lab.folder import open_lab_folder
from worker.lab.make import LabSettings, default_attack, make_lab_model


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dataset", default=default_dataset())
    parser.add_argument("--attacks", default="clean," + ",".join(ATTACK_NAMES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--options", default="{}", help="CBPT options as JSON, over the defaults (PurifyOptions)"
    )
    parser.add_argument(
        "--cbpt-only",
        action="store_true",
        help="skip CoOp, the weight-tuning baseline and the oracle: compare CBPT variants",
    )
    parser.add_argument(
        "--finetune",
        default="{}",
        help="the weight-tuning baseline's FinetuneSettings as JSON, over the defaults",
    )
    parser.add_argument("--lab", type=Path, default=Path("var/bench/lab"))
    parser.add_argument(
        "--lab-settings",
        default="{}",
        help="LabSettings as JSON over the defaults, for models not yet in --lab, e.g. "
        '\'{"architecture": {"embed_dim": 128}}\' (give such a lab its own --lab)',
    )
    parser.add_argument("--cache", type=Path, default=Path("var/lab-cache"))
    parser.add_argument("--out", type=Path, default=Path("var/bench/efficacy.json"))
    parser.add_argument("--family", choices=("classic", "broad"), default="classic")
    parser.add_argument("--task", default="glyphs", help="the broad family's downstream task")
    args = parser.parse_args()
    make = _maker(args)
    overrides = json.loads(args.options)
    finetune = FinetuneSettings.model_validate(json.loads(args.finetune))
    console = Console(width=220)
    rows: list[dict[str, Any]] = []
    for name in [a for a in args.attacks.split(",") if a]:
        folder = args.lab / name
        if not (folder / "open_clip_model.safetensors").is_file():
            make(None if name == "clean" else name, folder)
        known = lab_attack(folder) or _clean_trigger(args, make, folder)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for defence in ("cbpt",) if args.cbpt_only else ("coop", "cbpt"):
                options = _options(defence, seed, args.rounds, overrides)
                started = time.perf_counter()
                with tempfile.TemporaryDirectory() as scratch:
                    result = purify_lab(folder, options, Path(scratch), known_triggers=(known,))
                seconds = time.perf_counter() - started
                report = result.report.model_dump(mode="json")
                summary = report["summary"]
                rows.append(
                    {
                        "model": name,
                        "seed": seed,
                        "defence": defence,
                        "verdict": result.verdict,
                        "suspected_target": result.suspected_target,
                        "seconds": round(seconds, 1),
                        **summary,
                        "flip_rate": report["detection"]["flip_rate"],
                        "mask_fraction": report["detection"]["mask_fraction"],
                        "score": report["detection"]["score"],
                        "restart_scores": report["detection"]["restart_scores"],
                        "objective": report["rounds"]["objective"],
                        "label_fit": report["rounds"]["label_fit"],
                        "timings_s": report["timings_s"],
                        **_accuracy_by_side(report, known.target or ""),
                        # The adaptive check: what a trigger re-inverted against the purified
                        # head still gets, the job's own estimate of the ASR left.
                        "reinverted_asr_after": next(
                            (
                                t["asr_after"]
                                for t in report["triggers"]
                                if t["kind"] == "re-inverted"
                            ),
                            None,
                        ),
                    }
                )
                console.print(
                    f"{name} seed {seed} {defence}: CA {summary['ca_before']:.3f}->"
                    f"{summary['ca_after']:.3f} ASR {summary['asr_before']:.3f}->"
                    f"{summary['asr_after']:.3f} verdict {result.verdict} ({seconds:.0f} s)"
                )
            if not args.cbpt_only:
                rows.append(weight_tuning(folder, known, seed, finetune, name))
                console.print(
                    f"{name} seed {seed} finetune: CA {rows[-1]['ca_after']:.3f} "
                    f"ASR {rows[-1]['asr_after']:.3f} ({rows[-1]['seconds']:.0f} s)"
                )
            if name != "clean" and not args.cbpt_only:
                base = _options("cbpt", seed, 0, overrides)
                job = next(r for r in reversed(rows) if r["defence"] == "cbpt")
                weights = base.tuning.loss_weights(job["objective"] == "labels")
                for defence, (ca, asr) in oracle(folder, known, base, weights).items():
                    rows.append(
                        {
                            "model": name,
                            "seed": seed,
                            "defence": defence,
                            "ca_after": ca,
                            "asr_after": asr,
                        }
                    )
    family = f"the broad family's {args.task}" if args.family == "broad" else args.dataset
    _print(console, rows, family)
    _print_means(console, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _maker(args: argparse.Namespace) -> Callable[[str | None, Path], Path]:
    """``make(attack, folder)`` for the chosen family: makes the model unless the folder holds
    it already, and returns the folder."""
    if args.family == "broad":
        from worker.lab.broad.make import BroadSettings, make_broad_model

        broad = BroadSettings.model_validate({"task": args.task, **json.loads(args.lab_settings)})

        def make_broad(attack: str | None, folder: Path) -> Path:
            if not (folder / "open_clip_model.safetensors").is_file():
                make_broad_model(attack, folder, broad, cache_dir=args.cache)
            return folder

        return make_broad
    settings = LabSettings.for_dataset(args.dataset, **json.loads(args.lab_settings))

    def make_classic(attack: str | None, folder: Path) -> Path:
        if not (folder / "open_clip_model.safetensors").is_file():
            make_lab_model(attack, folder, settings, cache_dir=args.cache)
        return folder

    return make_classic


def _clean_trigger(
    args: argparse.Namespace, make: Callable[[str | None, Path], Path], folder: Path
) -> AttackSpec:
    """What the clean model is measured against: its family's BadNets trigger."""
    if args.family == "broad":
        spec = lab_attack(make("badnets", args.lab / "badnets"))
        assert spec is not None
        return spec
    settings = LabSettings.for_dataset(args.dataset, **json.loads(args.lab_settings))
    return default_attack("badnets", settings, _classes(folder))


def _options(defence: str, seed: int, rounds: int, overrides: dict[str, Any]) -> PurifyOptions:
    if defence == "coop":
        # Prompt tuning on clean cross-entropy alone; the inversion still runs, for the verdict.
        tuning = TuningSettings(objective="labels", backdoor_weight=0.0, regularizer_weight=0.0)
        return PurifyOptions.model_validate(
            {"seed": seed, "tuning": {**tuning.model_dump(), "when_clean": True}, "rounds": 0}
        )
    base = PurifyOptions.model_validate({"seed": seed, "rounds": {"count": rounds}})
    return merged(base, overrides)


def oracle(
    folder: Path, trigger: AttackSpec, options: PurifyOptions, weights: LossWeights
) -> dict[str, tuple[float, float]]:
    """Test CA and ASR after tuning on the real trigger's features of the shots, with the
    objective the job chose (``weights``): prompts tuned once ("oracle") and a free linear head
    ("ceiling")."""
    lab = open_lab_folder(folder, templates=options.templates)
    model, normalizer, shots, test, hand = lab.model, lab.normalizer, lab.shots, lab.test, lab.hand
    clean = encode_images(model, shots.images, normalizer)
    triggered = encode_images(model, shots.images, normalizer, transform=trigger.apply)
    target = shots.class_names.index(trigger.target or "")
    tuned = tune_prompts(
        ClassText(model, lab.loaded.tokenizer, shots.class_names, hand),
        TuningFeatures(clean, shots.labels, triggered, shots.labels),
        options.tuning,
        seed=options.seed,
        target=target,
        weights=weights,
    )
    ceiling = _free_head(
        hand, clean, shots.labels, triggered, lab.logit_scale, options.tuning, target, weights
    )
    test_clean = encode_images(model, test.images, normalizer)
    test_triggered = encode_images(model, test.images, normalizer, transform=trigger.apply)

    def measure(head: torch.Tensor) -> tuple[float, float]:
        ca = clean_accuracy(predictions(test_clean, head), test.labels)
        asr = attack_success_rate(predictions(test_triggered, head), test.labels, target)
        return ca, asr

    return {"oracle": measure(tuned.class_embeddings), "ceiling": measure(ceiling)}


def weight_tuning(
    folder: Path, trigger: AttackSpec, seed: int, settings: FinetuneSettings, model_name: str
) -> dict[str, Any]:
    """The weight-tuning baseline's row: CleanCLIP-style fine-tuning of both towers on the same
    shots, then the test CA and the real trigger's ASR under the tuned model's zero-shot head."""
    lab = open_lab_folder(folder)
    shots = lab.shot_tensors()
    started = time.perf_counter()
    tuned = finetune_on_shots(
        lab.model, lab.normalizer, lab.loaded.tokenizer, shots, lab.class_names, settings, seed=seed
    )
    seconds = time.perf_counter() - started
    head = class_embeddings(tuned, lab.loaded.tokenizer, lab.class_names)
    test = lab.test
    target = lab.class_names.index(trigger.target or "")
    clean = predictions(encode_images(tuned, test.images, lab.normalizer), head)
    triggered = predictions(
        encode_images(tuned, test.images, lab.normalizer, transform=trigger.apply), head
    )
    return {
        "model": model_name,
        "seed": seed,
        "defence": "finetune",
        "ca_after": clean_accuracy(clean, test.labels),
        "asr_after": attack_success_rate(triggered, test.labels, target),
        "seconds": round(seconds, 1),
    }


def _free_head(
    hand: torch.Tensor,
    clean: torch.Tensor,
    labels: torch.Tensor,
    triggered: torch.Tensor,
    scale: float,
    settings: TuningSettings,
    target: int,
    terms: LossWeights,
    steps: int = 1000,
) -> torch.Tensor:
    """A linear head fitted with CBPT's own tuning objective, no prompts."""
    weights = torch.nn.Parameter(hand.clone())
    optimizer = torch.optim.Adam([weights], lr=5e-3)
    features = TuningFeatures(clean, labels, triggered, labels)
    objective = TuningObjective(scale, hand, features, settings, target=target, weights=terms)
    for _ in range(steps):
        loss = objective(F.normalize(weights, dim=1))
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return F.normalize(weights.detach(), dim=1)


def _classes(folder: Path) -> tuple[str, ...]:
    return tuple(json.loads((folder / "lab.json").read_text())["classes"])


def _print(console: Console, rows: list[dict[str, Any]], lab: str) -> None:
    table = Table(title=f"efficacy on {lab} lab models (held-out test set)")
    columns = (
        "model",
        "seed",
        "verdict",
        "suspected",
        "score",
        "flip",
        "mask",
        "objective (CV zero-shot / labels)",
        "CA none",
        "ASR none",
        "CA CoOp",
        "ASR CoOp",
        "CA FT",
        "ASR FT",
        "FT (s)",
        "CA CBPT",
        "ASR CBPT",
        "fidelity CBPT",
        "re-inv. after",
        "CBPT (s)",
        "CA oracle",
        "ASR oracle",
        "CA ceiling",
        "ASR ceiling",
    )
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("model", "verdict", "suspected") else "right"
        )
    by_key: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["model"], row["seed"]), {})[row["defence"]] = row
    for (model, seed), pair in by_key.items():
        cbpt, coop, tuned = pair["cbpt"], pair.get("coop", {}), pair.get("finetune", {})
        best, ceiling = pair.get("oracle", {}), pair.get("ceiling", {})
        table.add_row(
            model,
            str(seed),
            cbpt["verdict"],
            cbpt["suspected_target"],
            f"{cbpt['score']:.1f}",
            _f(cbpt["flip_rate"]),
            _f(cbpt["mask_fraction"]),
            _objective(cbpt),
            _f(cbpt["ca_before"]),
            _f(cbpt["asr_before"]),
            _f(coop.get("ca_after")),
            _f(coop.get("asr_after")),
            _f(tuned.get("ca_after")),
            _f(tuned.get("asr_after")),
            "-" if "seconds" not in tuned else f"{tuned['seconds']:.0f}",
            _f(cbpt["ca_after"]),
            _f(cbpt["asr_after"]),
            _f(cbpt["fidelity"]),
            _f(cbpt.get("reinverted_asr_after")),
            f"{cbpt['seconds']:.0f}",
            _f(best.get("ca_after")),
            _f(best.get("asr_after")),
            _f(ceiling.get("ca_after")),
            _f(ceiling.get("asr_after")),
        )
    console.print(table)


def _accuracy_by_side(report: dict[str, Any], target: str) -> dict[str, list[float]]:
    """Accuracy on the target class's clean images, and the mean per-class accuracy of the
    others, before and after: where the clean accuracy that tuning costs is lost."""
    per_class = report["per_class_accuracy"]
    row = per_class["classes"].index(target)
    sides: dict[str, list[float]] = {"target_accuracy": [], "others_accuracy": []}
    for when in ("before", "after"):
        values = per_class[when]
        others = values[:row] + values[row + 1 :]
        sides["target_accuracy"].append(round(values[row], 6))
        sides["others_accuracy"].append(round(sum(others) / len(others), 6))
    return sides


def _print_means(console: Console, rows: list[dict[str, Any]]) -> None:
    """CBPT over the backdoored models: the figures the targets are stated in."""
    attacked = [r for r in rows if r["defence"] == "cbpt" and r["model"] != "clean"]
    if attacked:
        asr = [r["asr_after"] for r in attacked]
        drop = [r["ca_before"] - r["ca_after"] for r in attacked]
        console.print(
            f"CBPT on {len(attacked)} backdoored runs: ASR after mean {sum(asr) / len(asr):.3f}, "
            f"max {max(asr):.3f}; CA drop mean {sum(drop) / len(drop):.3f}, max {max(drop):.3f}"
        )
        target = [r["target_accuracy"][0] - r["target_accuracy"][1] for r in attacked]
        others = [r["others_accuracy"][0] - r["others_accuracy"][1] for r in attacked]
        console.print(
            f"  accuracy drop, mean: the target class {sum(target) / len(target):.3f}, "
            f"the other classes (mean per class) {sum(others) / len(others):.3f}"
        )


def _objective(row: dict[str, Any]) -> str:
    """What CBPT fitted, and the cross-validated accuracies that chose it."""
    fit = row.get("label_fit")
    if not fit:
        return str(row.get("objective", "-"))
    return f"{row['objective']} ({fit['zero_shot']:.3f} / {fit['fitted']:.3f})"


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
