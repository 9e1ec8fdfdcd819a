"""Reading untrusted dataset archives: the happy path, and a clear error for each bad input."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.cbpt.imagesets import ImageSetError, ImageSetLimits, read_image_set


def _png(value: int, size: tuple[int, int] = (10, 8), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, value if mode == "L" else (value, value // 2, 255 - value)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_reads_classes_in_folder_order_with_display_names(tmp_path: Path) -> None:
    archive = _zip(
        tmp_path / "data.zip",
        {
            "classes.json": json.dumps({"ankle_boot": "ankle boot"}).encode(),
            "ankle_boot/a.png": _png(10),
            "ankle_boot/b.png": _png(20, mode="L"),
            "bag/x.jpg": _png(30),
            "bag/.hidden.png": b"ignored",
            "README.txt": b"not an image",
        },
    )
    images = read_image_set(archive, 16)
    assert images.folders == ("ankle_boot", "bag")
    assert images.class_names == ("ankle boot", "bag")
    assert images.labels.tolist() == [0, 0, 1]
    assert images.images.shape == (3, 3, 16, 16)
    assert images.files == ("ankle_boot/a.png", "ankle_boot/b.png", "bag/x.jpg")
    grey = images.images[1]
    assert bool((grey[0] == grey[1]).all()), "grey images become RGB"


def test_reads_tar_archives(tmp_path: Path) -> None:
    path = tmp_path / "data.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, value in (("cat/1.png", 1), ("dog/2.png", 2)):
            data = _png(value)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    images = read_image_set(path, 8)
    assert images.class_names == ("cat", "dog")


def test_resizes_shortest_side_then_centre_crops(tmp_path: Path) -> None:
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 255  # only the centre third is white
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    archive = _zip(tmp_path / "d.zip", {"a/1.png": buffer.getvalue(), "b/1.png": _png(0)})
    image = read_image_set(archive, 10, interpolation="nearest").images[0]
    assert int(image.min()) == 255


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({}, "empty"),
        ({"only/1.png": _png(1)}, "at least 2"),
        ({"a/1.png": _png(1), "b/1.png": b"not a png"}, "'b/1.png' is not a readable image"),
        ({"a/1.png": _png(1), "b/notes.txt": b"x"}, "at least 2"),
        ({"../evil/1.png": _png(1), "a/1.png": _png(1)}, "unsafe member path"),
        ({"/abs/1.png": _png(1), "a/1.png": _png(1)}, "unsafe member path"),
        ({"a/1.png": _png(1), "b/1.png": _png(1), "classes.json": b"{"}, "not valid JSON"),
        ({"a/1.png": _png(1), "b/1.png": _png(1), "classes.json": b'{"c": "x"}'}, "hold no images"),
        ({"a/1.png": _png(1), "b/1.png": _png(1), "classes.json": b'{"a": "x\\u0007"}'}, "control"),
    ],
)
def test_bad_archives_get_clear_errors(
    tmp_path: Path, members: dict[str, bytes], message: str
) -> None:
    with pytest.raises(ImageSetError, match=message):
        read_image_set(_zip(tmp_path / "bad.zip", members), 8)


def test_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"\x89PNG nothing")
    with pytest.raises(ImageSetError, match="not a zip or tar"):
        read_image_set(path, 8)


def test_pixel_cap_is_checked_before_decoding(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "big.zip", {"a/1.png": _png(1, (64, 64)), "b/1.png": _png(1)})
    with pytest.raises(ImageSetError, match="over 1000 pixels"):
        read_image_set(archive, 8, limits=ImageSetLimits(max_pixels=1000))


def test_compression_bombs_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a/1.png", b"\0" * 5_000_000)
        archive.writestr("b/1.png", _png(1))
    with pytest.raises(ImageSetError, match="expands"):
        read_image_set(path, 8)


def test_too_few_images_per_class(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "d.zip", {"a/1.png": _png(1), "b/1.png": _png(1), "b/2.png": _png(2)})
    with pytest.raises(ImageSetError, match="class 'a' has 1 image"):
        read_image_set(archive, 8, limits=ImageSetLimits(min_per_class=2))


def test_links_in_tar_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as archive:
        link = tarfile.TarInfo("a/1.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    with pytest.raises(ImageSetError, match="link or device"):
        read_image_set(path, 8)


def test_links_in_zip_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "links.zip"
    with zipfile.ZipFile(path, "w") as archive:
        info = zipfile.ZipInfo("a/1.png")
        info.external_attr = 0o120777 << 16
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(ImageSetError, match="link member"):
        read_image_set(path, 8)


def test_classes_json_naming_every_folder_sets_the_order(tmp_path: Path) -> None:
    mapping = {"zebra": "zebra", "ant": "ant", "moth": "moth"}
    members = {"classes.json": json.dumps(mapping).encode()}
    members |= {f"{folder}/1.png": _png(i) for i, folder in enumerate(sorted(mapping))}
    images = read_image_set(_zip(tmp_path / "d.zip", members), 8)
    assert images.folders == ("zebra", "ant", "moth")
    assert images.files[images.labels.tolist().index(0)] == "zebra/1.png"


def test_duplicate_display_names_are_refused(tmp_path: Path) -> None:
    members = {
        "classes.json": b'{"a": "cat", "b": "cat"}',
        "a/1.png": _png(1),
        "b/1.png": _png(2),
    }
    with pytest.raises(ImageSetError, match="same display name"):
        read_image_set(_zip(tmp_path / "d.zip", members), 8)
