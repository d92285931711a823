"""Threshold metrics for binary tasks: precision, recall and F1 at a threshold, and the threshold with the best F1.

A row is predicted positive when its score is at or above the threshold (``p >= t``). Rows whose label is NaN (outside
the task's sample space, as in ``evaluate``'s ``predictions_out``) are left out; the other labels must be 0 or 1.

Conventions where a ratio has no denominator: with no positive prediction, precision is 0; with no positive label,
recall is 0; F1 is 0 whenever precision and recall are both 0. Every value is then a number (never NaN), and a
threshold that predicts nothing positive scores F1 0 rather than looking perfect.

Pure numpy; the run (torchrec_mtl.run.evaluate) applies them to the gathered test predictions, at the configured threshold or
at the one ``best_f1_threshold`` chooses on the validation predictions.

Example::

    >>> p = np.array([0.9, 0.8, 0.4, 0.3, 0.1])
    >>> y = np.array([1.0, 0.0, 1.0, 0.0, np.nan])  # the last row is outside the task: ignored
    >>> threshold_metrics(p, y, 0.5)
    {'threshold': 0.5, 'precision': 0.5, 'recall': 0.5, 'f1': 0.5}
    >>> best_f1_threshold(p, y)  # 0.4: three predicted positive, both positives found: F1 = 2*2 / (3 + 2)
    0.4
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np


def _labelled(predictions: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The rows with a label, as (scores, positives: bool); ValueError for shapes that differ or labels not 0/1."""
    predictions, labels = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape}: expected two equal 1-d arrays")
    present = ~np.isnan(labels)
    predictions, labels = predictions[present], labels[present]
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError(f"labels: expected 0, 1 or NaN, got {np.setdiff1d(labels, (0.0, 1.0))[:5].tolist()}")
    return predictions, labels == 1.0


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def threshold_metrics(predictions: np.ndarray, labels: np.ndarray, threshold: float) -> Dict[str, float]:
    """Precision, recall and F1 of predicting positive where ``predictions >= threshold``, over the rows whose label
    is not NaN (see the module's conventions for empty denominators).

    Example::

        >>> threshold_metrics(np.array([0.7, 0.7, 0.2]), np.array([1.0, 0.0, 1.0]), 0.7)  # ties at t are positive
        {'threshold': 0.7, 'precision': 0.5, 'recall': 0.5, 'f1': 0.5}
        >>> threshold_metrics(np.array([0.2, 0.1]), np.array([1.0, 0.0]), 0.5)  # nothing predicted positive
        {'threshold': 0.5, 'precision': 0.0, 'recall': 0.0, 'f1': 0.0}
    """
    scores, positive = _labelled(predictions, labels)
    predicted = scores >= threshold
    true_positives = int(np.count_nonzero(predicted & positive))
    precision = _ratio(true_positives, int(np.count_nonzero(predicted)))
    recall = _ratio(true_positives, int(np.count_nonzero(positive)))
    return {
        "threshold": float(threshold),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
    }


def best_f1_threshold(predictions: np.ndarray, labels: np.ndarray) -> float:
    """The threshold (one of the labelled rows' distinct scores) whose F1 is highest, over the rows whose label is
    not NaN; among equal F1s the highest threshold (the fewest positive predictions).

    Exact, in O(n log n): the rows are sorted by score, highest first; at the k-th distinct score s every row up to
    the last one scoring s is predicted positive (``p >= s``, so tied scores go together), and
    F1(s) = 2 TP(s) / (predicted positives(s) + positives). No other threshold does better: any t between two
    distinct scores predicts the same rows as the next score up. With no positive label every F1 is 0 and the highest
    score is returned; with no labelled row at all there is nothing to choose from (ValueError).

    Example::

        >>> best_f1_threshold(np.array([0.9, 0.6, 0.6, 0.2]), np.array([1.0, 1.0, 0.0, 0.0]))  # 0.6: F1 0.8
        0.6
    """
    scores, positive = _labelled(predictions, labels)
    if scores.size == 0:
        raise ValueError("best_f1_threshold: no row with a label to choose a threshold on")
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    true_positives = np.cumsum(positive)
    predicted_positives = np.arange(1, scores.size + 1)
    # the last row of each run of equal scores: the threshold there takes the whole run
    last = np.append(scores[1:] != scores[:-1], True)
    f1 = 2.0 * true_positives[last] / (predicted_positives[last] + true_positives[-1])
    return float(scores[last][int(np.argmax(f1))])  # argmax: the first (highest) of equal maxima
