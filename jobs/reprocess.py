"""Nightly incremental reprocessing: keep Iceberg mask tables up to date with the input.

    python -m jobs.reprocess --input s3://bucket/images/ --warehouse s3://bucket/warehouse \\
        --catalog-uri postgresql+psycopg2://... --model u2net --weights s3://bucket/u2net.pth --prune

Lists the input (no image bytes read), compares fingerprints and the run's model_id with the
tables `<namespace>.masks` and `<namespace>.mask_errors`, and sends only new, changed,
previously failed and stale inputs through the pipeline, committing every `--chunk-size` keys.
A killed run loses at most the chunk in flight; rerunning continues from the last commit.
Exit 0 when the run finished, whatever the number of error rows; 2 with one line on stderr
for job-level problems (bad flags, no inputs, unreachable storage or catalog, unusable weights).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from jobs._common import UserError, add_ray_arguments, init_ray, job_main
from jobs.infer import add_model_arguments, add_source_arguments, pipeline_config

__all__ = ["add_arguments", "run", "main", "catalog_settings"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    g = p.add_argument_group("tables")
    g.add_argument("--warehouse", required=True,
                   help="Iceberg warehouse URI (local folder or s3://bucket/prefix)")
    g.add_argument("--catalog-uri", default=None,
                   help="catalog URI (sqlite:///..., postgresql+psycopg2://..., http(s):// for REST). "
                        "Default for a local warehouse: sqlite:///<warehouse>/catalog.db; required "
                        "for a remote warehouse unless --catalog-property type=... is given")
    g.add_argument("--catalog-property", action="append", default=[], metavar="KEY=VALUE",
                   help="extra pyiceberg catalog property (repeatable), e.g. type=glue, "
                        "credential=..., s3.endpoint=...")
    g.add_argument("--catalog-name", default="u2net", help="catalog name (default: u2net)")
    g.add_argument("--namespace", default="u2net",
                   help="namespace of the masks and mask_errors tables (default: u2net)")
    add_model_arguments(p)
    p.add_argument("--mask-png", action="store_true", help="also store a full-size 8-bit PNG per row")
    p.add_argument("--mask-rle", action="store_true", help="also store COCO RLE of the thresholded mask")
    r = p.add_argument_group("run")
    r.add_argument("--chunk-size", type=int, default=10_000,
                   help="keys per commit (shards and Parquet files: units worth about that many "
                        "keys; a unit is never split). A crash loses at most one chunk")
    r.add_argument("--prune", action="store_true",
                   help="delete rows whose input no longer exists (files: key not listed; shards "
                        "and Parquet files: the unit is gone)")
    r.add_argument("--full", action="store_true",
                   help="ignore fingerprints and model_id: reprocess every listed input")
    r.add_argument("--summary", default=None, metavar="PATH",
                   help="also write the run summary as JSON here (local path or URI)")
    r.add_argument("--rows-per-file", type=int, default=2000, help="target rows per data file")
    add_ray_arguments(p)


def parse_properties(items: list[str]) -> dict[str, str]:
    props = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--catalog-property expects KEY=VALUE, got {item!r}")
        props[key.strip()] = value
    return props


def catalog_settings(args: argparse.Namespace):
    from pipeline.iceberg import CatalogError, CatalogSettings

    for flag, value in (("--namespace", args.namespace), ("--catalog-name", args.catalog_name)):
        if not _NAME.match(value):
            raise UserError(f"{flag} must be a plain identifier (letters, digits, _), got {value!r}")
    settings = CatalogSettings(warehouse=args.warehouse, uri=args.catalog_uri, name=args.catalog_name,
                               namespace=args.namespace,
                               properties=parse_properties(args.catalog_property))
    try:
        settings.catalog_properties()  # configuration errors surface before Ray starts
    except CatalogError as exc:
        raise UserError(str(exc)) from None
    return settings


def run(args: argparse.Namespace) -> int:
    from jobs.infer import _check_weights_exist

    if args.chunk_size < 1 or args.rows_per_file < 1:
        raise UserError("--chunk-size and --rows-per-file must be >= 1")
    cfg = pipeline_config(args)
    settings = catalog_settings(args)
    _check_weights_exist(cfg.model.weights)
    from pipeline import storage
    from pipeline.iceberg import CatalogError
    from pipeline.incremental import run_reprocess
    from u2net_core.checkpoint import WeightsMismatchError

    local = None if (args.address or os.environ.get("RAY_ADDRESS")) else os.cpu_count()
    try:
        summary = run_reprocess(cfg, settings, chunk_size=args.chunk_size, full=args.full,
                                prune=args.prune, rows_per_file=args.rows_per_file,
                                local_cores=local,
                                # Ray starts only when there is work (a quiet night needs none).
                                start_ray=lambda: init_ray(args.address, args.num_cpus))
    except (CatalogError, WeightsMismatchError) as exc:
        raise UserError(str(exc)) from None
    text = json.dumps(summary, indent=2, sort_keys=True, default=str)
    if args.summary:
        storage.write_bytes(args.summary, text.encode())
    print(text)
    return 0


def main(argv=None) -> int:
    return job_main(add_arguments, run, "python -m jobs.reprocess", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
