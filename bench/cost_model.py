"""Cost model: project a run of 1M and 100M images onto a GPU cluster from measured costs.

    python -m bench.cost_model --scale-report .bench_out/scale_run.json

Measured (here, when this runs, single-threaded on this machine's cores):
  * CPU per image: decode to the model input (a synthetic 1920×1080 JPEG q90, draft decoding
    on, as the pipeline does), sha256 of the input, postprocess (upsample the map to full
    size, coverage and bbox), parsing a sample out of a shard, and packing one (tar member +
    sha256);
  * the size of a `masks` row at 320 px (zstd Parquet of smooth-edged synthetic masks);
and read from the scale run's report (bench/scale_run.py): listing and manifest-planning cost
per object on the driver, and bytes per planned unit (driver memory).

Assumed (flags; every one is printed with the result): the cluster shape, the GPU's dense BF16
peak and the fraction of it U²-Net reaches (MFU), how a cloud vCPU compares with a core here,
image size, network, S3 request prices and listing latency, node price. The GPU side comes
from model FLOPs (DESIGN §1: U2NET 117.2 GFLOPs, U2NETP 39.5 GFLOPs per 320×320 image), not
from a GPU measurement: none was available to this run.

Per node the pipeline runs at the slowest of GPU, CPU (decode + postprocess + reading on the
vCPUs not reserved) and network; the cluster at nodes × that (Ray Data streams every stage,
so stages overlap and the slowest sets the pace). Driver-side costs (listing, planning, plan
memory) do not shrink with more nodes and are reported on their own.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GFLOPS_320 = {"u2net": 117.2, "u2netp": 39.5}  # DESIGN §1: 2 × conv MACs at 1×3×320×320


# ---------------------------------------------------------------------------------------------
# Measurements

def _synthetic_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients, a few shapes and sensor-like noise: JPEG-compresses like a photo
    more than flat colour does (flat colour would make decoding look cheaper than it is)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([xx / width * 200, yy / height * 180, (xx + yy) / (width + height) * 220], -1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(40, 300)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _per_call_ms(fn, repeat: int, rounds: int = 5) -> float:
    """Mean time per call of the fastest of `rounds` rounds (as `timeit` advises: slower
    rounds measure the other processes on the machine, not the code)."""
    fn()  # warm caches and lazy imports
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best * 1e3


def measure_cpu(repeat: int = 8) -> dict:
    """Per-image CPU costs on one core of this machine (single-threaded calls)."""
    from PIL import Image

    from pipeline import shards
    from u2net_core import decode_image, masks

    photo = _synthetic_photo(1920, 1080)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    small = io.BytesIO()
    Image.fromarray(photo[:64, :64]).save(small, format="JPEG", quality=90)
    prob = np.zeros((320, 320), np.uint8)
    prob[80:240, 100:220] = 255

    def post():  # what the postprocess stage does by default (pipeline/postprocess.py)
        masks.coverage_and_bbox_from_map(prob, 1920, 1080)

    def post_png():  # with --mask-png: the full-size mask and its PNG
        full = masks.upsample_map(prob, 1920, 1080)
        masks.coverage_and_bbox(full)
        masks.encode_png(full)

    meta = json.dumps({"key": "photos/2024/IMG_0001.jpg", "source_uri": "s3://bucket/photos/2024/"
                       "IMG_0001.jpg", "fingerprint": "412345-0123456789abcdef"}).encode()
    samples = 50

    def pack_samples() -> bytes:  # what a pack task spends per image besides I/O
        writer = shards.TarSampleWriter()
        for i in range(samples):
            hashlib.sha256(jpeg).digest()
            writer.add(f"{i:06d}", {"jpg": jpeg, "json": meta})
        return writer.finish()

    shard = pack_samples()

    def read_samples():  # what reading a packed sample costs the inference job's read tasks
        for _, members in shards.iter_samples(io.BytesIO(shard)):
            shards.original_key(members)
            shards.image_member(members)

    return {
        "jpeg_1080p_bytes": len(jpeg),
        "decode_1080p_to_320_ms": round(_per_call_ms(lambda: decode_image(jpeg, 320), repeat), 3),
        "decode_1080p_full_ms": round(_per_call_ms(lambda: decode_image(jpeg, 320, draft=False), repeat // 2 or 1), 3),
        "decode_64px_to_64_ms": round(_per_call_ms(lambda: decode_image(small.getvalue(), 64), repeat * 10), 4),
        "postprocess_1080p_ms": round(_per_call_ms(post, repeat), 3),
        "postprocess_1080p_with_png_ms": round(_per_call_ms(post_png, repeat // 2 or 1), 3),
        "pack_tar_sha256_ms": round(_per_call_ms(pack_samples, 3) / samples, 4),
        "read_packed_sample_ms": round(_per_call_ms(read_samples, 3) / samples, 4),
        # the decode stage also hashes every input (content_sha256): per byte, for the assumed size
        "sha256_ms_per_mb": round(_per_call_ms(lambda: hashlib.sha256(jpeg).digest(), repeat * 5)
                                  / (len(jpeg) / 1e6), 4),
    }


def measure_mask_row_bytes(rows: int = 200, size: int = 320) -> float:
    """Bytes per `masks` row on disk for clean (smooth-edged) 320×320 maps, zstd-3 Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    maps = []
    for _ in range(rows):
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        rx, ry = rng.uniform(0.15, 0.35, 2) * size
        d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
        # A blob with a transition of a few pixels, like a trained model's output on a clean
        # object (random weights give noise maps, which compress far worse and mean nothing).
        m = 1 / (1 + np.exp((d - 1) * 40))
        maps.append((m * 255).astype(np.uint8).tobytes())
    table = pa.table({
        "key": [f"photos/{i:08d}.jpg" for i in range(rows)],
        "source_uri": [f"s3://bucket/photos/{i:08d}.jpg" for i in range(rows)],
        "source_fingerprint": [f"{400000 + i}-{i:032x}" for i in range(rows)],
        "content_sha256": [f"{i:064x}" for i in range(rows)],
        "prob_map": maps,
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=3)
    return round(len(buf.getvalue()) / rows + 120, 1)  # + ~120 B: the small fixed columns not modelled


# ---------------------------------------------------------------------------------------------
# Projection

def project(n: int, model: str, a: argparse.Namespace, cpu: dict, scale: dict, mask_row: float) -> dict:
    node_vcpus_free = a.vcpus_per_node - a.reserved_vcpus_per_node
    flops = GFLOPS_320[model] * 1e9 * (a.input_size / 320) ** 2
    gpu_ips = {k: a.gpus_per_node * a.gpu_peak_tflops * 1e12 * mfu / flops
               for k, mfu in (("low", a.mfu_low), ("high", a.mfu_high))}
    read_ms = cpu["read_packed_sample_ms"]  # parsing a sample out of a shard (the GET is I/O)
    sha_ms = cpu["sha256_ms_per_mb"] * a.mean_image_bytes / 1e6
    cpu_ms = (cpu["decode_1080p_to_320_ms"] + cpu["postprocess_1080p_ms"] + sha_ms + read_ms) / a.vcpu_speed
    cpu_ips = node_vcpus_free * 1000 / cpu_ms
    net_ips = a.nic_gbps * 1e9 / 8 * a.nic_efficiency / a.mean_image_bytes
    out = {"images": n, "model": model, "cpu_ms_per_image": round(cpu_ms, 3), "per_node_images_per_s": {
        "gpu_low_mfu": round(gpu_ips["low"]), "gpu_high_mfu": round(gpu_ips["high"]),
        "cpu": round(cpu_ips), "network": round(net_ips)}, "scenarios": {}}
    # Driver-side planning: one process, no matter how many nodes.
    pages = n / 1000  # ListObjectsV2 returns at most 1000 keys a page, pages are sequential
    list_h = (pages * a.list_page_s + n * scale["list_us_per_object"] / 1e6) / 3600
    # Loose objects need one GET per image; S3 serves ~5,500 GETs/s per prefix, then throttles.
    s3_cap = a.s3_get_per_s_per_prefix * a.prefixes
    for case in ("low", "high"):
        limits = {"gpu": gpu_ips[case], "cpu": cpu_ips, "network": net_ips}
        bottleneck = min(limits, key=limits.get)
        cluster_ips = a.nodes * limits[bottleneck]
        infer_h = (n / cluster_ips + a.fixed_overhead_s) / 3600
        loose_h = list_h + (n / min(cluster_ips, s3_cap) + a.fixed_overhead_s) / 3600
        out["scenarios"][f"mfu_{case}"] = {
            "bottleneck": bottleneck, "cluster_images_per_s": round(cluster_ips),
            "infer_hours": round(infer_h, 3),  # packed shards (or a manifest, planned in seconds)
            "infer_node_hours": round(infer_h * a.nodes, 2),
            "infer_usd": round(infer_h * a.nodes * a.node_hour_usd, 2),
            "gpu_busy_fraction": round(cluster_ips / (a.nodes * gpu_ips[case]), 2),
            # the same run straight from loose objects: listing first, then GET-rate bound
            "loose_objects_hours": round(loose_h, 3),
            "loose_objects_usd": round(loose_h * a.nodes * a.node_hour_usd + n / 1000 * a.get_usd_per_1k, 2),
        }
    out["driver"] = {
        "list_loose_objects_hours": round(list_h, 3),
        "plan_manifest_hours": round(n * scale["plan_manifest_us_per_unit"] / 1e6 / 3600, 3),
        "list_packed_shards_s": round(n / a.shard_size / 1000 * a.list_page_s, 1),
        "plan_memory_gib": round(n * scale["bytes_per_unit"] / 2**30, 2),
    }
    # Requests: loose objects cost one GET each per run; packed shards one GET per shard.
    gets_loose, gets_packed = n, n / a.shard_size
    out["requests_usd"] = {
        "loose_get": round(gets_loose / 1000 * a.get_usd_per_1k, 2),
        "loose_list": round(pages / 1000 * a.list_usd_per_1k, 2),
        "packed_get": round(gets_packed / 1000 * a.get_usd_per_1k, 4),
        "mask_file_puts": round(n / a.rows_per_file / 1000 * a.put_usd_per_1k, 4),
    }
    # Reading loose objects, the cluster needs one GET per image at its pace; S3 serves about
    # 5,500 GETs/s per prefix before throttling (SlowDown), packed shards need 1/shard_size of it.
    fastest = max(s["cluster_images_per_s"] for s in out["scenarios"].values())
    out["loose_objects_get_rate"] = {
        "gets_per_s_at_fastest": fastest,
        "prefixes_needed": int(-(-fastest // a.s3_get_per_s_per_prefix)),
        "packed_gets_per_s": round(fastest / a.shard_size, 1),
    }
    # Packing: reading the loose object is I/O (bounded by the GET rate and the network), the
    # CPU part is the tar member and the hash (measured), plus the index row (negligible).
    pack_ips_cluster = a.nodes * a.vcpus_per_node * 1000 / (cpu["pack_tar_sha256_ms"] / a.vcpu_speed)
    pack_ips_cluster = min(pack_ips_cluster, a.s3_get_per_s_per_prefix * a.prefixes,
                           a.nodes * net_ips)
    out["pack_once"] = {
        "cluster_images_per_s": round(pack_ips_cluster),
        "hours": round(n / pack_ips_cluster / 3600, 3),
        "usd": round(n / pack_ips_cluster / 3600 * a.nodes * a.node_hour_usd
                     + gets_loose / 1000 * a.get_usd_per_1k
                     + 3 * gets_packed / 1000 * a.put_usd_per_1k, 2),  # shard, index piece, marker
        "bound": ("S3 GET rate per prefix" if pack_ips_cluster == a.s3_get_per_s_per_prefix * a.prefixes
                  else "cpu/network"),
    }
    out["output_gib"] = {
        "masks_table": round(n * mask_row / 2**30, 2),
        "packed_shards": round(n * (a.mean_image_bytes + 2048) / 2**30, 1),  # + tar headers of 2 members
    }
    return out


def _scale_inputs(report: dict) -> dict:
    st = report["stages"]
    pack = st["pack"]
    per_img = pack.get("task_wall_ms_per_image") or pack.get("task_cpu_ms_per_image")
    return {
        "list_us_per_object": st["list"]["us_per_object"],
        "plan_us_per_unit": st["plan"]["us_per_unit"],
        "plan_manifest_us_per_unit": st["plan_manifest"]["us_per_unit"],
        "bytes_per_unit": st["plan"]["bytes_per_unit"],
        "pack_images_per_s_here": pack["images_per_s"],
        "pack_core_ms_per_image_upper_bound_here": pack.get("core_ms_per_image_upper_bound"),
        "pack_task_wall_ms_per_image_here": per_img,
        "scale_run_images": st["pack"]["inputs"],
        "scale_run_load_average": report.get("load_average_start"),
    }


def _table(rows: list[dict]) -> str:
    head = ("| images | model | MFU | bottleneck | cluster img/s | hours | $ | loose objects: h / $ | "
            "driver: list loose h / plan manifest h / plan GiB | masks GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        for case, s in r["scenarios"].items():
            lines.append(
                f"| {r['images']:,} | {r['model']} | {case.split('_')[1]} | {s['bottleneck']} | "
                f"{s['cluster_images_per_s']:,} | {s['infer_hours']} | {s['infer_usd']} | "
                f"{s['loose_objects_hours']} / {s['loose_objects_usd']} | "
                f"{r['driver']['list_loose_objects_hours']} / {r['driver']['plan_manifest_hours']} / "
                f"{r['driver']['plan_memory_gib']} | {r['output_gib']['masks_table']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale-report", default=str(REPO / ".bench_out" / "scale_run.json"))
    ap.add_argument("--out", default=str(REPO / ".bench_out" / "cost_model.json"))
    ap.add_argument("--images", type=int, nargs="+", default=[1_000_000, 100_000_000])
    ap.add_argument("--models", nargs="+", default=["u2net", "u2netp"], choices=list(GFLOPS_320))
    ap.add_argument("--input-size", type=int, default=320)
    g = ap.add_argument_group("cluster shape (assumed)")
    g.add_argument("--cluster-name", default="8 × (1× H100 SXM 80GB + 16 vCPU)")
    g.add_argument("--nodes", type=int, default=8)
    g.add_argument("--gpus-per-node", type=int, default=1)
    g.add_argument("--vcpus-per-node", type=int, default=16)
    g.add_argument("--reserved-vcpus-per-node", type=float, default=2,
                   help="for the GPU actor's Python side and Ray's own processes")
    g.add_argument("--vcpu-speed", type=float, default=1.0,
                   help="work one cloud vCPU does relative to one core of the measuring machine")
    g.add_argument("--gpu-peak-tflops", type=float, default=989.0, help="H100 SXM dense BF16")
    g.add_argument("--mfu-low", type=float, default=0.08,
                   help="fraction of peak U²-Net reaches, pessimistic (small-channel 3×3 convs, "
                        "bilinear upsampling and concatenations are memory-bound)")
    g.add_argument("--mfu-high", type=float, default=0.25,
                   help="optimistic (the published 30 FPS of U2NET on a 1080Ti is ~31%% of its "
                        "fp32 peak at batch 1)")
    g.add_argument("--nic-gbps", type=float, default=25.0)
    g.add_argument("--nic-efficiency", type=float, default=0.7)
    g.add_argument("--node-hour-usd", type=float, default=4.0,
                   help="price of one node (1 H100 + 16 vCPU) per hour, assumed")
    g.add_argument("--fixed-overhead-s", type=float, default=120.0,
                   help="cluster-side start: Ray up, weights to actors, first batches")
    d = ap.add_argument_group("data and object store (assumed)")
    d.add_argument("--mean-image-bytes", type=int, default=400_000, help="a 1080p JPEG at q90")
    d.add_argument("--shard-size", type=int, default=1000)
    d.add_argument("--rows-per-file", type=int, default=2000)
    d.add_argument("--list-page-s", type=float, default=0.06, help="latency of one ListObjectsV2 page")
    d.add_argument("--get-usd-per-1k", type=float, default=0.0004, help="S3 Standard GET")
    d.add_argument("--put-usd-per-1k", type=float, default=0.005, help="S3 Standard PUT")
    d.add_argument("--list-usd-per-1k", type=float, default=0.005, help="S3 Standard LIST")
    d.add_argument("--s3-get-per-s-per-prefix", type=float, default=5500)
    d.add_argument("--prefixes", type=int, default=1, help="prefixes the loose objects are spread over")
    a = ap.parse_args(argv)

    scale_report = json.loads(Path(a.scale_report).read_text())
    scale = _scale_inputs(scale_report)
    load_before = os.getloadavg()
    cpu = measure_cpu()
    mask_row = measure_mask_row_bytes()
    rows = [project(n, m, a, cpu, scale, mask_row) for n in a.images for m in a.models]
    result = {"cluster": a.cluster_name,
              "assumptions": {k: v for k, v in vars(a).items() if k not in ("scale_report", "out")},
              "measured": {"cpu_per_image_this_machine": cpu, "load_average": load_before,
                           "masks_bytes_per_row_320": mask_row,
                           "from_scale_run": scale, "scale_run_machine": scale_report.get("machine")},
              "projections": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"load average while measuring: {load_before[0]:.1f} on {os.cpu_count()} CPUs "
          "(measurements on a busy machine overstate CPU costs)")
    print(f"cluster: {a.cluster_name}; input {a.input_size}px; measured CPU ms/image here: "
          f"decode {cpu['decode_1080p_to_320_ms']}, postprocess {cpu['postprocess_1080p_ms']}, "
          f"sha256/MB {cpu['sha256_ms_per_mb']}, read packed sample {cpu['read_packed_sample_ms']}, "
          f"pack tar+sha256 {cpu['pack_tar_sha256_ms']}; masks row at 320: {mask_row} B")
    print(_table(rows))
    print(f"full result: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
