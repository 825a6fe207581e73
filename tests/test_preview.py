"""Contact sheets are drawn from what is stored: the masks table and the inputs' source URIs."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.preview import (CAPTION_HEIGHT, HEADER_HEIGHT, MARGIN, parse_source_uri,
                              read_sample_rows, write_contact_sheet)
from pipeline.schema import MASKS_SCHEMA
from u2net_core.masks import full_size_mask

THUMB = 160


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _halves(height: int, width: int, left, right) -> np.ndarray:
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = left
    arr[:, width // 2:] = right
    return arr


def _rotated_jpeg() -> bytes:
    """Stored 200×100, left red / right blue, EXIF orientation 6: shown 100×200, red on top."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(_halves(100, 200, (255, 0, 0), (0, 0, 255))).save(
        buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _left_half_map(h: int = 32, w: int = 32) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[:, : w // 2] = 255
    return m


def _row(key: str, source_uri: str, data: bytes, width: int, height: int, prob_map: np.ndarray) -> dict:
    return {"key": key, "source_uri": source_uri, "source_fingerprint": "f",
            "content_sha256": hashlib.sha256(data).hexdigest(), "width": width, "height": height,
            "prob_map": prob_map.tobytes(), "map_height": prob_map.shape[0],
            "map_width": prob_map.shape[1], "mask_png": None, "mask_rle": None, "coverage": 0.5,
            "bbox": None, "model": "u2netp", "model_id": "m", "run_id": "r",
            "processed_at": datetime.now(timezone.utc)}


def _write_masks(folder: Path, rows: list[dict], files: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        part = rows[i::files]
        pq.write_table(pa.Table.from_pylist(part, schema=MASKS_SCHEMA),
                       folder / f"part-{i}.parquet", row_group_size=1)


def _inputs(root: Path, uri=lambda p: str(p)) -> list[dict]:
    """Four rows, one per source kind plus one whose input is gone. `uri` maps a local path to
    the URI the rows should name (for S3 the same layout is uploaded by the caller)."""
    root.mkdir(parents=True, exist_ok=True)
    wide = _png(_halves(160, 320, (0, 200, 0), (200, 200, 0)))  # 320×160: thumbnail = full size
    (root / "loose").mkdir()
    (root / "loose" / "wide.png").write_bytes(wide)

    jpeg = _rotated_jpeg()
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        for name, data in [("s/0001.json", b"{}"), ("s/0002.jpg", jpeg), ("s/0002.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    gray = _png(np.full((120, 90, 3), 128, np.uint8))
    pq.write_table(pa.table({"key": ["p0", "p1"], "image": [b"not used", gray]}),
                   root / "images.parquet")
    return [
        _row("loose/wide.png", uri(root / "loose" / "wide.png"), wide, 320, 160, _left_half_map()),
        _row("shard/s/0002", uri(root / "shard-000.tar") + "#s/0002.jpg", jpeg, 100, 200, _left_half_map(20, 10)),
        _row("p1", uri(root / "images.parquet") + "#row=1", gray, 90, 120, _left_half_map()),
        # A key in another script: captions must not trip over the font.
        _row("zz/猫 gone.png", uri(root / "loose" / "猫 gone.png"), b"gone", 64, 64, _left_half_map()),
    ]


def _cell(sheet: np.ndarray, row: int, column: int, cell_width: int, size: tuple[int, int]) -> np.ndarray:
    """The pixels of one panel, located from the documented layout (panels centred in cells)."""
    w, h = size
    x0 = MARGIN + column * (cell_width + MARGIN) + (cell_width - w) // 2
    y0 = MARGIN + HEADER_HEIGHT + row * (CAPTION_HEIGHT + THUMB + MARGIN) + CAPTION_HEIGHT + (THUMB - h) // 2
    return sheet[y0:y0 + h, x0:x0 + w]


def test_parse_source_uri_kinds():
    assert parse_source_uri("/d/a#b.png").kind == "file"  # '#' in a loose file's own name
    ref = parse_source_uri("s3://b/x/shard.tar#k/0001.jpg")
    assert (ref.kind, ref.uri, ref.member) == ("shard", "s3://b/x/shard.tar", "k/0001.jpg")
    ref = parse_source_uri("/d/t.parquet#row=12")
    assert (ref.kind, ref.uri, ref.row) == ("parquet", "/d/t.parquet", 12)


def test_sampling_reads_back_rows_deterministically(tmp_path):
    rows = _inputs(tmp_path / "in")
    _write_masks(tmp_path / "masks", rows, files=2)  # two files, one row group per row
    a = read_sample_rows(str(tmp_path / "masks"), 2, seed=3)
    assert [r["key"] for r in a] == [r["key"] for r in read_sample_rows(str(tmp_path / "masks"), 2, seed=3)]
    assert len({r["key"] for r in a}) == 2
    everything = read_sample_rows(str(tmp_path / "masks"), 10, seed=0)
    assert [r["key"] for r in everything] == sorted(r["key"] for r in rows)
    assert everything[0]["prob_map"] == rows[0]["prob_map"]


def test_cli_sheet_from_masks_folder(tmp_path, capsys):
    from jobs import cli

    rows = _inputs(tmp_path / "in")
    _write_masks(tmp_path / "out" / "masks", rows, files=2)
    out = tmp_path / "sheets" / "sheet.png"
    assert cli.main(["preview", "--table", str(tmp_path / "out" / "masks"), "--output", str(out),
                     "--rows", "8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(out)

    sheet = np.asarray(Image.open(out).convert("RGB"))
    cell_width = 320  # the widest thumbnail: 320×160 at height 160
    assert sheet.shape[:2] == (MARGIN + HEADER_HEIGHT + 4 * (CAPTION_HEIGHT + THUMB + MARGIN),
                               MARGIN + 3 * (cell_width + MARGIN))
    keys = sorted(r["key"] for r in rows)
    by_key = {r["key"]: r for r in rows}

    # The mask column is the stored map, rebuilt at full size (320×160 = the thumbnail size).
    i = keys.index("loose/wide.png")
    mask = _cell(sheet, i, 1, cell_width, (320, 160))
    expected = full_size_mask(by_key["loose/wide.png"])
    assert np.abs(mask[..., 0].astype(int) - expected.astype(int)).max() <= 1
    assert mask[:, :100].min() >= 250 and mask[:, 220:].max() <= 5
    # Input as stored; the cutout keeps the masked (left) half over a grey/white checkerboard.
    assert np.abs(_cell(sheet, i, 0, cell_width, (320, 160))[80, 40].astype(int) - (0, 200, 0)).max() <= 2
    cut = _cell(sheet, i, 2, cell_width, (320, 160))
    assert np.abs(cut[80, 40].astype(int) - (0, 200, 0)).max() <= 2
    assert set(map(tuple, cut[:, 240:].reshape(-1, 3))) <= {(255, 255, 255), (204, 204, 204)}

    # Shard member with EXIF orientation 6: shown upright (100×200 → 80×160), red on top.
    j = keys.index("shard/s/0002")
    upright = _cell(sheet, j, 0, cell_width, (80, 160)).astype(int)
    assert np.abs(upright[20, 40] - (255, 0, 0)).max() < 30
    assert np.abs(upright[140, 40] - (0, 0, 255)).max() < 30

    # Parquet row 1 (not row 0, whose bytes are not an image).
    k = keys.index("p1")
    assert np.abs(_cell(sheet, k, 0, cell_width, (120, 160)).astype(int) - 128).max() <= 2

    # A missing input greys out its input and cutout panels; its mask is still drawn.
    g = keys.index("zz/猫 gone.png")
    assert (_cell(sheet, g, 0, cell_width, (160, 160))[100:, 40] == (190, 190, 190)).all()
    gone_mask = _cell(sheet, g, 1, cell_width, (160, 160))
    assert gone_mask[80, 20, 0] >= 250 and gone_mask[80, 140, 0] <= 5


def test_run_folder_and_moved_inputs(tmp_path):
    rows = _inputs(tmp_path / "in")
    run = tmp_path / "run"
    _write_masks(run / "masks", rows)
    (run / "_run.json").write_text(json.dumps({"input": str(tmp_path / "in"),
                                               "settings": {"source": {"image_column": "image"}}}))
    shutil.move(tmp_path / "in", tmp_path / "moved")
    before = write_contact_sheet(str(run), str(tmp_path / "a.png"), rows=4)
    after = write_contact_sheet(str(run), str(tmp_path / "b.png"), rows=4,
                                input_root=str(tmp_path / "moved"))
    grey = np.array([190, 190, 190])
    a = np.asarray(Image.open(before).convert("RGB"))
    b = np.asarray(Image.open(after).convert("RGB"))
    # Row 0 is loose/wide.png: unreadable before, found under --input-root after.
    assert (_cell(a, 0, 0, 320, (320, 160))[100] == grey).all()
    assert np.abs(_cell(b, 0, 0, 320, (320, 160))[80, 40].astype(int) - (0, 200, 0)).max() <= 2
    # The shard and Parquet rows are rebased too (their path below the recorded input root).
    assert not (_cell(b, 1, 0, 320, (120, 160))[100:, 40] == grey).all()
    assert not (_cell(b, 2, 0, 320, (80, 160))[100:, 40] == grey).all()


def test_changed_input_is_not_shown_under_a_stale_mask(tmp_path):
    rows = _inputs(tmp_path / "in")
    (tmp_path / "in" / "loose" / "wide.png").write_bytes(_png(np.zeros((160, 320, 3), np.uint8)))
    _write_masks(tmp_path / "masks", rows[:1])
    sheet = np.asarray(Image.open(write_contact_sheet(str(tmp_path / "masks"), str(tmp_path / "s.png"))))
    assert (_cell(sheet[..., :3], 0, 0, 320, (320, 160))[100] == (190, 190, 190)).all()


def test_cli_errors_are_one_line(tmp_path, capsys):
    from jobs import preview

    assert preview.main(["--table", str(tmp_path / "nothing"), "--output", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    _write_masks(tmp_path / "empty" / "masks", [])
    assert preview.main(["--table", str(tmp_path / "empty"), "--output", str(tmp_path / "x.png")]) == 2
    assert "has no rows" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_s3_table_inputs_and_output(s3_bucket, tmp_path):
    import boto3

    from pipeline.storage import read_bytes

    local = tmp_path / "in"
    rows = _inputs(local, uri=lambda p: f"s3://{s3_bucket}/in/{p.relative_to(local).as_posix()}")
    _write_masks(tmp_path / "out" / "masks", rows)
    s3 = boto3.client("s3")
    for path in [*local.rglob("*"), *(tmp_path / "out").rglob("*")]:
        if path.is_file():
            s3.upload_file(str(path), s3_bucket, path.relative_to(tmp_path).as_posix())
    uri = f"s3://{s3_bucket}/sheets/sheet.png"
    assert write_contact_sheet(f"s3://{s3_bucket}/out", uri, rows=2, seed=1) == uri
    sheet = Image.open(io.BytesIO(read_bytes(uri)))
    assert sheet.size[1] == MARGIN + HEADER_HEIGHT + 2 * (CAPTION_HEIGHT + THUMB + MARGIN)
