"""CPU stage: probability map → coverage, bbox; full-size PNG, COCO RLE, RGBA cutouts on demand.

Coverage and bbox are those of the full-size mask that `u2net_core.masks.upsample_map` (the
helper readers use) gives, computed without building it (`coverage_and_bbox_from_map`); the
full-size mask itself is built only for PNG, RLE or cutouts.
"""

from __future__ import annotations

import hashlib
import io
import posixpath

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.config import PostprocessConfig
from pipeline.schema import BBOX_TYPE, RowStatus
from u2net_core import masks

__all__ = ["postprocess_batch", "cutout_relpath", "POSTPROCESSED_FIELDS"]

POSTPROCESSED_FIELDS = [
    ("coverage", pa.float32()),
    ("bbox", BBOX_TYPE),
    ("mask_png", pa.binary()),
    ("mask_rle", pa.string()),
]


def cutout_relpath(key: str) -> str:
    """A relative path for a key's cutout that can never leave the cutouts prefix.

    Keys can come from inside foreign shards (`../../etc/x`, `/abs`, `C:\\x`): drop empty,
    `.` and `..` components, and when that changed anything add a hash of the original key,
    so two different keys never share a file.
    """
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    parts = [p.replace(":", "_") for p in parts]
    safe = "/".join(parts) or "key"
    if safe != key:
        safe = f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    return f"{safe}.png"


def _write_cutout(prefix: str, key: str, data: bytes, full: np.ndarray, options: dict) -> None:
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data))
    img.seek(0)
    img = ImageOps.exif_transpose(img)
    rgba = masks.cutout(img, full)
    buf = io.BytesIO()
    rgba.save(buf, format="PNG", compress_level=1)
    rel = cutout_relpath(key)
    assert not posixpath.isabs(rel) and ".." not in rel.split("/")
    storage.write_bytes(storage.join_uri(prefix, rel), buf.getvalue(), options)


def postprocess_batch(batch: pa.Table, cfg: PostprocessConfig) -> pa.Table:
    """Ray Data map function."""
    rows = RowStatus(batch)
    n = batch.num_rows
    cov: list = [None] * n
    box: list = [None] * n
    png: list = [None] * n
    rle: list = [None] * n
    keys = batch.column("key").to_pylist()
    maps = batch.column("prob_map").to_pylist()
    mh = batch.column("map_height").to_pylist()
    mw = batch.column("map_width").to_pylist()
    widths = batch.column("width").to_pylist()
    heights = batch.column("height").to_pylist()
    datas = batch.column("data").to_pylist() if "data" in batch.column_names else [None] * n
    for i in range(n):
        if not rows.ok(i):
            continue
        try:
            small = np.frombuffer(maps[i], np.uint8).reshape(mh[i], mw[i])
            cov[i], box[i] = masks.coverage_and_bbox_from_map(small, widths[i], heights[i])
            if not (cfg.mask_png or cfg.mask_rle or cfg.cutouts):
                continue  # the full-size mask costs ~5 ms per 1080p image: only when asked for
            full = masks.upsample_map(small, widths[i], heights[i])
            if cfg.mask_png:
                png[i] = masks.encode_png(full)
            if cfg.mask_rle:
                rle[i] = masks.rle_encode(full >= masks.THRESHOLD_U8)
            if cfg.cutouts:
                _write_cutout(cfg.cutouts, keys[i], datas[i], full, cfg.storage_options)
        except Exception as exc:
            rows.fail(i, "postprocess", exc)
            cov[i] = box[i] = png[i] = rle[i] = None
    table = rows.write(batch.drop_columns(["data"]) if "data" in batch.column_names else batch)
    for (name, typ), values in zip(POSTPROCESSED_FIELDS, (cov, box, png, rle)):
        table = table.append_column(name, pa.array(values, typ))
    return table
