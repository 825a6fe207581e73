"""Contact sheet of a mask table: input | mask | cutout for a random sample of rows, as a PNG.

    u2net-ray preview --table out/ --output sheet.png --rows 8 --seed 0

Rows are read back from the `masks` Parquet table (`--table` is the run's output folder or
its masks/ folder, local or s3://...), each mask rebuilt at full size from the stored map,
each input read again from its `source_uri` (loose file, WebDataset shard member or Parquet
row). Inputs that moved since the run are found with `--input-root`; an input that cannot be
read only greys out its own row. Prints the path of the sheet.
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import UserError, job_main

__all__ = ["add_arguments", "run", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", required=True,
                   help="run output folder (holding masks/) or the masks folder itself (local or URI)")
    p.add_argument("--output", required=True, help="PNG to write (local path or URI)")
    p.add_argument("--rows", type=int, default=8, help="rows to sample (default 8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--input-root", default=None, metavar="URI",
                   help="where the inputs are now, when they moved since the run (the part of "
                        "each source below the run's input root is kept)")
    p.add_argument("--image-column", default=None,
                   help="image bytes column of Parquet inputs (default: the run's, else 'image')")
    p.add_argument("--thumb-height", type=int, default=160, help="panel height in pixels (default 160)")


def run(args: argparse.Namespace) -> int:
    from pipeline.preview import write_contact_sheet

    if args.rows < 1 or args.thumb_height < 16:
        raise UserError("--rows must be >= 1 and --thumb-height >= 16")
    path = write_contact_sheet(args.table, args.output, rows=args.rows, seed=args.seed,
                               input_root=args.input_root, image_column=args.image_column,
                               thumb_height=args.thumb_height)
    print(path)
    return 0


def main(argv=None) -> int:
    return job_main(add_arguments, run, "python -m jobs.preview", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
