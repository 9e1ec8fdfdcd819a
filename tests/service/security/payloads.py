"""Hostile files, built in memory: pickles that run code, lying headers, unsafe archives, bombs.

Every payload that could execute code does so by creating a canary file, so a case can prove
that nothing ran by finding the canary absent. Builders are plain functions of their inputs and
fast enough to call per case (the largest, a 200,000-member zip, is written by hand with
``struct`` because ``zipfile`` would take seconds).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import shlex
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save as save_safetensors
from torch import nn

# Pickles ----------------------------------------------------------------------------------------


class SystemCall:
    """Unpickling calls ``os.system("touch <canary>")``: the classic ``__reduce__`` payload."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.canary))}",)


class ExecCall:
    """Unpickling calls ``builtins.exec`` on source that opens the canary for writing."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return builtins.exec, (f"open({str(self.canary)!r}, 'w').close()",)


class TrapModule(nn.Module):
    """A module whose unpickling writes the canary: only a full (unsafe) unpickle gets there.

    Loading it needs this class by reference, which is what ``weights_only`` refuses.
    """

    def __init__(self, canary: Path) -> None:
        super().__init__()
        self.canary = str(canary)
        self.linear = nn.Linear(2, 2)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        Path(state["canary"]).touch()


def payload(kind: str, canary: Path) -> SystemCall | ExecCall:
    """``os.system`` or ``builtins.exec``, aimed at ``canary``."""
    kinds: dict[str, type[SystemCall | ExecCall]] = {
        "os.system": SystemCall,
        "builtins.exec": ExecCall,
    }
    return kinds[kind](canary)


def raw_pickle(obj: object, protocol: int) -> bytes:
    """A bare pickle stream: ``\\x80`` and the protocol byte, which is all the API can sniff."""
    return pickle.dumps(obj, protocol=protocol)


def torch_saved(obj: object) -> bytes:
    """``torch.save``'s zip format: it passes the API as a state-dict file (``data.pkl``)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def torchscript() -> bytes:
    """A real TorchScript archive: code the loader would run, which is why it is refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, not gone
        scripted = torch.jit.script(nn.Linear(2, 2))
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()


# Safetensors ------------------------------------------------------------------------------------


def safetensors_file(tensors: dict[str, np.ndarray] | None = None) -> bytes:
    """A valid safetensors file; the default is a few small float tensors."""
    return save_safetensors(tensors or {"a": np.ones((4, 4), np.float32), "b": np.zeros(8, "f4")})


def safetensors_raw(header: dict[str, Any], data: bytes) -> bytes:
    """A safetensors file from a header written by hand, so that it can lie."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def truncated_safetensors() -> bytes:
    """A valid file cut short: the last tensor's bytes are missing."""
    whole = safetensors_file()
    return whole[:-16]


def overlapping_safetensors() -> bytes:
    """Two tensors claiming the same bytes: readers would alias them."""
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    return safetensors_raw({"a": entry, "b": dict(entry)}, bytes(32))


def hiding_safetensors() -> bytes:
    """Tensors cover 16 bytes of 1,024: the rest is hidden cargo no reader looks at."""
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    return safetensors_raw({"a": entry}, bytes(1024))


def holey_safetensors() -> bytes:
    """The second tensor starts past the end of the first, leaving a hole between them."""
    first = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    second = {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]}
    return safetensors_raw({"a": first, "b": second}, bytes(48))


def huge_header_length() -> bytes:
    """The length field claims an 8 EiB header in a 64-byte file."""
    return struct.pack("<Q", 2**63) + b'{"a":1}' + bytes(49)


# Images -----------------------------------------------------------------------------------------


def png(size: tuple[int, int] = (8, 8), mode: str = "RGB", fill: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, fill if mode in ("L", "P", "I;16") else (fill, 30, 200)).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header declares ``width x height`` pixels over a few bytes of data.

    Decoding it would need tens of gigabytes; the IHDR is valid (CRC included), so only a
    reader that checks the declared size before decoding refuses it cheaply.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def truncated_jpeg() -> bytes:
    """A JPEG cut in the middle of its entropy-coded data: the header still reads fine."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)  # noise compresses badly
    buffer = io.BytesIO()
    Image.fromarray(noise, "RGB").save(buffer, "JPEG", quality=95)
    whole = buffer.getvalue()
    return whole[: len(whole) // 2]


def convert_image(data: bytes, mode: str) -> tuple[str, bytes]:
    """Re-encodes an image in ``mode``: CMYK as JPEG, 16-bit grey and palette as PNG."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    buffer = io.BytesIO()
    if mode == "CMYK":
        rgb.convert("CMYK").save(buffer, "JPEG", quality=95)
        return ".jpg", buffer.getvalue()
    if mode == "I;16":
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        Image.fromarray(grey).save(buffer, "PNG")  # uint16 reads as mode I;16
        return ".png", buffer.getvalue()
    if mode == "P":
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(buffer, "PNG")
        return ".png", buffer.getvalue()
    raise ValueError(f"no conversion to {mode}")


