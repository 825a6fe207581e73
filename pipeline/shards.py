"""WebDataset tar shards: streaming iteration over samples, and writing them.

A WebDataset sample is a run of consecutive tar members sharing a key: the member path up to
the first dot of its basename (`a/b/0001.jpg`, `a/b/0001.json` → key `a/b/0001`, extensions
`jpg`, `json`). Member names come from whoever wrote the shard: they are only ever used as
strings (keys), never as paths to open or write, and only regular files are read (no links,
devices or directories). A sample packed by this project carries its original key in a
`.json` member (`{"key": "photos/cat.jpg", ...}`), so masks join back to the source objects.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from typing import BinaryIO, Iterator

__all__ = ["iter_samples", "split_member", "image_member", "original_key", "TarSampleWriter",
           "IMAGE_EXTS"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


def split_member(name: str) -> tuple[str, str]:
    """`dir/0001.seg.png` → (`dir/0001`, `seg.png`); the extension is lower-cased."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def iter_samples(fileobj: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield `(sample_key, {extension: bytes})` in shard order, streaming (no seeks)."""
    current_key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, ext = split_member(info.name)
            if not ext:
                continue
            if key != current_key:
                if current_key is not None and members:
                    yield current_key, members
                current_key, members = key, {}
            f = tar.extractfile(info)
            members[ext] = f.read() if f is not None else b""
    if current_key is not None and members:
        yield current_key, members


def image_member(members: dict[str, bytes], preferred: str | None = None) -> tuple[str, bytes] | None:
    """The sample's image member: `preferred` if given and present, else the first image ext."""
    if preferred:
        return (preferred, members[preferred]) if preferred in members else None
    for ext in members:
        if ext.rsplit(".", 1)[-1] in IMAGE_EXTS:
            return ext, members[ext]
    return None


def original_key(members: dict[str, bytes]) -> str | None:
    """The original key a sample packed by this project carries in its `.json` member."""
    raw = members.get("json")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    key = meta.get("key") if isinstance(meta, dict) else None
    return key if isinstance(key, str) and key else None


class TarSampleWriter:
    """Write WebDataset samples into a tar held in memory (shards are small enough: the
    caller picks `--shard-size`), then hand the bytes to one atomic object write."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def add(self, sample_key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{sample_key}.{ext}")
            info.size = len(data)
            info.mtime = 0  # deterministic shards: same input, same bytes
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def finish(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()
