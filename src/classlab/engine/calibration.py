"""Temperature scaling (Guo et al. 2017): one number T that makes a classifier's probabilities mean what they say.

A network trained with cross-entropy to high accuracy is usually over-confident: its mean top softmax is
above its accuracy. Dividing every logit by one T > 0 fitted on held-out images lowers the negative
log-likelihood without moving any image's top class (dividing by a positive number keeps the logits' order),
so accuracy, the confusion matrix and every argmax stay exactly as they were; only the probabilities change.

T is fitted on the run's validation split, never on its test images, whose figures it would flatter, and it
is tied to the checkpoint file it was fitted on by that file's SHA-256: a resumed run's new best.ckpt has other
logits, and an old T used for it would be wrong without a word. Such a calibration is left unused, with a
warning that says how to fit it again.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from classlab.engine.metrics import calibration
from classlab.errors import ClassLabError, spelt
from classlab.run import RunFolder, file_sha256

METHOD = "temperature scaling (Guo et al. 2017): probabilities = softmax(logits / temperature)"
T_MIN, T_MAX = 0.05, 20.0  # beyond these the validation set says 'sharper/flatter for ever', not a temperature


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(logits / temperature), in float64."""
    return float(F.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, bool]:
    """(T minimising the NLL of softmax(logits / T), whether T was held at a bound).

    LBFGS on log T (positive by construction), in float64 on logits computed once. The NLL is convex in 1/T, so
    it has one minimum, or none: a model right on every validation image lowers it for ever as T -> 0, and one
    whose true-class logit is below its mean logit on average as T grows. Then T is held at T_MIN / T_MAX,
    which the caller refuses (``no_temperature``); LBFGS would stop wherever the slope became too flat to see.
    """
    z, y = logits.detach().double(), labels.detach()
    if not bool(torch.isfinite(z).all()):
        bad = int((~torch.isfinite(z)).any(1).sum())
        raise ClassLabError(
            f"the model gives non-finite logits (NaN or inf) on {bad} of {len(z)} validation images: no temperature "
            "can calibrate them; its checkpoint is damaged or its training diverged"
        )
    true = z.gather(1, y[:, None]).squeeze(1)
    if bool((true > z.scatter(1, y[:, None], -math.inf).amax(1)).all()):
        return T_MIN, True
    if float((true - z.mean(1)).mean()) <= 0:
        return T_MAX, True
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    found = float(log_t.detach().exp())
    held = min(max(found, T_MIN), T_MAX)
    return held, held != found


def calibration_record(
    run: RunFolder,
    checkpoint: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    digest: str | None = None,
) -> dict[str, Any]:
    """What calibration.json holds: T, the checkpoint file it belongs to, and the validation figures it moved.

    ``digest``: the file's SHA-256 taken before its weights were read (``file_sha256``): a file replaced since
    (a run still training writes a new best.ckpt) then does not match, and is not calibrated by another's T."""
    ckpt = run.checkpoint(checkpoint)
    before, after = logits.double().softmax(1), (logits.double() / temperature).softmax(1)
    return {
        "method": METHOD,
        "temperature": temperature,
        "checkpoint": checkpoint,
        "checkpoint_file": ckpt.relative_to(run.path).as_posix(),
        "checkpoint_sha256": digest or file_sha256(ckpt),
        "val_images": len(labels),
        "val_nll_before": nll(logits, labels),
        "val_nll_after": nll(logits, labels, temperature),
        "val_ece_before": calibration(before, labels)["ece"],
        "val_ece_after": calibration(after, labels)["ece"],
        "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def no_temperature(temperature: float, val_images: int) -> ClassLabError:
    """The refusal when the validation NLL has no minimum in [T_MIN, T_MAX]. Writing the bound instead would
    sharpen (or flatten) every later probability 20-fold on the word of a split that says nothing about T:
    a model right on all its validation images would be called sure of everything."""
    way = (
        "goes to 0: the model is right on (nearly) every one of them"
        if temperature == T_MIN
        else "grows: the true class's logit is below the mean logit on (nearly) every one of them"
    )
    return ClassLabError(
        f"no temperature in [{T_MIN:g}, {T_MAX:g}] minimises the NLL of the {val_images} validation images (it keeps "
        f"falling as T {way}), so none is written and the probabilities stay as they were; a larger validation "
        "split (data.val_fraction) can tell a temperature"
    )


def _fix(run: RunFolder, checkpoint: str) -> str:
    """How to fit the temperature again, as the reader gives it: a command, or the Python call."""
    best = checkpoint == "best"
    flag = "" if best else f" --checkpoint {checkpoint}"
    keyword = "" if best else f", checkpoint={checkpoint!r}"
    command = f"classlab eval {run.path}{flag} --calibrate"
    return "fit it again: " + spelt(command, f"classlab.evaluate({str(run.path)!r}{keyword}, calibrate=True)")


def calibration_in_use(run: RunFolder, checkpoint: str, *, warn: bool = True) -> dict[str, Any] | None:
    """The calibration fitted for this very checkpoint file (its record, with ``file``), or None; one found but
    not usable (another checkpoint's, damaged) is a warning naming the fix, and never silently applied."""
    problem = None
    try:
        record = run.read_calibration(checkpoint)
    except ClassLabError as exc:
        record, problem = None, str(exc)
    if record is not None:
        problem = _unusable(run, checkpoint, record)
    if problem is not None and warn:
        warnings.warn(
            f"{problem}: it is not used, and the probabilities are not calibrated; {_fix(run, checkpoint)}",
            stacklevel=3,
        )
    if record is None or problem is not None:
        return None
    return {**record, "file": str(run.calibration_path(checkpoint))}


def _unusable(run: RunFolder, checkpoint: str, record: dict[str, Any]) -> str | None:
    """Why a calibration record cannot be used for ``checkpoint`` as it is now, or None."""
    path = run.calibration_path(checkpoint)
    temperature = record.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        return f"{path} is damaged (its temperature is {temperature!r}, not a positive number)"
    ckpt = run.checkpoint(checkpoint)
    if record.get("checkpoint_sha256") != file_sha256(ckpt):
        return f"{path} was fitted for another {ckpt.name} (the file has changed since, as a resumed run's does)"
    return None


def temperature_in_use(run: RunFolder, checkpoint: str) -> float | None:
    """The T a load of this checkpoint divides its logits by now: a classifier's usable calibration, else None.
    Asked without a warning: it is for comparing what files were made of, and the load that uses T says so."""
    if (run.read_config_tree().get("task") or "classify") != "classify":
        return None
    record = calibration_in_use(run, checkpoint, warn=False)
    return float(record["temperature"]) if record is not None else None


def calibration_note(record: dict[str, Any]) -> str:
    """The one line that says the probabilities are calibrated, and by what."""
    return f"probabilities calibrated: T={record['temperature']:.4g} ({Path(record['file']).name})"
