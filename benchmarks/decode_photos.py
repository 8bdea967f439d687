"""Decoding a folder of phone-sized photos: the first run (decode once, in parallel, cache) against the second (cache).

    python benchmarks/decode_photos.py                     # 1,000 photos of 3000x4000: BENCHMARKS.md "decode_photos"
    python benchmarks/decode_photos.py --photos 200        # fewer photos (say so when quoting the figure)
    python benchmarks/decode_photos.py --smoke             # 8 small photos, nothing written (CI)

The photos are made here, once, by upscaling the shared flowers5 photos (128x128) to 3000x4000
and saving them as JPEG quality 90, the size and format of a 12-megapixel phone photo. The
decode of a training run is what is timed: ``load_data`` on the folder at the training size,
first with an empty cache (every JPEG decoded at reduced scale in parallel threads, then the
uint8 tensor cached), then again (the cache read back).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FLOWERS, WORK, command, machine, publish, today  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

HYP = {
    "photos": 1000,  # photos in the folder
    "width": 3000,  # pixels, portrait 3000x4000 as a 12-megapixel phone camera
    "height": 4000,
    "quality": 90,  # JPEG quality of the made photos
    "image_size": 128,  # training resolution they are decoded to
}
SMOKE = {"photos": 8, "width": 300, "height": 400}


# ---------------------------------------------------------------------------------------------
# The photos
# ---------------------------------------------------------------------------------------------


def make_photos(source: Path, dest: Path, hyp: dict) -> Path:
    """``dest/<class>/<n>.jpg``: ``hyp['photos']`` upscaled copies of the source photos, classes taken in turn."""
    marker = dest / f".complete-{hyp['photos']}-{hyp['width']}x{hyp['height']}"
    if marker.is_file():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    files = {c.name: sorted(c.glob("*.jpg")) for c in classes}
    jobs = [
        (c.name, files[c.name][i // len(classes)], i) for i in range(hyp["photos"]) for c in [classes[i % len(classes)]]
    ]

    def one(job: tuple[str, Path, int]) -> None:
        name, src, i = job
        out = dest / name / f"{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as img:
            big = img.convert("RGB").resize((hyp["width"], hyp["height"]), Image.BILINEAR)
        big.save(out, quality=hyp["quality"])

    started = time.perf_counter()
    with ThreadPoolExecutor() as pool:
        list(pool.map(one, jobs))
    marker.write_text(f"made in {time.perf_counter() - started:.0f}s\n")
    return dest


# ---------------------------------------------------------------------------------------------
# The timing
# ---------------------------------------------------------------------------------------------


def time_load(folder: Path, cache: Path, image_size: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all threads) of ``load_data`` on the folder."""
    from classlab.config import load_config
    from classlab.data.pipeline import load_data

    cfg = load_config(
        None,
        [
            "data.dataset=folder",
            f"data.root={folder}",
            f"data.cache_dir={cache}",
            f"data.image_size={image_size}",
            "data.val_fraction=0.2",
        ],
    )
    started, cpu = time.perf_counter(), time.process_time()
    data = load_data(cfg)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert len(data.train) + len(data.val or []) == sum(1 for _ in folder.rglob("*.jpg"))
    return elapsed, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=HYP["photos"], help="how many photos to make and decode")
    parser.add_argument("--source", type=Path, default=FLOWERS, help="folder of class folders to upscale")
    parser.add_argument("--work", type=Path, default=WORK / "decode_photos")
    parser.add_argument("--smoke", action="store_true", help="8 small photos; BENCHMARKS.md untouched")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        print(f"error: {args.source} not found: pass --source <folder of class folders>", file=sys.stderr)
        return 2
    hyp = {**HYP, "photos": args.photos, **(SMOKE if args.smoke else {})}
    folder = make_photos(args.source, args.work / f"photos_{hyp['width']}x{hyp['height']}", hyp)
    megabytes = sum(f.stat().st_size for f in folder.rglob("*.jpg")) / 2**20
    cache = args.work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    (first, first_cpu), (second, second_cpu) = (time_load(folder, cache, hyp["image_size"]) for _ in range(2))
    from classlab.data.loaders import available_cores

    n = hyp["photos"]
    body = (
        f"## Decoding phone photos (decode once, cache)\n\n{today()}; {machine()}; "
        f"{available_cores()} decode threads.\n"
        f"`{command()}`\n\n"
        f"{n:,} JPEGs of {hyp['width']}x{hyp['height']} ({megabytes:,.0f} MB, flowers5 photos upscaled), "
        f"loaded as a training run loads them, at {hyp['image_size']} px:\n\n"
        "| run | wall seconds | CPU seconds (all threads) | photos / s (wall) |\n|---|---|---|---|\n"
        f"| first (reduced-scale decode, parallel, cache written) | {first:.1f} | {first_cpu:.1f} | {n / first:.0f} |\n"
        f"| second (read the cache) | {second:.2f} | {second_cpu:.2f} | {n / second:.0f} |\n\n"
        "The CPU was shared with other jobs while this ran, so the wall times are upper bounds; the CPU\n"
        "seconds are what the work costs (on idle cores the first run's wall time is about CPU seconds / cores).\n"
    )
    publish("decode_photos", body, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
