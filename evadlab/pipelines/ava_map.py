"""AVA frame-mAP, computed exactly as the official evaluator does in the SlowFast/EVAD setting.

The official evaluator is the Pascal-VOC-style one from the TF Object Detection API as shipped in SlowFast's
``slowfast/utils/ava_evaluation`` (``PascalDetectionEvaluator``, ``PerImageEvaluation``, ``metrics``) and driven by
``slowfast/utils/ava_eval_helper.py`` (``read_csv``, ``read_exclusions``, ``read_labelmap``, ``run_evaluation``).
This module reproduces its results (to the last bit on the same machine) with columnar, vectorised code:

* Rows are kept only for label-map classes; the image key is ``"%s,%04d" % (video_id, int(timestamp))``; keys in
  the exclusions file are dropped from ground truth and detections alike. Duplicate rows are all kept.
* Detections with ``y1 >= y2`` or ``x1 >= x2`` are dropped (``PerImageEvaluation._remove_invalid_boxes``), after
  their keyframe took its place in the order images are added (its first row of a label-map class, valid or not).
* Per image and class, detections are visited in *file order* (the official code does not sort them by score;
  ActivityNet's own reader sorts and keeps 50 per image, SlowFast's does neither, and there is no cap here).
  Each one takes the ground-truth box with the largest IoU (``np.argmax``: the first box on ties, NaN wins); it
  is a true positive iff that IoU is >= the threshold and no earlier detection already took that box. A
  detection whose best box is taken is a false positive even when another free box overlaps it enough.
* IoU = intersection / (area_a + area_b - intersection) without the VOC ``+1``.
* Per class, the scores of all images are concatenated in the order images first appear in the detections, then
  ranked with ``np.argsort(scores)[::-1]``; calling that same function on the same array reproduces the official
  (unstable) tie order exactly. Precision is made monotone and AP is the area under the all-point interpolated
  curve. A class without ground truth gets no AP; the mAP is ``np.nanmean`` over classes ``1..max(label ids)``.
* Several IoU thresholds (EVAD's strict mode, ``np.linspace(0.5, 0.95, 10)``): the mAP is the mean of the
  per-threshold mAPs, as EVAD reports ``AP``; per-class values are the mean over thresholds.

The files are read by ``evadlab.pipelines.ava`` in its official mode, which reads every line the official reader
reads the same way (detections without extent are left out there, with a warning giving their count and first line;
rows the official code scores although they look wrong are kept, with a warning) and stops, naming the file and
line, at a line the official reader cannot read either (a wrong number of fields, a field ``int()`` / ``float()``
refuses, a blank line) or at a timestamp outside 0..2**31-1.

``evadlab ava-map --json`` prints one object: ``mAP`` (null without any class with ground truth), ``per_class``
keyed by the class id as a string, each ``{"name": ..., "AP": ...}`` (AP null for a class without ground truth; two
classes may share a name), ``num_groundtruth``, ``num_detections`` and, for several IoU thresholds, ``mAP_per_iou``
keyed by the threshold with 2 decimals.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evadlab.pipelines import ava

DEFAULT_IOU_THRESHOLDS = (0.5,)
# EVAD's strict evaluation: the exact values of np.linspace matter when an IoU lands on a threshold.
STRICT_IOU_THRESHOLDS = tuple(float(t) for t in np.linspace(0.5, 0.95, 10))

_COORDINATES = ava.BOX_COLUMNS


@dataclass(frozen=True)
class FrameMapResult:
    """Frame-mAP over the label-map classes.

    ``per_class`` maps every label-map class id to its AP (mean over thresholds), or None when the class has
    no ground truth. ``mAP_per_iou`` maps each IoU threshold to its mAP.
    """

    mAP: float
    per_class: dict[int, float | None]
    num_groundtruth: int
    num_detections: int
    mAP_per_iou: dict[float, float]


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class _Boxes:
    """Rows of one side (ground truth or detections) in the evaluator's own layout."""

    image: np.ndarray  # image code, numbered in order of first appearance in these rows
    image_keys: pa.Array  # key string of each image code
    class_index: np.ndarray  # position of the row's class among the sorted evaluated class ids
    y1: np.ndarray
    x1: np.ndarray
    y2: np.ndarray
    x2: np.ndarray
    score: np.ndarray

    def take(self, rows: np.ndarray) -> _Boxes:
        return _Boxes(self.image[rows], self.image_keys, self.class_index[rows], self.y1[rows], self.x1[rows],
                      self.y2[rows], self.x2[rows], self.score[rows])


