"""Seeded train/validation splits: stratified by class, optionally grouped, optionally N per class.

The split is saved in the run folder as indices into the training source, so resume and
eval see exactly the images training saw, whatever the seed handling of a later version.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from classlab.errors import ClassLabError


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each class gives round(n_c * val_fraction) images (at least one when it has two) to validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        if val_fraction > 0 and n_val == 0 and len(idx) >= 2:
            n_val = 1
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def grouped_split(
    labels: np.ndarray, groups: Sequence[object], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Whole groups go to one side, so no group (one person, one patient) is on both.

    Groups are visited in a seeded order and given to validation while that brings each class
    closer to its share, which keeps classes roughly stratified.
    """
    groups = np.asarray(groups, dtype=object)
    names = sorted(set(groups.tolist()), key=str)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    classes = np.unique(labels)
    target = {c: (labels == c).sum() * val_fraction for c in classes}
    have = dict.fromkeys(classes, 0)
    total_target, total = len(labels) * val_fraction, 0
    val_groups = set()
    for k in order:
        if total >= total_target:
            break
        members = groups == names[k]
        counts = {c: int((labels[members] == c).sum()) for c in classes}
        helps = any(counts[c] and have[c] + counts[c] <= target[c] + counts[c] / 2 for c in classes)
        if helps:
            val_groups.add(names[k])
            for c in classes:
                have[c] += counts[c]
            total += int(members.sum())
    if val_fraction > 0 and not val_groups:
        val_groups.add(_smallest_spare_group(labels, groups, [names[k] for k in order]))
    in_val = np.array([g in val_groups for g in groups.tolist()], dtype=bool)
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)


def _smallest_spare_group(labels: np.ndarray, groups: np.ndarray, names: list[object]) -> object:
    """The smallest group (ties in the seeded order) that leaves every class some training image: the group to
    validate on when each is bigger than the validation share, as a stratified split spares one image a class."""
    for name in sorted(names, key=lambda g: int((groups == g).sum())):
        members = groups == name
        if all((labels[~members] == c).any() for c in np.unique(labels[members])):
            return name
    raise ClassLabError(
        f"data.group_column: each of its {len(names)} groups holds every image of some class, so no group can be "
        "the validation split without that class missing from training; group by a finer column (one person, "
        "one patient), or leave data.group_column unset"
    )


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Each image's fold (0..k-1): every class dealt round-robin in a seeded order.

    A class of n_c images puts floor(n_c/k) or ceil(n_c/k) into each fold (stratified within
    one image), and each class starts dealing where the last one stopped, so fold sizes also
    differ by at most one.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    start = 0
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        fold[idx] = (start + np.arange(len(idx))) % k
        start = (start + len(idx)) % k
    return fold


def grouped_folds(labels: np.ndarray, groups: Sequence[object], k: int, seed: int) -> np.ndarray:
    """Each image's fold with whole groups in one fold (a person never in two folds).

    Groups are placed largest first (ties in a seeded order), each into the fold where it
    brings the class counts closest to an even share, which keeps folds near-stratified.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups, dtype=object)
    names, inverse = np.unique(np.array([str(g) for g in groups.tolist()]), return_inverse=True)
    if len(names) < k:
        raise ClassLabError(
            f"data.folds={k} but data.group_column has only {len(names)} group(s); use at most {len(names)} folds"
        )
    classes, label_idx = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(names), len(classes)), dtype=np.int64)
    np.add.at(counts, (inverse, label_idx), 1)
    target = counts.sum(0) / k
    rng = np.random.default_rng(seed)
    order = sorted(rng.permutation(len(names)).tolist(), key=lambda g: -int(counts[g].sum()))
    have = np.zeros((k, len(classes)), dtype=np.float64)
    group_fold = np.empty(len(names), dtype=np.int64)
    for g in order:
        after = have + counts[g]
        cost = ((after - target) ** 2).sum(1) - ((have - target) ** 2).sum(1)
        best = int(np.argmin(cost + 1e-9 * have.sum(1)))
        group_fold[g] = best
        have[best] += counts[g]
    return group_fold[inverse]


def fold_split(fold_of: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices when fold ``fold`` is validation."""
    return np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)


def per_class(
    labels: np.ndarray,
    indices: np.ndarray,
    n: int,
    seed: int,
    class_names: Sequence[str],
    val_share: str | None = "data.val_fraction",
) -> np.ndarray:
    """N training images a class, drawn seeded from ``indices``; too few is an error, not a silent imbalance.

    A class no image of the data carries (a multi-task combination that never occurs) has nothing to draw
    and is passed over: counting it short would make every N impossible. ``val_share`` is the setting that
    sized the validation split (None: no split took images, so lowering it would not help).
    """
    rng = np.random.default_rng(seed + 7919)
    present = set(np.unique(labels).tolist())
    chosen = []
    short: list[tuple[str, int]] = []
    for cls in range(len(class_names)):
        idx = indices[labels[indices] == cls]
        if cls not in present:
            continue
        if len(idx) < n:
            short.append((class_names[cls], len(idx)))
            continue
        chosen.append(rng.choice(idx, size=n, replace=False))
    if short:
        fewest = min(count for _, count in short)
        fix = f"use data.images_per_class={fewest} or less" if fewest else "every class needs a training image"
        after, lower = (" after the validation split", f", or lower {val_share}") if val_share else ("", "")
        raise ClassLabError(
            f"data.images_per_class={n} but these classes have fewer training images{after}: "
            + ", ".join(f"{name} ({count})" for name, count in short[:10])
            + (" ..." if len(short) > 10 else "")
            + f"; {fix}{lower}"
        )
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)


def make_split(
    labels: np.ndarray,
    *,
    val_fraction: float,
    seed: int,
    class_names: Sequence[str],
    groups: Sequence[object] | None = None,
    images_per_class: int | None = None,
    folds: int | None = None,
    fold: int | None = None,
    given_val: np.ndarray | None = None,
) -> dict[str, list[int]]:
    """Train and val indices into ``labels``, as saved in split.json (k-fold: fold ``fold`` of ``folds``).

    ``given_val`` marks the images of the data's own validation set (a ``val/`` folder): they are
    the validation split as they are, since the person who made them chose them for a reason.
    """
    labels = np.asarray(labels)
    if given_val is not None and folds:
        raise ClassLabError(
            f"data.folds={folds} makes its own validation folds, but the data has its own validation folder: "
            "move its class folders into train/ to fold over both, or leave data.folds unset"
        )
    if given_val is not None:
        train, val = np.flatnonzero(~given_val), np.flatnonzero(given_val)
    elif folds:
        fold_of = (
            grouped_folds(labels, groups, folds, seed) if groups is not None else stratified_folds(labels, folds, seed)
        )
        train, val = fold_split(fold_of, fold or 0)
    elif groups is not None:
        train, val = grouped_split(labels, groups, val_fraction, seed)
    else:
        train, val = stratified_split(labels, val_fraction, seed)
    if images_per_class:
        share = None if given_val is not None or not len(val) else "data.val_fraction"
        train = per_class(labels, train, images_per_class, seed, class_names, share)
    if len(train) == 0:
        raise ClassLabError("the training split is empty; lower data.val_fraction or add images")
    return {"train": train.tolist(), "val": val.tolist()}
