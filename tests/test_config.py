"""Config validation: the one-line errors a user sees, overrides, printing, INI files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from classlab.config import load_config, read_ini, stage_config
from classlab.errors import ClassLabError, ConfigError
from tests.conftest import make_image, run_cli


def test_defaults_validate() -> None:
    cfg = load_config()
    assert cfg.data.dataset == "sample"
    assert cfg.model.name == "cnn"


def test_overrides_apply_with_types(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("exp_name: a\noptim:\n  lr: 0.1\n")
    cfg = load_config(path, ["optim.lr=0.05", "data.batch_size=256", "epochs=3", "model.layers=[8, p]"])
    assert cfg.optim.lr == 0.05 and cfg.data.batch_size == 256 and cfg.epochs == 3
    assert cfg.model.layers == [8, "p"]


def test_a_mapping_override_without_the_space_after_its_colons_says_so() -> None:
    """YAML reads {black:3.0} as the key 'black:3.0' with no value; the error was "= a section: allowed: ..."."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.class_weights={race:{black:3.0}}"])
    assert str(err.value) == (
        "override 'loss.class_weights={race:{black:3.0}}': YAML reads 'black:3.0' as one key with no value; "
        "put a space after each colon: loss.class_weights={race: {black: 3.0}}"
    )
    cfg = load_config(None, ["loss.class_weights={race: {black: 3.0}}", "data.cache_dir=C:/cache"])
    assert cfg.loss.class_weights == {"race": {"black": 3.0}}


def test_unknown_key_names_nearest() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"):
        load_config(None, ["optim.lrr=0.1"])
    # A key without its section, or under another tool's name: spelling distance alone found nothing (lr) or the
    # wrong key (optim.learning_rate read as optim.name).
    hints = {
        "lr": "optim.lr",
        "learning_rate": "optim.lr",
        "optim.learning_rate": "optim.lr",
        "max_epochs": "epochs",
        "data.num_workers": "data.workers",
        "arch": "model.name",
    }
    for given, meant in hints.items():
        with pytest.raises(ConfigError, match=rf"^unknown config key '{given}' \(did you mean '{meant}'\?\)"):
            load_config(None, [f"{given}=1"])
    with pytest.raises(ConfigError, match=r"^unknown config key 'name' \(keys named 'name': model.name, optim.name, "):
        load_config(None, ["name=resnet18"])
    # A section given one value: the key it most likely meant, not "Input should be a valid dictionary".
    with pytest.raises(
        ConfigError, match=r"^'model' is a section, not a value: set one of its keys, e.g. model.name=res"
    ):
        load_config(None, ["model=resnet18"])


