"""Pack loose images (a prefix, or a manifest of URIs) into WebDataset or Parquet shards.

    python -m jobs.pack --input s3://bucket/images/ --output s3://bucket/packed/ --shard-size 1000
    python -m jobs.pack --source manifest --input s3://bucket/manifest.parquet \\
        --uri-column url --key-column id --output s3://bucket/packed/ --format parquet

Writes <output>/shard-NNNNNN.tar (or .parquet), <output>/_index.parquet (one row per input:
its shard and position, or why it was not packed) and <output>/_pack.json last. Rerunning
into the same output skips shards that are verified complete and repacks the rest. Then
`python -m jobs.infer --input <output>` keys every mask by the original relative path.
Exit 0 when the run finished, whatever the number of unreadable inputs; 2 with one line on
stderr for job-level problems.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs._common import UserError, add_ray_arguments, init_ray, job_main

__all__ = ["add_arguments", "run", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True,
                   help="a folder/prefix of images (local, s3://, any fsspec), or a manifest "
                        "(.parquet/.csv file, or a prefix of them with --source manifest)")
    p.add_argument("--source", default="auto", choices=["auto", "files", "manifest"],
                   help="input kind (default: manifest when --input is a .parquet/.csv file, "
                        "else loose files)")
    p.add_argument("--uri-column", default="uri", help="manifest URI column (default: uri)")
    p.add_argument("--key-column", default="key",
                   help="manifest key column (default: key; without it, a row's key is the "
                        "URI's path without scheme and bucket)")
    p.add_argument("--output", required=True, help="output URI for the shards and the index")
    p.add_argument("--format", default="webdataset", choices=["webdataset", "parquet"],
                   help="WebDataset .tar shards (default) or Parquet shards of image bytes")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="images per shard (default 1000; a shard is held in a task's memory "
                        "twice, so shard size × mean image size × 2 must fit)")
    p.add_argument("--verify", default="sha256", choices=["sha256", "size"],
                   help="how a rerun checks a shard it would skip: re-hash it (default) or only "
                        "compare its size with the done marker")
    p.add_argument("--cpus-per-task", type=float, default=0.5,
                   help="logical CPUs reserved per shard task (default 0.5: mostly I/O)")
    add_ray_arguments(p)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import SourceConfig
    from pipeline.pack import PackConfig, plan_pack_input, run_pack

    if args.shard_size < 1:
        raise UserError("--shard-size must be >= 1")
    if args.cpus_per_task <= 0:
        raise UserError("--cpus-per-task must be > 0")
    source = SourceConfig(uri=args.input, kind=args.source, key_column=args.key_column,
                          uri_column=args.uri_column)
    cfg = PackConfig(output=args.output, format=args.format, shard_size=args.shard_size,
                     verify=args.verify, num_cpus=args.cpus_per_task)
    plan = plan_pack_input(source)  # on the driver, before paying for Ray: bad inputs fail fast
    init_ray(args.address, args.num_cpus)
    summary = run_pack(source, cfg, plan=plan)
    brief = {k: summary[k] for k in ("inputs", "packed", "errors", "shards", "shards_written",
                                     "shards_skipped", "stale_removed", "output")}
    brief["images_per_s"] = summary["timings"]["images_per_s"]
    print(json.dumps(brief, indent=2))
    return 0


def main(argv=None) -> int:
    return job_main(add_arguments, run, "python -m jobs.pack", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