def frame_map(groundtruth, detections, class_ids: Iterable[int],
              iou_thresholds: Iterable[float] = DEFAULT_IOU_THRESHOLDS) -> FrameMapResult:
    """Frame-mAP of detections against ground truth (tables shaped like ``ava.read_boxes_csv`` output).

    Row order matters exactly as file order does for the official evaluator. Rows of classes outside
    ``class_ids`` are ignored; exclusions are applied by the readers.
    """
    evaluated = _evaluated_class_ids(class_ids)
    thresholds = _checked_thresholds(iou_thresholds)
    truth = _boxes_from_table(groundtruth, evaluated, is_detection=False, name="groundtruth")
    found = _boxes_from_table(detections, evaluated, is_detection=True, name="detections")
    num_groundtruth_per_class = np.bincount(truth.class_index, minlength=len(evaluated))

    # Detections are visited in group order (class, then image in order of first appearance, then file order)
    # through `order`, without moving the columns themselves.
    order = _group_order(found.class_index, found.image)
    class_in_order = found.class_index[order]
    group_of_found = class_in_order * len(found.image_keys) + found.image[order]
    group_of_truth, truth = _groundtruth_groups(truth, found)
    best_truth, best_iou = _best_overlaps(found, order, group_of_found, truth, group_of_truth)

    class_start = np.searchsorted(class_in_order, np.arange(len(evaluated) + 1))
    average_precisions = np.full((len(thresholds), len(evaluated)), np.nan)
    for class_position in np.flatnonzero(num_groundtruth_per_class):
        rows = slice(class_start[class_position], class_start[class_position + 1])
        # The official ranking: argsort of this exact score array, reversed (its tie order is part of the result).
        ranking = np.argsort(found.score[order[rows]])[::-1]
        for threshold_position, threshold in enumerate(thresholds):
            hits = _true_positives(best_truth[rows], best_iou[rows], threshold)
            average_precisions[threshold_position, class_position] = _average_precision(
                hits[ranking], num_groundtruth_per_class[class_position])

    map_per_iou = [_mean_over_label_range(evaluated, row) for row in average_precisions]
    per_class = {int(class_id): (None if num_groundtruth_per_class[position] == 0
                                 else float(np.mean(average_precisions[:, position])))
                 for position, class_id in enumerate(evaluated)}
    return FrameMapResult(mAP=float(np.mean(map_per_iou)), per_class=per_class,
                          num_groundtruth=int(num_groundtruth_per_class.sum()),
                          num_detections=len(found.image),
                          mAP_per_iou=dict(zip(thresholds, (float(value) for value in map_per_iou))))


def _evaluated_class_ids(class_ids: Iterable[int]) -> np.ndarray:
    evaluated = np.unique(np.asarray(list(class_ids), dtype=np.int64))
    if evaluated.size == 0 or evaluated[0] < 1:
        raise ValueError("class ids must be a non-empty set of positive integers (label-map ids)")
    return evaluated


def _checked_thresholds(iou_thresholds: Iterable[float]) -> tuple[float, ...]:
    thresholds = tuple(float(t) for t in iou_thresholds)
    if not thresholds or not all(0.0 < t <= 1.0 for t in thresholds):
        raise ValueError(f"IoU thresholds must be a non-empty list of numbers in (0, 1], got {thresholds}")
    return thresholds


