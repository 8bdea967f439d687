"""Predict at scale: streamed CSV, progress with images/s, unreadable files listed and skipped."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import classlab
from classlab.errors import ClassLabError
from tests.conftest import run_cli


def make_folder(root: Path, n: int, broken: int, seed: int = 0) -> list[str]:
    """``n`` small random images in a few sub-folders plus ``broken`` damaged files; returns the broken names."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        size = int(rng.choice([12, 16, 24, 40]))
        path = root / f"part{i % 7}" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size + i % 5, 3), dtype=np.uint8)).save(path)
    names = []
    for j in range(broken):
        path = root / f"part{j % 7}" / f"broken{j}.{'png' if j % 2 else 'jpg'}"
        if j % 2:  # a truncated PNG
            good = (root / "part0" / "img0.png").read_bytes()
            path.write_bytes(good[: len(good) // 2])
        else:  # not an image at all
            path.write_bytes(random.Random(j).randbytes(100))
        names.append(path.name)
    return names


def test_folder_with_broken_files(tiny_run: Path, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    broken = make_folder(images, 300, 6)
    out = tmp_path / "out" / "pred.csv"
    result = run_cli("predict", str(tiny_run), str(images), "--out", str(out), "--batch-size", "64")
    assert result.returncode == 0, result.stderr
    assert "images/s" in result.stderr and "306/306 images" in result.stderr  # progress
    assert "wrote 306 predictions" in result.stdout and "images/s" in result.stdout
    assert "6 file(s) could not be read" in result.stderr
    assert all(name in result.stderr for name in broken)  # listed at the end
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 306 and not list(out.parent.glob("*.tmp"))
    bad = {Path(r["path"]).name for r in rows if r["error"]}
    assert bad == set(broken)
    assert all(r["class"] and not r["error"] for r in rows if Path(r["path"]).name not in bad)
    # Natural order: img2 before img10 inside a folder.
    part0 = [Path(r["path"]).name for r in rows if "/part0/" in r["path"] and r["path"].endswith(".png")]
    assert part0.index("img7.png") < part0.index("img14.png")


def test_api_streams_unless_rows_wanted(tiny_run: Path, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    make_folder(images, 40, 2)
    streamed = classlab.predict(tiny_run, [images], tmp_path / "p.csv", batch_size=16)
    assert streamed.rows is None and len(streamed) == 42 and streamed.failed_count == 2
    assert len(streamed.failed) == 2 and streamed.images_per_s > 0
    with pytest.raises(ClassLabError, match="keep_rows=True"):
        list(streamed)
    kept = classlab.predict(tiny_run, [images], batch_size=16)  # no CSV: the rows are the result
    assert kept.rows is not None and len(list(kept)) == 42
    csv_rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["class"] for r in csv_rows] == [r["class"] for r in kept]


def test_file_names_that_are_not_utf8(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A CP949 name unzipped on Linux (bytes that are not UTF-8) failed the whole CSV with UnicodeEncodeError;
    now its row shows the bytes as \\xNN, the CSV stays UTF-8, and one note says how to rename."""
    from classlab.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (24, 24), (200, 20, 20)).save(os.fsdecode(os.fsencode(folder) + b"/\xc7\xd1.png"))
    Image.new("RGB", (24, 24), (20, 200, 20)).save(folder / "고양이.png")
    assert main(["predict", str(tiny_run), str(folder), "--out", str(tmp_path / "p.csv"), "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert sorted(Path(r["path"]).name for r in rows) == ["\\xc7\\xd1.png", "고양이.png"]
    assert all(r["class"] and not r["error"] for r in rows)
    assert "note: 1 file name(s) are not UTF-8" in capsys.readouterr().err


def test_a_url_is_named_as_one() -> None:
    """People paste an image's address; 'does not exist' would send them looking for a file."""
    from classlab.predict import expand_paths

    with pytest.raises(ClassLabError, match=r"'https://x\.org/cat\.jpg' is a URL; predict reads files: download"):
        expand_paths(["https://x.org/cat.jpg"])


def test_a_csv_given_as_images_is_named(tmp_path: Path) -> None:
    """A competition's test.csv given to predict was one 'not an image PIL can read' row and exit code 0."""
    from classlab.predict import expand_paths

    (tmp_path / "test.csv").write_text("id,label\n0a1b,\n")
    with pytest.raises(ClassLabError) as err:
        expand_paths([tmp_path / "test.csv"])
    assert str(err.value) == (
        f"'{tmp_path / 'test.csv'}' is a CSV file, not an image; give the folder of the images it lists, with "
        f"--template {tmp_path / 'test.csv'} --id-column COLUMN to fill it as a submission (or `classlab eval RUN "
        f"--data {tmp_path / 'test.csv'}` to score a labelled manifest)"
    )


def test_failure_leaves_no_partial_csv(tiny_run: Path, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    make_folder(images, 10, 0)
    out = tmp_path / "pred.csv"
    out.write_text("old\n")
    with pytest.raises(ClassLabError):
        classlab.predict(tiny_run, [images], out, backend="tflite")
    assert out.read_text() == "old\n" and not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_ten_thousand_images_bounded_memory(tiny_run: Path, tmp_path: Path) -> None:
    images = tmp_path / "many"
    make_folder(images, 10_000, 20)
    out = tmp_path / "many.csv"
    code = (
        "import resource, sys, classlab;"
        f"r = classlab.predict({str(tiny_run)!r}, [{str(images)!r}], {str(out)!r}, progress=True);"
        "print(r.count, r.failed_count, round(r.images_per_s),"
        " resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    count, failed, rate, peak_mb = map(int, result.stdout.split())
    print(f"10,020 files: {rate} images/s, peak RSS {peak_mb} MB")
    assert count == 10_020 and failed == 20 and rate > 0
    assert peak_mb < 1500, f"peak resident memory {peak_mb} MB"
    with open(out) as handle:
        assert sum(1 for _ in handle) == 10_021


def test_rate_reads_well_for_a_handful_of_images() -> None:
    """Three images after a second of model loading: "0.4 images/s", not "0 images/s"."""
    from classlab.predict import rate_text

    assert rate_text(3, 7.5) == "0.4 images/s"
    assert rate_text(300, 2.0) == "150 images/s"
    assert rate_text(0, 0.0) == "0.0 images/s"


def test_out_places_that_cannot_take_the_file_are_one_line(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Before: 'error: unexpected FileExistsError' (--out under a file), 'unexpected OSError' (a read-only disk), a
    submission told to 'continue the run with --resume'; --out to a device or pipe renamed a regular file onto it
    (as root: /dev/stdout replaced); an empty folder wrote a header-only CSV and exit code 0."""
    import errno
    import threading

    from tests.faults import cli, error_lines, fail_writes

    images = tmp_path / "imgs"
    make_folder(images, 4, 0)
    (tmp_path / "a.csv").write_text("x\n")
    code, _, err = cli(capsys, "predict", str(tiny_run), str(images), "--out", str(tmp_path / "a.csv" / "p.csv"), "-q")
    assert code == 1 and error_lines(err) == [
        f"error: cannot write {tmp_path / 'a.csv' / 'p.csv'}: '{tmp_path / 'a.csv'}' is a file, not a folder; "
        "nothing was written there: give --out a place you can write to"
    ], err
    template = tmp_path / "info.csv"
    template.write_text("ImageID,ans\npart0/img0,\n")
    for name, extra in {"p.csv": [], "s.csv": ["--template", str(template)]}.items():
        failed = fail_writes(monkeypatch, name, errno.EROFS, at="open")
        code, _, err = cli(capsys, "predict", str(tiny_run), str(images), "--out", str(tmp_path / name), "-q", *extra)
        monkeypatch.undo()
        assert (
            code == 1
            and failed
            and error_lines(err)
            == [
                f"error: cannot write {tmp_path / name}: Read-only file system; nothing was written there: "
                "give --out a place you can write to"
            ]
        ), err
        assert not list(tmp_path.glob(f".{name}.*"))

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    code, out, err = cli(capsys, "predict", str(tiny_run), str(images), "--out", str(fifo), "-q")
    reader.join(timeout=60)
    assert code == 0, err
    assert fifo.is_fifo() and got[0].decode().startswith("path,class,prob") and got[0].count(b"\n") == 5
    assert out == "" and f"wrote 4 predictions to {fifo}" in err  # the pipe carries the CSV alone

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    code, _, err = cli(capsys, "predict", str(tiny_run), str(tmp_path / "empty"), "--out", str(tmp_path / "e.csv"))
    assert code == 1 and not (tmp_path / "e.csv").exists()
    assert error_lines(err) == [
        f"error: no image files in '{tmp_path / 'empty'}' (.jpg, .png, .webp, ... in any sub-folder); give the folder "
        "that holds the images"
    ]
