"""Image-folder normalize at scale: decode throughput and peak memory on generated images.

Generates --images 64x64 RGB images (JPEG by default; in parallel) in --classes class folders laid
out as data/raw/imagefolder/ in a temporary folder, then runs the normalize stage's code on them
in a child process and measures:

- decode throughput: images per second in the decode phase (decode_folder), and for the whole
  normalize (decode, split, write, statistics, report);
- peak RSS of the process tree (normalize and its decode workers), sampled every 50 ms with psutil
  as the sum over the tree (shared library pages counted once per process: an overestimate), and
  the exact peaks (getrusage) of the normalize process and of its largest decode worker.

The target, at 100,000 images: at most 2 GB peak RSS for the tree.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

from common import ROOT, BenchError, main_guard, row, write_result

RSS_TARGET_MB = 2048
SAMPLE_SECONDS = 0.05


def generate_one(job: tuple[Path, int, int, str]) -> None:
    """A smooth random image with some texture, so files and decoding are photo-like, not trivial."""
    import numpy as np
    from PIL import Image

    path, seed, size, fmt = job
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    corners = rng.uniform(0, 255, (2, 2, 3))
    rows = corners[0][None, :] * (1 - ramp[:, None, None]) + corners[1][None, :] * ramp[:, None, None]
    base = rows[:, 0][:, None] * (1 - ramp[None, :, None]) + rows[:, 1][:, None] * ramp[None, :, None]
    pixels = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    options = {"quality": 90} if fmt == "jpeg" else {}
    Image.fromarray(pixels).save(path, fmt.upper(), **options)


def generate(raw: Path, images: int, classes: int, size: int, fmt: str, workers: int) -> float:
    suffix = ".jpg" if fmt == "jpeg" else ".png"
    for c in range(classes):
        (raw / f"class_{c:02d}").mkdir(parents=True)
    jobs = [(raw / f"class_{i % classes:02d}" / f"{i:07d}{suffix}", i, size, fmt) for i in range(images)]
    started = time.perf_counter()
    with Pool(workers) as pool:
        for _ in pool.imap_unordered(generate_one, jobs, chunksize=256):
            pass
    return time.perf_counter() - started


def child(data: Path, size: int, workers: int) -> None:
    """Run normalize as the stage does; print timings and exact peak RSS as one JSON line."""
    from imgclf.config.compose import compose
    from imgclf.config.operations import validate
    from imgclf.data.normalize import normalize
    from imgclf.data.sources import imagefolder

    timings = {}
    decode_folder = imagefolder.decode_folder

    def timed_decode(*args, **kwargs):
        started = time.perf_counter()
        result = decode_folder(*args, **kwargs)
        timings["decode_s"] = time.perf_counter() - started
        return result

    imagefolder.decode_folder = timed_decode  # normalize looks it up at call time
    overrides = ["data=imagefolder", "data.path=generated", f"data.image_size=[{size},{size}]"]
    config = validate(compose([*overrides, f"data.workers={workers}"], ROOT / "conf")).data
    started = time.perf_counter()
    report = normalize(config, 0, data / "raw" / "imagefolder", data / "normalized")
    timings["normalize_s"] = time.perf_counter() - started
    kib = 1024  # ru_maxrss is in KiB on Linux
    result = {
        **timings,
        "n_images": report["n_images"],
        "bad_files": len(report["bad_files"]),
        "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
        "largest_worker_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib,
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_child(data: Path, size: int, workers: int) -> tuple[dict, float, int]:
    """The child's result, the peak summed RSS of its process tree (MB) and the most processes seen."""
    import psutil

    cmd = [sys.executable, __file__, "--child", str(data), "--size", str(size), "--workers", str(workers)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree = psutil.Process(process.pid)
    peak, most = 0, 0
    while process.poll() is None:
        total, count = 0, 0
        try:
            members = [tree, *tree.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for member in members:
            try:
                total += member.memory_info().rss
                count += 1
            except psutil.NoSuchProcess:
                pass
        peak, most = max(peak, total), max(most, count)
        time.sleep(SAMPLE_SECONDS)
    out, err = process.communicate()
    if process.returncode:
        raise BenchError(f"normalize failed with exit code {process.returncode}:\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise BenchError(f"normalize printed no result:\n{out[-2000:]}\n{err[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT ")), peak / 2**20, most


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000, help="images to generate (default 100,000)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=64, help="side of the square images, in pixels")
    parser.add_argument("--format", choices=["jpeg", "png"], default="jpeg")
    parser.add_argument(
        "--workers", type=int, default=0, help="decode processes (data.workers); 0: one per core"
    )
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.size, args.workers)
        return

    work = Path(tempfile.mkdtemp(prefix="imgclf-bench-imagefolder-", dir=args.dir))
    try:
        raw = work / "data" / "raw" / "imagefolder"
        cpus = os.cpu_count() or 1
        print(
            f"generating {args.images} {args.size}x{args.size} {args.format} images in {raw} ...", flush=True
        )
        generate_s = generate(raw, args.images, args.classes, args.size, args.format, cpus)
        on_disk = sum(p.stat().st_size for p in raw.rglob("*") if p.is_file())
        print(f"generated in {generate_s:.1f} s ({on_disk / 2**20:.0f} MB); normalizing ...", flush=True)
        result, tree_peak_mb, processes = run_child(work / "data", args.size, args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = args.images
    if sum(result["n_images"].values()) != n or result["bad_files"]:
        raise BenchError(
            f"expected {n} good images, the report says {result['n_images']}, bad {result['bad_files']}"
        )
    rows = [
        row("images", n),
        row("decode throughput", round(n / result["decode_s"], 1), "images/s"),
        row(
            "normalize throughput (whole stage)",
            round(n / result["normalize_s"], 1),
            "images/s",
        ),
        row("normalize wall time", round(result["normalize_s"], 2), "s"),
        row("peak RSS, process tree (sampled sum)", round(tree_peak_mb, 1), "MB", "<=", RSS_TARGET_MB),
        row("peak RSS, normalize process", round(result["self_maxrss_mb"], 1), "MB"),
        row("peak RSS, largest decode worker", round(result["largest_worker_maxrss_mb"], 1), "MB"),
    ]
    details = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
        "generate_s": round(generate_s, 2),
        "bytes_on_disk": on_disk,
        "processes_seen": processes,
        "child": result,
    }
    write_result("imagefolder", rows, details)


if __name__ == "__main__":
    main_guard(main)
