"""``classlab report``: one self-contained HTML page, opened in a real (headless) browser.

The browser part needs Chromium or Chrome (Debian: ``apt-get install chromium``; ``.ci/run`` installs it);
where none can be found those tests are skipped and say so. The page's content is checked without one too.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import classlab
from tests.browser import Browser
from tests.conftest import run_cli, tiny_config

COLUMN = "Array.from(document.querySelectorAll('#{table} tbody tr')).map(r => r.cells[{col}].dataset.sort)"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One trained run, and two copies of it with other learning rates and test accuracies (a small sweep)."""
    tmp = tmp_path_factory.mktemp("html")
    classlab.train(None, tiny_config(tmp, exp_name="a", epochs=2, **{"data.images_per_class": 30}), quiet=True)
    root = tmp / "runs"
    for name, lr, acc in (("b", 0.2, 0.91), ("c", 0.01, 0.05)):
        shutil.copytree(root / "a", root / name)
        config = yaml.safe_load((root / name / "config.yaml").read_text())
        config["optim"]["lr"], config["exp_name"] = lr, name
        (root / name / "config.yaml").write_text(yaml.safe_dump(config))
        summary = json.loads((root / name / "summary.json").read_text())
        (root / name / "summary.json").write_text(json.dumps({**summary, "test_acc": acc}))
    return root


def _self_contained(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)  # no file, CDN or server references
    assert "<script src" not in page and "<link" not in page and "http://" not in page and "https://" not in page