def test_wrong_type_and_range_name_key_value_and_allowed() -> None:
    with pytest.raises(ConfigError, match=r"config key 'data\.batch_size' = 'abc': .*integer"):
        load_config(None, ["data.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"config key 'data\.val_fraction' = 1\.5: .*less than 1"):
        load_config(None, ["data.val_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"config key 'sched\.name' = 'cosin': allowed: 'multistep'"):
        load_config(None, ["sched.name=cosin"])


def test_a_misspelt_choice_is_named_and_one_logger_needs_no_list() -> None:
    """Before: task=clasify and trainer.loggers=[tensorbord] listed the choices without the one meant, and
    trainer.loggers=mlflow was refused with "allowed: [tensorboard | csv | mlflow | wandb, ...]"."""
    with pytest.raises(ConfigError, match=r"^config key 'task' = 'clasify': allowed: .*; did you mean classify\?$"):
        load_config(None, ["task=clasify"])
    with pytest.raises(ConfigError, match=r"'tensorbord': allowed: 'tensorboard', .*; did you mean tensorboard\?$"):
        load_config(None, ["trainer.loggers=[tensorbord]"])
    assert load_config(None, ["trainer.loggers=mlflow"]).trainer.loggers == ["mlflow"]
    with pytest.raises(ConfigError, match=r"write a list in brackets: trainer\.loggers=\[tensorboard,csv\]$"):
        load_config(None, ["trainer.loggers=tensorboard,csv"])


def test_a_percentage_where_a_fraction_goes_names_the_fraction() -> None:
    with pytest.raises(ConfigError, match=r"'10%': .*; takes a fraction of 1: data\.val_fraction=0\.1 for 10%$"):
        load_config(None, ["data.val_fraction=10%"])
    with pytest.raises(ConfigError, match=r"= 25: .*less than or equal to 1; .*aug\.random_erasing=0\.25 for 25%$"):
        load_config(None, ["aug.random_erasing=25"])
    for not_a_share in ("optim.lr=5%", "data.batch_size=10%", "data.val_fraction=1.5"):
        with pytest.raises(ConfigError) as exc:
            load_config(None, [not_a_share])
        assert "fraction of 1" not in str(exc.value)


def test_a_key_of_several_forms_lists_them_under_its_own_name() -> None:
    """pydantic tags a union's failed member onto the path (aug.flip.bool); the user sees the key and its forms."""
    with pytest.raises(ConfigError, match=r"^config key 'aug\.flip' = 'maybe': allowed: true \| false \| alternate$"):
        load_config(None, ["aug.flip=maybe"])
    with pytest.raises(ConfigError, match=r"write a list in brackets: optim\.betas=\[0\.9,0\.99\]$"):
        load_config(None, ["optim.betas=0.9,0.99"])


@pytest.mark.parametrize(("spelled", "meant"), [("bf16", "bf16-mixed"), ("16", "16-mixed"), ("fp32", "32-true")])
def test_precision_spellings_from_lightning_and_papers(spelled: str, meant: str) -> None:
    assert load_config(None, [f"trainer.precision={spelled}"]).trainer.precision == meant


def test_relative_root_resolved_against_config_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "cfg.yaml"
    path.write_text("data:\n  dataset: folder\n  root: images\n")
    cfg = load_config(path)
    assert cfg.data.root == str((tmp_path / "sub" / "images").resolve())


def test_cli_config_errors_exit_2_one_line_no_traceback(tmp_path: Path) -> None:
    result = run_cli("train", "optim.lrr=0.1", "--print-config")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?); valid keys of 'optim' are listed by "
        "`classlab train --print-config`"
    ]
    assert "Traceback" not in result.stderr
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data: [unclosed\n")
    result = run_cli("train", str(bad_yaml))
    assert result.returncode == 2 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr


def test_data_files_given_as_the_config_say_what_they_are(tmp_path: Path) -> None:
    """Read as YAML, a photo gave a 'not UTF-8 text' line about text encodings."""
    photo = make_image(tmp_path / "photos" / "cat" / "0.JPG", (200, 0, 0))
    root = photo.parents[1]
    with pytest.raises(ConfigError, match=rf"^'{photo}' is an image, not a config file; .*data.root={root}$"):
        load_config(photo)
    for name, key in (("train.csv", "data.csv_file"), ("resnet.pth", "model.pretrained_path")):
        (tmp_path / name).write_bytes(b"\xff\x00")
        with pytest.raises(ConfigError, match=rf"not a config file; .*: classlab train {key}={tmp_path / name}$"):
            load_config(tmp_path / name)


def test_a_key_given_twice_and_tab_indents_are_named(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys: a second optim: block would silently drop the first."""
    two = tmp_path / "two.yaml"
    two.write_text("optim:\n  lr: 0.1\ndata:\n  batch_size: 64\noptim:\n  name: adamw\n")
    with pytest.raises(ConfigError) as caught:
        load_config(two)
    assert str(caught.value) == (
        f"{two}: not valid YAML at line 5, column 1: key 'optim' given twice (first on line 1): keep one"
    )
    nested = tmp_path / "nested.yaml"
    nested.write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"line 3, column 3: key 'lr' given twice \(first on line 2\)"):
        load_config(nested)
    merged = tmp_path / "merged.yaml"  # a merge key is not a repeat: the mapping's own lr wins, as YAML says
    merged.write_text("optim: &o {lr: 0.1, name: sgd}\nsched: {name: cosine}\nstages:\n- {optim: {<<: *o, lr: 0.2}}\n")
    assert load_config(merged).optim.lr == 0.1
    tabs = tmp_path / "tabs.yaml"
    tabs.write_text("data:\n\tdataset: sample\n")
    with pytest.raises(ConfigError, match=r"line 2, column 1: .*'\\t'.*: YAML indents with spaces, not tabs$"):
        load_config(tabs)


def test_a_stage_keeps_the_runs_data_and_split() -> None:
    """A stage that redraws the split (another val_fraction or seed) would validate on images an earlier stage
    trained on; it is refused when the config is read, before any stage trains."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["stages=[{}, {data.image_size: 48, data.val_fraction: 0.2}]"])
    assert str(caught.value) == (
        "stages[1]: data.val_fraction=0.2 where the run has 0.1: every stage trains and validates on the run's own "
        "data and split (else a later stage validates on images an earlier one trained on); set data.val_fraction "
        "at the top of the config, and in a stage only what changes (size, epochs, optimiser)"
    )
    with pytest.raises(ConfigError, match=r"^stages\[0\]: seed=1 where the run has 0: "):
        load_config(None, ["stages=[{seed: 1}]"])
    # The labels too: another class order or task would train stage 2 from stage 1's head on other classes,
    # while the run folder's classes.json stays stage 1's.
    with pytest.raises(ConfigError, match=r"^stages\[1\]: data.classes=\[.*where the run has None: "):
        load_config(None, ["stages=[{}, {data.classes: [truck, ship, horse, frog, dog, deer, cat, bird, car, plane]}]"])
    with pytest.raises(ConfigError, match=r"^stages\[1\]: task='rotation' where the run has 'classify': "):
        load_config(None, ["stages=[{}, {task: rotation}]"])
    cfg = load_config(None, ["stages=[{}, {data.image_size: 48, data.images_per_class: 20, epochs: 2}]"])
    assert stage_config(cfg, 1).data.image_size == 48


def test_print_config_shows_every_default() -> None:
    result = run_cli("train", "--print-config", "epochs=4")
    assert result.returncode == 0, result.stderr
    assert "epochs: 4" in result.stdout
    for key in ("label_smoothing:", "val_fraction:", "batch_size:", "monitor: val/acc", "root: runs"):
        assert key in result.stdout


INI = """
[EXP]
seed = 3
exp_name = rot_b0   # trailing comment
batch_size = 64
model = efficientnet
epochs = 30
lr = 0.01
val_freq = 2
worker = 4
gpus = 0,1
unsuper = true
[DATASET]
root = data/fashion
dataset = fasion
num_imgs_per_cat = 20
[MODEL]
depth = 0
optim = rangerlars
scheduler = reducelr
criterion = crossentropy
block_op = 15
no_head = true
cutmix_alpha = 1.0
cutmix_prob = 0.5
labelsmooth = 0.1
"""


def test_a_root_alone_means_that_folder_not_the_sample(tmp_path: Path) -> None:
    """`classlab train data.root=photos/` trained on the embedded sample, ignoring the folder, until it inferred it."""
    assert load_config(None, [f"data.root={tmp_path}"]).data.dataset == "folder"
    assert load_config(None, [f"data.root={tmp_path}", "data.csv_file=train.csv"]).data.dataset == "csv"
    assert load_config(None, [f"data.root={tmp_path}", "data.dataset=cifar10"]).data.dataset == "cifar10"
    assert load_config(None, []).data.dataset == "sample"
    with pytest.raises(ConfigError, match=r"is not read by data.dataset=sample .*set data.dataset=folder"):
        load_config(None, [f"data.root={tmp_path}", "data.dataset=sample"])


def test_ini_maps_onto_schema(tmp_path: Path) -> None:
    path = tmp_path / "exp.ini"
    path.write_text(INI)
    with pytest.warns(UserWarning, match="training on the CPU"):
        cfg = load_config(path)
    assert cfg.seed == 3 and cfg.exp_name == "rot_b0" and cfg.data.batch_size == 64
    assert cfg.model.name == "efficientnet_b0" and cfg.epochs == 30 and cfg.optim.lr == 0.01
    assert cfg.trainer.val_every == 2 and cfg.data.workers == 4 and cfg.task == "rotation"
    assert cfg.data.root == str((tmp_path / "data" / "fashion").resolve()) and cfg.data.dataset == "folder"
    assert cfg.data.images_per_class == 20 and cfg.optim.name == "rangerlars" and cfg.sched.name == "plateau"
    assert cfg.model.truncate_at == 16 and cfg.model.head_conv is False  # block_op 15 = blocks 0..15 kept
    assert cfg.aug.cutmix_alpha == 1.0 and cfg.aug.mix_prob == 0.5 and cfg.loss.label_smoothing == 0.1
    assert cfg.trainer.devices == 1


def test_ini_unknown_key_and_criterion_rejected(tmp_path: Path) -> None:
    path = tmp_path / "exp.ini"
    path.write_text("[EXP]\nseeed = 1\n")
    with pytest.raises(ConfigError, match=r"INI key 'seeed' in \[EXP\] is not supported \(did you mean 'seed'\?\)"):
        read_ini(path)
    path.write_text("[MODEL]\ncriterion = dice\n")
    with pytest.raises(ConfigError, match="criterion=dice is not supported; use 'crossentropy' or 'focal'"):
        read_ini(path)
    path.write_text("[TRAIN]\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"unknown INI section \[TRAIN\]"):
        read_ini(path)
    path.write_text("[EXP]\ngpus = all\n")  # was an 'unexpected ValueError' from int('all')
    with pytest.raises(ConfigError, match=r"exp.ini: gpus = all is not a list of GPU numbers; write gpus = 0 or gpus"):
        read_ini(path)


def test_ini_resnet_depth_checked(tmp_path: Path) -> None:
    path = tmp_path / "exp.ini"
    path.write_text("[EXP]\nmodel = resnet\n[MODEL]\ndepth = 19\n")
    with pytest.raises(ConfigError, match="depth 18, 34, 50, 101 or 152"):
        read_ini(path)


def test_unknown_model_and_model_key() -> None:
    # Model keys are checked where models are built (the models layer), before any data is read.
    from classlab.train import coerce_config

    with pytest.raises(ConfigError, match="resnet_cifar"):
        coerce_config(None, ["model.name=resnet_cifr"])
    with pytest.raises(ConfigError, match="model.depht"):
        coerce_config(None, ["model.name=resnet_cifar", "model.depht=20"])


def test_every_config_key_has_a_description() -> None:
    from pydantic import BaseModel

    from classlab.config import Config

    def missing(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out += missing(ann, f"{prefix}{name}.")
            elif not field.description:
                out.append(prefix + name)
        return out

    assert missing(Config) == []


def test_explain_a_key() -> None:
    result = run_cli("train", "--explain", "optim.lr")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        "optim.lr: peak learning rate (per batch of data.batch_size)",
        "  allowed: float (>0.0, <=100.0)",
        "  default: 0.05",
    ]
    assert "allowed: auto | memory | stream\n" in run_cli("train", "--explain", "data.loader").stdout
    typo = run_cli("train", "--explain", "optim.lrr")
    assert (
        typo.returncode == 2
        and typo.stderr.strip() == "error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"
    )


def test_explain_answers_without_importing_the_training_stack() -> None:
    """``--explain`` is a lookup in the schema: it must not wait seconds for Lightning (or torch) to import."""
    code = (
        "import sys; from classlab.cli import main; code = main(['train', '--explain', 'optim.lr']); "
        "print(code, 'lightning' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "0 False False"


def test_text_files_from_windows_editors(tmp_path: Path) -> None:
    """Notepad's BOM is read; a CP949 file (Korean Windows, Excel's plain CSV there) is one line asking for UTF-8,
    where it was 'unexpected UnicodeDecodeError'."""
    from classlab.data.sources import open_dataset

    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfepochs: 2\n")
    assert load_config(tmp_path / "bom.yaml").epochs == 2
    (tmp_path / "old.ini").write_bytes("[EXP]\n# 회전 실험\nepochs=2\n".encode("cp949"))
    said = r"old\.ini: not UTF-8 text \(byte 0x[0-9a-f]{2} at offset \d+\); save it as UTF-8"
    with pytest.raises(ConfigError, match=said):
        load_config(tmp_path / "old.ini")
    (tmp_path / "train.csv").write_bytes("path,label\n고양이.jpg,고양이\n".encode("cp949"))
    cfg = load_config(None, [f"data.root={tmp_path}", "data.csv_file=train.csv"])
    with pytest.raises(ClassLabError, match=r"train\.csv: not UTF-8 text .*Excel: CSV UTF-8"):
        open_dataset(cfg.data)


def test_yaml_aliases_cannot_expand_into_billions(tmp_path: Path) -> None:
    """Nine lines of nested aliases are 9**9 values: validation and its error line would never end (or fill memory)."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    lines.append(f"epochs: [{', '.join(['*a7'] * 9)}]")
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"laughs\.yaml: expands to more than 100,000 values \(YAML anchors"):
        load_config(tmp_path / "laughs.yaml")
    anchors = "[&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a], "
    anchors += "&c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c], "
    anchors += "[*d, *d, *d, *d, *d, *d, *d, *d, *d, *d, *d]]"
    with pytest.raises(ConfigError, match=r"override 'epochs': expands to more than"):
        load_config(None, [f"epochs={anchors}"])
    with pytest.raises(ConfigError) as info:  # a large value that is merely wrong: the line stays short
        load_config(None, [f"epochs=[{', '.join(['1'] * 5000)}]"])
    assert len(str(info.value)) < 160 and str(info.value).endswith("...]: Input should be a valid integer")
    assert load_config(None, ["model.layers=[&w 8, p, *w]"]).model.layers == [8, "p", 8]  # a plain alias still works


def test_a_url_where_a_path_goes_is_named() -> None:
    """Resolved as a path, data.root=https://... became '<cwd>/https:/...' and 'is not a folder'."""
    with pytest.raises(ConfigError, match=r"^data\.root 'https://x\.org/photos\.zip' is a URL; classlab reads local"):
        load_config(None, ["data.root=https://x.org/photos.zip"])
    with pytest.raises(ConfigError, match=r"^model\.pretrained_path 's3://bucket/w\.pth' is a URL"):
        load_config(None, ["model.pretrained_path=s3://bucket/w.pth"])


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("", "is empty"),
        ("\n  \n", "is empty"),
        ("# the photos experiment\n# lr: 0.1\n", "holds only comments"),
        ("---\n", "holds no keys (only '---')"),
        ("null\n", "holds no keys (only 'null')"),
    ],
)
def test_a_config_file_without_keys_says_the_defaults_are_used(tmp_path: Path, capsys, text: str, said: str) -> None:
    """Before: a config saved empty by mistake (or holding only comments, '---' or 'null') trained the defaults
    without a word, as if the user had given no file."""
    from tests.faults import cli

    path = tmp_path / "my.yaml"
    path.write_text(text)
    line = f"{path} {said}: every key takes its default"
    with pytest.warns(UserWarning, match=line.replace("(", r"\(").replace(")", r"\)")):
        assert load_config(path).model_dump() == load_config().model_dump()
    code, out, err = cli(capsys, "train", "--print-config", str(path))
    assert code == 0 and out
    assert f"warning: {line} (`classlab train --print-config` lists them)" in err.splitlines()
    path.write_text("{}\n")  # an empty mapping written as one: said on purpose
    code, _, err = cli(capsys, "train", "--print-config", str(path))
    assert code == 0 and "every key takes its default" not in err
