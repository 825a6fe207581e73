"""Export U²-Net weights to ONNX, in the official export's layout (rembg's u2net_custom loads it).

    u2net-ray export --model u2netp --weights u2netp.pth --onnx u2netp.onnx
    rembg i -m u2net_custom -x '{"model_path": "u2netp.onnx"}' in.jpg out.png

The graph outputs the seven sigmoid maps, fused first; batch, height and width are dynamic
(`--static-hw` fixes H = W = --input-size). After export the file is run once with ONNX
Runtime against PyTorch (batches of 1 and 2; a non-square size when H and W are dynamic) and
the job fails when they differ by more than 1e-4. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from jobs._common import UserError, job_main

__all__ = ["add_arguments", "run", "main", "VERIFY_TOLERANCE"]

VERIFY_TOLERANCE = 1e-4  # fp32 ONNX Runtime vs PyTorch on CPU agree to ~1e-6 on these maps


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="u2net", choices=["u2net", "u2netp"], help="model variant")
    p.add_argument("--weights", required=True,
                   help="weights file (local path or URI): an official .pth or one from `u2net-ray train`")
    p.add_argument("--onnx", required=True, help="output .onnx path (local path or URI)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default 17 with the torchscript exporter, 18 with dynamo)")
    p.add_argument("--input-size", type=int, default=320,
                   help="traced input size S (S×S); the fixed size with --static-hw (default 320)")
    p.add_argument("--static-hw", action="store_true",
                   help="fix height and width at --input-size (the batch axis stays dynamic)")
    p.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"],
                   help="PyTorch ONNX exporter; dynamo needs the onnxscript package (default torchscript)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the ONNX Runtime vs PyTorch check after export")


def _verify_shapes(size: int, static_hw: bool) -> list[tuple[int, int, int, int]]:
    shapes = [(1, 3, size, size), (2, 3, size, size)]
    if not static_hw:
        # Not a multiple of 32 and not square: exercises ceil-mode pooling and H ≠ W.
        shapes.append((1, 3, size * 3 // 4 + 7, size + 13))
    return shapes


def run(args: argparse.Namespace) -> int:
    from pipeline import storage
    from u2net_core import WeightsMismatchError, build_model, load_weights
    from u2net_core.onnx_export import (DEFAULT_OPSET, INPUT_NAME, export_onnx,
                                        max_abs_diff_vs_torch)

    if args.input_size < 32:
        raise UserError("--input-size must be >= 32")
    if not storage.exists(args.weights):
        raise UserError(f"weights file {args.weights!r} does not exist")
    try:
        model = load_weights(build_model(args.model), args.weights).eval()
    except WeightsMismatchError as exc:
        raise UserError(str(exc)) from None

    # Export and verify in a scratch folder; only a verified file reaches the destination.
    with tempfile.TemporaryDirectory(prefix="u2net-export-") as tmp:
        local = os.path.join(tmp, "model.onnx")
        try:
            export_onnx(model, local, input_size=args.input_size, opset=args.opset,
                        dynamic_hw=not args.static_hw, exporter=args.exporter,
                        metadata={"model": args.model})
        except ImportError as exc:
            raise UserError(str(exc)) from None
        summary = {
            "onnx": args.onnx,
            "model": args.model,
            "exporter": args.exporter,
            "opset": args.opset or DEFAULT_OPSET[args.exporter],
            "bytes": os.path.getsize(local),
            "input": f"{INPUT_NAME}: " + ("Nx3xHxW" if not args.static_hw
                                          else f"Nx3x{args.input_size}x{args.input_size}")
                     + " float32, normalised",
            "outputs": "d0 (fused), d1..d6: Nx1xHxW sigmoid probabilities",
        }
        if not args.no_verify:
            shapes = _verify_shapes(args.input_size, args.static_hw)
            try:
                diff = max_abs_diff_vs_torch(local, model, shapes)
            except ImportError as exc:
                summary["verified"] = f"skipped: {exc}"
            else:
                summary["verified"] = {"shapes": ["x".join(map(str, s)) for s in shapes],
                                       "max_abs_diff": diff}
                if not diff <= VERIFY_TOLERANCE:  # also catches NaN
                    print(json.dumps(summary, indent=2))
                    print(f"error: ONNX Runtime and PyTorch differ by {diff:.3g} "
                          f"(> {VERIFY_TOLERANCE}); the exported file is not trustworthy",
                          file=sys.stderr)
                    return 1
        with open(local, "rb") as f:
            storage.write_bytes(args.onnx, f.read())  # atomic: temp name + rename, or one PUT
    print(json.dumps(summary, indent=2))
    return 0


def main(argv=None) -> int:
    return job_main(add_arguments, run, "python -m jobs.export", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
