"""The API's up-front input checks, on real files built per test.

Every refusal is pinned to its code, because clients branch on codes; the files that must pass
are built the way real tools build them, so that the checks are not merely strict but right.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from service.validation import (
    CheckpointInfo,
    DatasetInfo,
    InputError,
    check_checkpoint,
    check_dataset,
)
from worker.cbpt.archives import ArchiveLimits
from worker.cbpt.errors import EngineError

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(24)  # never decoded: only names and sizes are checked


def _refused(code: str, call: Any, *args: Any, **kwargs: Any) -> InputError:
    """Runs ``call`` and returns its InputError after checking the code, so details can be read."""
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    assert caught.value.code == code, caught.value.detail
    return caught.value


# Checkpoint files ------------------------------------------------------------------------------


def _safetensors(path: Path, header: dict[str, Any], data_bytes: int, *, pad: int = 0) -> Path:
    """Writes a safetensors file by hand, so that a header can say things a library never would."""
    raw = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_bytes))
    return path


def _good_header() -> dict[str, Any]:
    """Two tensors tiling 56 data bytes exactly: ``a`` F32 [2, 3] then ``b`` I64 [4]."""
    return {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "I64", "shape": [4], "data_offsets": [24, 56]},
    }


def _zip(path: Path, members: dict[str, bytes | None]) -> Path:
    """A stored (uncompressed) zip; ``None`` makes a folder entry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some tests need
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as bundle:
            for name, data in members.items():
                if data is None:
                    bundle.writestr(zipfile.ZipInfo(name.rstrip("/") + "/"), b"")
                else:
                    bundle.writestr(zipfile.ZipInfo(name), data)
    return path


def _tar(path: Path, members: dict[str, bytes | None], mode: str = "w:gz") -> Path:
    """A tar (gzip by default); ``None`` makes a folder entry."""
    with tarfile.open(path, mode) as bundle:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                bundle.addfile(info)
            else:
                info.size = len(data)
                bundle.addfile(info, io.BytesIO(data))
    return path


def test_input_error_carries_code_and_detail() -> None:
    """The API maps ``code`` to its problem document, and callers catching ValueError still work."""
    error = InputError("DATASET_EMPTY", "nothing here")
    assert isinstance(error, ValueError)
    assert (error.code, error.detail) == ("DATASET_EMPTY", "nothing here")
    assert isinstance(error, EngineError)  # the one base the problem mapping reads
    assert str(error) == "nothing here"


