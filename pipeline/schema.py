"""The two output tables (DESIGN §3) and the row contract between pipeline stages.

Rows flow one per image through every stage with a fixed set of columns. A row that fails
keeps flowing with `status = "error"` and its `error_stage`, `error_type`, `error_message`;
later stages pass it through untouched and the sink routes it to `mask_errors`. No exception
from one image ever reaches Ray's task retry, so one bad image never costs a batch.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["MASKS_SCHEMA", "ERRORS_SCHEMA", "STATUS_OK", "STATUS_ERROR", "STATUS_SKIP",
           "RowStatus", "BBOX_TYPE", "short_message"]

STATUS_OK, STATUS_ERROR, STATUS_SKIP = "ok", "error", "skip"

BBOX_TYPE = pa.struct([("x0", pa.int32()), ("y0", pa.int32()), ("x1", pa.int32()),
                       ("y1", pa.int32())])
TIMESTAMP = pa.timestamp("us", tz="UTC")

MASKS_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("source_uri", pa.string()),
    pa.field("source_fingerprint", pa.string()),
    pa.field("content_sha256", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("prob_map", pa.binary()),
    pa.field("map_height", pa.int16()),
    pa.field("map_width", pa.int16()),
    pa.field("mask_png", pa.binary()),
    pa.field("mask_rle", pa.string()),
    pa.field("coverage", pa.float32()),
    pa.field("bbox", BBOX_TYPE),
    pa.field("model", pa.string()),
    pa.field("model_id", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("processed_at", TIMESTAMP),
])

ERRORS_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("source_uri", pa.string()),
    pa.field("source_fingerprint", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("model_id", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("processed_at", TIMESTAMP),
])

_MAX_MESSAGE = 500


def short_message(exc: BaseException | str) -> str:
    msg = str(exc) if not isinstance(exc, str) else exc
    msg = " ".join(msg.split()) or type(exc).__name__
    return msg if len(msg) <= _MAX_MESSAGE else msg[: _MAX_MESSAGE - 1] + "…"


class RowStatus:
    """The four status columns of a batch as Python lists, to update per row and write back."""

    COLUMNS = ("status", "error_stage", "error_type", "error_message")

    def __init__(self, table: pa.Table) -> None:
        self.status, self.stage, self.type, self.message = (
            table.column(c).to_pylist() for c in self.COLUMNS)

    def ok(self, i: int) -> bool:
        return self.status[i] == STATUS_OK

    def fail(self, i: int, stage: str, exc: BaseException) -> None:
        self.status[i] = STATUS_ERROR
        self.stage[i] = stage
        self.type[i] = getattr(exc, "kind", None) or type(exc).__name__
        self.message[i] = short_message(exc)

    def write(self, table: pa.Table) -> pa.Table:
        for name, values in zip(self.COLUMNS, (self.status, self.stage, self.type, self.message)):
            table = table.set_column(table.schema.get_field_index(name), name,
                                     pa.array(values, pa.string()))
        return table
