"""Command-line habits: flags anywhere, --version, python -m, completion, -v, help everywhere, env vars."""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from classlab import __version__
from classlab.cli import _quiet_libraries, build_parser
from classlab.config import load_config
from classlab.engine.loggers import PACKAGES as LOGGER_PACKAGES
from tests.conftest import REPO, run_cli, tiny_config


def test_flags_and_overrides_in_any_order() -> None:
    parser = build_parser()
    args = parser.parse_args(["train", "exp_name=x", "--force", "data.root=/data", "--quiet", "epochs=3"])
    assert args.items == ["exp_name=x", "data.root=/data", "epochs=3"] and args.force and args.quiet
    args = parser.parse_args(["predict", "runs/a", "--top", "2", "one.jpg", "two.jpg"])
    assert args.items == ["runs/a", "one.jpg", "two.jpg"] and args.top == 2  # run folder(s), then the images
    args = parser.parse_args(["sweep", "epochs=1", "--grid", "optim.lr=0.1,0.2", "seed=3", "--jobs", "2"])
    assert args.items == ["epochs=1", "seed=3"] and args.grid == ["optim.lr=0.1,0.2"] and args.jobs == 2


def test_habits_from_other_tools_get_the_classlab_spelling(tmp_path: Path, capsys) -> None:
    """`--data.root=x` (Hydra, fire) and `classlab train photos/` name the key=value form instead of failing oddly."""
    parser = build_parser()
    for argv, said in (
        (["train", "--data.root=photos"], "config keys are set as key=value, without dashes: data.root=photos"),
        (["sweep", "epochs=1", "--epochs=3"], "--epochs=3: config keys are set as key=value, without dashes: epochs=3"),
        (["train", "--epochs", "5"], "--epochs: config keys are set as key=value, without dashes: epochs=5"),
        (["train", "--batch-size", "32"], "without dashes: data.batch_size=32"),  # argparse script habits
        (["train", "--optim.lrr=3"], "without dashes: optim.lrr=3"),
        (["train", "-c", "my.yaml"], "-c: the config file goes first, without a flag: classlab train my.yaml"),
        (["sweep", "--config", "my.yaml"], "the config file goes first, without a flag: classlab sweep my.yaml"),
    ):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 2
        assert said in capsys.readouterr().err
    assert parser.parse_args(["eval", "runs/a", "--tta=flip", "--check=last"]).checkpoint == "last"  # real flags
    from classlab.cli import main  # in this process: a subprocess would spend its time importing torch

    assert main(["train", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"'{tmp_path}' is a folder, not a config file; to train on its images: classlab train data.root=" in err
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 1  # the verb's full name is the same command
    err = capsys.readouterr().err
    assert "nowhere" in err and "invalid choice" not in err and err.count("\n") == 1


def test_misspelt_commands_and_flags_get_the_nearest_spelling(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    for argv, said in (
        (["trian"], "invalid choice: 'trian'"),
        (["trian"], "(did you mean 'train'?)"),
        (["train", "--reusme"], "unrecognized arguments: --reusme (did you mean '--resume'?)"),
        (["predict", "runs/a", "x.jpg", "--tpo", "3"], "(did you mean '--top'?)"),
        (["eval", "runs/a", "--split", "tset"], "(did you mean 'test'?)"),
        # The command's own options: report has --out, and predict's --top would be refused next.
        (["report", "runs/a", "-o", "page.html"], "unrecognized arguments: -o page.html (did you mean '--out'?)"),
    ):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and said in err, err


def test_counts_are_checked_before_any_work_and_out_may_be_a_folder(tmp_path: Path, capsys) -> None:
    """--top 0 and --batch-size 0 were taken (as 1, or as a ValueError after loading the run); --out results/
    failed with IsADirectoryError after predicting every image."""
    from classlab.cli import _output_file

    parser = build_parser()
    for argv, said in (
        (["predict", "runs/a", "x.jpg", "--top", "0"], "argument --top: 0 is below 1"),
        (["predict", "runs/a", "x.jpg", "--batch-size", "many"], "argument --batch-size: 'many' is not a whole number"),
        (["sweep", "--jobs", "0"], "argument --jobs: 0 is below 1"),
        (["train", "--folds", "1"], "argument --folds: 1 is below 2"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert said in capsys.readouterr().err
    assert _output_file(str(tmp_path), "predictions.csv") == str(tmp_path / "predictions.csv")
    assert _output_file("new/", "submission.csv") == str(Path("new") / "submission.csv")
    assert _output_file(str(tmp_path / "p.csv"), "predictions.csv") == str(tmp_path / "p.csv")


def test_print_config_after_an_override_shows_allowed_values() -> None:
    result = run_cli("train", "epochs=3", "--print-config", "optim.name=adamw")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert re.search(r"^epochs: 3  # int \(>=1, <=100000\); passes over the training images$", text, re.M)
    optimizers = r"sgd \| adam \| adamw \| radam \| lars \| lamb \| rangerlars \| muon"
    assert re.search(rf"^  name: adamw  # {optimizers}; optimizer \(muon: Muon for", text, re.M)
    assert "  loggers: [tensorboard]  # [tensorboard | csv | mlflow | wandb, ...]; experiment trackers;" in text
    # The comments are for the reader: the text loads back as the same config.
    assert yaml.safe_load(text) == load_config(None, ["epochs=3", "optim.name=adamw"]).to_dict()


def test_version_and_python_dash_m() -> None:
    result = subprocess.run([sys.executable, "-m", "classlab", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"classlab {__version__}"
    result = subprocess.run([sys.executable, "-m", "classlab", "nosuch"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice: 'nosuch'" in result.stderr


def test_completion_scripts() -> None:
    bash = run_cli("completion", "bash")
    assert bash.returncode == 0, bash.stderr
    for word in ("train", "eval", "report", "--print-config", "--resume"):
        assert word in bash.stdout
    sourced = subprocess.run(
        ["bash", "-c", "source /dev/stdin && complete -p classlab"], input=bash.stdout, capture_output=True, text=True
    )
    assert sourced.returncode == 0 and "classlab" in sourced.stdout, sourced.stderr
    zsh = run_cli("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef classlab")


def test_every_option_has_help() -> None:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{name} {action.dest}"
        for name, p in [("classlab", parser), *sub.choices.items()]
        for action in p._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
    ]
    assert missing == []
    assert all(choice.help for choice in sub._choices_actions)  # every command too


def test_verbose_lets_library_warnings_and_logs_through(capsys: pytest.CaptureFixture) -> None:
    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        _quiet_libraries(0)
        warnings.warn_explicit("hidden", UserWarning, "x.py", 1, module="lightning.pytorch.trainer")
        assert "hidden" not in capsys.readouterr().err
        assert logging.getLogger("lightning.pytorch").level == logging.ERROR
        _quiet_libraries(1)
        warnings.warn_explicit("shown", UserWarning, "x.py", 1, module="lightning.pytorch.trainer")
        assert "shown" in capsys.readouterr().err
        assert logging.getLogger("lightning.pytorch").level == logging.INFO
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def test_verbose_train_shows_lightning_messages(tmp_path: Path) -> None:
    quiet = run_cli("train", *tiny_config(tmp_path, exp_name="q", epochs=1, **{"trainer.max_steps": 1}))
    loud = run_cli("train", "-v", *tiny_config(tmp_path, exp_name="v", epochs=1, **{"trainer.max_steps": 1}))
    assert quiet.returncode == 0 and loud.returncode == 0, loud.stderr
    assert "GPU available" not in quiet.stdout + quiet.stderr
    assert "GPU available" in loud.stderr  # Lightning's own device report


def test_readme_documents_every_environment_variable() -> None:
    used = set()
    for path in (REPO / "src").rglob("*.py"):
        text = path.read_text()
        used |= set(re.findall(r"""environ(?:\.get)?[\[(]\s*["']([A-Z_]+)["']""", text))
        used |= set(re.findall(r"""^[A-Z_]+_ENV = "([A-Z_]+)\"""", text, re.M))
    used -= {"LOCAL_RANK", "NODE_RANK"}  # set by the DDP launcher, not by users
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("### Environment variables") :]
    assert used and {"CLASSLAB_DEBUG", "CLASSLAB_DATA", "XDG_CACHE_HOME", "CLASSLAB_RUN_DIR"} <= used
    assert [v for v in sorted(used) if f"`{v}`" not in table] == []


# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "PyYAML", "pillow_heif": "pillow-heif"}
# What each optional feature imports (the code imports these lazily, inside the feature).
EXTRAS = {
    "export": {"onnx", "onnxruntime", "onnxscript"},
    "ray": {"ray"},
    "mlflow": {"mlflow"},
    "wandb": {"wandb"},
    "heic": {"pillow-heif"},
    # efficientnet_pytorch builds a source model in test_pretrained; pillow-heif reads the HEIC photo of test_data
    "test": {"pytest", "ruff", "efficientnet_pytorch", "pillow-heif"},
}


def _requirement_names(items: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", item, maxsplit=1)[0] for item in items}


def test_pyproject_declares_what_the_code_imports() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = _requirement_names(project["dependencies"])
    extras = {name: _requirement_names(items) for name, items in project["optional-dependencies"].items()}
    assert extras == EXTRAS
    assert {"lightning>=2.6"} <= set(project["dependencies"])  # Trainer.fit(weights_only=...)
    imported = set()
    for path in (REPO / "src").rglob("*.py"):
        imported |= set(re.findall(r"^\s*(?:import|from) ([A-Za-z_]\w*)", path.read_text(), re.M))
    imported |= {package for package, _ in LOGGER_PACKAGES.values()}  # imported by name, then by Lightning
    third_party = {DISTRIBUTIONS.get(m, m) for m in imported - set(sys.stdlib_module_names) - {"classlab"}}
    optional = set().union(*EXTRAS.values())
    assert third_party - core - optional == set()  # nothing imported that no requirement installs
    assert {"safetensors", "shtab", "lightning", "torchmetrics", "tensorboard"} <= core
    assert optional - EXTRAS["test"] <= third_party  # each extra's packages are used by some feature


def test_ctrl_c_while_the_libraries_load_is_an_interrupt_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lightning's import takes seconds on a busy machine: a user who sees a typo presses Ctrl-C right then."""
    import classlab.cli

    def slow_import(verbose: int = 0) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(classlab.cli, "_quiet_libraries", slow_import)
    code = classlab.cli.main(["train", "epochs=1"])
    assert code == 130 and capsys.readouterr().err.strip() == "interrupted"
