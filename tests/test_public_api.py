"""The public surface is a promise: adding is fine, removing or renaming is a breaking change."""

from __future__ import annotations

import worker.cbpt
import worker.lab


def test_cbpt_exports() -> None:
    assert sorted(worker.cbpt.__all__) == [
        "ATTACK_NAMES",
        "AttackSpec",
        "BadNets",
        "Blended",
        "ImageSet",
        "ImageSetError",
        "ImageSetLimits",
        "LabelConsistent",
        "OptimizedPatch",
        "SIG",
        "WaNet",
        "parse_attack",
        "read_image_set",
    ]
    assert all(hasattr(worker.cbpt, name) for name in worker.cbpt.__all__)


def test_lab_exports() -> None:
    assert sorted(worker.lab.__all__) == [
        "DatasetUnavailableError",
        "LabEvaluation",
        "LabModel",
        "LabSettings",
        "TinyClipConfig",
        "TrainSettings",
        "default_attack",
        "default_dataset",
        "evaluate_lab_dir",
        "load_dataset",
        "load_lab_model",
        "make_lab_model",
    ]
    assert all(hasattr(worker.lab, name) for name in worker.lab.__all__)


def test_the_method_imports_no_service_layer() -> None:
    import subprocess
    import sys

    code = (
        "import sys, worker.cbpt, worker.lab; "
        "bad = [m for m in ('fastapi', 'sqlalchemy', 'celery', 'service') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
