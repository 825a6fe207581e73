"""Batch inference: images under a prefix, in shards or in a Parquet table → mask tables.

    python -m jobs.infer --input s3://bucket/images/ --output s3://bucket/masks-run/ \\
        --model u2net --weights s3://bucket/models/u2net.pth

Writes <output>/masks/ and <output>/mask_errors/ (Parquet) and <output>/_run.json last.
Exit 0 when the run finished, whatever the number of error rows; 2 with one line on stderr
for job-level problems (bad flags, no inputs, unreachable storage, unusable weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jobs._common import UserError, add_ray_arguments, init_ray, job_main

__all__ = ["add_arguments", "run", "main", "add_model_arguments", "add_source_arguments",
           "pipeline_config"]


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="input URI: a folder/prefix of images, "
                   "WebDataset .tar shards, or Parquet files of image bytes (local, s3://, any fsspec)")
    p.add_argument("--source", default="auto", choices=["auto", "files", "webdataset", "parquet", "manifest"],
                   help="input kind (default: detected from the listing)")
    p.add_argument("--key-column", default="key", help="Parquet/manifest key column (default: key)")
    p.add_argument("--image-column", default="image", help="Parquet image bytes column (default: image)")
    p.add_argument("--uri-column", default="uri", help="manifest URI column (default: uri)")
    p.add_argument("--image-member", default=None,
                   help="WebDataset image member extension (default: the sample's first image member)")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    from u2net_core.registry import MODELS
    from u2net_core.runtime import PRECISIONS

    p.add_argument("--model", default="u2net", choices=sorted(MODELS), help="model variant")
    p.add_argument("--weights", default=None,
                   help="weights file (local path or URI): an official .pth or one from `u2net-ray train`")
    p.add_argument("--input-size", type=int, default=320, help="model input size S (S×S; default 320)")
    p.add_argument("--normalize", default="none", choices=["none", "minmax"],
                   help="'minmax' stretches each map to 0..1 as the official tool and rembg do "
                        "(also on images with no salient object); default none")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: 8 on CPU, 64 on GPU, at 320 px)")
    p.add_argument("--actors", type=int, default=None,
                   help="model actors (default: one per GPU, or sized from the CPUs)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per model actor (default: 1 when the cluster has GPUs; 0.5 packs two per GPU)")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="CPUs reserved per model actor")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="model precision (default auto: bf16 where the CPU or GPU computes it "
                        "natively, else fp32); int8 quantises on --calibration images (x86 CPUs)")
    p.add_argument("--calibration", default=None, metavar="URI",
                   help="int8: a folder of 8-64 images like the inputs, to calibrate the "
                        "quantisation (its content is part of the model_id)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model in each actor: faster after a one-off compile of "
                        "a minute or more per actor, so for long runs (BENCHMARKS.md)")
    p.add_argument("--max-pixels", type=int, default=178_956_970,
                   help="refuse images above this many pixels (decompression-bomb guard)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    p.add_argument("--output", required=True, help="output URI for masks/, mask_errors/ and _run.json")
    add_model_arguments(p)
    p.add_argument("--mask-png", action="store_true", help="also store a full-size 8-bit PNG per row")
    p.add_argument("--mask-rle", action="store_true", help="also store COCO RLE of the thresholded mask")
    p.add_argument("--cutouts", default=None, metavar="URI", help="write RGBA cutout PNGs under this prefix")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the output first (needed to rerun into it with other weights/settings)")
    p.add_argument("--rows-per-file", type=int, default=2000, help="target rows per Parquet file")
    add_ray_arguments(p)


def pipeline_config(args: argparse.Namespace):
    from pipeline.config import (DecodeConfig, MaskPipelineConfig, ModelConfig,
                                 PostprocessConfig, SourceConfig)

    if not args.weights:
        raise UserError("--weights is required: U²-Net weights cannot be downloaded here. Pass the "
                        "official u2net.pth/u2netp.pth or weights from `u2net-ray train`.")
    if args.input_size < 32 or (args.batch_size is not None and args.batch_size < 1):
        raise UserError("--input-size must be >= 32 and --batch-size >= 1")
    if args.calibration and args.precision != "int8":
        raise UserError("--calibration is for --precision int8 only")
    if args.precision == "int8" and not args.calibration:
        raise UserError("--precision int8 needs --calibration URI: a folder of 8-64 images like "
                        "the inputs (the quantisation scales are measured on them)")
    return MaskPipelineConfig(
        source=SourceConfig(uri=args.input, kind=args.source, key_column=args.key_column,
                            image_column=args.image_column, uri_column=args.uri_column,
                            image_member=args.image_member),
        model=ModelConfig(name=args.model, weights=args.weights, input_size=args.input_size,
                          normalize=args.normalize, batch_size=args.batch_size, actors=args.actors,
                          gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
                          precision=args.precision, calibration=args.calibration,
                          compile=args.compile),
        decode=DecodeConfig(input_size=args.input_size, max_pixels=args.max_pixels),
        post=PostprocessConfig(mask_png=getattr(args, "mask_png", False),
                               mask_rle=getattr(args, "mask_rle", False),
                               cutouts=getattr(args, "cutouts", None)),
    )


def _check_weights_exist(uri: str) -> None:
    from pipeline import storage

    if not storage.exists(uri):
        raise UserError(f"weights file {uri!r} does not exist")


def run(args: argparse.Namespace) -> int:
    cfg = pipeline_config(args)
    _check_weights_exist(cfg.model.weights)
    init_ray(args.address, args.num_cpus)
    from pipeline.batch import OutputConflict, run_batch_inference
    from u2net_core.checkpoint import WeightsMismatchError

    local = None if (args.address or os.environ.get("RAY_ADDRESS")) else os.cpu_count()
    try:
        summary = run_batch_inference(cfg, args.output, overwrite=args.overwrite,
                                      rows_per_file=args.rows_per_file, local_cores=local)
    except (OutputConflict, WeightsMismatchError) as exc:
        raise UserError(str(exc)) from None
    brief = {k: summary[k] for k in ("run_id", "inputs", "masks", "errors", "processed",
                                     "skipped_done", "model_id", "output")}
    brief["images_per_s"] = summary["timings"]["images_per_s"]
    print(json.dumps(brief, indent=2))
    return 0


def main(argv=None) -> int:
    return job_main(add_arguments, run, "python -m jobs.infer", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
