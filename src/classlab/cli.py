"""The ``classlab`` command. Each subcommand is a thin layer over the Python API.

User errors (bad config, missing files, damaged checkpoints) end as one ``error:`` line and a
non-zero exit code: 2 for configuration, 1 for everything else. Set CLASSLAB_DEBUG=1 to see
the traceback of an unexpected failure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from classlab.errors import ClassLabError, ConfigError, RunInterrupted, ddp_worker, did_you_mean


def _split_config_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[cfg.yaml] key=value ...`` -> (config path or None, overrides)."""
    config, overrides = None, []
    for item in items:
        if "=" in item and not Path(item).exists():
            overrides.append(item)
        elif Path(item).is_dir():
            raise ClassLabError(
                f"'{item}' is a folder, not a config file; to train on its images: classlab train data.root={item}"
            )
        elif config is None:
            config = item
        else:
            raise ClassLabError(f"'{item}': give one config file, then key=value overrides (for example epochs=3)")
    return config, overrides


class SuggestingParser(argparse.ArgumentParser):
    """argparse's errors with the nearest spelling: `classlab trian`, `train --reusme` (Python 3.11 suggests none)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        chosen = re.search(r"invalid choice: '?([^'\s]+)'? \(choose from (.*)\)", message)
        if chosen:
            message += did_you_mean(chosen.group(1), re.findall(r"[\w-]+", chosen.group(2)))
        unknown = re.match(r"unrecognized arguments: (-\S+)", message)
        files = [a for a in self._argv if a.startswith("-") and a in message and Path(a).exists()]
        if files:  # predict RUN -photo.jpg: 'did you mean --top?' pointed away from the fix
            message += (
                f" ('{files[0]}' is a file whose name starts with '-': write ./{files[0]}, or put -- before the file "
                "names)"
            )
        elif unknown:
            message += did_you_mean(unknown.group(1).split("=")[0], self._every_option())
        super().error(message)

    _argv: list[str] = []

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._argv = list(sys.argv[1:] if args is None else args)  # the command given, for error()'s suggestion
        return super().parse_known_args(args, namespace)

    def _every_option(self) -> list[str]:
        """The options the command given takes (every command's when none is given): `report -o` is
        pointed at report's --out, not at predict's --top, which report would refuse next."""
        options = list(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = next((action.choices[a] for a in self._argv if a in action.choices), None)
                parsers = [chosen] if chosen is not None else action.choices.values()
                options += [o for parser in parsers for o in parser._option_string_actions]
        return [o for o in options if o.startswith("--")]


class IntermixedParser(SuggestingParser):
    """Options and positionals in any order: ``train exp_name=x --force data.root=y`` as well as flags last.

    argparse stops collecting a ``nargs="*"`` positional at the first option; the intermixed parse
    collects the options first and then all positionals, wherever they stand.
    """

    _inside = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._inside:  # parse_known_intermixed_args calls back into this method
            return super().parse_known_args(args, namespace)
        if self.get_default("takes_overrides"):
            _no_key_options(self, list(args or ()))
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _no_key_options(parser: SuggestingParser, args: list[str]) -> None:
    """``--epochs 5``, ``--lr=0.1``, ``--config x.yaml``: the habits of argparse scripts, named with the form
    classlab takes (argparse suggested the nearest option: --epochs, did you mean --report?)."""
    from classlab.config import key_named

    options = parser._option_string_actions
    for i, arg in enumerate(args):
        if not arg.startswith("-") or arg in ("-", "--") or any(o.startswith(arg.split("=", 1)[0]) for o in options):
            continue  # not a flag, or one of this command's own (argparse takes --res for --resume)
        name, _, value = arg.lstrip("-").partition("=")
        if not value and i + 1 < len(args) and not args[i + 1].startswith("-") and "=" not in args[i + 1]:
            value = args[i + 1]
        if name in ("config", "c", "cfg"):
            parser.error(
                f"{arg}: the config file goes first, without a flag: classlab {parser.prog.split()[-1]} "
                f"{value or 'CONFIG'} [key=value ...]"
            )
        key = key_named(name)
        if key is None and "=" in arg and arg.startswith("--"):
            key = name  # --optim.lrr=3: the key's own check names its spelling next
        if key is not None:
            parser.error(f"{arg}: config keys are set as key=value, without dashes: {key}={value or 'VALUE'}")


def _quiet_libraries(verbose: int = 0) -> None:
    """Lightning's advice is aimed at its own users; ours get classlab's messages instead (``-v`` shows it all).
    For the whole process, as a command is one; the verbs that set it again for their call (train) get ``verbose``."""
    from classlab.engine.library_logs import library_logs

    library_logs(verbose)
    if verbose:
        return

    def show(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def cmd_train(args: argparse.Namespace, task: str | None = None) -> int:
    if args.explain:  # answered from the schema alone, before the training stack (Lightning) is imported
        from classlab.config import explain

        try:
            text = explain(args.explain)
        except ConfigError as exc:  # model.tf_same, model.stem: a family's keys are its builder's, not the schema's
            from classlab.models.registry import explain_family_param

            text = explain_family_param(args.explain, exc)
        print(text)
        return 0
    from classlab.train import print_config, train

    config, overrides = _split_config_args(args.items)
    if task:
        overrides = [f"task={task}", *overrides]
    if getattr(args, "folds", None):
        overrides = [*overrides, f"data.folds={args.folds}"]
    if args.print_config:
        print(print_config(config, overrides), end="")
        return 0
    train(config, overrides, resume=args.resume, force=args.force, quiet=args.quiet, verbose=args.verbose)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from classlab.engine.metrics import top5_tells
    from classlab.evaluate import display_width, evaluate, left_out_lines, pad

    overrides = [item for item in args.runs if "=" in item and not Path(item).exists()]
    if overrides:
        raise ConfigError(
            f"{overrides[0]}: eval takes no key=value overrides (it reads the run's own config.yaml); give run folders"
        )
    runs = _ensemble_runs(_runs_named(args.runs, args), args.ensemble)
    metrics = evaluate(
        runs,
        split=args.split,
        checkpoint=args.checkpoint,
        tta=args.tta,
        report=args.report,
        data=args.data,
        calibrate=args.calibrate,
        out=args.out,
    )
    members = f", mean of {len(metrics['members'])} runs" if metrics.get("members") else ""
    part = metrics.get("data") or metrics["split"]
    model = metrics["backend"] if metrics.get("model") else f"{metrics['checkpoint']}.ckpt"  # an exported file
    print(f"{' '.join(args.runs)} [{part}, {model}, {metrics['images']} images{members}]")
    for note in metrics.get("notes") or []:
        print(f"note: {note}", file=sys.stderr)
    _print_calibration(metrics)
    for line in left_out_lines(metrics):
        print(line, file=sys.stderr)
    tta = metrics.get("tta")
    top5 = top5_tells(len(metrics["per_class"]))
    if tta:
        each = " a scale" if tta.get("protocol") == "perscale" else ""  # each scale scored alone: per scale
        label = f"TTA {tta['modes']} ({tta['views']} views{each})"
        print(f"{'':<8}{'plain':>8}  {label}")
        rows = (
            [("top-1", "top1"), ("top-5", "top5"), ("macro-F1", "f1")]
            if top5
            else [("top-1", "top1"), ("macro-F1", "f1")]
        )
        for name, key in rows:
            if key in tta:  # a per-scale protocol's figure is a mean of accuracies: no F1 of its own
                print(f"{name:<8}{metrics[key]:>8.4f}  {tta[key]:.4f}  ({tta[key] - metrics[key]:+.4f})")
        for row in tta.get("per_scale", []):
            print(
                f"  scale {row['scale']:>5} px  top-1 {row['top1']:.4f}"
                + (f"  top-5 {row['top5']:.4f}" if top5 else "")
            )
        if tta.get("protocol") == "perscale":
            print("  (TTA figures are the mean of the per-scale accuracies)")
    else:
        shown = f"   top-5 {metrics['top5']:.4f}" if top5 else ""
        print(f"top-1 {metrics['top1']:.4f}{shown}   macro-F1 {metrics['f1']:.4f}")
    for name, acc in (metrics.get("tasks") or {}).items():
        print(f"task {name}: top-1 {acc:.4f}   macro-F1 {metrics['tasks_f1'][name]:.4f}")
    width = max(display_width(c) for c in metrics["per_class"])
    for name, acc in metrics["per_class"].items():
        print(f"  {pad(name, width)}  {acc:.4f}" if acc is not None else f"  {pad(name, width)}  (no images)")
    written = "metrics.json, confusion.csv, confusion.png"
    if "report" in metrics:
        from classlab.evaluate import format_table

        print(f"per-class precision / recall / F1 ({'TTA' if tta else 'plain'} predictions):")
        print(format_table(metrics["report"]["per_class"]))
        print(f"expected calibration error (15 bins): {metrics['report']['ece']:.4f}")
        written += ", per_class.csv, confident_errors.png, errors/, reliability.png, report.json"
    if metrics["out"] is None:
        print(f"nothing written (an exported model has no run folder): add --out FOLDER to keep {written}")
    else:
        print(f"wrote {metrics['out']}/{{{written}}}")
    return 0


def _print_calibration(metrics: dict[str, Any]) -> None:
    """eval --calibrate: the temperature it fitted, and what it did to the evaluated images."""
    for member in metrics.get("calibrated_members") or []:  # an ensemble's: each run on its own validation images
        print(
            f"calibrated {member['run']}: T={member['temperature']:.4f} fitted on {member['val_images']} of its "
            f"validation images (val NLL {member['val_nll_before']:.4f} -> {member['val_nll_after']:.4f})"
        )
    cal = metrics.get("calibration")
    if not cal or not cal.get("fitted_now"):
        return  # a calibration fitted before is one note line (metrics' notes)
    print(
        f"calibrated: T={cal['temperature']:.4f} fitted on {cal['val_images']} validation images of "
        f"{cal['checkpoint']}.ckpt (val NLL {cal['val_nll_before']:.4f} -> {cal['val_nll_after']:.4f}), "
        f"written to {cal['file']}"
    )
    part = metrics.get("data") or metrics["split"]
    # The validation split's figures are of the images T was fitted on: they flatter it, as training accuracy does.
    fitted_on = " (the images T was fitted on: judge it on the test split)" if part == "val" else ""
    print(
        f"{part}: ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}, NLL {cal['nll_before']:.4f} -> "
        f"{cal['nll_after']:.4f}{fitted_on}; accuracy unchanged (dividing the logits by T keeps every image's "
        "top class)"
    )


def _ensemble_runs(runs: list[str], ensemble: str | None) -> list[str] | str:
    """Several runs (or a k-fold folder) need ``--ensemble mean``; one run is passed as it is."""
    from classlab.run import is_fold_group

    several = len(runs) > 1 or any(is_fold_group(r) for r in runs)
    if several and ensemble is None:
        what = f"{len(runs)} runs" if len(runs) > 1 else f"'{runs[0]}' is a k-fold folder (one run per fold)"
        raise ConfigError(f"{what}: add --ensemble mean to average their probabilities")
    return list(runs) if several else runs[0]


def _runs_named(items: list[str], args: argparse.Namespace) -> list[str]:
    """Run folders for ``items``, where a run's checkpoint file also sets ``--checkpoint``."""
    from classlab.run import run_of

    runs, picked = [], set()
    for item in items:
        run, checkpoint = run_of(item)
        runs.append(run)
        if checkpoint:
            picked.add(checkpoint)
    if len(picked) > 1:
        raise ConfigError(
            f"checkpoints {', '.join(sorted(picked))} given: give the run folders and one --checkpoint for all of them"
        )
    given = args.checkpoint
    if given is not None and ("/" in given or os.sep in given) and Path(given).is_file():
        # --checkpoint runs/x/checkpoints/last.ckpt: a path, where a name in the run is meant
        folder, name = run_of(given)
        if name is None or Path(folder).resolve() not in {Path(r).resolve() for r in runs}:
            raise ConfigError(
                f"--checkpoint {given}: that file belongs to run '{folder}'; give that folder as the run, or a "
                "checkpoint name of this run (best, last, epochN)"
                if name
                else f"--checkpoint {given}: give a checkpoint's name in the run (best, last, epochN), not a file path"
            )
        given = args.checkpoint = name
    if picked:
        (checkpoint,) = picked
        if given not in (None, checkpoint):
            raise ConfigError(f"{checkpoint}.ckpt given with --checkpoint {given}: keep one of the two")
        args.checkpoint = checkpoint
    if args.checkpoint is None:
        args.checkpoint = "best"
    return runs


def _split_runs(items: list[str], args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``RUN1 RUN2 ... PATHS``: the leading run folders (config.yaml) or k-fold folders, then image paths."""
    from classlab.engine.exported import is_exported_file
    from classlab.run import holds_runs, is_fold_group, is_run_folder, run_of

    runs = []
    for item in items:
        if is_run_folder(run_of(item)[0]) or is_fold_group(item) or is_exported_file(item):
            runs.append(item)
        else:
            break
    if not runs:
        raise ConfigError(
            f"'{items[0]}' is not a run folder (no config.yaml) nor an exported .onnx file; "
            + (holds_runs(items[0]) or "give the run(s) first, then images")
        )
    if len(runs) == len(items):
        raise ConfigError("no images given after the run folder(s); give image files or folders to predict")
    return _runs_named(runs, args), items[len(runs) :]


def cmd_predict(args: argparse.Namespace) -> int:
    from classlab.engine.exported import is_exported_file
    from classlab.engine.load import rotation_note
    from classlab.predict import predict

    run_items, paths = _split_runs(args.items, args)
    runs = _ensemble_runs(run_items, args.ensemble)
    if args.template:
        return _submission(args, runs, paths)
    out = _csv_file(args.out, "predictions.csv")
    result = predict(
        runs,
        paths,
        out,
        checkpoint=args.checkpoint,
        top=args.top,
        progress=not args.quiet,
        backend=args.backend,
        batch_size=args.batch_size,
        tta=args.tta,
    )
    how = result.backend + (f", TTA {args.tta}" if args.tta else "")
    print(
        f"wrote {result.count} prediction{'' if result.count == 1 else 's'} to {out} ({result.rate}, {how})",
        file=_report_stream(out),
    )
    if result.calibration_note:
        print(f"note: {result.calibration_note}", file=sys.stderr)
    if result.task == "rotation":
        folders = [r for r in run_items if not is_exported_file(r)]
        print(rotation_note(" + ".join(run_items), folders[0] if len(folders) == 1 else None), file=sys.stderr)
    if result.odd_names:
        print(
            f"note: {result.odd_names} file name(s) are not UTF-8 (an old Windows or zip tool wrote them); "
            "the CSV shows their bytes as \\xNN: rename them to UTF-8: convmv -f cp949 -t utf-8 -r --notest FOLDER",
            file=sys.stderr,
        )
    if result.failed_count:
        print(f"{result.failed_count} file(s) could not be read (see the error column):", file=sys.stderr)
        for path, error in result.failed[:20]:
            print(f"  {path}: {error}", file=sys.stderr)
        if result.failed_count > 20:
            print(f"  ... and {result.failed_count - 20} more", file=sys.stderr)
    return 0


def _numbered_classes(runs: list[str] | str) -> list[str] | None:
    """The run's class names when they are whole numbers other than their indices (labels 1..5, or 1, 2, 10)."""
    from classlab.engine.ensemble import expand_runs
    from classlab.run import RunFolder

    first = Path(runs if isinstance(runs, str) else runs[0])
    if not first.is_dir():
        return None  # an exported .onnx file: its class names are in its metadata
    try:
        classes = RunFolder(expand_runs([first])[0]).read_classes()  # a k-fold folder: its first fold run's
    except ClassLabError:
        return None  # an exported .onnx file alone, or a damaged run: predicting says so in its own words
    numbers = [c.strip().lstrip("-").isdigit() for c in classes]
    if classes and all(numbers) and [int(c) for c in classes] != list(range(len(classes))):
        return classes
    return None


def _submission(args: argparse.Namespace, runs: list[str] | str, paths: list[str]) -> int:
    from classlab.predict import fill_template

    numbered = _numbered_classes(runs) if args.label_format is None else None
    if numbered:
        # The default (index) wrote 0 for the class '1': a submission of wrong labels, without a word.
        shown = ", ".join(f"{c} is {i}" for i, c in enumerate(numbered[:4])) + (", ..." if len(numbered) > 4 else "")
        raise ConfigError(
            f"the run's classes are numbers other than their indices ({shown}): say which the submission holds, "
            "--label-format name (the numbers as in the training labels) or --label-format index"
        )
    args.label_format = args.label_format or "index"
    out = _csv_file(args.out, "submission.csv")
    done = fill_template(
        runs,
        paths,
        args.template,
        out,
        id_column=args.id_column,
        label_column=args.label_column,
        label_format=args.label_format,
        allow_missing=args.allow_missing,
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        tta=args.tta,
    )
    print(
        f"wrote {done.rows} row{'s' * (done.rows != 1)} to {out} ({args.label_column} = class {args.label_format}, "
        "template order)",
        file=_report_stream(out),
    )
    for note in done.notes:
        print(f"note: {note}", file=sys.stderr)
    if done.missing:
        print(f"{len(done.missing)} row(s) left empty (--allow-missing):", file=sys.stderr)
        for line in done.missing[:20]:
            print(f"  {line}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from classlab.engine.exported import TEMPERATURE_KEY
    from classlab.engine.load import rotation_note
    from classlab.export import export, exported_metadata, input_layout
    from classlab.run import open_run

    if args.format and args.format_word and args.format != args.format_word:
        raise ConfigError(f"{args.format_word} and --format {args.format} given: keep one of the two")
    fmt = args.format_word or args.format  # None: as the --out file's suffix says, else onnx
    out = _output_file(args.out, f"model.{fmt or 'onnx'}") if args.out else None
    (run,) = _runs_named([args.run], args)
    path = export(run, fmt, out, checkpoint=args.checkpoint)
    meta = exported_metadata(path)
    layout = input_layout(int(meta.get("classlab.channels", 3)))
    print(f"wrote {path} ({layout}, dynamic batch, normalization and class names included)")
    temperature = float(meta[TEMPERATURE_KEY]) if TEMPERATURE_KEY in meta else None
    if temperature is not None:
        print(f"note: probabilities calibrated: T={temperature:.4g} divides the logits inside {path.name} "
              "(metadata classlab.temperature)", file=sys.stderr)  # fmt: skip
    if open_run(run).read_config_tree().get("task") == "rotation":
        print(rotation_note(run, run), file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from classlab.models import list_models
    from classlab.models.registry import hub_names

    pattern = (args.pattern or "").lower()
    rows = list_models(pattern)
    if rows:
        print(f"{'name':<22} {'preset':<14} {'params':>12} {'MFLOPs':>10}  input  description")
    for info in rows:
        preset = info.preset or ""
        mflops = f"{info.mflops:,.1f}" if info.mflops is not None else "-"
        params = f"{info.params:,}" if info.params is not None else "-"
        print(f"{info.name:<22} {preset:<14} {params:>12} {mflops:>10}  {info.image_size:>5}  {info.description}")
    if not pattern:
        print("and every torchvision classification model by its name (mobilenet_v2, convnext_tiny, ...), any timm")
        print("model as timm:<name>: `classlab models PATTERN` lists the names that contain PATTERN")
        return 0
    hubs = hub_names(pattern)
    for hub, names in hubs.items():
        if names:
            shown = ", ".join(names[:40]) + (f" and {len(names) - 40} more" if len(names) > 40 else "")
            print(f"{hub} ({len(names)}): {shown}")
    if not rows and not any(hubs.values()):
        print(f"no model name contains '{args.pattern}'; `classlab models` lists the families", file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from classlab.sweep import sweep

    config, overrides = _split_config_args(args.items)
    points = sweep(
        config,
        args.grid or [],
        overrides,
        jobs=args.jobs,
        ray_address=args.ray,
        ray_cpus=args.ray_cpus,
        quiet=args.quiet,
        verbose=args.verbose,
    )
    failed = [p for p in points if p.status != "finished"]
    print(f"{len(points) - len(failed)}/{len(points)} runs finished in {points[0].path.parent if points else '-'}")
    errors = sum(p.status == "failed" for p in failed)  # a config or data error fails again until it is fixed
    if errors:
        print(
            f"{errors} failed: fix what its 'failed' line says (or leave those values out of --grid), then run the "
            "same command again; finished runs are kept",
            file=sys.stderr,
        )
    if len(failed) > errors:
        print(f"{len(failed) - errors} not finished; run the same command again to resume them", file=sys.stderr)
    return 1 if failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from classlab.compare import compare

    split = [m.strip() for item in (args.metric or []) for m in item.split(",") if m.strip()]
    table = compare(
        args.runs,
        by=args.by,
        metrics=split or None,
        out=args.out,
        x=args.x,
        group=args.group,
        plots=not args.no_plots,
    )
    if args.html:
        from classlab.report import write_html_report

        table.files.append(
            write_html_report(args.runs, table.files[0].parent / "report.html", by=args.by, metrics=split or None)
        )
    print(table.markdown(), end="")
    print("wrote " + ", ".join(str(f) for f in table.files))
    for note in table.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from classlab.report import write_html_report

    out = _output_file(args.out, "report.html")
    notes: list[str] = []
    path = write_html_report(args.runs, out, split=args.split, labelled=args.data, notes=notes)
    print(f"wrote {path} (one self-contained page: open it in any browser)")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell), end="")
    return 0


def _at_least(low: int) -> Any:
    """An argparse type: a whole number >= ``low`` (argparse's error then names the option)."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    whole.__name__ = "number"
    return whole


def _report_stream(out: str) -> Any:
    """Where the "wrote ..." line goes: stderr when the CSV itself went to a device or pipe (``--out /dev/stdout``),
    so that ``classlab predict ... --out /dev/stdout | head`` reads the CSV alone."""
    from classlab.run import is_special_file

    return sys.stderr if is_special_file(Path(out)) else sys.stdout


def _csv_file(out: str | None, default_name: str) -> str:
    """Where predict writes its CSV: ``--out -`` is standard output, as for most Unix tools (it wrote a file '-')."""
    if out == "-" and Path("/dev/stdout").exists():
        return "/dev/stdout"
    return _output_file(out or ".", default_name)


def _output_file(out: str, default_name: str) -> str:
    """``--out results/`` (an existing folder, or a path ending in a slash) means results/<default_name>,
    for every command that writes one file (predict, export, report)."""
    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        return str(Path(out) / default_name)
    return out


def _common(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: `classlab -v train` and `classlab train -v` both count; the subparser must not reset it.
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="let library logs and warnings through (Lightning, torch); -vv for debug logs",
    )


def _add_ensemble_and_submission_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ensemble", choices=["mean"], help="average the probabilities of several runs (one class map)")
    p.add_argument("--template", help="organisers' CSV to fill in (submission): its rows, order and columns are kept")
    p.add_argument("--id-column", default="ImageID", help="template column naming each row's image (default ImageID)")
    p.add_argument("--label-column", default="ans", help="template column to fill with the prediction (default ans)")
    p.add_argument(
        "--label-format",
        default=None,
        choices=["index", "name"],
        help="class index (default) or class name; classes that are numbers other than their indices need it",
    )
    p.add_argument("--allow-missing", action="store_true", help="leave rows without a usable image empty")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", help="[config.yaml|config.ini] [key=value ...], in any order with the flags")
    p.set_defaults(takes_overrides=True)
    p.add_argument("--resume", action="store_true", help="continue the run from its last.ckpt")
    p.add_argument("--force", action="store_true", help="move an existing run folder aside and start again")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config with every default, each key's allowed values as a comment",
    )
    p.add_argument("--explain", metavar="KEY", help="what a config key means, its unit, default and allowed values")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--folds", type=_at_least(2), metavar="K", help="k-fold cross-validation: runs/<exp>/fold0..K-1 and oof.csv"
    )


def _add_eval_command(sub: Any) -> None:
    p = sub.add_parser(
        "eval", aliases=["evaluate"], help="evaluate a run: top-1, top-5, per-class accuracy, confusion matrix"
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="a run folder; several (or a k-fold folder) with --ensemble; or a file written by classlab export "
        "(.onnx) with --data",
    )
    p.add_argument("--ensemble", choices=["mean"], help="average the probabilities of several runs (one class map)")
    p.add_argument("--split", default="test", choices=["test", "val"], help="images to evaluate (default test)")
    p.add_argument(
        "--data",
        metavar="PATH",
        help="labelled images the run never saw instead of a split: FOLDER/<class>/*.jpg (its test/ part when it "
        "has one) or a CSV manifest with the run's columns",
    )
    p.add_argument(
        "--out",
        metavar="FOLDER",
        help="an exported .onnx file's evaluation: write its files into FOLDER (without it the figures are printed "
        "and nothing is written); a run's go into RUN/eval/",
    )
    p.add_argument("--checkpoint", help="best, last, epochN (default best)")
    p.add_argument(
        "--tta",
        metavar="MODES",
        help="test-time augmentation: flip, translate (4 shifts), diagonal (2 shifts at airbench's weights), "
        "tencrop, multiscale:S1,S2,... (join modes with commas); "
        "published multi-scale protocols: perscale:S1,S2,... (ten crops of S at each scale, accuracy per scale "
        "and their mean) or fullconv:S1,S2,... (whole image at each scale, scores averaged; He et al.)",
    )
    p.add_argument(
        "--report", action="store_true", help="also write per-class P/R/F1, confident errors, reliability diagram"
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="first fit a temperature on the run's validation split (written to RUN/calibration.json; each run "
        "of an ensemble on its own); eval, predict, load and export of this checkpoint then give calibrated "
        "probabilities (accuracy unchanged)",
    )
    p.set_defaults(func=cmd_eval)


def _add_run_commands(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model (no arguments: a small CNN on the embedded sample)")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="self-supervised pretraining: `classlab pretrain rotation CONFIG`")
    p.add_argument("pretext", choices=["rotation"], help="the pretext task")
    _add_train_args(p)
    p.set_defaults(func=lambda a: cmd_train(a, task=a.pretext))

    _add_eval_command(sub)

    p = sub.add_parser("predict", help="predict image files or folders into a CSV (or a submission file)")
    p.add_argument(
        "items",
        nargs="+",
        metavar="RUN... PATH",
        help=(
            "run folder(s) (or a checkpoint file of one) or a file written by classlab export (.onnx), "
            "then image files or folders"
        ),
    )
    _add_ensemble_and_submission_args(p)
    p.add_argument("--out", help="CSV file to write (default predictions.csv; - for standard output)")
    p.add_argument("--checkpoint", help="best, last, epochN (default best)")
    p.add_argument("--top", type=_at_least(1), default=3, help="how many classes per image (default 3)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        help="onnx: run the run's exported model in onnxruntime (default torch; onnx for an .onnx file)",
    )
    p.add_argument("--batch-size", type=_at_least(1), default=256, help="images per forward pass (default 256)")
    p.add_argument(
        "--tta",
        metavar="MODES",
        help="average each image's views: flip, translate or diagonal, tencrop, multiscale:S1,S2,... "
        "(joined with commas, as in eval --tta)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a run's model: ONNX or torch.export (pt2)")
    p.add_argument("run", help="run folder (or one of its checkpoint files)")
    p.add_argument("format_word", nargs="?", choices=["onnx", "pt2"], metavar="FORMAT", help="the same as --format")
    p.add_argument("--format", choices=["onnx", "pt2"], help="file format (default: the --out suffix's, else onnx)")
    p.add_argument("--out", help="file to write (default RUN/export/model.<format>)")
    p.add_argument("--checkpoint", help="best, last, epochN (default best)")
    p.set_defaults(func=cmd_export)


def _add_study_commands(sub: Any) -> None:
    p = sub.add_parser("sweep", help="run a grid of configs, one run folder each; a second call continues it")
    p.add_argument("items", nargs="*", help="[config.yaml|config.ini] [key=value ...] shared by every run")
    p.set_defaults(takes_overrides=True)
    p.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2",
        help="one axis of the grid (repeat for more); YAML values; linked keys: k1,k2=[a1,a2],[b1,b2]",
    )
    p.add_argument("--jobs", type=_at_least(1), default=1, help="runs at once on this machine, as subprocesses")
    p.add_argument("--ray", metavar="ADDRESS", help="send the runs to a Ray cluster (auto, ray://host:port, local)")
    p.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs Ray reserves per run")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="table (Markdown + CSV) and plots across run folders")
    p.add_argument("runs", nargs="+", help="run folders, sweep folders or globs")
    p.add_argument("--by", action="append", metavar="KEY", help="config key to show (default: keys that differ)")
    p.add_argument("--metric", action="append", help="summary.json value(s) to show (default: accuracies, time)")
    p.add_argument("--x", metavar="KEY", help="config key on the x axis of the metric plot (default: first numeric)")
    p.add_argument("--group", action="append", metavar="KEY", help="one line per value of this key (repeatable)")
    p.add_argument("--out", help="folder for compare.csv/.md and PNGs (default: <runs' parent>/compare)")
    p.add_argument("--no-plots", action="store_true", help="write the table only")
    p.add_argument("--html", action="store_true", help="also write report.html there (as `classlab report`)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="one self-contained HTML page about runs: table, curves, error analysis")
    p.add_argument("runs", nargs="+", help="run folders, sweep folders or globs")
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument(
        "--split", default="test", choices=["test", "val"], help="images of the single-run analysis (default test)"
    )
    p.add_argument("--data", metavar="PATH", help="labelled images for the single-run analysis (as eval --data)")
    p.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = SuggestingParser(prog="classlab", description="Image-classification experiments: one config, one command.")
    parser.add_argument(
        "--version", action="version", version=f"classlab {version('classlab')}", help="print the version"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="let library logs and warnings through")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=IntermixedParser, metavar="COMMAND")
    _add_run_commands(sub)
    _add_study_commands(sub)
    p = sub.add_parser("models", help="list registered models with parameters and MFLOPs; PATTERN searches the hubs")
    p.add_argument("pattern", nargs="?", help="list only names containing this, torchvision's and timm's too")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser(
        "completion", help="print a shell completion script: `classlab completion bash > ~/.classlab-complete`"
    )
    p.add_argument("shell", choices=["bash", "zsh", "tcsh"], help="the shell")
    p.set_defaults(func=cmd_completion)
    for p in {id(p): p for p in sub.choices.values()}.values():  # an alias (evaluate) is the same parser
        _common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if not getattr(args, "explain", None):  # --explain reads the schema only: no reason to pay Lightning's import
            _quiet_libraries(args.verbose)  # inside: a Ctrl-C during this slow import is an interrupt, not a traceback
        return int(args.func(args) or 0)
    except ClassLabError as exc:
        print(f"error: {_who()}{exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # `classlab models | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as exc:
        # A run says where it stopped (RunInterrupted); a Ctrl-C before training began has nothing to add.
        how = "run the same command again to continue the sweep" if args.func is cmd_sweep else "continue with --resume"
        if ddp_worker():
            pass  # every process stopped at the same batch: process 0 says where
        elif isinstance(exc, RunInterrupted):
            print(f"\ninterrupted: {exc}; {how}", file=sys.stderr)
        else:
            print("\ninterrupted" + (f": {how}" if args.func is cmd_sweep else ""), file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a bare traceback
        if os.environ.get("CLASSLAB_DEBUG"):
            raise
        print(
            f"error: {_who()}unexpected {type(exc).__name__}: {exc} (set CLASSLAB_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


def _who() -> str:
    """An error line from a DDP worker names its process: the two lines of a two-process run were indistinguishable."""
    worker = ddp_worker()
    return f"{worker}: " if worker else ""


if __name__ == "__main__":
    sys.exit(main())