def test_library_safetensors_passes_with_its_tensor_count(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(
        {
            "visual.proj": np.ones((3, 4), dtype=np.float32),
            "logit_scale": np.array(4.6, dtype=np.float16),
            "positions": np.arange(5, dtype=np.int64),
            "empty": np.zeros((0, 7), dtype=np.uint8),
        },
        str(path),
        metadata={"format": "np"},
    )
    info = check_checkpoint(path)
    assert info == CheckpointInfo("safetensors", path.stat().st_size, 4)


def test_hand_built_safetensors_passes(tmp_path: Path) -> None:
    """The builder below makes valid files, so the refusals after it are about the one change."""
    path = _safetensors(tmp_path / "w.safetensors", _good_header(), 56, pad=5)
    assert check_checkpoint(path).tensors == 2


def test_empty_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    _refused("CHECKPOINT_EMPTY", check_checkpoint, path)


@pytest.mark.parametrize("keep", [20, -4], ids=["inside-header", "inside-data"])
def test_truncated_safetensors_is_refused(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": np.ones((8, 8), dtype=np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:keep])
    _refused("CHECKPOINT_TRUNCATED", check_checkpoint, path)


def test_header_length_past_the_end_is_truncation(tmp_path: Path) -> None:
    path = tmp_path / "huge-header.safetensors"
    path.write_bytes(struct.pack("<Q", 200 * 1024**2) + b'{"a": 1}')
    _refused("CHECKPOINT_TRUNCATED", check_checkpoint, path)


@pytest.mark.parametrize(
    ("b_offsets", "data_bytes", "code", "words"),
    [
        ([28, 60], 60, "CHECKPOINT_HEADER_INVALID", "hole"),
        ([20, 52], 56, "CHECKPOINT_HEADER_INVALID", "overlaps"),
        ([24, 56], 40, "CHECKPOINT_TRUNCATED", "holds 40"),
        ([24, 56], 64, "CHECKPOINT_HEADER_INVALID", "lies about its offsets"),
    ],
    ids=["hole", "overlap", "end-beyond-file", "bytes-after-last-tensor"],
)
def test_offsets_that_do_not_tile_the_data_are_refused(
    tmp_path: Path, b_offsets: list[int], data_bytes: int, code: str, words: str
) -> None:
    header = _good_header()
    header["b"]["data_offsets"] = b_offsets
    error = _refused(code, check_checkpoint, _safetensors(tmp_path / "w", header, data_bytes))
    assert words in error.detail


def test_first_tensor_must_start_at_zero(tmp_path: Path) -> None:
    header = _good_header()
    header["a"]["data_offsets"] = [8, 32]
    header["b"]["data_offsets"] = [32, 64]
    error = _refused(
        "CHECKPOINT_HEADER_INVALID", check_checkpoint, _safetensors(tmp_path / "w", header, 64)
    )
    assert "'a'" in error.detail


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dtype", "F128"),
        ("dtype", "f32"),
        ("shape", [2, -3]),
        ("shape", [True, 6]),
        ("shape", [2.0, 3]),
        ("shape", "2x3"),
        ("shape", [3, 3]),  # 36 bytes of F32, but the offsets span 24
        ("shape", [2**40, 2**40, 2**40]),
        ("data_offsets", [0]),
        ("data_offsets", [24, 0]),
        ("data_offsets", [0, "24"]),
        ("data_offsets", None),
    ],
)
def test_bad_tensor_entries_are_refused_by_name(tmp_path: Path, field: str, value: Any) -> None:
    header = _good_header()
    header["a"][field] = value
    header["a|name"] = header.pop("a")
    error = _refused(
        "CHECKPOINT_HEADER_INVALID", check_checkpoint, _safetensors(tmp_path / "w", header, 56)
    )
    assert "'a|name'" in error.detail


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": {"dtype": "F32"',
        b'{"a": 1, "a": 2}',
        b'{"\xff": 1}',
        b"{" + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"__metadata__": {"format": 1}}',
        b'{"__metadata__": {"format": "pt"}}',
        b'{"a": [1, 2]}',
    ],
    ids=[
        "not-json",
        "repeated-key",
        "not-utf8",
        "deep-nesting",
        "metadata-not-strings",
        "no-tensors",
        "entry-not-object",
    ],
)
def test_bad_headers_are_refused(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    _refused("CHECKPOINT_HEADER_INVALID", check_checkpoint, path)


class _Payload:
    """Unpickling this creates the canary file: proof that something was executed."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.canary), "w"))


def test_pickle_is_recognised_without_being_executed(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    payload = pickle.dumps({"weight": _Payload(canary)}, protocol=2)
    path = tmp_path / "model.pt"
    path.write_bytes(payload)

    info = check_checkpoint(path)

    assert info == CheckpointInfo("pickle", len(payload), None)
    assert not canary.exists()
    # The payload is live: had the check unpickled it, the canary would be there.
    pickle.loads(payload)["weight"].close()
    assert canary.exists()


@pytest.mark.parametrize(
    "content",
    [b"hello, this is not a model\n", b"(dp0\nS'w'\np1\nI1\ns.", bytes(range(256)) * 4],
    ids=["text", "protocol-0-pickle", "binary"],
)
def test_unknown_formats_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    _refused("CHECKPOINT_FORMAT_UNSUPPORTED", check_checkpoint, path)


@pytest.mark.parametrize(
    "member", ["model/code/__torch__/model.py", "model/constants.pkl"], ids=["code", "constants"]
)
def test_torchscript_zip_is_refused(tmp_path: Path, member: str) -> None:
    path = _zip(
        tmp_path / "scripted.pt",
        {"model/data.pkl": b"\x80\x02}q\x00.", member: b"x", "model/version": b"3\n"},
    )
    _refused("CHECKPOINT_TORCHSCRIPT", check_checkpoint, path)


def test_torch_zip_is_accepted_unopened(tmp_path: Path) -> None:
    members: dict[str, bytes | None] = {
        "archive/data.pkl": b"\x80\x02}q\x00.",
        "archive/version": b"3\n",
        "archive/byteorder": b"little",
    }
    members.update({f"archive/data/{i}": bytes(64) for i in range(100)})  # past 64 members
    path = _zip(tmp_path / "model.pt", members)
    assert check_checkpoint(path) == CheckpointInfo("torch-zip", path.stat().st_size, None)


def _hub(weights: str = "open_clip_model.safetensors") -> dict[str, bytes | None]:
    return {"open_clip_config.json": b'{"model_cfg": {}}', weights: bytes(64), "README.md": b"hi"}


@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_hub_zip_is_accepted(tmp_path: Path, weights: str) -> None:
    path = _zip(tmp_path / "hub.zip", _hub(weights))
    assert check_checkpoint(path) == CheckpointInfo("archive", path.stat().st_size, None)


def test_hub_tar_in_one_top_folder_is_accepted(tmp_path: Path) -> None:
    members = {f"./ViT-B-32/{name}": data for name, data in _hub("epoch_32.pt").items()}
    members = {"./": None, "./ViT-B-32": None, **members}
    assert check_checkpoint(_tar(tmp_path / "hub.tar.gz", members)).format == "archive"


def test_hub_prefers_the_hub_name_over_other_weights(tmp_path: Path) -> None:
    members = {**_hub(), "optimizer.pt": bytes(8)}
    assert check_checkpoint(_zip(tmp_path / "hub.zip", members)).format == "archive"


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ({"open_clip_model.safetensors": bytes(64)}, "open_clip_config.json"),
        ({"a/b/open_clip_config.json": b"{}", "a/b/model.pt": b"x"}, "open_clip_config.json"),
        ({"one/x.json": b"{}", "two/open_clip_config.json": b"{}"}, "open_clip_config.json"),
        ({"open_clip_config.json": b"{}", "notes.txt": b"x"}, "no weights"),
        ({"open_clip_config.json": b"{}", "sub/model.pt": b"x"}, "no weights"),
        ({"open_clip_config.json": b"{}", "a.pt": b"x", "b.bin": b"y"}, "several"),
        ({**_hub(), "../evil.sh": b"x"}, "unsafe"),
    ],
    ids=[
        "no-config",
        "config-too-deep",
        "config-in-one-of-two-folders",
        "no-weights",
        "weights-in-subfolder",
        "ambiguous-weights",
        "zip-slip",
    ],
)
def test_bad_hub_archives_are_refused(
    tmp_path: Path, members: dict[str, bytes | None], words: str
) -> None:
    error = _refused(
        "CHECKPOINT_FORMAT_UNSUPPORTED", check_checkpoint, _zip(tmp_path / "hub.zip", members)
    )
    assert words in error.detail


def test_hub_archive_limits_apply(tmp_path: Path) -> None:
    members = {**_hub(), **{f"extra/{i}.txt": b"x" for i in range(70)}}
    path = _zip(tmp_path / "hub.zip", members)
    _refused("CHECKPOINT_FORMAT_UNSUPPORTED", check_checkpoint, path)
    assert check_checkpoint(path, ArchiveLimits(max_members=100)).format == "archive"


def test_validation_keeps_torch_out_of_the_api_process() -> None:
    """The API imports this module; loading torch there would cost seconds and gigabytes."""
    code = (
        "import sys, service.validation\n"
        "heavy = {'torch', 'open_clip', 'numpy'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# Datasets --------------------------------------------------------------------------------------


def _images(*folders_and_counts: tuple[str, int]) -> dict[str, bytes | None]:
    return {
        f"{folder}/{i}.png": IMAGE for folder, count in folders_and_counts for i in range(count)
    }


def test_zip_dataset_with_classes_json_uses_its_order(tmp_path: Path) -> None:
    members = {
        **_images(("dog", 3), ("cat", 2)),
        "dog/extra.JPEG": IMAGE,
        "classes.json": json.dumps({"dog": "a dog", "cat": "a cat"}).encode(),
    }
    info = check_dataset(_zip(tmp_path / "data.zip", members))
    assert info == DatasetInfo(classes=("dog", "cat"), images=6, per_class={"dog": 4, "cat": 2})


def test_tar_gz_dataset_with_partial_classes_json_sorts(tmp_path: Path) -> None:
    """Names as ``tar -C dir .`` writes them, with the debris macOS adds, which is skipped."""
    members: dict[str, bytes | None] = {"./": None, "./zebra": None, "./ankle_boot": None}
    members.update(
        {f"./{name}": data for name, data in _images(("zebra", 2), ("ankle_boot", 3)).items()}
    )
    members.update(
        {
            "./classes.json": b'{"ankle_boot": "ankle boot"}',
            "./zebra/.DS_Store": b"junk",
            "./__MACOSX/zebra/._0.png": b"junk",
            "./zebra/Thumbs.db": b"junk",
        }
    )
    info = check_dataset(_tar(tmp_path / "data.tar.gz", members))
    assert info == DatasetInfo(
        classes=("ankle_boot", "zebra"), images=5, per_class={"ankle_boot": 3, "zebra": 2}
    )


def test_plain_tar_without_classes_json_passes(tmp_path: Path) -> None:
    path = _tar(tmp_path / "data.tar", _images(("b", 2), ("a", 2), ("c", 2)), mode="w")
    assert check_dataset(path).classes == ("a", "b", "c")


@pytest.mark.parametrize("content", [b"just text\n", b"\x80\x02}q\x00."], ids=["text", "pickle"])
def test_non_archive_dataset_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "data.zip"
    path.write_bytes(content)
    _refused("DATASET_NOT_ARCHIVE", check_dataset, path)


@pytest.mark.parametrize(
    "members",
    [
        {"../x.png": IMAGE, **_images(("a", 2), ("b", 2))},
        {"a/../../x.png": IMAGE, **_images(("a", 2), ("b", 2))},
        {"/etc/x.png": IMAGE, **_images(("a", 2), ("b", 2))},
        {"a/x.png": IMAGE, "b/y.png": IMAGE, "./a/x.png": IMAGE, "b/z.png": IMAGE},
    ],
    ids=["zip-slip", "zip-slip-nested", "absolute", "duplicate-name"],
)
def test_unsafe_dataset_is_refused(tmp_path: Path, members: dict[str, bytes | None]) -> None:
    _refused("DATASET_UNSAFE", check_dataset, _zip(tmp_path / "data.zip", members))


def test_tar_link_is_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "data.tar.gz"
    with tarfile.open(path, "w:gz") as bundle:
        for name in _images(("a", 2), ("b", 2)):
            info = tarfile.TarInfo(name)
            info.size = len(IMAGE)
            bundle.addfile(info, io.BytesIO(IMAGE))
        link = tarfile.TarInfo("a/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        bundle.addfile(link)
    _refused("DATASET_UNSAFE", check_dataset, path)


def test_dataset_archive_limits_apply(tmp_path: Path) -> None:
    path = _zip(tmp_path / "data.zip", _images(("a", 3), ("b", 3)))
    _refused("DATASET_UNSAFE", check_dataset, path, limits=ArchiveLimits(max_members=5))
    assert check_dataset(path, limits=ArchiveLimits(max_members=6)).images == 6


@pytest.mark.parametrize(
    "members",
    [{}, {"a": None, "b": None}, {"classes.json": b"{}"}, {".DS_Store": b"junk"}],
    ids=["no-members", "only-folders", "only-classes-json", "only-debris"],
)
def test_empty_dataset_is_refused(tmp_path: Path, members: dict[str, bytes | None]) -> None:
    _refused("DATASET_EMPTY", check_dataset, _zip(tmp_path / "data.zip", members))


def test_zero_byte_dataset_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "data.zip"
    path.write_bytes(b"")
    _refused("DATASET_EMPTY", check_dataset, path)


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ({**_images(("a", 2), ("b", 2)), "stray.png": IMAGE}, "'stray.png'"),
        ({**_images(("a", 2), ("b", 2)), "README.txt": b"x"}, "'README.txt'"),
        ({**_images(("a", 2), ("b", 2)), "a/deeper/x.png": IMAGE}, "subfolder"),
        ({**_images(("a", 2), ("b", 2)), "a/deeper": None}, "subfolder"),
        ({f"fewshot/{k}": v for k, v in _images(("a", 2), ("b", 2)).items()}, "'fewshot'"),
    ],
    ids=["top-level-image", "top-level-file", "nested-image", "nested-folder", "wrapper-folder"],
)
def test_bad_layout_is_refused(
    tmp_path: Path, members: dict[str, bytes | None], words: str
) -> None:
    error = _refused("DATASET_LAYOUT", check_dataset, _zip(tmp_path / "data.zip", members))
    assert words in error.detail


def test_one_class_is_too_few(tmp_path: Path) -> None:
    _refused("DATASET_TOO_FEW_CLASSES", check_dataset, _zip(tmp_path / "d.zip", _images(("a", 5))))


def test_class_limit_applies(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.zip", _images(("a", 2), ("b", 2), ("c", 2)))
    _refused("DATASET_TOO_MANY_CLASSES", check_dataset, path, max_classes=2)
    assert len(check_dataset(path, max_classes=3).classes) == 3


@pytest.mark.parametrize(
    ("members", "min_per_class"),
    [
        (_images(("a", 2), ("b", 1)), 2),
        ({**_images(("a", 2), ("b", 2)), "empty": None}, 2),
        (_images(("a", 3), ("b", 2)), 3),
    ],
    ids=["one-image", "empty-folder", "custom-minimum"],
)
def test_small_class_is_refused(
    tmp_path: Path, members: dict[str, bytes | None], min_per_class: int
) -> None:
    path = _zip(tmp_path / "d.zip", members)
    _refused("DATASET_CLASS_TOO_SMALL", check_dataset, path, min_per_class=min_per_class)


@pytest.mark.parametrize("name", ["a/b.zip", "a/b.tar.gz", "a/b.txt", "a/b.svg", "a/b"])
def test_non_images_are_refused(tmp_path: Path, name: str) -> None:
    members = {**_images(("a", 2), ("b", 2)), name: b"PK\x03\x04"}
    error = _refused("DATASET_NOT_IMAGE", check_dataset, _zip(tmp_path / "d.zip", members))
    assert repr(name) in error.detail


@pytest.mark.parametrize(
    "content",
    [
        b'{"a": "x"',
        b'["a", "b"]',
        b'{"a": 1}',
        b'{"a": ""}',
        b'{"a": "   "}',
        json.dumps({"a": "x" * 81}).encode(),
        b'{"a": "tab\\there"}',
        b'{"a": "x", "c": "y"}',
        b'{"a": "same", "b": "same"}',
        b'{"a": "one", "a": "two"}',
        b'{"a": "' + b"x" * (1024**2) + b'"}',
        b"\xff\xfe{}",
    ],
    ids=[
        "not-json",
        "not-object",
        "not-string",
        "empty-name",
        "blank-name",
        "long-name",
        "control-character",
        "unknown-folder",
        "same-display-name",
        "repeated-key",
        "too-big",
        "not-utf8",
    ],
)
def test_bad_classes_json_is_refused(tmp_path: Path, content: bytes) -> None:
    members = {**_images(("a", 2), ("b", 2)), "classes.json": content}
    _refused("DATASET_CLASSES_JSON", check_dataset, _zip(tmp_path / "d.zip", members))


def test_good_classes_json_passes_alongside_the_bad_ones(tmp_path: Path) -> None:
    """The refusals above are about content: 80 characters and non-ASCII names are fine."""
    content = json.dumps({"a": "ä" * 80, "b": " bee "}).encode()
    members = {**_images(("a", 2), ("b", 2)), "classes.json": content}
    assert check_dataset(_zip(tmp_path / "d.zip", members)).classes == ("a", "b")


@pytest.mark.parametrize("folder", ["ca\x01t", "dog\x7f", "x" * 81], ids=["c0", "del", "long"])
def test_bad_class_folder_names_are_refused(tmp_path: Path, folder: str) -> None:
    members = _images((folder, 2), ("b", 2))
    _refused("DATASET_CLASS_NAME", check_dataset, _zip(tmp_path / "d.zip", members))


def test_eighty_character_folder_passes(tmp_path: Path) -> None:
    members = _images(("x" * 80, 2), ("b", 2))
    assert check_dataset(_zip(tmp_path / "d.zip", members)).per_class["x" * 80] == 2


def test_element_count_overflow_is_named(tmp_path: Path) -> None:
    """safetensors counts elements in 64 bits; the check stops multiplying once past that."""
    header = _good_header()
    header["a"]["shape"] = [2**63, 2**63, *[2**64 - 1] * 1000]
    error = _refused(
        "CHECKPOINT_HEADER_INVALID", check_checkpoint, _safetensors(tmp_path / "w", header, 56)
    )
    assert "overflows" in error.detail


def test_folder_left_out_of_classes_json_needs_a_usable_default(tmp_path: Path) -> None:
    """``__`` would be shown as an empty name once underscores become spaces and are trimmed."""
    members = {**_images(("a", 2), ("__", 2)), "classes.json": b'{"a": "apple"}'}
    error = _refused("DATASET_CLASSES_JSON", check_dataset, _zip(tmp_path / "d.zip", members))
    assert "empty" in error.detail
