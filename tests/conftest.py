"""Shared fixtures: small image folders the tests make, and the shared CIFAR-10 JPEG copy when present."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _torch_state_as_found() -> object:
    """Each test starts with the process-wide torch switches as the suite set them: a test that runs
    ``cli.main`` in this process (a verb that seeds and sets deterministic mode and threads for its run, as
    a command may) left them on for every later test, whose result then hung on the order tests ran in."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


def make_image(path: Path, color: tuple[int, int, int], size: int = 24, mode: str = "RGB", noise: int = 30) -> Path:
    """A noisy image of one dominant colour: learnable, and every file different."""
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    arr = np.clip(np.array(color)[None, None, :] + rng.integers(-noise, noise + 1, (size, size, 3)), 0, 255).astype(
        "uint8"
    )
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def class_folder(
    root: Path, colors: dict[str, tuple[int, int, int]], n: int, size: int = 24, suffix: str = ".png"
) -> Path:
    """root/<class>/<class><i><suffix>: ``n`` noisy images of one colour a class."""
    for name, color in colors.items():
        for i in range(n):
            make_image(root / name / f"{name}{i}{suffix}", color, size=size)
    return root


@pytest.fixture
def color_folder(tmp_path: Path) -> Path:
    """root/<class>/*.png with three colour classes, 40 images each."""
    root = tmp_path / "colors"
    colors = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
    for name, color in colors.items():
        for i in range(40):
            make_image(root / name / f"{i}.png", color)
    return root


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed command line as a user would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("CLASSLAB_RUN_DIR", None)
    env.pop("CLASSLAB_LOCK_OWNER", None)  # a lock held by this test process is not the child's
    return subprocess.run(
        [sys.executable, "-m", "classlab.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env
    )


def tiny_config(tmp_path: Path, **extra: object) -> list[str]:
    """Overrides for a fast run on the embedded sample (1,000 training images, small CNN)."""
    base = {
        "run.root": str(tmp_path / "runs"),
        "data.images_per_class": 100,
        "data.batch_size": 64,
        "data.cache_dir": str(tmp_path / "cache"),
        "model.layers": "[16,p,32,p,64,p]",
        "epochs": 3,
        "optim.lr": 0.05,
        "trainer.progress": "false",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small run on the embedded sample (1 epoch, 30 images a class), trained once per test session."""
    import classlab

    tmp = tmp_path_factory.mktemp("tiny")
    classlab.train(None, tiny_config(tmp, exp_name="tiny", epochs=1, **{"data.images_per_class": 30}), quiet=True)
    return tmp / "runs" / "tiny"


@pytest.fixture(scope="module")
def tiny_run(tiny_trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the session's tiny run, so a module's eval/export files stay its own."""
    dest = tmp_path_factory.mktemp("run") / tiny_trained.name
    shutil.copytree(tiny_trained, dest)
    return dest


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for a module's page tests (tests/browser.py); the test is skipped without one."""
    from tests.browser import Browser, find_browser

    binary = find_browser()
    if binary is None:
        pytest.skip(
            "no Chromium or Chrome found (apt-get install chromium, or set CHROME_BIN): the page was not opened"
        )
    with Browser(binary) as b:
        yield b
