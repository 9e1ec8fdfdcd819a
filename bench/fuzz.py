"""Fuzzing the API against its own OpenAPI document: the long profile.

``tests/service/test_fuzz_api.py`` runs a short version on every test run; this one runs many more
cases, in three phases, and counts every failure instead of stopping at the first:

- ``fuzz``: every operation, valid (positive) and invalid (negative) inputs.
- ``pinned``: generated inputs on real resources (uploaded files, a finished job with
  artifacts), since random ids stop at a 404 before most of the code runs.
- ``stateful``: sequences that follow the links inferred from the document (a created job is
  read, listed, cancelled, its artifacts fetched), with job bodies pointed at real files.

The gate is five checks: no 5xx, a documented status, the documented content type, a body of
the documented schema, documented headers. Two more (``negative_data_rejection``,
``unsupported_method``) are printed as advisory: they judge how strict the API is, not whether
the document is right. The exit status is 1 if a gating check failed.

    .venv/bin/python bench/fuzz.py [--examples 150] [--scenarios 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import schemathesis
from hypothesis import HealthCheck, given, reject, seed, settings
from hypothesis.errors import Unsatisfiable
from rich.console import Console
from rich.table import Table
from safetensors.numpy import save
from schemathesis import APIOperation, Case, CheckFunction, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import dataset_bytes
from service import jobs
from service.api import create_app
from service.auth import create_key
from service.blobs import BlobStore
from service.crud.files import file_id
from service.db import session_factory, transaction
from service.migrations import upgrade
from service.models import Artifact, File, Job
from service.settings import Settings

TENANT = "fuzz"
GATING: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
ADVISORY: list[CheckFunction] = [negative_data_rejection, unsupported_method]
AnyCase = Case[Any]
Operation = APIOperation[Any, Any, Any, Any]
CRASH = "not_a_server_error"  # where a request that raised instead of answering is counted


@dataclass
class Seeded:
    """Real resources for generated requests to land on."""

    checkpoint: str
    dataset: str
    job: str
    artifacts: tuple[str, ...]


@dataclass
class Tally:
    cases: Counter[tuple[str, str]] = field(default_factory=Counter)
    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    failures: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def fail(self, check: str, case: AnyCase, detail: str) -> None:
        self.failures[check] += 1
        key = f"{check} {case.operation.label}"
        if key not in self.examples:
            self.examples[key] = f"{detail[:600]}\n    reproduce: {case.as_curl_command()}"


# Setup ------------------------------------------------------------------------------------------


def seed_data(settings: Settings, scratch: Path) -> Seeded:
    """Writes straight to the store and database: a finished job cannot be made through the API
    without a worker, and the API's own upload path is fuzzed anyway."""
    store = BlobStore(settings.blobs)
    sources = {
        "checkpoint": save({"w": np.zeros((2, 2), dtype=np.float32)}),
        "dataset": dataset_bytes(),
        "report.json": b'{"verdict": "clean"}',
        "head.safetensors": save({"head": np.ones((2, 2), dtype=np.float32)}),
    }
    blobs = {}
    for name, content in sources.items():
        path = scratch / name
        path.write_bytes(content)
        blobs[name] = store.put_file(path)
    job_id = jobs.new_job_id()
    artifacts = ("head.safetensors", "report.json")
    listing = [
        {
            "name": name,
            "size": blobs[name].size,
            "sha256": blobs[name].sha256,
            "url": f"/v1/jobs/{job_id}/artifacts/{name}",
        }
        for name in artifacts
    ]
    result = {
        "verdict": "clean",
        "suspected_target": "cat",
        "summary": {
            "ca_before": 0.9,
            "ca_after": 0.9,
            "asr_before": 0.1,
            "asr_after": 0.1,
            "fidelity": 1.0,
        },
        "artifacts": listing,
    }
    ids = {
        name: file_id(tenant=TENANT, sha256=blobs[name].sha256)
        for name in ("checkpoint", "dataset")
    }
    with transaction(session_factory(settings.database)) as session:
        for name, ident in ids.items():
            blob = blobs[name]
            session.add(File(id=ident, tenant=TENANT, sha256=blob.sha256, size=blob.size))
        session.add(
            Job(
                id=job_id, tenant=TENANT, request={}, state="SUCCEEDED", stage="done", result=result
            )
        )
        session.flush()
        for name in artifacts:
            media = "application/json" if name.endswith(".json") else "application/octet-stream"
            blob = blobs[name]
            session.add(
                Artifact(
                    job_id=job_id, name=name, sha256=blob.sha256, size=blob.size, media_type=media
                )
            )
    return Seeded(ids["checkpoint"], ids["dataset"], job_id, artifacts)


