"""The end-to-end demo on generated data: dataset → training → evaluation → inference → sheet.

    make demo            # or: python -m jobs.demo --output demo_out

1. `jobs.make_dataset` draws a labelled salient-object dataset (no download is possible here);
2. `jobs.train` trains U²-Net† (u2netp) from scratch with Ray Train, 2 CPU workers;
3. `jobs.evaluate` scores the trained weights on the held-out images;
4. `jobs.infer` runs batch inference with those weights on images the model has not seen,
   plus a few broken files, into the `masks` and `mask_errors` tables;
5. `u2net-ray preview` draws a contact sheet (input | mask | cutout) read back from the table.

Everything runs on one local Ray, sized for a 2-core machine. The defaults are a smoke-sized
training run (192 images, 8 epochs at 96 px) so the whole demo stays within minutes on 2 cores:
its masks show the pipeline, not what U²-Net can learn. Larger `--train-count`, `--epochs` and
`--input-size` give better masks (BENCHMARKS.md has a longer learning curve).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jobs._common import add_ray_arguments, init_ray, job_main

__all__ = ["add_arguments", "run", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="demo_out", help="folder for everything the demo writes")
    p.add_argument("--train-count", type=int, default=192, help="generated training images")
    p.add_argument("--val-count", type=int, default=16, help="generated held-out images (evaluation)")
    p.add_argument("--infer-count", type=int, default=12, help="generated unseen images for inference")
    p.add_argument("--epochs", type=int, default=8, help="training epochs")
    p.add_argument("--input-size", type=int, default=96,
                   help="model input size (the paper uses 320; 96 keeps the demo short on CPUs)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--seed", type=int, default=0, help="dataset and training seed")
    add_ray_arguments(p)


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def _add_broken_inputs(folder: Path) -> None:
    """A few inputs that must land in mask_errors, so the demo shows that table too."""
    (folder / "broken_truncated.jpg").write_bytes((folder / next(iter(sorted(
        p.name for p in folder.glob("*.jpg"))))).read_bytes()[:600])
    (folder / "not_an_image.png").write_bytes(b"this is a text file with an image extension\n")
    (folder / "empty.jpg").write_bytes(b"")


def run(args: argparse.Namespace) -> int:
    from jobs import evaluate, infer, make_dataset, train
    from pipeline.preview import write_contact_sheet

    out = Path(args.output).resolve()
    data, unseen = out / "data", out / "unseen"
    crop = args.input_size * 9 // 10  # the paper's 288/320 ratio
    t_start = time.perf_counter()
    timings = {}

    t = _step("1/5 generating a labelled dataset (jobs.make_dataset)")
    make_dataset.write_dataset(data, args.train_count, args.seed, size=args.input_size * 2,
                               val_count=args.val_count)
    make_dataset.write_dataset(unseen, args.infer_count, args.seed + 1000, size=args.input_size * 2)
    _add_broken_inputs(unseen / "images")
    timings["dataset_s"] = time.perf_counter() - t

    init_ray(args.address, args.num_cpus)

    t = _step(f"2/5 training u2netp from scratch, {args.workers} workers (jobs.train)")
    run_dir = out / "runs" / "demo"
    rc = train.main(["--images", str(data / "images"), "--masks", str(data / "masks"),
                     "--val-images", str(data / "val" / "images"),
                     "--val-masks", str(data / "val" / "masks"),
                     "--output", str(out / "runs"), "--name", "demo", "--model", "u2netp",
                     "--workers", str(args.workers), "--epochs", str(args.epochs),
                     "--batch-size", "8", "--input-size", str(args.input_size),
                     "--crop-size", str(crop), "--seed", str(args.seed)])
    if rc != 0:
        return rc
    weights = run_dir / "weights.pth"
    timings["train_s"] = time.perf_counter() - t

    t = _step("3/5 evaluating the trained weights on held-out images (jobs.evaluate)")
    metrics_path = out / "metrics.json"
    rc = evaluate.main(["--images", str(data / "val" / "images"), "--masks", str(data / "val" / "masks"),
                        "--model", "u2netp", "--weights", str(weights),
                        "--input-size", str(args.input_size), "--output", str(metrics_path)])
    if rc != 0:
        return rc
    timings["evaluate_s"] = time.perf_counter() - t

    t = _step("4/5 batch inference on unseen images, broken files included (jobs.infer)")
    tables = out / "masks_run"
    rc = infer.main(["--input", str(unseen / "images"), "--output", str(tables), "--model", "u2netp",
                     "--weights", str(weights), "--input-size", str(args.input_size),
                     "--mask-png", "--overwrite"])
    if rc != 0:
        return rc
    timings["infer_s"] = time.perf_counter() - t

    t = _step("5/5 contact sheet read back from the mask table (u2net-ray preview)")
    sheet = write_contact_sheet(str(tables), str(out / "contact_sheet.png"), rows=8, seed=args.seed)
    timings["preview_s"] = time.perf_counter() - t

    summary = json.loads((tables / "_run.json").read_text())
    metrics = json.loads(metrics_path.read_text())
    print("\n=== demo finished in %.0f s" % (time.perf_counter() - t_start))
    print(f"  masks table        {tables / 'masks'}  ({summary['masks']} rows)")
    print(f"  mask_errors table  {tables / 'mask_errors'}  ({summary['errors']} rows)")
    print(f"  run summary        {tables / '_run.json'}")
    print(f"  trained weights    {weights}")
    print(f"  training curves    {run_dir / 'curves.png'}")
    print(f"  held-out metrics   MAE {metrics['mae']:.3f}, max Fβ {metrics['max_f']:.3f}  ({metrics_path})")
    print(f"  contact sheet      {sheet}")
    print("  timings            " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    query = (f"select key, coverage, bbox from read_parquet('{tables}/masks/*.parquet') "
             "order by coverage desc limit 5")
    print(f"\nRead the tables with DuckDB:\n  {sys.executable} -c "
          f"\"import duckdb; duckdb.sql(\\\"{query}\\\").show()\"")
    return 0


def main(argv=None) -> int:
    return job_main(add_arguments, run, "python -m jobs.demo", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
