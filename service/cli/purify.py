"""``antidote purify``: run a purification locally, without the service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.table import Table

from service.cli.progress import stage_bars


def purify(
    checkpoint: Annotated[
        Path,
        typer.Option(help="Weights: .safetensors, a state-dict file, or a hub folder/archive."),
    ],
    data: Annotated[Path, typer.Option(help="Zip or tar of <class>/<image> folders.")],
    out: Annotated[Path, typer.Option(help="Folder for prompts, head, trigger and report.")],
    arch: Annotated[
        str | None, typer.Option(help="open_clip model name or config JSON (if not in the folder).")
    ] = None,
    known_trigger: Annotated[
        list[Path] | None,
        typer.Option(help="Attack spec JSON to measure ASR against (repeatable)."),
    ] = None,
    eval_data: Annotated[
        Path | None, typer.Option(help="Separate held-out archive to measure on.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds the split, inversion and tuning.")] = 0,
    rounds: Annotated[int, typer.Option(help="Re-inversion rounds after the first.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[
        str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 elsewhere), fp32 or bf16.")
    ] = "auto",
) -> None:
    """Invert the trigger, tune class-wise prompts, and report CA and ASR before and after."""
    from worker.cbpt.attacks import parse_attack
    from worker.cbpt.options import PurifyOptions, Runtime
    from worker.cbpt.purify import Inputs
    from worker.cbpt.purify import purify as run

    try:
        options = PurifyOptions.model_validate({"seed": seed, "rounds": {"count": rounds}})
        runtime = TypeAdapter(Runtime).validate_python({"device": device, "precision": precision})
    except ValidationError as exc:
        raise typer.BadParameter(
            "; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from exc
    specs = tuple(parse_attack(path.read_bytes()) for path in known_trigger or [])
    console = Console(stderr=True)
    with stage_bars(console) as progress:
        result = run(
            Inputs(checkpoint, data, arch, specs, eval_data),
            options,
            out_dir=out,
            runtime=runtime,
            progress=progress,
        )
    table = Table(title=f"verdict: {result.verdict}, suspected target: {result.suspected_target}")
    for column in ("trigger", "target", "ASR before", "ASR after", "fidelity"):
        table.add_column(column, justify="left" if column in ("trigger", "target") else "right")
    for trigger in result.report.triggers:
        fidelity = trigger.fidelity
        table.add_row(
            trigger.name,
            trigger.target,
            f"{trigger.asr_before:.3f}",
            f"{trigger.asr_after:.3f}",
            "-" if fidelity is None else f"{fidelity:.3f}",
        )
    Console().print(table)
    summary = result.report.summary
    Console().print(f"CA {summary.ca_before:.3f} -> {summary.ca_after:.3f}; artifacts in {out}")
