"""Labelled data (an image and its ground-truth mask per sample) as a Ray Dataset.

Training and evaluation read the same three layouts through this module:

- DUTS-style folders: ``--images DIR --masks DIR``, image and mask matched by their path
  relative to the folder without the extension (``images/a/x.jpg`` ↔ ``masks/a/x.png``).
  Every image must have a mask and every mask an image: a partial match almost always means
  the wrong folder, and silently training on a subset would hide that.
- WebDataset shards: one sample = an image member and a mask member (``x.jpg`` + ``x.png``
  by default). Member names are only ever used as keys, never as paths.
- Parquet: an image and a mask column holding encoded bytes, and optionally a key column.

Planning (listing, stem matching, schema checks) runs on the driver and raises
`LabelledDataError` with one line a user can act on; reading runs in Ray tasks and yields rows
``key: string, image: binary, mask: binary``.

Keys follow DESIGN §2: loose files → image path relative to the images folder; WebDataset →
``<shard path relative to the root>/<sample key>`` (or the original key a sample packed by this
project carries); Parquet → the key column, or ``<file path relative to the root>#<row>``.

Two optional stages serve training: a stable hold-out split by key hash (so train and
validation never overlap, whatever the seed or the number of workers), and an epoch-keyed
shuffle of the planned units (see `EpochShuffle`).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import pyarrow as pa

from pipeline import shards, storage

__all__ = ["LabelledSource", "LabelledPlan", "LabelledDataError", "EpochShuffle", "Holdout",
           "plan_labelled", "read_labelled", "stable_unit_interval", "stable_hash64",
           "current_epoch", "LABELLED_SCHEMA"]

SourceKind = Literal["folders", "webdataset", "parquet"]

LABELLED_SCHEMA = pa.schema([("key", pa.string()), ("image", pa.binary()), ("mask", pa.binary())])

_SHARD_EXTS = (".tar", ".tar.gz", ".tgz")
# Pairs of loose files read per task: enough to amortise task overhead, small enough to spread
# a few thousand images over every CPU.
_PAIRS_PER_READ_TASK = 16
# Rows per output batch when expanding a shard or a Parquet file.
_ROWS_PER_CHUNK = 64


class LabelledDataError(ValueError):
    """The labelled input is unusable as given (one line, meant for the user)."""


@dataclass(frozen=True)
class LabelledSource:
    """Where labelled samples come from. `kind` picks which of the other fields matter."""

    kind: SourceKind = "folders"
    images: str | None = None  # folders
    masks: str | None = None  # folders
    input: str | None = None  # webdataset / parquet: a file or a folder of them
    image_member: str = "jpg"
    mask_member: str = "png"
    image_column: str = "image"
    mask_column: str = "mask"
    key_column: str = "key"

    def describe(self) -> str:
        if self.kind == "folders":
            return f"images {self.images} + masks {self.masks}"
        return f"{self.kind} {self.input}"


@dataclass
class LabelledPlan:
    """The listed input: one unit per image/mask pair (folders) or per shard / Parquet file."""

    source: LabelledSource
    units: list[dict[str, Any]]
    # S3 options captured on the driver (`storage.s3_options()`), for the read tasks: a Ray
    # worker's own environment may lack the credentials. None for local inputs.
    options: dict | None = field(repr=False, default=None)

    @property
    def pairs_known(self) -> bool:
        return self.source.kind == "folders"

    def with_holdout(self, holdout: Holdout) -> "LabelledPlan":
        """Folders only: the plan restricted to one side of the split (decided on the driver,
        so the other side's bytes are never read)."""
        if not self.pairs_known:
            raise ValueError("only folder plans know their keys before reading")
        units = [u for u in self.units
                 if (stable_unit_interval(u["key"]) < holdout.fraction) == (holdout.part == "val")]
        return LabelledPlan(self.source, units, self.options)

    def __len__(self) -> int:
        return len(self.units)


@dataclass(frozen=True)
class EpochShuffle:
    """Shuffle the planned units differently every epoch, reproducibly from `seed`.

    The order of epoch *e* is a function of (seed, e) only: units are sorted by a hash of
    (seed, e, unit id). Ray Data re-executes a dataset once per training epoch; the map stage
    learns which execution it serves from Ray Data's execution index (see `current_epoch`),
    and `epoch_offset` (the epochs already done when the run (re)started) turns that into the
    training epoch, so a resumed run sorts epoch 3 by the same keys as an uninterrupted one.
    (Which worker receives which sample still depends on Ray Data's streaming: the order, and
    each sample's augmentation, are reproducible; the exact batches are not.)
    Folders are shuffled pair by pair; shards and Parquet files are shuffled as whole units and
    the trainer adds a seeded local shuffle buffer, as is usual for WebDataset.
    """

    seed: int
    epoch_offset: int = 0


@dataclass(frozen=True)
class Holdout:
    """Keep the keys whose stable hash falls below `fraction` (``part="val"``) or the others."""

    fraction: float
    part: Literal["train", "val"]


def stable_hash64(text: str) -> int:
    """A 64-bit hash that is the same in every process and on every machine (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def stable_unit_interval(text: str) -> float:
    """`text` → a number in [0, 1), uniform and stable: the hold-out split's coin."""
    return stable_hash64("holdout:" + text) / 2.0 ** 64


def current_epoch(epoch_offset: int) -> int:
    """The 1-based training epoch that the running Ray Data execution feeds.

    Ray Data counts executions of a dataset (one per epoch of a training loop over a
    `streaming_split`), and exposes the count to tasks through the seed configuration it uses
    for `random_shuffle(seed=RandomSeedConfig(..., reseed_after_execution=True))`. A trainer
    that re-creates the dataset when it (re)starts passes the epochs already done as offset.
    """
    from ray.data import DataContext, RandomSeedConfig

    seed_tuple = RandomSeedConfig(seed=0, reseed_after_execution=True).get_seed_tuple(
        data_context=DataContext.get_current())
    return epoch_offset + int(seed_tuple.execution_idx or 0) + 1


# ----------------------------------------------------------------------------------- planning


def _stem(relpath: str) -> str:
    return posixpath.splitext(relpath)[0]


def _examples(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", … (+{len(items) - n})" if len(items) > n else "")


def _options_for(*uris: str | None) -> dict | None:
    return None if all(u is None or storage.is_local(u) for u in uris) else storage.s3_options()


def _plan_folders(source: LabelledSource) -> LabelledPlan:
    if not source.images or not source.masks:
        raise LabelledDataError("folders input needs both --images and --masks")
    images = storage.list_files(source.images)
    if not images:
        exts = " ".join(storage.IMAGE_EXTENSIONS)
        raise LabelledDataError(f"no images under {source.images} (looked for {exts})")
    masks = storage.list_files(source.masks)
    if not masks:
        raise LabelledDataError(f"no mask files under {source.masks}")
    for what, entries in (("images", images), ("masks", masks)):
        dup = sorted(s for s, c in Counter(_stem(e.relpath) for e in entries).items() if c > 1)
        if dup:
            raise LabelledDataError(f"{len(dup)} file names in the {what} folder differ only by "
                                    f"extension, so masks cannot be matched by stem: "
                                    f"{_examples(dup)}")
    mask_by_stem = {_stem(e.relpath): e for e in masks}
    image_stems = {_stem(e.relpath) for e in images}
    no_mask = [e.relpath for e in images if _stem(e.relpath) not in mask_by_stem]
    no_image = [e.relpath for e in masks if _stem(e.relpath) not in image_stems]
    if no_mask or no_image:
        parts = []
        if no_mask:
            parts.append(f"{len(no_mask)} of {len(images)} images have no mask with the same "
                         f"stem ({_examples(no_mask)})")
        if no_image:
            parts.append(f"{len(no_image)} of {len(masks)} masks have no image "
                         f"({_examples(no_image)})")
        raise LabelledDataError(f"images in {source.images} and masks in {source.masks} do not "
                                f"match: " + "; ".join(parts))
    units = [{"key": e.relpath, "image_uri": e.uri,
              "mask_uri": mask_by_stem[_stem(e.relpath)].uri} for e in images]
    return LabelledPlan(source, units, _options_for(source.images, source.masks))


def _plan_webdataset(source: LabelledSource) -> LabelledPlan:
    if not source.input:
        raise LabelledDataError("--source webdataset needs --input (a shard or a folder of shards)")
    if source.image_member == source.mask_member:
        raise LabelledDataError(f"--image-member and --mask-member are both "
                                f"{source.image_member!r}")
    options = _options_for(source.input)
    fs, _ = storage.filesystem(source.input, options)
    entries = storage.list_files(source.input, extensions=_SHARD_EXTS)
    if not entries:
        raise LabelledDataError(f"no WebDataset shards (.tar) under {source.input}")
    # Check the member names on the first sample now: a wrong --mask-member would otherwise
    # only surface inside a training worker, after the cluster has started.
    first = entries[0]
    with fs.open(storage.split_uri(first.uri)[1], "rb") as f:
        sample = next(iter(shards.iter_samples(f)), None)
    if sample is None:
        raise LabelledDataError(f"shard {first.uri} holds no samples")
    key, members = sample
    missing = [m for m in (source.image_member, source.mask_member) if m not in members]
    if missing:
        raise LabelledDataError(
            f"sample {key!r} of {first.relpath} has no {' / '.join(map(repr, missing))} member "
            f"(it has: {', '.join(sorted(members))}); set --image-member / --mask-member")
    units = [{"uri": e.uri, "rel": e.relpath} for e in entries]
    return LabelledPlan(source, units, options)


def _plan_parquet(source: LabelledSource) -> LabelledPlan:
    import pyarrow.parquet as pq

    if not source.input:
        raise LabelledDataError("--source parquet needs --input (a file or a folder of .parquet)")
    entries = storage.list_files(source.input, extensions=(".parquet",))
    if not entries:
        raise LabelledDataError(f"no .parquet files under {source.input}")
    pafs, path = storage.pyarrow_filesystem(entries[0].uri)
    names = pq.read_schema(pafs.open_input_file(path)).names
    missing = [c for c in (source.image_column, source.mask_column) if c not in names]
    if missing:
        raise LabelledDataError(f"{entries[0].relpath} has no column "
                                f"{' / '.join(map(repr, missing))} (columns: {', '.join(names)}); "
                                f"set --image-column / --mask-column")
    units = [{"uri": e.uri, "rel": e.relpath} for e in entries]
    return LabelledPlan(source, units, _options_for(source.input))


def plan_labelled(source: LabelledSource) -> LabelledPlan:
    """List and validate the input on the driver (no image bytes read, except one shard sample)."""
    planners = {"folders": _plan_folders, "webdataset": _plan_webdataset,
                "parquet": _plan_parquet}
    if source.kind not in planners:
        raise LabelledDataError(f"unknown labelled source {source.kind!r}; "
                                f"choose one of {', '.join(planners)}")
    return planners[source.kind](source)


# ------------------------------------------------------------------------------------ reading


def _table(keys: list[str], images: list[bytes], masks: list[bytes]) -> pa.Table:
    return pa.table({"key": pa.array(keys, pa.string()), "image": pa.array(images, pa.binary()),
                     "mask": pa.array(masks, pa.binary())}, schema=LABELLED_SCHEMA)


def _read_pairs(units: pa.Table, options: dict | None) -> pa.Table:
    keys = units.column("key").to_pylist()
    uris = units.column("image_uri").to_pylist() + units.column("mask_uri").to_pylist()
    # Concurrent reads: on object stores, request latency bounds small-object reads.
    datas = storage.read_many(uris, options)
    for uri, data in zip(uris, datas):
        if isinstance(data, BaseException):
            # A listed file that cannot be read now (deleted, no permission) is not a sample
            # to skip silently: fail with the file named.
            raise OSError(f"cannot read {uri}: {data}") from data
    return _table(keys, datas[:len(keys)], datas[len(keys):])


def _shard_rows(unit: dict, source: LabelledSource, options: dict | None) -> Iterator[pa.Table]:
    rel = unit["rel"]
    keys: list[str] = []
    images: list[bytes] = []
    masks: list[bytes] = []
    fs, path = storage.filesystem(unit["uri"], options)
    with fs.open(path, "rb") as f:
        for sample_key, members in shards.iter_samples(f):
            image = members.get(source.image_member)
            mask = members.get(source.mask_member)
            if image is None or mask is None:
                # Training on a sample without its label is never what the user meant.
                raise LabelledDataError(
                    f"sample {sample_key!r} of shard {rel} lacks its "
                    f"{source.image_member if image is None else source.mask_member!r} member "
                    f"(it has: {', '.join(sorted(members))})")
            key = shards.original_key(members) or f"{rel}/{sample_key}"
            keys.append(key.replace("\\", "/"))
            images.append(image)
            masks.append(mask)
            if len(keys) >= _ROWS_PER_CHUNK:
                yield _table(keys, images, masks)
                keys, images, masks = [], [], []
    if keys:
        yield _table(keys, images, masks)


def _parquet_rows(unit: dict, source: LabelledSource, options: dict | None) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    pafs, path = storage.pyarrow_filesystem(unit["uri"], options)
    pf = pq.ParquetFile(pafs.open_input_file(path))
    has_key = source.key_column in pf.schema_arrow.names
    columns = [source.image_column, source.mask_column] + ([source.key_column] if has_key else [])
    offset = 0
    for batch in pf.iter_batches(columns=columns, batch_size=_ROWS_PER_CHUNK):
        n = batch.num_rows
        if has_key:
            keys = [str(k) if k not in (None, "") else f"{unit['rel']}#{offset + i}"
                    for i, k in enumerate(batch.column(2).to_pylist())]
        else:
            keys = [f"{unit['rel']}#{offset + i}" for i in range(n)]
        images = batch.column(0).to_pylist()
        masks = batch.column(1).to_pylist()
        for i, (im, mk) in enumerate(zip(images, masks)):
            if im is None or mk is None:
                raise LabelledDataError(f"row {offset + i} of {unit['rel']} has a null "
                                        f"{source.image_column if im is None else source.mask_column}")
        offset += n
        yield _table(keys, [bytes(b) for b in images], [bytes(b) for b in masks])


def _expand_units(units: pa.Table, source: LabelledSource, options: dict | None
                  ) -> Iterator[pa.Table]:
    for unit in units.to_pylist():
        if source.kind == "webdataset":
            yield from _shard_rows(unit, source, options)
        else:
            yield from _parquet_rows(unit, source, options)


def _add_epoch_order(units: pa.Table, shuffle: EpochShuffle, id_column: str) -> pa.Table:
    epoch = current_epoch(shuffle.epoch_offset)
    ids = units.column(id_column).to_pylist()
    order = [stable_hash64(f"order:{shuffle.seed}:{epoch}:{i}") for i in ids]
    return units.append_column("_order", pa.array(order, pa.uint64()))


def _keep_holdout(rows: pa.Table, holdout: Holdout) -> pa.Table:
    import pyarrow.compute as pc

    inside = [stable_unit_interval(k) < holdout.fraction for k in rows.column("key").to_pylist()]
    mask = pa.array(inside, pa.bool_())
    return rows.filter(mask if holdout.part == "val" else pc.invert(mask))


def read_labelled(source: LabelledSource | LabelledPlan, *, shuffle: EpochShuffle | None = None,
                  holdout: Holdout | None = None, read_num_cpus: float = 0.25):
    """A lazy Ray Dataset of ``key, image, mask`` rows (encoded bytes) for the labelled input.

    `source`: a `LabelledSource` (planned here, on the driver) or a plan made earlier.
    `shuffle`: epoch-keyed unit order for training (see `EpochShuffle`); None keeps the listing
    order. `holdout`: keep only the validation (or only the training) part of a stable split.
    Read tasks are I/O-bound and reserve `read_num_cpus` each.
    """
    import ray

    plan = source if isinstance(source, LabelledPlan) else plan_labelled(source)
    if holdout is not None and plan.pairs_known:
        plan, holdout = plan.with_holdout(holdout), None
    if not plan.units:
        raise LabelledDataError(f"no samples left to read from {plan.source.describe()}")
    src, options = plan.source, plan.options
    if plan.pairs_known:
        blocks = max(1, min(len(plan.units) // _PAIRS_PER_READ_TASK, 1000))
        ds = ray.data.from_items(plan.units, override_num_blocks=blocks)
        id_column, batch_size = "key", _PAIRS_PER_READ_TASK
    else:
        ds = ray.data.from_items(plan.units, override_num_blocks=len(plan.units))
        id_column, batch_size = "rel", 1  # relative: the same order wherever the data moves
    if shuffle is not None:
        ds = ds.map_batches(_add_epoch_order, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"shuffle": shuffle, "id_column": id_column},
                            num_cpus=read_num_cpus)
        ds = ds.sort("_order").drop_columns(["_order"])
    if plan.pairs_known:
        ds = ds.map_batches(_read_pairs, batch_format="pyarrow", batch_size=batch_size,
                            fn_kwargs={"options": options}, num_cpus=read_num_cpus)
    else:
        ds = ds.map_batches(_expand_units, batch_format="pyarrow", batch_size=batch_size,
                            fn_kwargs={"source": src, "options": options},
                            num_cpus=read_num_cpus)
    if holdout is not None:
        ds = ds.map_batches(_keep_holdout, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"holdout": holdout}, num_cpus=read_num_cpus)
    return ds
