"""``antidote lab``: make backdoored lab models and measure them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from service.cli.progress import StageCallback, stage_bars
from service.settings import get_settings

if TYPE_CHECKING:
    from worker.lab.make import LabModel

app = typer.Typer(help="Make tiny backdoored CLIP checkpoints and measure their CA and ASR.")


@app.command("make")
def make(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the lab model to.")],
    attack: Annotated[
        str,
        typer.Option(
            help="badnets, blended, sig, wanet, label-consistent, optimized-patch or none."
        ),
    ] = "badnets",
    dataset: Annotated[
        str | None,
        typer.Option(help="fashion-mnist or digits (default: fashion-mnist if installed)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds data, training and the trigger.")] = 0,
    shots: Annotated[int, typer.Option(help="Clean images per class in fewshot.zip.")] = 16,
    target: Annotated[int, typer.Option(help="Index of the target class.")] = 0,
    poison_rate: Annotated[
        float | None,
        typer.Option(help="Share of pairs poisoned (default 0.1 classic, 0.01 broad, at most)."),
    ] = None,
    family: Annotated[
        str,
        typer.Option(
            help="classic (a tiny CLIP trained on the classes it is scored on) or broad "
            "(pretrained on captioned scenes, measured on a held-out downstream task)."
        ),
    ] = "classic",
    task: Annotated[
        str | None,
        typer.Option(help="Broad family: glyphs (36 classes, the default) or fashion."),
    ] = None,
) -> None:
    """Make a lab model: a clean CLIP (cached) with the attack implanted."""
    from worker.cbpt.attacks import ATTACK_NAMES
    from worker.lab.datasets import default_dataset
    from worker.lab.make import LabSettings, make_lab_model

    if attack != "none" and attack not in ATTACK_NAMES:
        raise typer.BadParameter(f"unknown attack {attack!r}", param_hint="--attack")
    if family not in ("classic", "broad"):
        raise typer.BadParameter(f"unknown family {family!r}", param_hint="--family")
    if family == "broad":
        _make_broad(out, attack, task, seed, shots, poison_rate)
        return
    if task is not None:
        raise typer.BadParameter("tasks belong to the broad family", param_hint="--task")
    chosen = dataset or default_dataset()
    if chosen not in ("fashion-mnist", "digits"):
        raise typer.BadParameter(f"unknown dataset {chosen!r}", param_hint="--dataset")
    overrides: dict[str, float] = {"seed": seed, "shots": shots, "target": target}
    if poison_rate is not None:
        overrides["poison_rate"] = poison_rate
    settings = LabSettings.for_dataset(chosen, **overrides)
    _make_with_bars(
        lambda progress: make_lab_model(
            None if attack == "none" else attack,
            out,
            settings,
            cache_dir=get_settings().lab_cache,
            progress=progress,
        ),
        attack,
        f"lab model on {chosen}",
    )


def _make_broad(
    out: Path, attack: str, task: str | None, seed: int, shots: int, poison_rate: float | None
) -> None:
    from pydantic import ValidationError

    from worker.lab.broad.make import BroadSettings, make_broad_model
    from worker.lab.broad.tasks import TASK_NAMES

    chosen = task or TASK_NAMES[0]
    if chosen not in TASK_NAMES:
        raise typer.BadParameter(f"unknown task {chosen!r}", param_hint="--task")
    overrides: dict[str, object] = {"task": chosen, "seed": seed, "shots": shots}
    if poison_rate is not None:
        overrides["poison_rate"] = poison_rate
    try:
        settings = BroadSettings.model_validate(overrides)
    except ValidationError as exc:
        raise typer.BadParameter(str(exc.errors()[0]["msg"])) from exc
    _make_with_bars(
        lambda progress: make_broad_model(
            None if attack == "none" else attack,
            out,
            settings,
            cache_dir=get_settings().lab_cache,
            progress=progress,
        ),
        attack,
        f"broad lab model for the {chosen} task",
    )


def _make_with_bars(make: Callable[[StageCallback], LabModel], attack: str, what: str) -> None:
    """Runs ``make`` under one progress bar per stage, then says where the model went."""
    console = Console(stderr=True)
    with stage_bars(console) as progress:
        made = make(progress)
    console.print(
        f"[bold]{attack}[/] {what} written to {made.directory} "
        f"(poison rate {made.poison_rate:.4f}, sha256 {made.model_sha256[:12]})"
    )


@app.command("eval")
def evaluate(
    directory: Annotated[Path, typer.Argument(help="A folder made by `antidote lab make`.")],
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line.")] = False,
    attack_file: Annotated[
        Path | None,
        typer.Option("--attack", help="Measure ASR of this spec instead of attack.json."),
    ] = None,
) -> None:
    """Print zero-shot CA and ASR ("a photo of a {}.") on the folder's held-out test set."""
    from worker.cbpt.attacks import parse_attack
    from worker.lab.evaluate import evaluate_lab_dir

    attack = parse_attack(attack_file.read_bytes()) if attack_file else None
    result = evaluate_lab_dir(directory, attack=attack)
    table = Table(title=f"{directory}")
    for column in ("metric", "value"):
        table.add_column(column)
    table.add_row("clean accuracy (CA)", f"{result.ca:.4f}  ({result.n_test} images)")
    asr = "-" if result.asr is None else f"{result.asr:.4f}  ({result.n_attacked} images)"
    table.add_row(f"attack success rate (ASR), {result.attack or 'no attack'}", asr)
    table.add_row("target class", result.target or "-")
    Console().print(table)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), sort_keys=True))
