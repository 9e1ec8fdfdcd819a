"""The admin commands on a fresh data dir, and on a database nobody has migrated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.auth import KEY_PREFIX

REPO = Path(__file__).resolve().parents[2]


def _antidote(env: dict[str, str], cwd: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ANTIDOTE_")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli.main", *arguments],
        env={**base, "PYTHONPATH": str(REPO), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_keys_work_on_a_fresh_embedded_data_dir(tmp_path: Path) -> None:
    """No ``serve`` has run: the command creates and migrates the embedded database itself."""
    env = {"ANTIDOTE_DATA_DIR": str(tmp_path / "data")}
    created = _antidote(env, tmp_path, "keys", "create", "--tenant", "acme")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith(KEY_PREFIX)
    assert (tmp_path / "data" / "antidote.db").is_file()
    listed = _antidote(env, tmp_path, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("\tacme\t") == 1
    assert secret[:10] in listed.stdout


def test_an_unmigrated_external_database_is_named_not_dumped(tmp_path: Path) -> None:
    """An external database is upgraded as its own step (replicas share it), so a command that
    finds it unmigrated says so in one line that names the fix, never with a traceback."""
    database = tmp_path / "external.db"
    env = {
        "ANTIDOTE_DATA_DIR": str(tmp_path / "data"),
        "ANTIDOTE_DATABASE_URL": f"sqlite:///{database}",
    }
    for arguments in (
        ("keys", "create", "--tenant", "acme"),
        ("keys", "list"),
        ("keys", "revoke", "key_x"),
    ):
        result = _antidote(env, tmp_path, *arguments)
        assert result.returncode == 1, (arguments, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "antidote db upgrade" in lines[0]
        assert "Traceback" not in result.stderr
    upgraded = _antidote(env, tmp_path, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    created = _antidote(env, tmp_path, "keys", "create", "--tenant", "acme")
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip().splitlines()[-1].startswith(KEY_PREFIX)
