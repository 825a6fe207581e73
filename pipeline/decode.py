"""CPU stage: image bytes → S×S uint8 model input, original size, sha256 (DESIGN §2).

Runs as Ray tasks with their own CPU request, never inside the model actor. Ships uint8
(S×S×3 bytes in a binary column), not float: 4× less to move between stages than float32.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from pipeline.config import DecodeConfig
from pipeline.schema import RowStatus
from u2net_core.imageio import decode_image

__all__ = ["decode_batch", "DECODED_FIELDS"]

DECODED_FIELDS = [
    ("content_sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("gray", pa.bool_()),
    ("image", pa.binary()),
]


def decode_batch(batch: pa.Table, cfg: DecodeConfig, keep_bytes: bool = False) -> pa.Table:
    """Ray Data map function. `keep_bytes` keeps the source bytes for cutouts downstream."""
    rows = RowStatus(batch)
    out: dict[str, list] = {name: [] for name, _ in DECODED_FIELDS}
    for i, data in enumerate(batch.column("data").to_pylist()):
        img = None
        digest = None
        if rows.ok(i):
            digest = hashlib.sha256(data or b"").hexdigest()
            try:
                img = decode_image(data or b"", cfg.input_size, max_pixels=cfg.max_pixels,
                                   draft=cfg.draft)
            except Exception as exc:  # hostile bytes are that file's problem, never the batch's
                rows.fail(i, "decode", exc)
        out["content_sha256"].append(digest)
        out["width"].append(img.width if img else None)
        out["height"].append(img.height if img else None)
        out["gray"].append(img.gray if img else None)
        out["image"].append(img.array.tobytes() if img else None)
    table = rows.write(batch if keep_bytes else batch.drop_columns(["data"]))
    for name, typ in DECODED_FIELDS:
        table = table.append_column(name, pa.array(out[name], typ))
    return table