def _boxes_from_table(table, evaluated: np.ndarray, *, is_detection: bool, name: str) -> _Boxes:
    table = table if isinstance(table, pa.Table) else pa.table(table)
    required = ("key", *_COORDINATES, "class_id") + (("score",) if is_detection else ())
    missing = [column for column in required if column not in table.column_names]
    if missing:
        raise ValueError(f"{name} table lacks column(s) {missing}; it has {table.column_names}")
    with_nulls = [column for column in required if table.column(column).null_count]
    if with_nulls:
        raise ValueError(f"{name} table has missing values in column(s) {with_nulls}")
    column = {c: table.column(c).to_numpy().astype(np.float64, copy=False) for c in _COORDINATES}
    if is_detection:
        column["score"] = table.column("score").to_numpy().astype(np.float64, copy=False)
    class_of_row = table.column("class_id").to_numpy().astype(np.int64, copy=False)
    listed = np.isin(class_of_row, evaluated)
    # Images are numbered as the official reader adds them: at the first row of a listed class, valid or not.
    image, image_keys = _first_appearance_codes(table.column("key"), None if listed.all() else np.flatnonzero(listed))
    keep = listed
    if is_detection:
        # The official per-image evaluation then drops boxes with no extent (NaN coordinates included).
        valid = (column["y1"] < column["y2"]) & (column["x1"] < column["x2"])
        image, keep = image[valid[listed]], listed & valid
    rows = None if keep.all() else np.flatnonzero(keep)  # None: every row, without copying the columns
    kept = {column_name: values if rows is None else values[rows] for column_name, values in column.items()}
    return _Boxes(image=image, image_keys=image_keys,
                  class_index=np.searchsorted(evaluated, class_of_row if rows is None else class_of_row[rows]),
                  y1=kept["y1"], x1=kept["x1"], y2=kept["y2"], x2=kept["x2"],
                  score=kept["score"] if is_detection else np.ones(len(image)))


def _first_appearance_codes(keys: pa.ChunkedArray, rows: np.ndarray | None) -> tuple[np.ndarray, pa.Array]:
    """Image code of each kept row, numbered in the order images first appear among the kept rows, and the
    key of each code (the official evaluator adds images in that order)."""
    keys = keys.combine_chunks() if keys.num_chunks else pa.array([], keys.type)
    if pa.types.is_dictionary(keys.type) and pc.count_distinct(keys.dictionary).as_py() < len(keys.dictionary):
        keys = keys.cast(keys.type.value_type)  # one key spelled by several codes: encode afresh
    if not pa.types.is_dictionary(keys.type):
        keys = pc.dictionary_encode(keys)
    images = pc.dictionary_encode(keys.indices if rows is None else keys.indices.take(pa.array(rows, pa.int64())))
    return (images.indices.to_numpy(zero_copy_only=False).astype(np.int64),
            keys.dictionary.take(images.dictionary))


