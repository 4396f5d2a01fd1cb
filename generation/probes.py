"""Linear probes for the tokens remaining: reading one layer at a time, fitting ridge, scoring.

scikit-learn and scipy belong to the optional `report` extra, so they are imported inside the functions
that use them and this module imports without them.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

REPORT_EXTRA_HINT = 'pip install -e ".[report]"'
REPORT_MODULES = ("matplotlib", "sklearn", "scipy")

# Rows per Arrow slice. One slice of the all-layers config of a 28-layer, 3072-wide model is
# 1024 rows x 86,016 float16 values, about 176 MB of the memory-mapped cache, of which only
# one layer (about 12 MB as float32) is copied.
DEFAULT_CHUNK_ROWS = 1024

RAW_TARGET = "remaining_tokens"
LOG_TARGET = "log_remaining_tokens"
TARGETS = (RAW_TARGET, LOG_TARGET)


class ReportError(Exception):
    """A report that cannot be made; the message states what is wrong and what to do."""


def require_report_extras() -> None:
    """Raise ReportError naming the install command unless matplotlib, scikit-learn and scipy import."""
    missing = []
    for name in REPORT_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ReportError(
            f"the report needs {', '.join(missing)}, which are not installed; "
            f"install the report extra with `{REPORT_EXTRA_HINT}`"
        )


@dataclasses.dataclass(frozen=True)
class ProbeScores:
    """Validation scores of one probe, on the scale of its target."""

    r2: float
    mae: float
    spearman: float  # NaN when the target or the prediction is constant, where rank correlation is undefined

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def probe_targets(remaining_tokens: np.ndarray) -> np.ndarray:
    """Stack the two regression targets as columns: remaining_tokens and log(remaining_tokens + 1)."""
    remaining = np.asarray(remaining_tokens, dtype=np.float64)
    return np.column_stack([remaining, np.log1p(remaining)])


def read_layer(
    dataset,
    position: int,
    *,
    layer_count: int,
    hidden_size: int,
    rows: np.ndarray | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> np.ndarray:
    """Copy the hidden states of one layer into a float32 array of shape [selected rows, hidden_size].

    `position` indexes the layers stored in a row (0 for the first), and `rows` is an optional boolean
    mask over the dataset's rows. Arrow slices of a `datasets.Dataset` are views of its memory-mapped
    cache, and float16 or float32 values convert to numpy without a copy, so only this layer's values
    of one chunk are copied at a time. Memory therefore stays near the size of the returned array.
    """
    if not 0 <= position < layer_count:
        raise IndexError(f"layer position {position} is out of range for rows of {layer_count} layers")
    total = len(dataset)
    if rows is None:
        rows = np.ones(total, dtype=bool)
    elif rows.shape != (total,):
        raise ValueError(f"row mask of shape {rows.shape} does not match the dataset's {total} rows")

    features = np.empty((int(rows.sum()), hidden_size), dtype=np.float32)
    arrow_view = dataset.with_format("arrow", columns=["hidden_states"])
    filled = 0
    for start in range(0, total, chunk_rows):
        column = arrow_view[start : start + chunk_rows].column("hidden_states")
        offset = start
        for chunk in column.chunks:
            values = chunk.flatten().to_numpy(zero_copy_only=False).reshape(len(chunk), layer_count, hidden_size)
            selected = values[rows[offset : offset + len(chunk)], position, :]
            features[filled : filled + len(selected)] = selected
            filled += len(selected)
            offset += len(chunk)
    return features


def fit_probes(
    train_features: np.ndarray,
    train_targets: np.ndarray,
    validation_features: np.ndarray,
    validation_targets: np.ndarray,
    *,
    alpha: float,
) -> list[ProbeScores]:
    """Fit ridge regression on standardised train features and score it on validation, per target column.

    The scaler learns the mean and standard deviation on train only, so validation rows leak nothing
    into the fit. One multi-output Ridge fits every target column independently with the same alpha.
    """
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(train_features) < 2:
        raise ReportError(
            f"the train split has {len(train_features)} usable row(s), too few to fit a probe; "
            "extract more samples or lower --validation-fraction"
        )
    if len(validation_features) == 0:
        raise ReportError("the validation split has no usable rows; raise --validation-fraction or extract more samples")

    model = make_pipeline(StandardScaler(), Ridge(alpha=alpha))
    model.fit(train_features, train_targets)
    predictions = model.predict(validation_features).reshape(validation_targets.shape)
    return [score_predictions(validation_targets[:, column], predictions[:, column]) for column in range(predictions.shape[1])]


def score_predictions(expected: np.ndarray, predicted: np.ndarray) -> ProbeScores:
    """Score predictions with R², mean absolute error and Spearman's rank correlation."""
    from scipy.stats import spearmanr
    from sklearn.metrics import mean_absolute_error, r2_score

    if len(expected) >= 2:
        r2 = float(r2_score(expected, predicted))
    else:
        r2 = math.nan  # r2_score would warn and return NaN for one row, so NaN is set here without the warning
    if len(expected) < 2 or np.ptp(expected) == 0 or np.ptp(predicted) == 0:
        spearman = math.nan
    else:
        spearman = float(spearmanr(expected, predicted).statistic)
    return ProbeScores(r2=r2, mae=float(mean_absolute_error(expected, predicted)), spearman=spearman)


def check_finite(features: np.ndarray, layer: int) -> None:
    """Raise ReportError when a layer's states contain NaN or infinity, which Ridge cannot fit."""
    bad = int(features.size - np.count_nonzero(np.isfinite(features)))
    if bad:
        raise ReportError(
            f"layer {layer}: {bad} hidden-state values are NaN or infinite; "
            "run `python -m generation verify DATA_DIR` to find the shards, then re-extract them"
        )
