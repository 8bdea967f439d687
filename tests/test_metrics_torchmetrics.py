"""The evaluation metrics now come from torchmetrics; they equal the hand-written ones they replaced.

The reference functions below are the previous implementations (engine/evaluate.py and report_eval.py
before the switch), kept here only to pin the numbers. The one place the two differ is the calibration
error's binning: ours put a confidence in (k/15, (k+1)/15], torchmetrics in [k/15, (k+1)/15) with an extra
bin for exactly 1.0, which classlab folds into the last bin (as Guo et al. and the reliability diagram do).
Softmax confidences practically never sit exactly on an interior edge, but a saturated float32 softmax is
exactly 1.0; the last test shows both cases.
"""

from __future__ import annotations

import pytest
import torch

from classlab.engine.metrics import calibration, confusion_matrix, per_class_scores, top_k_accuracy

# -- the previous, hand-written implementations ------------------------------------------------


def ref_top_k(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(1).float().mean())


def ref_confusion(logits: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(labels * n + logits.argmax(1), minlength=n * n).reshape(n, n)


def ref_per_class(pred: torch.Tensor, labels: torch.Tensor, n: int) -> list[tuple[float, float, float, int]]:
    cm = torch.bincount(labels * n + pred, minlength=n * n).reshape(n, n).double()
    tp, predicted, actual = cm.diag(), cm.sum(0), cm.sum(1)
    rows = []
    for i in range(n):
        p = float(tp[i] / predicted[i]) if predicted[i] > 0 else 0.0
        r = float(tp[i] / actual[i]) if actual[i] > 0 else 0.0
        rows.append((p, r, 2 * p * r / (p + r) if p + r > 0 else 0.0, int(actual[i])))
    return rows


def ref_ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15, torchmetrics_edges: bool = False) -> float:
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    if torchmetrics_edges:  # [k/B, (k+1)/B), and exactly 1.0 in the last (torchmetrics: a bin of its own)
        edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
        index = (torch.bucketize(conf, edges, right=True) - 1).clamp(max=bins - 1)
        count = bins
    else:  # (k/B, (k+1)/B]: the previous implementation
        edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
        index = (torch.bucketize(conf.double(), edges, right=False) - 1).clamp(0, bins - 1)
        count = bins
    ece = 0.0
    for i in range(count):
        mask = index == i
        if mask.any():
            ece += (
                float(mask.sum()) / len(labels) * abs(float(correct[mask].mean()) - float(conf[mask].double().mean()))
            )
    return ece


# -- fixed logits --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixed() -> tuple[torch.Tensor, torch.Tensor]:
    """2,000 examples of 10 classes, logits leaning towards the label, at several temperatures."""
    g = torch.Generator().manual_seed(14)
    labels = torch.randint(0, 10, (2000,), generator=g)
    logits = torch.randn(2000, 10, generator=g) * torch.linspace(0.5, 4.0, 2000)[:, None]
    logits[torch.arange(2000), labels] += 1.5
    labels[:7] = 9  # class 9 gets a few more examples than it is predicted for
    logits[:, 3] -= 20.0  # class 3 is never predicted: precision 0 by convention
    return logits, labels


def test_accuracy_and_confusion_equal_the_previous_numbers(fixed: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, labels = fixed
    for k in (1, 3, 5):
        assert top_k_accuracy(logits, labels, k) == pytest.approx(ref_top_k(logits, labels, k), abs=1e-7)
    assert 0.3 < top_k_accuracy(logits, labels, 1) < 0.9  # a meaningful case, not all right or all wrong
    assert torch.equal(confusion_matrix(logits, labels, 10), ref_confusion(logits, labels, 10))


def test_per_class_scores_equal_the_previous_numbers(fixed: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, labels = fixed
    pred = logits.argmax(1)
    rows = per_class_scores(pred, labels, [str(i) for i in range(10)])
    for row, (p, r, f1, support) in zip(rows, ref_per_class(pred, labels, 10), strict=True):
        assert row["precision"] == pytest.approx(p, abs=1e-6)
        assert row["recall"] == pytest.approx(r, abs=1e-6)
        assert row["f1"] == pytest.approx(f1, abs=1e-6)
        assert row["support"] == support
    assert rows[3]["precision"] == 0.0 and rows[3]["f1"] == 0.0 and rows[3]["support"] > 0


def test_ece_equals_the_previous_number_off_the_edges(fixed: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, labels = fixed
    probs = logits.softmax(1)
    edges = torch.linspace(0, 1, 16)
    conf = probs.max(1).values
    assert not torch.isin(conf, edges).any()  # no confidence on a bin edge in this set
    cal = calibration(probs, labels)
    assert cal["ece"] == pytest.approx(ref_ece(probs, labels), abs=1e-6)
    assert cal["ece"] > 0.01
    assert sum(b["count"] for b in cal["bins"]) == len(labels)


def test_ece_bin_edges_where_they_differ() -> None:
    edge = float(torch.linspace(0, 1, 16)[9])  # 0.6 exactly as float32 bin edge
    probs = torch.tensor([[edge, 1 - edge], [0.58, 0.42], [1.0, 0.0], [0.95, 0.05]])
    labels = torch.tensor([0, 1, 1, 0])  # the edge case right, 0.58 wrong, the saturated 1.0 wrong, 0.95 right
    ours = calibration(probs, labels)["ece"]
    # Previous binning: 0.6 joins 0.58 in (8/15, 9/15]; 1.0 joins 0.95 in (14/15, 1].
    assert ref_ece(probs, labels) == pytest.approx(0.5 * abs(0.5 - (edge + 0.58) / 2) + 0.5 * abs(0.5 - 0.975))
    # classlab: the edge alone in [9/15, 10/15), 0.58 alone, 1.0 (wrong) and 0.95 (right) in the last bin.
    assert ours == pytest.approx((0.58 + (1 - edge)) / 4 + 0.5 * abs(0.5 - 0.975), abs=1e-6)
    assert ours != pytest.approx(ref_ece(probs, labels), abs=1e-3)
    assert ours == pytest.approx(ref_ece(probs, labels, torchmetrics_edges=True), abs=1e-6)
