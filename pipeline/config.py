"""Typed configuration of the mask pipeline (in the spirit of `ray.data.llm` processor configs).

A config goes in, a lazy `Dataset -> Dataset` comes out: `pipeline.build_mask_pipeline`.
Jobs fill these from their flags; Python users construct them directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

from pipeline.storage import IMAGE_EXTENSIONS, s3_options

SourceKind = Literal["auto", "files", "webdataset", "parquet", "manifest"]


@dataclass
class SourceConfig:
    uri: str
    kind: SourceKind = "auto"
    key_column: str = "key"  # parquet / manifest
    image_column: str = "image"  # parquet
    uri_column: str = "uri"  # manifest
    image_member: Optional[str] = None  # webdataset: default = first image extension in a sample
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS  # loose files
    files_per_read_task: int = 32
    # Captured on the driver when the config is made: workers read with these, not with
    # their own environment. Never logged or written to summaries (it holds credentials).
    storage_options: dict = field(default_factory=s3_options, repr=False)


@dataclass
class DecodeConfig:
    input_size: int = 320
    max_pixels: int = 178_956_970  # Pillow's own decompression-bomb limit
    draft: bool = True  # JPEG DCT-domain downscaling
    num_cpus: float = 0.5  # differs from the model stage so the two never fuse (DESIGN §5)
    batch_size: int = 32


@dataclass
class ModelConfig:
    name: str = "u2net"
    weights: str = ""
    input_size: int = 320
    normalize: Literal["none", "minmax"] = "none"
    batch_size: Optional[int] = None  # None: chosen for the device by `plan_actors`
    actors: Optional[int] = None  # None: one per GPU on a GPU cluster, else sized from CPUs
    gpus_per_actor: Optional[float] = None  # None: 1 when the cluster has GPUs, else CPU actors
    cpus_per_actor: Optional[float] = None  # None: 1 (GPU actors) / a share of the CPUs (CPU)
    # auto: bf16 where the device computes it natively, else fp32 (`u2net_core.runtime`);
    # int8: quantised on `calibration` images, x86 CPUs only.
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"
    calibration: Optional[str] = None  # int8: URI of a folder of representative images
    compile: bool = False  # torch.compile the model in each actor (a minute or more per actor)
    channels_last: bool = True


@dataclass
class PostprocessConfig:
    mask_png: bool = False
    mask_rle: bool = False
    cutouts: Optional[str] = None  # URI prefix for RGBA cutout PNGs
    storage_options: dict = field(default_factory=s3_options, repr=False)
    num_cpus: float = 0.5
    batch_size: int = 32


@dataclass
class MaskPipelineConfig:
    source: SourceConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    post: PostprocessConfig = field(default_factory=PostprocessConfig)

    def __post_init__(self) -> None:
        self.decode.input_size = self.model.input_size

    def output_settings(self) -> dict:
        """Every setting that changes the stored output: part of `model_id`.

        Precision enters as asked for: `auto` is one setting (the fastest mode within the
        fidelity bound of tests/test_precision.py on whatever hardware runs it), so moving a
        nightly job between CPU and GPU nodes does not make every row stale. `compile`,
        batch size and actor layout are left out: they move maps by at most float rounding,
        as two machines' kernels do (BENCHMARKS.md). int8 adds its calibration digest
        (`pipeline.processor.read_weights`)."""
        return {
            "model": self.model.name,
            "input_size": self.model.input_size,
            "normalize": self.model.normalize,
            "precision": self.model.precision,
            "draft": self.decode.draft,
            "mask_png": self.post.mask_png,
            "mask_rle": self.post.mask_rle,
        }

    def to_dict(self) -> dict:
        """Settings for summaries and logs, without credentials."""
        d = asdict(self)
        for part in d.values():
            if isinstance(part, dict):
                part.pop("storage_options", None)
        return d
