"""Train/validation (or train/test) splits: speaker-grouped where a group exists, stratified elsewhere."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, StratifiedShuffleSplit, ShuffleSplit


def has_group(groups: np.ndarray) -> np.ndarray:
    """True where a record carries a usable group (speaker) id: not None, not NaN, not empty."""
    out = np.zeros(len(groups), dtype=bool)
    for i, g in enumerate(groups):
        if g is None:
            continue
        if isinstance(g, float) and np.isnan(g):
            continue
        out[i] = str(g) != ""
    return out


def _stratified(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(y)
    n_held = int(round(n * fraction))
    if n_held == 0 or n_held == n:
        return np.arange(n), np.arange(0)
    _, counts = np.unique(y, return_counts=True)
    # Stratify only when every class can appear on both sides.
    can_stratify = counts.min() >= 2 and n_held >= len(counts) and n - n_held >= len(counts)
    splitter = (StratifiedShuffleSplit if can_stratify else ShuffleSplit)(n_splits=1, test_size=n_held, random_state=seed)
    train, held = next(splitter.split(np.zeros(n), y if can_stratify else None))
    return np.sort(train), np.sort(held)


def grouped_split(
    y: np.ndarray, groups: np.ndarray | None = None, fraction: float = 0.2, seed: int = 13
) -> tuple[np.ndarray, np.ndarray]:
    """Split record positions into (kept, held_out).

    Records with a group (speaker) are split by group, so no group is on both sides; the
    number of held-out groups is ``round(fraction * n_groups)``, at least one when there
    are two or more groups. Records without a group are split stratified by ``y``.
    Returns sorted integer positions.
    """
    y = np.asarray(y)
    n = len(y)
    if groups is None:
        return _stratified(y, fraction, seed)
    groups = np.asarray(groups, dtype=object)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} records")
    grouped = has_group(groups)
    kept, held = [], []
    if grouped.any():
        positions = np.flatnonzero(grouped)
        names = np.array([str(g) for g in groups[grouped]])
        n_groups = len(np.unique(names))
        n_held_groups = min(max(int(round(fraction * n_groups)), 1), n_groups - 1) if n_groups >= 2 else 0
        if n_held_groups and fraction > 0:
            splitter = GroupShuffleSplit(n_splits=1, test_size=n_held_groups, random_state=seed)
            k, h = next(splitter.split(positions, groups=names))
            kept.append(positions[k])
            held.append(positions[h])
        else:
            kept.append(positions)
    if (~grouped).any():
        positions = np.flatnonzero(~grouped)
        k, h = _stratified(y[~grouped], fraction, seed)
        kept.append(positions[k])
        held.append(positions[h])
    return np.sort(np.concatenate(kept)).astype(int), np.sort(np.concatenate(held or [np.arange(0)])).astype(int)


def grouped_folds(y: np.ndarray, groups: np.ndarray | None = None, n_folds: int = 3, seed: int = 13) -> list[np.ndarray]:
    """``n_folds`` disjoint held-out position sets covering every record once (for cross-fitting).

    Records with a group are assigned whole groups per fold (so no speaker is in a fold
    and outside it); the others are spread stratified by ``y``.
    """
    from sklearn.model_selection import GroupKFold, KFold, StratifiedKFold

    y = np.asarray(y)
    folds: list[list[np.ndarray]] = [[] for _ in range(n_folds)]
    grouped = has_group(np.asarray(groups, dtype=object)) if groups is not None else np.zeros(len(y), bool)
    if grouped.any():
        positions = np.flatnonzero(grouped)
        names = np.array([str(g) for g in np.asarray(groups, dtype=object)[grouped]])
        if len(np.unique(names)) >= n_folds:
            for k, (_, held) in enumerate(GroupKFold(n_splits=n_folds).split(positions, groups=names)):
                folds[k].append(positions[held])
        else:
            grouped[:] = False  # too few groups to keep them apart: treat as ungrouped
    rest = np.flatnonzero(~grouped)
    if len(rest):
        _, counts = np.unique(y[rest], return_counts=True)
        splitter = (StratifiedKFold if counts.min() >= n_folds else KFold)(n_folds, shuffle=True, random_state=seed)
        for k, (_, held) in enumerate(splitter.split(np.zeros(len(rest)), y[rest])):
            folds[k].append(rest[held])
    return [np.sort(np.concatenate(parts)).astype(int) if parts else np.arange(0) for parts in folds]


def leave_one_group_out(y: np.ndarray, groups: np.ndarray, seed: int = 13) -> list[tuple[np.ndarray, np.ndarray]]:
    """Speaker-independent folds that use every group: one (train, test) pair per group.

    Fold k's test side holds all records of group k plus the k-th of ``n_groups``
    stratified shares of the records without a group (so every record is tested exactly
    once and each test side has its fair share of the ungrouped records); the train side
    is everything else. Returns sorted integer positions.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    y = np.asarray(y)
    groups = np.asarray(groups, dtype=object)
    grouped = has_group(groups)
    names = sorted({str(g) for g in groups[grouped]})
    if len(names) < 2:
        raise ValueError(f"leave-one-group-out needs at least two groups, got {names}")
    rest = np.flatnonzero(~grouped)
    shares: list[np.ndarray] = [np.arange(0)] * len(names)
    if len(rest) >= len(names):
        _, counts = np.unique(y[rest], return_counts=True)
        splitter = (StratifiedKFold if counts.min() >= len(names) else KFold)(len(names), shuffle=True,
                                                                               random_state=seed)
        shares = [rest[held] for _, held in splitter.split(np.zeros(len(rest)), y[rest])]
    out = []
    str_groups = np.array([str(g) for g in groups])
    for name, share in zip(names, shares):
        test = np.sort(np.concatenate([np.flatnonzero(grouped & (str_groups == name)), share])).astype(int)
        train = np.setdiff1d(np.arange(len(y)), test)
        out.append((train, test))
    return out