def image_mode(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        return str(image.mode)


# Archives ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One archive member as written: a file by default, or a folder, link, device or fifo."""

    name: str
    data: bytes = b""
    kind: str = "file"  # file | dir | symlink | hardlink | chr | blk | fifo
    target: str = ""  # what a link points at


def zip_archive(entries: Iterable[Entry], *, deflate: bool = False) -> bytes:
    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(buffer, "w", method) as archive, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)  # on purpose, if so
        for entry in entries:
            info = zipfile.ZipInfo(entry.name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = method
            if entry.kind == "symlink":
                info.external_attr = (0o120777 << 16) | 0x20  # how Info-ZIP stores a link
                archive.writestr(info, entry.target)
            elif entry.kind == "dir":
                info.external_attr = (0o40755 << 16) | 0x10
                archive.writestr(info, b"")
            else:
                archive.writestr(info, entry.data)
    return buffer.getvalue()


_TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_archive(entries: Iterable[Entry], *, compression: str = "") -> bytes:
    buffer = io.BytesIO()
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = _TAR_TYPES[entry.kind]
            info.mode = 0o755 if entry.kind == "dir" else 0o644
            info.linkname = entry.target
            if entry.kind in ("chr", "blk"):
                info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
            if entry.kind == "file":
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def class_images(classes: Sequence[str] = ("cat", "dog"), per_class: int = 3) -> list[Entry]:
    """A valid ``<class>/<image>`` layout for a hostile member to hide in."""
    return [
        Entry(f"{folder}/{index}.png", png(fill=40 * index + 10))
        for folder in classes
        for index in range(per_class)
    ]


def hub_entries(config: dict[str, Any] | None = None) -> list[Entry]:
    """A valid open_clip hub layout: config and a weights file (which the API does not load)."""
    return [
        Entry("open_clip_config.json", json.dumps(config or TINY_HUB_CONFIG).encode()),
        Entry("open_clip_model.safetensors", safetensors_file()),
    ]


TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
"""An open_clip model that builds in milliseconds: jobs that must fail at load stay cheap."""

TINY_HUB_CONFIG: dict[str, Any] = {"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": {"size": 16}}


@cache
def zip_bomb(megabytes: int = 50) -> bytes:
    """One member of ``megabytes`` MB of zeros, deflated about a thousandfold."""
    zeros = bytes(megabytes * 1024 * 1024)
    return zip_archive([*class_images(), Entry("cat/bomb.png", zeros)], deflate=True)


@cache
def many_members_zip(count: int = 200_000, *, declare: int | None = None) -> bytes:
    """``count`` empty stored members, written by hand (zip64 end records included).

    ``zipfile`` needs several seconds for this; packing the headers directly takes a fraction
    of one, which keeps the case about the server's time, not the test's. With ``declare``, the
    end record lies about the count (and has no zip64 records): readers that trust the count
    and readers that walk the directory then disagree.
    """
    local_parts: list[bytes] = []
    central_parts: list[bytes] = []
    offset = 0
    dos_date = (2024 - 1980) << 9 | 1 << 5 | 1
    local_header = struct.Struct("<IHHHHHIIIHH")
    central_header = struct.Struct("<IHHHHHHIIIHHHHHII")
    for index in range(count):
        name = f"c{index % 2}/{index}.png".encode()
        local = local_header.pack(0x04034B50, 20, 0, 0, 0, dos_date, 0, 0, 0, len(name), 0) + name
        central_parts.append(
            central_header.pack(
                0x02014B50, 20, 20, 0, 0, 0, dos_date, 0, 0, 0, len(name), 0, 0, 0, 0, 0, offset
            )
            + name
        )
        local_parts.append(local)
        offset += len(local)
    central = b"".join(central_parts)
    if declare is not None:
        end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, declare, declare, len(central), offset, 0)
        return b"".join(local_parts) + central + end
    zip64_end = struct.pack(
        "<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(central), offset
    )
    locator = struct.pack("<IIQI", 0x07064B50, 0, offset + len(central), 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return b"".join(local_parts) + central + zip64_end + locator + end


@cache
def many_members_tar_gz(count: int = 300_000) -> bytes:
    """``count`` empty members in a gzipped tar, headers packed by hand and compressed as
    they are made (``tarfile`` would need seconds, and the raw tar is 150 MB).

    A tar has no directory: a reader reaches the last member only by reading every header.
    """
    template = bytearray(tarfile.TarInfo("x").tobuf(tarfile.USTAR_FORMAT))
    template[0:100] = bytes(100)
    template[148:156] = b" " * 8  # the checksum is summed with its own field as spaces
    before, after, base = bytes(template[100:148]), bytes(template[156:]), sum(template)
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    chunks: list[bytes] = []
    batch: list[bytes] = []
    for index in range(count):
        name = f"c{index % 2}/{index:07d}.png".encode()
        checksum = f"{base + sum(name):06o}".encode() + b"\0 "
        batch.append(name.ljust(100, b"\0") + before + checksum + after)
        if len(batch) == 10_000:
            chunks.append(packer.compress(b"".join(batch)))
            batch.clear()
    chunks.append(packer.compress(b"".join(batch) + bytes(1024)))  # two zero blocks: the end
    chunks.append(packer.flush())
    return b"".join(chunks)


def many_classes_zip(classes: int = 10_000, per_class: int = 2) -> bytes:
    """``classes`` folders of 1x1 PNGs: a real archive, just far too many classes."""
    pixel = png((1, 1))
    return zip_archive(
        Entry(f"class{index:05d}/{shot}.png", pixel)
        for index in range(classes)
        for shot in range(per_class)
    )
