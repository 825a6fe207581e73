"""ONNX export in the layout of the official U²-Net export, the one rembg and friends load.

The graph takes one N×3×H×W float32 input (normalised as in `u2net_core.transforms`) and returns
the seven *sigmoid* maps, fused d0 first, each N×1×H×W: exactly what the official `forward`
returns. rembg's `u2net_custom` session relies on that: it feeds a 1×3×320×320 input under
`session.get_inputs()[0].name` and reads `outputs[0][:, 0]` as the fused probability map. Our
`U2Net.forward` returns logits (training wants them), so the export wraps it in
`SigmoidOutputs`.

The batch axis is always dynamic; H and W are dynamic too unless `dynamic_hw=False` (for
runtimes that want static spatial shapes, e.g. TensorRT engines built for one size). The
network itself handles any H and W (ceil-mode pooling, size-matched upsampling), and the
exported graph computes every upsampling size from its input, so a dynamic graph is exact at
any size, not only at multiples of 32.

Exporters: the TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`) is the
default: it needs nothing beyond torch and `onnx`, and exports U²-Net† in ~2 s. PyTorch has
deprecated it; `exporter="dynamo"` uses the torch.export-based one instead, which also needs
the `onnxscript` package and takes ~15–50 s for the same model. Both give the same graph
interface (names, dynamic axes, declared output shapes), fixed up after export.

No Ray here; `onnx` is imported on use, `onnxruntime` only by `max_abs_diff_vs_torch`.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["SigmoidOutputs", "export_onnx", "max_abs_diff_vs_torch", "INPUT_NAME",
           "OUTPUT_NAMES", "DEFAULT_OPSET", "Exporter"]

# The official export's input name; rembg looks the name up, but other tools hard-code it.
INPUT_NAME = "input.1"
OUTPUT_NAMES = tuple(f"d{i}" for i in range(7))  # d0 = fused, then the side outputs d1..d6
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}  # dynamo's lowest native opset is 18
Exporter = Literal["torchscript", "dynamo"]


class SigmoidOutputs(nn.Module):
    """`U2Net` with the official output convention: sigmoid of (d0, d1, ..., d6)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.sigmoid(d) for d in self.model(x))


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the `onnx` package: pip install 'u2net-ray[onnx]'") from None
    return onnx


def _export_torchscript(wrapped: nn.Module, dummy: torch.Tensor, opset: int, dynamic_hw: bool) -> bytes:
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The deprecation notice is about this exporter as such; it is chosen deliberately
        # (see the module docstring) and the warning would only be noise in job logs.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapped, (dummy,), buf, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: axes for name in (INPUT_NAME, *OUTPUT_NAMES)},
            do_constant_folding=True)
    return buf.getvalue()


def _export_dynamo(wrapped: nn.Module, dummy: torch.Tensor, opset: int, dynamic_hw: bool) -> bytes:
    try:
        import onnxscript  # noqa: F401  (torch's dynamo exporter imports it lazily)
    except ImportError:
        raise ImportError("exporter='dynamo' needs the `onnxscript` package "
                          "(pip install onnxscript), or use exporter='torchscript'") from None
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({0: dyn, 2: dyn, 3: dyn} if dynamic_hw else {0: dyn},)
    program = torch.onnx.export(wrapped, (dummy,), None, dynamo=True, opset_version=opset,
                                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                dynamic_shapes=shapes, verbose=False)
    return program.model_proto.SerializeToString()


