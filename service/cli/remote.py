"""Commands that drive a running clip-antidote service: ``submit``, ``status``, ``wait``,
``download`` and ``cancel``.

Output is split for scripting: what a script needs (a job id, JSON, file paths, the result table)
goes to stdout, and everything meant for a person watching (progress, errors) goes to stderr.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.client import (
    DEFAULT_URL,
    AntidoteClient,
    AntidoteError,
    ApiError,
    Job,
    WaitTimeout,
)

Url = Annotated[
    str | None,
    typer.Option(envvar="ANTIDOTE_URL", help=f"Service base URL (default {DEFAULT_URL})."),
]
ApiKey = Annotated[
    str | None,
    typer.Option(envvar="ANTIDOTE_API_KEY", help="API key sent as a bearer token."),
]
JobId = Annotated[str, typer.Argument(help="The job's id, as printed by submit.")]
InputFile = Annotated[
    Path, typer.Argument(exists=True, dir_okay=False, readable=True, resolve_path=True)
]


def _fail(message: str) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(1)


@contextmanager
def _client(url: str | None, api_key: str | None) -> Iterator[AntidoteClient]:
    """Turns the client's failures into one stderr line and exit code 1 instead of a traceback."""
    try:
        with AntidoteClient.from_env(base_url=url, api_key=api_key) as client:
            yield client
    except ApiError as exc:
        _fail(f"{exc.code}: {exc.detail}")
    except AntidoteError as exc:
        _fail(str(exc))
    except httpx.TransportError as exc:
        _fail(f"cannot reach the service: {exc}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_result(job: Job) -> None:
    result = job.result
    if result is None:
        return
    summary = result.summary
    table = Table(title=f"job {job.id}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("CA", _fmt(summary.ca_before), _fmt(summary.ca_after))
    table.add_row("ASR", _fmt(summary.asr_before), _fmt(summary.asr_after))
    console = Console()
    console.print(table)
    console.print(f"fidelity: {_fmt(summary.fidelity)}")
    target = f" (suspected target: {result.suspected_target})" if result.suspected_target else ""
    console.print(f"verdict: {result.verdict}{target}")


def _follow(client: AntidoteClient, job_id: str, timeout: float | None = None) -> bool:
    """Shows the job's progress until it ends; prints the result, or its problem to stderr."""
    columns = (
        TextColumn("{task.description:<12}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("pending", total=1.0)

        def update(job: Job) -> None:
            description = job.stage or job.state.lower()
            progress.update(task, description=description, completed=min(1.0, job.progress))

        try:
            job = client.wait(job_id, timeout=timeout, on_progress=update)
        except WaitTimeout as exc:
            progress.stop()
            _fail(f"timeout: {exc}")
    if job.succeeded:
        _print_result(job)
        return True
    problem = job.error or {}
    code = problem.get("code") or job.state
    detail = problem.get("detail") or problem.get("title") or f"job ended {job.state}"
    typer.echo(f"{code}: {detail}", err=True)
    return False


def _read_object(path: Path, option: str) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint=option) from exc
    if not isinstance(loaded, dict):
        raise typer.BadParameter(f"{path}: not a JSON object", param_hint=option)
    return loaded


def submit(
    checkpoint: InputFile,
    data: InputFile,
    arch: Annotated[
        str | None,
        typer.Option(help="open_clip model name, or a model config .json file to upload."),
    ] = None,
    known_trigger: Annotated[
        list[Path] | None,
        typer.Option(help="Attack spec JSON to measure ASR against (repeatable)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds the split, inversion and tuning.")] = 0,
    options: Annotated[
        Path | None,
        typer.Option(help="JSON object of job options (inversion, tuning, rounds...)."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Upload a checkpoint and a few-shot dataset and start a purification job.

    The job id is the last line of stdout. With --wait, exit code 1 means the job did not succeed.
    """
    model: str | None = arch
    model_config: Path | None = None
    if arch is not None and arch.lower().endswith(".json"):
        # A config file that is missing is a typo, not a model name: say so before uploading.
        if not Path(arch).is_file():
            raise typer.BadParameter(f"no such file: {arch}", param_hint="--arch")
        model, model_config = None, Path(arch)
    specs = [_read_object(path, "--known-trigger") for path in known_trigger or []]
    job_options = {"seed": seed, **(_read_object(options, "--options") if options else {})}
    succeeded = True
    with _client(url, api_key) as client:
        job = client.submit(
            checkpoint,
            data,
            model=model,
            model_config=model_config,
            known_triggers=specs,
            options=job_options,
        )
        if wait:
            typer.echo(f"submitted job {job.id}", err=True)
            succeeded = _follow(client, job.id)
    typer.echo(job.id)
    if not succeeded:
        raise typer.Exit(1)


def status(job_id: JobId, url: Url = None, api_key: ApiKey = None) -> None:
    """Print the job resource as JSON."""
    with _client(url, api_key) as client:
        job = client.get(job_id)
    typer.echo(json.dumps(job.raw, indent=2))


def wait(
    job_id: JobId,
    timeout: Annotated[
        float | None, typer.Option(help="Give up after this many seconds (the job goes on).")
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Follow a job to its end and print CA and ASR before and after; exit 1 unless it succeeded."""
    with _client(url, api_key) as client:
        succeeded = _follow(client, job_id, timeout)
    if not succeeded:
        raise typer.Exit(1)


def download(
    job_id: JobId,
    out_dir: Annotated[Path, typer.Argument(file_okay=False, help="Folder for the artifacts.")],
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Download a finished job's artifacts, each checked against its SHA-256."""
    with _client(url, api_key) as client:
        paths = client.download(job_id, out_dir)
    for path in paths:
        typer.echo(str(path))


def cancel(job_id: JobId, url: Url = None, api_key: ApiKey = None) -> None:
    """Ask for a job to be cancelled and print its new state (usually CANCELLING)."""
    with _client(url, api_key) as client:
        job = client.cancel(job_id)
    typer.echo(f"{job.id} {job.state}")
