"""What README.md tells a new user holds: every config key it names is one ``classlab train --explain`` explains."""

from __future__ import annotations

import re

import pytest

from classlab import cli
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


SECTIONS = "data|aug|model|optim|sched|loss|trainer|run"
NOT_KEYS = {"run.lock"}  # a file of the run folder, named like a key


def readme_keys() -> list[str]:
    """Every config key the README names in backticks (``model.tf_same: true``, ``optim.lr=100``, ``data.root``)."""
    found = re.findall(rf"`((?:{SECTIONS})\.[a-z_]+(?:\.[a-z_]+)*)[`=: ]", README)
    return sorted(set(found) - NOT_KEYS)


def test_readme_names_family_parameters() -> None:
    """The check below covers the keys a family's builder reads, not only the schema's generic ones."""
    assert {"model.tf_same", "model.truncate_at", "optim.lr", "data.root"} <= set(readme_keys())


@pytest.mark.parametrize("key", readme_keys())
def test_every_key_the_readme_names_is_explained(key: str, capsys: pytest.CaptureFixture[str]) -> None:
    """README: `model.tf_same: true` uses TensorFlow padding; one key at length: `classlab train --explain KEY`.
    A family parameter (model.tf_same, model.stem) trained, yet --explain called it an unknown key and offered
    'did you mean model.name?'."""
    code = cli.main(["train", "--explain", key])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith(f"{key}: ") and "default:" in out


def test_a_family_parameter_says_which_models_read_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--explain", "model.tf_same"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_b0" in out and "efficientnet_b7" in out
    assert "allowed: bool" in out and "default: false" in out
    assert cli.main(["train", "--explain", "model.stem"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "default: imagenet" in out


def test_an_unknown_model_key_is_still_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--explain", "model.tf_sane"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'model.tf_sane'") and "model.tf_same" in err