def _fix_interface(model_proto, in_ch: int, out_ch: int, height: int, width: int,
                   dynamic_hw: bool, metadata: dict[str, str]) -> None:
    """Declare the graph's input and output shapes as they really are.

    The TorchScript exporter's shape inference mislabels the side outputs d2..d6 (it declares
    their channel axis as a spatial symbol, because their upsampling size comes from another
    tensor's shape), and the dynamo exporter names axes `s77`, `s53`. Runtimes never need these
    declarations, but tools that read them (TensorRT's parser, netron, rembg-like wrappers that
    inspect shapes) do, so every output is declared N×out_ch×H×W with the input's symbols.
    """
    spatial = ["height", "width"] if dynamic_hw else [height, width]
    for value, channels in [(model_proto.graph.input[0], in_ch),
                            *[(o, out_ch) for o in model_proto.graph.output]]:
        dims = value.type.tensor_type.shape.dim
        for dim, wanted in zip(dims, ["batch", channels, *spatial]):
            dim.Clear()
            if isinstance(wanted, int):
                dim.dim_value = wanted
            else:
                dim.dim_param = wanted
    # Intermediate shape annotations carry the same wrong or exporter-specific symbols; they
    # are optional and every runtime infers its own.
    del model_proto.graph.value_info[:]
    del model_proto.metadata_props[:]
    for key, value in metadata.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value


def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: int = 320,
                opset: int | None = None, dynamic_hw: bool = True,
                exporter: Exporter = "torchscript", metadata: dict[str, str] | None = None) -> str:
    """Export a `U2Net` (logits) as an ONNX graph of its seven sigmoid maps; return the path.

    `input_size` is the traced (and, with `dynamic_hw=False`, the fixed) H = W. The batch axis
    is always dynamic. The file is checked with `onnx.checker` before it is written, and
    written through a temporary name, so a failed export never leaves a broken file behind.
    """
    onnx = _require_onnx()
    if exporter not in DEFAULT_OPSET:
        raise ValueError(f"exporter must be one of {sorted(DEFAULT_OPSET)}, got {exporter!r}")
    if input_size < 32:
        raise ValueError(f"input_size must be >= 32 (the model pools five times), got {input_size}")
    opset = opset or DEFAULT_OPSET[exporter]
    in_ch = int(getattr(model, "in_ch", 3))
    out_ch = int(getattr(model, "out_ch", 1))
    was_training = model.training
    model.eval()  # BatchNorm must export its running statistics, not batch statistics
    try:
        wrapped = SigmoidOutputs(model).eval()
        # Batch 2 for tracing: a batch of 1 invites exporters to specialise the batch axis.
        dummy = torch.randn(2, in_ch, input_size, input_size,
                            generator=torch.Generator().manual_seed(0))
        export = _export_torchscript if exporter == "torchscript" else _export_dynamo
        with torch.no_grad():
            raw = export(wrapped, dummy, opset, dynamic_hw)
    finally:
        model.train(was_training)

    proto = onnx.load_from_string(raw)
    meta = {"producer": "u2net-ray", "outputs": "sigmoid probabilities d0 (fused), d1..d6",
            "input": "N×3×H×W: RGB / image max, then (x - mean) / std per channel",
            "mean": "0.485,0.456,0.406", "std": "0.229,0.224,0.225",
            "input_size": str(input_size)}
    meta.update(metadata or {})
    _fix_interface(proto, in_ch, out_ch, input_size, input_size, dynamic_hw, meta)
    onnx.checker.check_model(proto, full_check=True)

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def max_abs_diff_vs_torch(onnx_path: str | os.PathLike, model: nn.Module,
                          shapes: Sequence[tuple[int, int, int, int]], *, seed: int = 0,
                          threads: int | None = None) -> float:
    """Largest |ONNX Runtime − PyTorch| over all seven sigmoid maps, for random inputs of
    each N×C×H×W shape in `shapes` (normal noise: the value range of normalised images)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("verification needs `onnxruntime`: pip install 'u2net-ray[onnx]'") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(os.fspath(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    wrapped = SigmoidOutputs(model).eval()
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    was_training = model.training
    model.eval()
    try:
        for shape in shapes:
            x = torch.randn(*shape, generator=g)
            with torch.inference_mode():
                expected = [t.numpy() for t in wrapped(x)]
            got = session.run(None, {name: x.numpy()})
            if len(got) != len(expected):
                raise AssertionError(f"ONNX graph has {len(got)} outputs, expected {len(expected)}")
            for a, b in zip(got, expected):
                if a.shape != b.shape:
                    raise AssertionError(f"ONNX output shape {a.shape} != PyTorch {b.shape}")
                worst = max(worst, float(np.abs(a - b).max()))
    finally:
        model.train(was_training)
    return worst