@pytest.fixture(scope="module")
def single_page(runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("page") / "single.html"
    result = run_cli("report", str(runs / "a"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out} (one self-contained page: open it in any browser)"
    return out


def test_single_run_page_content(single_page: Path, runs: Path) -> None:
    page = single_page.read_text()
    _self_contained(page)
    report = json.loads((runs / "a" / "eval" / "test" / "report.json").read_text())  # computed by `report`
    for section in ("Runs", "Validation curves", "Confusion matrix", "Per-class precision", "Most confidently"):
        assert section in page
    for err in report["confident_errors"][:3]:
        assert f"true: {err['true']}" in page and f"pred: {err['predicted']}" in page
    assert page.count('class="thumb"') == len(report["confident_errors"]) > 0


def test_single_run_page_in_browser(single_page: Path, runs: Path, browser: Browser, tmp_path: Path) -> None:
    report = json.loads((runs / "a" / "eval" / "test" / "report.json").read_text())
    browser.open(single_page)
    images = browser.js(
        "Array.from(document.images).map(i => ({ok: i.complete && i.naturalWidth > 0, src: i.src.slice(0, 22)}))"
    )
    # Two curves, the reliability diagram and a thumbnail per confident error, all decoded from data URIs.
    assert len(images) == 3 + len(report["confident_errors"])
    assert all(i["ok"] and i["src"] == "data:image/png;base64," for i in images), images
    assert browser.js("document.querySelectorAll('#confusion tbody tr').length") == 10
    precision = COLUMN.format(table="per-class", col=1)
    browser.click("#per-class th:nth-child(2)")
    ascending = [float(v) for v in browser.js(precision)]
    assert ascending == sorted(ascending) and ascending[0] < ascending[-1]
    browser.click("#per-class th:nth-child(2)")
    assert [float(v) for v in browser.js(precision)] == sorted(ascending, reverse=True)
    assert browser.errors() == []
    shot = browser.screenshot(tmp_path / "report.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_compare_html_sorts_runs_in_browser(runs: Path, browser: Browser, tmp_path: Path) -> None:
    result = run_cli("compare", str(runs / "*"), "--html", "--out", str(tmp_path / "cmp"), "--no-plots")
    assert result.returncode == 0, result.stderr
    page = tmp_path / "cmp" / "report.html"
    assert str(page) in result.stdout
    text = page.read_text()
    _self_contained(text)
    assert "Error analysis" not in text  # several runs: the table and the curves only
    browser.open(page)
    header = browser.js("Array.from(document.querySelectorAll('#runs th')).map(h => h.textContent)")
    assert header[:3] == ["run", "status", "optim.lr"]
    col = header.index("test_acc") + 1
    browser.click(f"#runs th:nth-child({col})")
    assert browser.js(COLUMN.format(table="runs", col=0)) == ["c", "a", "b"]  # test_acc 0.05 < a's < 0.91
    browser.click(f"#runs th:nth-child({col})")
    assert browser.js(COLUMN.format(table="runs", col=0)) == ["b", "a", "c"]
    browser.click("#runs th:nth-child(3)")  # optim.lr, as numbers: 0.01 < 0.05 < 0.2
    assert browser.js(COLUMN.format(table="runs", col=0)) == ["c", "a", "b"]
    assert browser.js("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert browser.js("document.images.length") == 2
    assert browser.errors() == []
    browser.screenshot(tmp_path / "compare.png")


def test_browser_driver_sees_console_errors(browser: Browser, tmp_path: Path) -> None:
    """The no-errors checks above could not fail if the driver missed errors: it does not."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><img src='missing.png'><script>console.error('boom'); nosuch();</script></body>")
    browser.open(page)
    errors = browser.errors()
    assert any("boom" in e for e in errors) and any("nosuch" in e or "Uncaught" in e for e in errors), errors
    assert browser.js("document.images[0].naturalWidth") == 0


def test_html_cells_show_values_as_they_are_not_markdown_escaped() -> None:
    """A multitask run's classes read `age=<30|gender=male`: the page showed `age=&lt;30\\|gender=male`, the
    Markdown table's escape; seconds are rounded as `compare` rounds them."""
    from classlab.compare import _cell
    from classlab.report import _table

    row = {"class": "age=<30|gender=male", "wall_time_s": 0.7234}
    page = _table(["class", "wall_time_s"], [row], "t")
    assert '<td data-sort="age=&lt;30|gender=male">age=&lt;30|gender=male</td>' in page
    assert '<td data-sort="0.7234">0.7</td>' in page and "\\|" not in page
    assert _cell("a|b") == "a\\|b"  # the Markdown table (compare.md) still escapes it


def test_a_run_that_failed_says_why_on_the_page(tmp_path: Path) -> None:
    """Before: a run that failed before its first epoch showed only 'no validation rows in metrics.csv yet'."""
    from classlab.compare import RunData
    from classlab.report import _failures

    failed = RunData("lr=10", tmp_path, {}, {"status": "diverged", "error": "the loss became NaN at <epoch 1>"}, [])
    fine = RunData("lr=0.1", tmp_path, {}, {"status": "finished"}, [])
    assert _failures([fine, failed]) == (
        '<h3>Runs that stopped with an error</h3><ul class="note"><li><b>lr=10</b> (diverged): the loss became NaN at '
        "&lt;epoch 1&gt;</li></ul>"
    )
    assert _failures([fine]) == ""


def test_a_k_fold_mean_row_stays_below_its_folds_when_sorted(browser: Browser, tmp_path: Path) -> None:
    """Before: the 'cv mean ± std' row sorted among the fold rows (a click on test_acc put it between them)."""
    from classlab.report import SCRIPT, _table

    rows = [{"run": "fold0", "test_acc": 0.5}, {"run": "fold1", "test_acc": 0.7}]
    rows.append({"run": "cv mean ± std (2 folds)", "test_acc": "0.6000 ± 0.1414"})
    page = tmp_path / "folds.html"
    page.write_text(f"<html><body>{_table(['run', 'test_acc'], rows, 'runs', 1)}<script>{SCRIPT}</script></body>")
    browser.open(page)
    order = "Array.from(document.querySelectorAll('#runs tr')).slice(1).map(r => r.cells[0].textContent)"
    for expected in (["fold0", "fold1"], ["fold1", "fold0"]):
        browser.click("#runs th:nth-child(2)")
        assert browser.js(order) == [*expected, "cv mean ± std (2 folds)"]
    assert browser.errors() == []


def test_the_page_reuses_the_error_analysis_only_while_it_is_of_the_runs_plain_best(
    tiny_run: Path, tmp_path: Path
) -> None:
    """report.json written by a --tta eval (or for a best.ckpt since replaced, or before a calibration) described
    other predictions than the page's: it was reused as it was. Now the page's analysis is made again then."""
    rep = tiny_run / "eval" / "test" / "report.json"
    classlab.report(tiny_run, tmp_path / "a.html")
    assert json.loads(rep.read_text())["predictions"] == "plain"
    written = rep.stat().st_mtime_ns
    classlab.report(tiny_run, tmp_path / "b.html")
    assert rep.stat().st_mtime_ns == written  # still the run's: reused, not computed again

    classlab.evaluate(tiny_run, tta="flip", report=True)
    assert json.loads(rep.read_text())["predictions"] == "tta:flip"
    classlab.report(tiny_run, tmp_path / "c.html")
    assert json.loads(rep.read_text())["predictions"] == "plain"

    best = tiny_run / "checkpoints" / "best.ckpt"
    best.write_bytes(best.read_bytes() + b"\0")  # another file: a resumed run's new best.ckpt (torch.load skips it)
    classlab.report(tiny_run, tmp_path / "d.html")
    inputs = json.loads(rep.read_text())["inputs"]
    assert inputs["checkpoint_sha256"] == hashlib.sha256(best.read_bytes()).hexdigest() and inputs["tta"] is None