def _group_order(class_index: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Stable order by (class, image): the official per-class concatenation order, file order inside each image."""
    # Files are usually grouped by keyframe, and then image codes (first-appearance numbers) never decrease.
    already_by_image = bool(np.all(image[1:] >= image[:-1]))
    by_image = np.arange(len(image)) if already_by_image else np.argsort(image, kind="stable")
    # A narrow integer type lets numpy's stable sort use a radix sort.
    narrow = class_index[by_image].astype(np.min_scalar_type(max(int(class_index.max(initial=0)), 1)))
    return by_image[np.argsort(narrow, kind="stable")]


def _groundtruth_groups(truth: _Boxes, found: _Boxes) -> tuple[np.ndarray, _Boxes]:
    """Ground truth of images that have detections, sorted by (class, detection image code), with its group id."""
    image_in_found = pc.fill_null(pc.index_in(truth.image_keys, value_set=found.image_keys), -1)
    found_image = image_in_found.to_numpy(zero_copy_only=False).astype(np.int64)[truth.image]
    rows = np.flatnonzero(found_image >= 0)
    group = truth.class_index[rows] * len(found.image_keys) + found_image[rows]
    order = np.argsort(group, kind="stable")
    return group[order], truth.take(rows[order])


def _best_overlaps(found: _Boxes, found_rows: np.ndarray, group_of_found: np.ndarray, truth: _Boxes,
                   group_of_truth: np.ndarray):
    """For each detection (``found_rows``, in group order): the ground-truth row of its image and class with the
    largest IoU, and that IoU.

    Mirrors ``np.argmax`` over the detection's IoU row: the earliest box wins ties and a NaN IoU wins outright.
    Detections without any ground truth in their group get row -1 and IoU -inf (never a match).
    """
    # Look each (image, class) group up once; detections of a group are contiguous in group order.
    group_start = np.flatnonzero(np.diff(group_of_found, prepend=-1))
    group_size = np.diff(group_start, append=len(group_of_found))
    first_of_group = np.searchsorted(group_of_truth, group_of_found[group_start], side="left")
    count_of_group = np.searchsorted(group_of_truth, group_of_found[group_start], side="right") - first_of_group
    first_truth = np.repeat(first_of_group, group_size)
    truth_count = np.repeat(count_of_group, group_size)
    best_truth = np.full(len(group_of_found), -1, dtype=np.int64)
    best_iou = np.full(len(group_of_found), -np.inf)
    with_truth = np.flatnonzero(truth_count)
    if with_truth.size == 0:
        return best_truth, best_iou

    # One entry per (detection, candidate ground-truth box) pair; each detection's pairs are contiguous.
    count = truth_count[with_truth]
    pair_start = np.cumsum(count) - count
    pair_found = np.repeat(with_truth, count)
    pair_truth = np.arange(count.sum()) + np.repeat(first_truth[with_truth] - pair_start, count)
    iou = _pairwise_iou(found, found_rows[pair_found], truth, pair_truth)

    group_max = np.repeat(np.maximum.reduceat(iou, pair_start), count)  # NaN propagates, as in np.argmax
    is_best = np.where(np.isnan(group_max), np.isnan(iou), iou == group_max)
    first_best = np.minimum.reduceat(np.where(is_best, np.arange(len(iou)), len(iou)), pair_start)
    best_truth[with_truth] = pair_truth[first_best]
    best_iou[with_truth] = iou[first_best]
    return best_truth, best_iou


def _pairwise_iou(a: _Boxes, a_rows: np.ndarray, b: _Boxes, b_rows: np.ndarray) -> np.ndarray:
    """IoU of box a[a_rows[i]] with b[b_rows[i]], with the official operation order (bit-identical results)."""
    a_y1, a_x1, a_y2, a_x2 = a.y1[a_rows], a.x1[a_rows], a.y2[a_rows], a.x2[a_rows]
    b_y1, b_x1, b_y2, b_x2 = b.y1[b_rows], b.x1[b_rows], b.y2[b_rows], b.x2[b_rows]
    height = np.maximum(0.0, np.minimum(a_y2, b_y2) - np.maximum(a_y1, b_y1))
    width = np.maximum(0.0, np.minimum(a_x2, b_x2) - np.maximum(a_x1, b_x1))
    intersection = height * width
    area_a = (a_y2 - a_y1) * (a_x2 - a_x1)
    area_b = (b_y2 - b_y1) * (b_x2 - b_x1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return intersection / (area_a + area_b - intersection)


def _true_positives(best_truth: np.ndarray, best_iou: np.ndarray, threshold: float) -> np.ndarray:
    """A detection is a hit iff its best box overlaps enough and no earlier detection (in order) took that box.

    Whether a box is taken never changes which box a detection picks, so the greedy pass reduces to "first
    candidate per box".
    """
    candidates = np.flatnonzero(best_iou >= threshold)
    _, first_per_box = np.unique(best_truth[candidates], return_index=True)
    hits = np.zeros(len(best_truth), dtype=bool)
    hits[candidates[first_per_box]] = True
    return hits


def _average_precision(hits_by_rank: np.ndarray, num_groundtruth: int) -> float:
    """VOC all-point AP, with the same floating-point operations as the official ``metrics`` module."""
    if hits_by_rank.size == 0:
        return 0.0
    hits = hits_by_rank.astype(int)
    true_positives = np.cumsum(hits)
    false_positives = np.cumsum(1 - hits)
    precision = true_positives.astype(float) / (true_positives + false_positives)
    recall = true_positives.astype(float) / num_groundtruth
    recall = np.concatenate([[0], recall, [1]])
    precision = np.concatenate([[0], precision, [0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def _mean_over_label_range(evaluated: np.ndarray, average_precisions: np.ndarray) -> float:
    """``np.nanmean`` over classes 1..max id, NaN where not evaluated: the official array, summed the same way."""
    if np.isnan(average_precisions).all():
        return math.nan
    per_label = np.full(int(evaluated[-1]), np.nan)
    per_label[evaluated - 1] = average_precisions
    return float(np.nanmean(per_label))


# ----------------------------------------------------------------------------------------------------------------
# Files and command line


def evaluate_files(labelmap, groundtruth, detections, exclusions=None,
                   iou_thresholds: Iterable[float] = DEFAULT_IOU_THRESHOLDS) -> FrameMapResult:
    """Frame-mAP from the official files: label map, ground-truth CSV, detections CSV, optional exclusions CSV. Warns
    (``ava.DroppedRowsWarning``) when no ground-truth box is left to score: the mAP is then NaN, as the official
    evaluator's."""
    class_ids = list(ava.read_label_map(labelmap))
    excluded = ava.read_exclusions(exclusions) if exclusions else set()
    truth = ava.read_boxes_csv(groundtruth, is_detection=False, class_ids=class_ids, excluded=excluded)
    found = ava.read_boxes_csv(detections, is_detection=True, class_ids=class_ids, excluded=excluded)
    if truth.num_rows == 0:
        warnings.warn(f"{groundtruth}: no ground-truth box of a class of the label map outside the exclusions: no "
                      f"class can be scored, the mAP is NaN", ava.DroppedRowsWarning, stacklevel=2)
    return frame_map(truth, found, class_ids, iou_thresholds)


def parse_iou_thresholds(spec: str) -> tuple[float, ...]:
    """``"0.5"`` -> (0.5,); ``"lo:hi"`` -> EVAD's ``np.linspace`` grid with step 0.05 (``"0.5:0.95"``: 10 values)."""
    try:
        bounds = [float(part) for part in str(spec).split(":")]
    except ValueError:
        bounds = []
    if len(bounds) == 1 and 0 < bounds[0] <= 1:
        return (bounds[0],)
    if len(bounds) == 2 and 0 < bounds[0] <= bounds[1] <= 1:
        low, high = bounds
        return tuple(float(t) for t in np.linspace(low, high, int(np.round((high - low) / 0.05)) + 1))
    raise ValueError(f"IoU must be a threshold like 0.5 or a range like 0.5:0.95, got {spec!r}")


def ava_map_command(labelmap, groundtruth, detections, exclusions=None, as_json: bool = False,
                    iou: str = "0.5") -> FrameMapResult:
    """The ``ava-map`` command: evaluates the files and prints one JSON object or a readable table on stdout, and
    each warning of the reading (rows left out or kept as the official evaluator does) as one line on stderr."""
    thresholds = parse_iou_thresholds(iou)
    names = ava.read_label_map(labelmap)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate_files(labelmap, groundtruth, detections, exclusions, thresholds)
    for warning in caught:
        print(f"evadlab ava-map: warning: {warning.message}", file=sys.stderr)
    print(_json_report(result, names) if as_json else _table_report(result, names, iou))
    return result


def _json_report(result: FrameMapResult, names: dict[int, str]) -> str:
    """Classes keyed by id: label maps may give two ids the same name (mmaction2's sample names 79 and 80 both
    "action3")."""
    report = {
        "mAP": _json_number(result.mAP),
        "per_class": {str(class_id): {"name": names[class_id], "AP": _json_number(ap)}
                      for class_id, ap in result.per_class.items()},
        "num_groundtruth": result.num_groundtruth,
        "num_detections": result.num_detections,
    }
    if len(result.mAP_per_iou) > 1:
        report["mAP_per_iou"] = {f"{t:.2f}": _json_number(value) for t, value in result.mAP_per_iou.items()}
    return json.dumps(report)


def _json_number(value: float | None) -> float | None:
    # JSON has no NaN; a metric that does not exist is null.
    return None if value is None or math.isnan(value) else value


def _table_report(result: FrameMapResult, names: dict[int, str], iou: str) -> str:
    width = max(len(name) for name in names.values())
    counts = f"{result.num_groundtruth} ground-truth boxes, {result.num_detections} detections"
    lines = [f"AVA frame-mAP @ IoU {iou}: {counts}", f"{'id':>4}  {'class':<{width}}  AP"]
    for class_id, ap in result.per_class.items():
        lines.append(f"{class_id:>4}  {names[class_id]:<{width}}  {'-' if ap is None else f'{ap:.4f}'}")
    if len(result.mAP_per_iou) > 1:
        lines += [f"mAP@{t:.2f}: {value:.4f}" for t, value in result.mAP_per_iou.items()]
    lines.append(f"mAP: {result.mAP:.4f}")
    return "\n".join(lines)
