"""The API checks and accepts jobs against the engine's torch-free contract: an API-only
process never loads torch or open_clip, so its image and its memory stay small."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.service.support import children, embedded_settings, new_key, start_server, stop_server
from tests.service.test_api import dataset, weights
from worker.cbpt.attacks import BadNets


def _mapped_files(pid: int) -> str:
    """Every file mapped into ``pid`` and its children: the shared libraries they loaded."""
    maps = []
    for process in (pid, *children(pid)):
        maps.append(Path(f"/proc/{process}/maps").read_text())
    return "".join(maps)


def test_an_api_only_process_accepts_a_job_without_loading_torch(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = embedded_settings(data_dir)
    key = new_key(settings, "acme")
    server = start_server(
        {"ANTIDOTE_DATA_DIR": str(data_dir)}, tmp_path / "serve.log", api_only=True
    )
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as http:
            files = {
                name: http.put("/v1/files", content=body).json()["id"]
                for name, body in (("checkpoint_file", weights()), ("dataset_file", dataset()))
            }
            body = {
                **files,
                "model": "ViT-B-32",
                # every part of the contract the API checks: grouped options, a context init
                # counted in BPE tokens, and a known trigger with a pattern image
                "options": {
                    "rounds": {"count": 1, "blend_budget": 0.1},
                    "tuning": {"n_ctx": 4, "context_init": "a photo of a"},
                    "evaluation": {"holdout_fraction": 0.5},
                },
                "known_triggers": [json.loads(BadNets(target="cat", seed=1).model_dump_json())],
            }
            accepted = http.post("/v1/jobs", json=body)
            assert accepted.status_code == 202, accepted.text
            refused = http.post(
                "/v1/jobs", json={**body, "options": {"tuning": {"context_init": "a b c d e"}}}
            )
            assert refused.status_code == 422, refused.text
            assert refused.json()["code"] == "OPTIONS_INVALID"
        mapped = _mapped_files(server.process.pid)
        assert "libtorch" not in mapped
        assert "/torch/" not in mapped
        assert "open_clip" not in mapped
    finally:
        stop_server(server)