# Running cases ----------------------------------------------------------------------------------


def run_case(case: AnyCase, phase: str, headers: dict[str, str], tally: Tally) -> Response | None:
    """One request, every check on its own, so one failure does not hide the others."""
    tally.cases[(phase, case.operation.label)] += 1
    try:
        response = case.call(headers=headers)
    except Exception as exc:  # the app raised past its handlers: as bad as a 500
        tally.fail(CRASH, case, f"{type(exc).__name__}: {exc}")
        return None
    tally.statuses[case.operation.label][response.status_code] += 1
    # Pinned and stateful cases are edited after generation, so whether they are "invalid"
    # no longer follows from how they were generated: the advisory checks would misjudge them.
    for check in (*GATING, *ADVISORY) if phase == "fuzz" else GATING:
        try:
            case.validate_response(response, checks=[check], headers=headers)
        except (FailureGroup, Failure) as exc:
            tally.fail(check.__name__, case, str(exc))
    return response


def pin_job_request(case: AnyCase, seeded: Seeded) -> None:
    """Real files and a known model, so options and trigger specs reach the engine's checks."""
    if case.media_type == "application/json" and isinstance(case.body, dict):
        case.body.update(
            checkpoint_file=seeded.checkpoint, dataset_file=seeded.dataset, model="ViT-B-32"
        )


