"""Checks of painted labels shared by fine-tuning and the live preview: which values are classes, and clear
errors for labels a model cannot learn from."""
from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_CLASSES = 255  # model classes a package may have (values are class numbers, not instance ids)


def some_values(values: Sequence[int], n: int = 6) -> str:
    """A short listing of sorted values: '1, 2, 3, ..., 60000'."""
    values = list(values)
    return ", ".join(map(str, values)) if len(values) <= n else ", ".join(map(str, values[:n - 1])) + f", ..., {values[-1]}"


def check_labels(labels: np.ndarray, label_mode: str) -> tuple[int, list[int]]:
    """Validate painted labels; returns (number of model classes K, label values of the classes).

    Sparse mode: the painted values (any positive integers; 0 = unlabelled), at least two. Dense mode:
    every value, 0 = background included. At most `MAX_CLASSES` classes; values are mapped to
    contiguous model classes in sorted order (see `finetune.to_internal`)."""
    values = [int(v) for v in np.unique(labels)]
    negative = [v for v in values if v < 0]
    if negative:
        raise ValueError(f"labels must be >= 0 (0 = unlabelled, classes 1..K); found negative values "
                         f"{some_values(negative)}")
    if label_mode == "sparse":
        values = [v for v in values if v != 0]
        if not values:
            raise ValueError("the labels contain no painted pixels: paint strokes of at least two classes "
                             "(values 1..K; 0 = unlabelled is ignored)")
        if len(values) < 2:
            raise ValueError(f"only one class ({values[0]}) is painted: at least two classes must be painted "
                             "(0 = unlabelled, classes 1..K)")
    elif len(values) < 2:
        raise ValueError(f"dense labels need at least two classes (0 = background and one more); found only "
                         f"{values}")
    if len(values) > MAX_CLASSES:
        raise ValueError(f"the labels hold {len(values)} different values ({some_values(values)}); at most {MAX_CLASSES} "
                         "classes are supported: label values are class numbers (not instance ids), so relabel "
                         f"them into at most {MAX_CLASSES} classes")
    return len(values), values
