"""A U²-Net prepared for fast inference on the hardware at hand: `InferenceModel`.

One object owns every speed setting of the forward pass, so the batch job, the benchmarks and
notebooks run the model the same way:

- **precision**: `fp32`; `bf16` / `fp16` autocast; `int8` (PT2E static quantisation with the
  X86 inductor quantizer, convolutions in int8, the rest in bf16 where the CPU has native bf16,
  else fp32); `auto` picks bf16 where the device computes it natively (AMX or AVX512-BF16
  CPUs, and GPUs with bf16), fp16 on older GPUs, fp32 otherwise. Every lower-precision mode
  has a fidelity bound against fp32 on a trained model, measured in BENCHMARKS.md and
  enforced in tests/test_precision.py.
- **memory format**: channels_last (oneDNN's and cuDNN's fast convolutions are NHWC).
- **torch.compile** (inductor, weights frozen as constants): optional, because compiling costs
  a minute or more per process and pays back only over thousands of images; always on for
  int8, whose quantised kernels exist only in compiled form. Compiled models see one input
  shape: callers pad the last batch (`fixed_batch`).

No Ray here.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["Precision", "PRECISIONS", "cpu_has_native_bf16", "choose_precision", "resolve_precision",
           "calibration_digest", "InferenceModel"]

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU executes bf16 matrix work natively (AMX-BF16 or AVX512-BF16), where
    oneDNN's bf16 convolutions beat fp32; elsewhere bf16 is emulated and slower."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)  # private helpers, present since torch 2.1
        try:
            if fn is not None and fn():
                return True
        except Exception:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def choose_precision(requested: str, device_type: str, native_bf16: bool) -> str:
    """The precision a model runs at, for a requested one, on a device of `device_type` that
    does (or does not) compute bf16 natively. Pure, so the GPU rules are tested on CPU."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested == "int8" and device_type != "cpu":
        raise ValueError("int8 runs on x86 CPUs only (PT2E with the X86 inductor quantizer)")
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "bf16" if native_bf16 else "fp16"  # pre-Ampere cards: fp16 tensor cores
    return "bf16" if native_bf16 else "fp32"  # emulated bf16 on CPU is slower than fp32


def resolve_precision(requested: str, device: str | torch.device) -> str:
    """`choose_precision` with this process's hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = cpu_has_native_bf16()
    return choose_precision(requested, device.type, native)


def calibration_digest(images: np.ndarray, gray: np.ndarray) -> str:
    """Identifies an int8 calibration set: the quantisation scales, hence the masks, depend on it."""
    h = hashlib.sha256(str(images.shape).encode())
    h.update(np.ascontiguousarray(images, np.uint8).tobytes())
    h.update(np.asarray(gray, bool).tobytes())
    return h.hexdigest()[:16]


class InferenceModel:
    """`model` (weights loaded, any mode) wrapped for inference. Call it with normalised
    N×3×S×S float input; it returns the fused logits N×1×S×S as float32.

    `calibration` is `(images, gray)`: uint8 N×S×S×3 inputs and their gray flags, as the
    decode stage ships them; int8 needs it (8–64 representative images). `fixed_batch`: the
    batch size every call will have (compiled and int8 models are specialised to it).
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu",
                 precision: str = "auto", *, channels_last: bool = True, compile: bool = False,
                 fixed_batch: Optional[int] = None,
                 calibration: Optional[tuple[np.ndarray, np.ndarray]] = None) -> None:
        self.device = torch.device(device)
        self.requested = precision
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = channels_last
        self.compiled = compile or self.precision == "int8"
        if self.compiled and not fixed_batch:
            raise ValueError("a compiled or int8 model needs fixed_batch (inputs of one shape)")
        self.fixed_batch = fixed_batch
        model = model.eval().to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: autotune once
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        # int8: convolutions quantised, everything else (upsampling, concatenation, sigmoid
        # inputs) in bf16 where the CPU has it; measured faster than int8 with fp32 glue.
        if self.precision in ("bf16", "fp16"):
            self.autocast_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        elif self.precision == "int8" and cpu_has_native_bf16():
            self.autocast_dtype = torch.bfloat16
        else:
            self.autocast_dtype = None
        if self.precision == "int8":
            if calibration is None:
                raise ValueError("int8 needs calibration images (8-64 representative inputs)")
            model = self._quantize(model, calibration)
        if self.compiled:
            import torch._inductor.config as inductor_config

            # Weights become constants of the graph: oneDNN prepacks them once (and int8
            # weights are folded). Process-wide, which is right for a dedicated model actor.
            inductor_config.freezing = True
            model = torch.compile(model, dynamic=False)
        self.model = model

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _quantize(self, model: nn.Module, calibration) -> nn.Module:
        import logging

        # torchao's import tries its CUDA kernels and logs a warning per library that a CPU
        # torch cannot load; PT2E quantisation is pure Python and needs none of them.
        ao_log = logging.getLogger("torchao")
        level = ao_log.level
        ao_log.setLevel(logging.ERROR)
        try:
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
        finally:
            ao_log.setLevel(level)

        from .transforms import normalize

        images, gray = calibration
        bs = self.fixed_batch
        example = torch.zeros((bs, 3) + tuple(images.shape[1:3]))
        with torch.no_grad():
            exported = torch.export.export(model, (self._prepare_input(example),)).module()
            quantizer = xiq.X86InductorQuantizer()
            quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
            prepared = prepare_pt2e(exported, quantizer)
            for start in range(0, len(images), bs):
                x = normalize(torch.from_numpy(np.ascontiguousarray(images[start:start + bs])),
                              gray=np.asarray(gray[start:start + bs]))
                prepared(self._prepare_input(x))
            return convert_pt2e(prepared)

    @torch.inference_mode()
    def fused_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Fused logits d0 (N×1×S×S float32) for normalised input x (N×3×S×S)."""
        x = self._prepare_input(x)
        with self._autocast():
            return self.model(x)[0].float()

    __call__ = fused_logits

    def describe(self) -> dict:
        return {"device": str(self.device), "requested_precision": self.requested,
                "precision": self.precision, "channels_last": self.channels_last,
                "compiled": self.compiled, "fixed_batch": self.fixed_batch,
                "cpu_native_bf16": cpu_has_native_bf16() if self.device.type == "cpu" else None}