def explore(
    operation: Operation,
    mode: GenerationMode,
    examples: int,
    rng_seed: int,
    body: Callable[[AnyCase], None],
) -> str | None:
    """Runs ``body`` on up to ``examples`` generated cases; says why if none could be made."""

    @given(case=operation.as_strategy(mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @seed(rng_seed)
    def run(case: AnyCase) -> None:
        body(case)

    try:
        run()
    except Unsatisfiable:
        return f"{operation.label}: the document admits no {mode.value} input"
    return None


def fuzz_phase(
    schema: OpenApiSchema, headers: dict[str, str], args: argparse.Namespace, tally: Tally
) -> None:
    def on_case(case: AnyCase) -> None:
        run_case(case, "fuzz", headers, tally)

    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            note = explore(operation, mode, args.examples, args.seed, on_case)
            if note:
                tally.skipped.append(note)


def pinned_phase(
    schema: OpenApiSchema,
    headers: dict[str, str],
    seeded: Seeded,
    args: argparse.Namespace,
    tally: Tally,
) -> None:
    def on_files(case: AnyCase) -> None:
        pin_job_request(case, seeded)
        run_case(case, "pinned", headers, tally)

    def on_job(case: AnyCase) -> None:
        pins: dict[str, Any] = {"job_id": seeded.job}
        if "name" in case.path_parameters:
            pins["name"] = seeded.artifacts[tally.cases.total() % len(seeded.artifacts)]
        case.path_parameters = {**case.path_parameters, **pins}
        run_case(case, "pinned", headers, tally)

    targets: list[tuple[str, str, Callable[[AnyCase], None]]] = [
        ("/v1/jobs", "POST", on_files),
        ("/v1/jobs/{job_id}", "GET", on_job),
        ("/v1/jobs/{job_id}/cancel", "POST", on_job),
        ("/v1/jobs/{job_id}/artifacts", "GET", on_job),
        ("/v1/jobs/{job_id}/artifacts/{name}", "GET", on_job),
    ]
    for path, method, body in targets:
        operation = schema[path][method]
        # Pinning replaces the only parameters these operations take; bodies stay generated.
        modes = [GenerationMode.POSITIVE]
        if method == "POST" and path == "/v1/jobs":
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            note = explore(operation, mode, args.examples, args.seed, body)
            if note:
                tally.skipped.append(note)


def stateful_phase(
    schema: OpenApiSchema,
    headers: dict[str, str],
    seeded: Seeded,
    args: argparse.Namespace,
    tally: Tally,
) -> None:
    base = schema.as_state_machine()

    class Workflow(base):  # type: ignore[misc, valid-type]
        """Records instead of raising, so a scenario goes on after a failed check."""

        def before_call(self, case: AnyCase) -> None:
            pin_job_request(case, seeded)

        def step(self, input: Any) -> Any:
            from schemathesis.generation.stateful.state_machine import StepOutput

            self.before_call(input.case)
            response = run_case(input.case, "stateful", headers, tally)
            if response is None:  # counted already; nothing for later steps to follow
                reject()
            return StepOutput(response, input.case)

    Workflow.run(
        settings=settings(
            max_examples=args.scenarios,
            stateful_step_count=8,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )


# Report -----------------------------------------------------------------------------------------


def report(console: Console, tally: Tally, elapsed: float) -> bool:
    phases = ("fuzz", "pinned", "stateful")
    labels = sorted({label for _, label in tally.cases})
    cases = Table(title="cases run")
    cases.add_column("operation")
    for phase in phases:
        cases.add_column(phase, justify="right")
    cases.add_column("statuses seen")
    for label in labels:
        seen = " ".join(f"{s}x{n}" for s, n in sorted(tally.statuses[label].items()))
        cases.add_row(label, *(str(tally.cases[(p, label)]) for p in phases), seen)
    totals = [sum(n for (p, _), n in tally.cases.items() if p == phase) for phase in phases]
    cases.add_row("total", *(str(n) for n in totals), "", end_section=True)
    console.print(cases)
    checks = Table(title=f"failures by check ({tally.cases.total()} cases in {elapsed:.0f} s)")
    checks.add_column("check")
    checks.add_column("kind")
    checks.add_column("failures", justify="right")
    for check in GATING:
        checks.add_row(check.__name__, "gate", str(tally.failures[check.__name__]))
    for check in ADVISORY:
        checks.add_row(check.__name__, "advisory", str(tally.failures[check.__name__]))
    console.print(checks)
    for note in tally.skipped:
        console.print(f"skipped: {note}", markup=False)
    for key, example in list(tally.examples.items())[:12]:
        console.print(f"- {key}\n    {example}", markup=False)
    return all(tally.failures[check.__name__] == 0 for check in GATING)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=150, help="Per operation and mode.")
    parser.add_argument("--scenarios", type=int, default=60, help="Stateful scenarios.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console = Console(width=132)
    tally = Tally()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="antidote-fuzz-") as temp:
        scratch = Path(temp)
        app_settings = Settings(data_dir=scratch / "var")
        app_settings.data_dir.mkdir(parents=True)
        upgrade(app_settings.database)
        with transaction(session_factory(app_settings.database)) as session:
            secret = create_key(session, TENANT).secret
        headers = {"Authorization": f"Bearer {secret}"}
        seeded = seed_data(app_settings, scratch)
        app = create_app(app_settings, reaper=False)
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        fuzz_phase(schema, headers, args, tally)
        pinned_phase(schema, headers, seeded, args, tally)
        stateful_phase(schema, headers, seeded, args, tally)
    return 0 if report(console, tally, time.perf_counter() - started) else 1


if __name__ == "__main__":
    raise SystemExit(main())
