"""Contact sheet of a finished mask table: input | mask | cutout for a random sample of rows.

Everything comes from storage, never from the run's memory: rows are read back from the
`masks` Parquet table (local or any fsspec/S3 URI), the full-size mask is rebuilt from the
stored map with `u2net_core.masks.full_size_mask` (what every reader gets), and the input is
read again from the row's `source_uri`: a loose file, a member of a WebDataset shard
(`<shard>.tar#<sample key>.<ext>`) or a row of a Parquet file (`<file>.parquet#row=N`). The
bytes are checked against the stored `content_sha256` and decoded by `u2net_core.imageio`
(EXIF orientation, odd modes) exactly as the pipeline decoded them, so the mask lines up.

An input that cannot be read (moved, changed since the run, unreadable) costs only its panels:
its row shows the stored mask and says why the input is missing, and the sheet is still made.
Inputs that moved can be found again with `input_root`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline import shards, storage
from u2net_core import masks
from u2net_core.imageio import decode_image

__all__ = ["write_contact_sheet", "render_contact_sheet", "read_sample_rows", "SheetLayout",
           "SourceRef", "parse_source_uri", "thumbnail_size", "THUMB_HEIGHT", "MARGIN", "CAPTION_HEIGHT",
           "HEADER_HEIGHT", "COLUMNS"]

log = logging.getLogger("u2net_ray")

THUMB_HEIGHT = 160
MARGIN = 8
CAPTION_HEIGHT = 16  # one line of Pillow's default font above each row
HEADER_HEIGHT = 16  # the column titles
COLUMNS = ("input", "mask", "cutout")
MAX_ASPECT = 4.0  # panoramas are shrunk to fit a 4:1 panel rather than widen the whole sheet
CHECKER = 8  # checkerboard square size behind the cutout, in pixels

# Only these columns are read: a sample must not pull mask_png/mask_rle of whole row groups.
_COLUMNS = ["key", "source_uri", "content_sha256", "width", "height", "prob_map",
            "map_height", "map_width", "coverage"]
_SHARD_EXTS = (".tar", ".tar.gz", ".tgz")
_ROW_FRAGMENT = re.compile(r"row=(\d+)")


# ---------------------------------------------------------------------------------------------
# Finding and sampling the table.

def _table_locations(table_uri: str) -> tuple[str, str]:
    """(masks folder, run folder): accepts the run output folder or its `masks/` folder."""
    candidate = storage.join_uri(table_uri, "masks")
    if storage.exists(candidate):
        return candidate, table_uri
    proto, path = storage.split_uri(table_uri)
    if not storage.exists(table_uri):
        raise storage.StorageError(f"mask table {table_uri!r} does not exist")
    return table_uri, storage.to_uri(proto, posixpath.dirname(path.rstrip("/")))


def _run_summary(run_uri: str) -> dict:
    """`_run.json` of the run when there is one (it names the input root and image column)."""
    uri = storage.join_uri(run_uri, "_run.json")
    try:
        return json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, ValueError, OSError):
        return {}


def _parquet_files(masks_uri: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, root = storage.pyarrow_filesystem(masks_uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [root]
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = posixpath.relpath(entry.path, root)
        # Ray's readers and ours skip `_`/`.` names (run summaries, temp files of a write).
        if (entry.type == pafs.FileType.File and rel.endswith(".parquet")
                and not any(part.startswith(("_", ".")) for part in rel.split("/"))):
            found.append(entry.path)
    return sorted(found)


def read_sample_rows(masks_uri: str, rows: int, seed: int = 0) -> list[dict[str, Any]]:
    """A uniform random sample of `rows` rows (all rows when there are fewer), sorted by key.

    Only file footers are read to count rows; then only the row groups that hold a sampled
    row, and only the columns a preview needs.
    """
    import pyarrow.parquet as pq

    fs, _ = storage.pyarrow_filesystem(masks_uri)
    files = _parquet_files(masks_uri)
    handles = [pq.ParquetFile(fs.open_input_file(path)) for path in files]
    counts = [h.metadata.num_rows for h in handles]
    total = sum(counts)
    chosen = sorted(random.Random(seed).sample(range(total), min(rows, total)))
    picked: list[dict[str, Any]] = []
    start = 0
    for handle, count in zip(handles, counts):
        wanted = [i - start for i in chosen if start <= i < start + count]
        start += count
        if not wanted:
            continue
        group_start = 0
        for g in range(handle.metadata.num_row_groups):
            n = handle.metadata.row_group(g).num_rows
            local = [i - group_start for i in wanted if group_start <= i < group_start + n]
            if local:
                columns = [c for c in _COLUMNS if c in handle.schema_arrow.names]
                table = handle.read_row_group(g, columns=columns)
                picked.extend(table.take(local).to_pylist())
            group_start += n
    picked.sort(key=lambda r: r["key"])
    return picked


# ---------------------------------------------------------------------------------------------
# Reading the inputs back.

@dataclass(frozen=True)
class SourceRef:
    kind: str  # "file", "shard" or "parquet"
    uri: str  # the object to open
    member: str | None = None  # shard member, `<sample key>.<ext>`
    row: int | None = None  # Parquet row number

    def with_uri(self, uri: str) -> "SourceRef":
        return SourceRef(self.kind, uri, self.member, self.row)


def parse_source_uri(source_uri: str) -> SourceRef:
    """A `source_uri` as the pipeline writes it → what to open.

    `#` is only a separator after a shard or Parquet object name (a loose file may have `#`
    in its own name), so each `#` is tried from the left.
    """
    for i, ch in enumerate(source_uri):
        if ch != "#":
            continue
        head, fragment = source_uri[:i], source_uri[i + 1:]
        if head.lower().endswith(_SHARD_EXTS) and fragment:
            return SourceRef("shard", head, member=fragment)
        match = _ROW_FRAGMENT.fullmatch(fragment)
        if head.lower().endswith(".parquet") and match:
            return SourceRef("parquet", head, row=int(match.group(1)))
    return SourceRef("file", source_uri)


def _rebase(ref: SourceRef, key: str, input_root: str, recorded_root: str | None) -> SourceRef:
    """Point a source at `input_root` instead of where the run read it.

    With the run's recorded input (`_run.json`), the part below it is kept. Without it, a
    loose file is found at `<input_root>/<key>` (a loose file's key is its path relative to
    the input root); shard and Parquet sources need the recorded root.
    """
    proto, path = storage.split_uri(ref.uri)
    if recorded_root:
        _, old = storage.split_uri(recorded_root)
        old = old.rstrip("/")
        if path == old:  # the run's input was this one file or shard
            return ref.with_uri(input_root)
        if path.startswith(old + "/"):
            return ref.with_uri(storage.join_uri(input_root, path[len(old) + 1:]))
    if ref.kind == "file":
        return ref.with_uri(storage.join_uri(input_root, key))
    raise LookupError(f"cannot place {ref.uri} under {input_root}: the run's input root is "
                      "unknown (no _run.json beside the masks folder)")


def _read_parquet_cell(ref: SourceRef, column: str) -> bytes:
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_filesystem(ref.uri)
    handle = pq.ParquetFile(fs.open_input_file(path))
    if column not in handle.schema_arrow.names:
        raise KeyError(f"{ref.uri} has no column {column!r} (pass the run's --image-column)")
    start = 0
    for g in range(handle.metadata.num_row_groups):
        n = handle.metadata.row_group(g).num_rows
        if start <= ref.row < start + n:
            value = handle.read_row_group(g, columns=[column]).column(0)[ref.row - start].as_py()
            if value is None:
                raise ValueError(f"row {ref.row} of {ref.uri} has no image")
            return bytes(value)
        start += n
    raise IndexError(f"{ref.uri} has {start} rows, no row {ref.row}")


def _read_shard_members(uri: str, members: set[str]) -> dict[str, bytes]:
    """Stream a shard once and return the wanted `<sample key>.<ext>` members it holds."""
    wanted = {shards.split_member(m): m for m in members}
    found: dict[str, bytes] = {}
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        for sample_key, sample in shards.iter_samples(f):
            for ext, data in sample.items():
                name = wanted.get((sample_key, ext))
                if name is not None:
                    found[name] = data
            if len(found) == len(wanted):
                break  # no need to read the rest of a large shard
    return found


def _fetch_sources(refs: list[SourceRef | Exception], image_column: str) -> list[bytes | Exception]:
    """Bytes of each input (or the exception that explains why not); each shard read once."""
    members: dict[str, set[str]] = {}
    for ref in refs:
        if isinstance(ref, SourceRef) and ref.kind == "shard":
            members.setdefault(ref.uri, set()).add(ref.member)
    shard_data: dict[str, dict[str, bytes] | Exception] = {}
    for uri, names in members.items():
        try:
            shard_data[uri] = _read_shard_members(uri, names)
        except Exception as exc:  # noqa: BLE001 (any storage/tar failure only costs these rows)
            shard_data[uri] = exc
    out: list[bytes | Exception] = []
    for ref in refs:
        if isinstance(ref, Exception):
            out.append(ref)
            continue
        try:
            if ref.kind == "shard":
                got = shard_data[ref.uri]
                if isinstance(got, Exception):
                    raise got
                if ref.member not in got:
                    raise FileNotFoundError(f"{ref.member} not in {ref.uri}")
                out.append(got[ref.member])
            elif ref.kind == "parquet":
                out.append(_read_parquet_cell(ref, image_column))
            else:
                out.append(storage.read_bytes(ref.uri))
        except Exception as exc:  # noqa: BLE001
            out.append(exc)
    return out


def _decode_checked(data: bytes, row: dict[str, Any]) -> np.ndarray:
    """H×W×3 uint8 input, decoded as the pipeline decoded it; refuses bytes that changed."""
    expected = row.get("content_sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError("the input changed since the run (sha256 differs)")
    decoded = decode_image(data, size=None)
    if (decoded.width, decoded.height) != (row["width"], row["height"]):
        raise ValueError(f"input is {decoded.width}×{decoded.height}, the table says "
                         f"{row['width']}×{row['height']}")
    return decoded.array


# ---------------------------------------------------------------------------------------------
# Drawing.

@dataclass(frozen=True)
class SheetLayout:
    """Geometry of a sheet: `rows` rows of three `cell_width`×`thumb_height` panels."""

    rows: int
    cell_width: int
    thumb_height: int = THUMB_HEIGHT

    @property
    def size(self) -> tuple[int, int]:
        width = MARGIN + len(COLUMNS) * (self.cell_width + MARGIN)
        height = MARGIN + HEADER_HEIGHT + self.rows * (CAPTION_HEIGHT + self.thumb_height + MARGIN)
        return width, height

    def row_top(self, row: int) -> int:
        return MARGIN + HEADER_HEIGHT + row * (CAPTION_HEIGHT + self.thumb_height + MARGIN)

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        x0 = MARGIN + column * (self.cell_width + MARGIN)
        y0 = self.row_top(row) + CAPTION_HEIGHT
        return x0, y0, x0 + self.cell_width, y0 + self.thumb_height


def thumbnail_size(width: int, height: int, thumb_height: int = THUMB_HEIGHT) -> tuple[int, int]:
    """Fixed height, aspect kept; panoramas wider than `MAX_ASPECT`:1 fit that width instead."""
    max_width = int(thumb_height * MAX_ASPECT)
    w = max(1, round(width * thumb_height / height))
    if w <= max_width:
        return w, thumb_height
    return max_width, max(1, round(height * max_width / width))


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    # reducing_gap: a cheap box pre-shrink, then Lanczos; the same recipe for image and mask.
    return img if img.size == size else img.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)


def _checkerboard(size: tuple[int, int]) -> Image.Image:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    light = ((yy // CHECKER + xx // CHECKER) % 2 == 0)
    grey = np.where(light, 255, 204).astype(np.uint8)
    return Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 255)]), "RGBA")


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    ellipsis = "…"
    if not isinstance(font, ImageFont.FreeTypeFont):
        # Pillow without FreeType falls back to a Latin-1 bitmap font, which raises on other
        # characters (keys are user file names in any script).
        text, ellipsis = text.encode("latin-1", "replace").decode("latin-1"), "..."
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + ellipsis, font=font) > max_width:
        text = text[:-1]
    return text + ellipsis


def _caption(row: dict[str, Any], error: str | None) -> str:
    parts = [str(row["key"]), f"{row['width']}x{row['height']}"]  # '×' is not in the default font
    if row.get("coverage") is not None:
        parts.append(f"coverage {row['coverage']:.1%}")
    if error:
        parts.append(f"input unavailable: {error}")
    return "   ".join(parts)


def _placeholder(size: tuple[int, int], text: str, font) -> Image.Image:
    panel = Image.new("RGB", size, (190, 190, 190))
    draw = ImageDraw.Draw(panel)
    draw.text((4, 4), _fit_text(draw, text, font, size[0] - 8), fill=(90, 0, 0), font=font)
    return panel


def render_contact_sheet(rows: list[dict[str, Any]], images: list[np.ndarray | Exception],
                         thumb_height: int = THUMB_HEIGHT) -> Image.Image:
    """The sheet for rows (as read from the table) and their decoded inputs (or errors)."""
    font = ImageFont.load_default()
    sizes = [thumbnail_size(int(r["width"]), int(r["height"]), thumb_height) for r in rows]
    layout = SheetLayout(len(rows), max([w for w, _ in sizes], default=thumb_height), thumb_height)
    sheet = Image.new("RGB", layout.size, (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(COLUMNS):
        x0, _, _, _ = layout.cell_box(0, column)
        draw.text((x0, MARGIN), title, fill=(0, 0, 0), font=font)
    for i, (row, image, size) in enumerate(zip(rows, images, sizes)):
        error = f"{type(image).__name__}: {image}" if isinstance(image, Exception) else None
        text = _fit_text(draw, _caption(row, error), font, layout.size[0] - 2 * MARGIN)
        draw.text((MARGIN, layout.row_top(i) + 2), text,
                  fill=(160, 0, 0) if error else (0, 0, 0), font=font)
        mask_thumb = _resize(Image.fromarray(masks.full_size_mask(row)), size)
        if error:
            input_panel = cutout_panel = _placeholder(size, "input unavailable", font)
        else:
            input_panel = _resize(Image.fromarray(image), size)
            cutout = masks.cutout(input_panel, np.asarray(mask_thumb))
            cutout_panel = _checkerboard(size)
            cutout_panel.alpha_composite(cutout)
            cutout_panel = cutout_panel.convert("RGB")
        for column, panel in enumerate((input_panel, mask_thumb.convert("RGB"), cutout_panel)):
            x0, y0, x1, y1 = layout.cell_box(i, column)
            # Centred in its cell: rows of different aspect ratios share the column width.
            sheet.paste(panel, (x0 + (x1 - x0 - size[0]) // 2, y0 + (y1 - y0 - size[1]) // 2))
    return sheet


def write_contact_sheet(table_uri: str, output_path: str, rows: int = 8, seed: int = 0, *,
                        input_root: str | None = None, image_column: str | None = None,
                        thumb_height: int = THUMB_HEIGHT) -> str:
    """Write a PNG contact sheet (input | mask | cutout) of `rows` sampled rows; return its path.

    `table_uri`: a run output folder (holding `masks/`) or the `masks` folder itself, local
    or a URI. `input_root`: where the inputs are now, when they moved since the run.
    `image_column`: the image column of Parquet inputs (default: the run's, else "image").
    """
    if rows < 1 or thumb_height < 16:
        raise ValueError("rows must be >= 1 and thumb_height >= 16")
    masks_uri, run_uri = _table_locations(table_uri)
    summary = _run_summary(run_uri)
    sample = read_sample_rows(masks_uri, rows, seed)
    if not sample:
        raise storage.StorageError(f"mask table {masks_uri!r} has no rows")
    column = (image_column or summary.get("settings", {}).get("source", {}).get("image_column")
              or "image")
    refs: list[SourceRef | Exception] = []
    for row in sample:
        try:
            ref = parse_source_uri(row["source_uri"] or "")
            if input_root:
                ref = _rebase(ref, row["key"], input_root, summary.get("input"))
            refs.append(ref)
        except LookupError as exc:
            refs.append(exc)
    images: list[np.ndarray | Exception] = []
    for row, data in zip(sample, _fetch_sources(refs, column)):
        if isinstance(data, Exception):
            images.append(data)
            continue
        try:
            images.append(_decode_checked(data, row))
        except Exception as exc:  # noqa: BLE001 (one bad input must not cost the sheet)
            images.append(exc)
    for row, image in zip(sample, images):
        if isinstance(image, Exception):
            log.warning("preview: input of %s unavailable: %s", row["key"], image)
    buf = io.BytesIO()
    render_contact_sheet(sample, images, thumb_height).save(buf, format="PNG", optimize=False)
    storage.write_bytes(output_path, buf.getvalue())
    return output_path
