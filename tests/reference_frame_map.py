"""A deliberately plain, per-keyframe AVA frame-mAP used as the oracle for the fast evaluator.

It follows the structure of the official evaluator (SlowFast's ``ava_eval_helper`` + the TF Object Detection API
``PascalDetectionEvaluator``) step by step, in plain Python and small numpy arrays, and shares no code with
``evadlab.pipelines.ava_map``: rows are read with the ``csv`` module into per-key dicts (insertion order =
first appearance), every image is evaluated class by class with an IoU matrix and a greedy loop, and per-class
results are concatenated image by image before ranking. The tests cross-check the fast evaluator against it and
the speed benchmark uses it as the baseline.
"""

from __future__ import annotations

import csv
from collections import defaultdict

import numpy as np


def image_key(video_id: str, timestamp) -> str:
    return "%s,%04d" % (video_id, int(timestamp))  # noqa: UP031 - the official key, spelled as it spells it


def read_class_ids(labelmap_path) -> list[int]:
    """Label-map ids, read the way the official helper does (two-space indented ``id:``/``label_id:`` lines)."""
    ids = []
    with open(labelmap_path) as lines:
        for line in lines:
            if line.startswith(("  id:", "  label_id:")):
                ids.append(int(line.strip().split(" ")[-1]))
    return ids


def read_excluded_keys(path) -> set[str]:
    excluded = set()
    if path:
        with open(path) as rows:
            for row in csv.reader(rows):
                excluded.add(image_key(row[0], row[1]))
    return excluded


def read_rows_by_key(path, class_ids, with_score: bool) -> dict[str, list[tuple]]:
    """key -> [(y1, x1, y2, x2, class_id, score), ...] in file order; scores are 1.0 without ``with_score``."""
    by_key: dict[str, list[tuple]] = defaultdict(list)
    with open(path) as rows:
        for row in csv.reader(rows):
            key = image_key(row[0], row[1])
            x1, y1, x2, y2 = (float(value) for value in row[2:6])
            class_id = int(row[6])
            if class_id not in class_ids:
                continue
            by_key[key].append((y1, x1, y2, x2, class_id, float(row[7]) if with_score else 1.0))
    return by_key


def rows_by_key_from_table(table) -> dict[str, list[tuple]]:
    """The same per-key layout from a table with key, x1, y1, x2, y2, class_id, score columns."""
    by_key: dict[str, list[tuple]] = defaultdict(list)
    for row in table.to_pylist():
        by_key[row["key"]].append((row["y1"], row["x1"], row["y2"], row["x2"], row["class_id"], row["score"]))
    return by_key


def iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of [y1, x1, y2, x2] boxes, areas without the VOC +1."""
    top = np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    left = np.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    bottom = np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    right = np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
    overlap = np.maximum(np.zeros(top.shape), bottom - top) * np.maximum(np.zeros(top.shape), right - left)
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return overlap / (area_a[:, None] + area_b[None, :] - overlap)


def label_one_class(det_boxes, gt_boxes, threshold) -> np.ndarray:
    """Greedy matching in the given detection order against the argmax-IoU ground-truth box."""
    hits = np.zeros(len(det_boxes), dtype=bool)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return hits
    overlaps = iou_matrix(det_boxes, gt_boxes)
    best = np.argmax(overlaps, axis=1)
    taken = np.zeros(len(gt_boxes), dtype=bool)
    for index in range(len(det_boxes)):
        box = best[index]
        if overlaps[index, box] >= threshold and not taken[box]:
            hits[index] = True
            taken[box] = True
    return hits


def voc_average_precision(scores: np.ndarray, hits: np.ndarray, num_gt: int) -> float:
    if len(scores) == 0:
        return 0.0
    order = np.argsort(scores)[::-1]
    ranked = hits.astype(int)[order]
    tp = np.cumsum(ranked)
    fp = np.cumsum(1 - ranked)
    precision = tp.astype(float) / (tp + fp)
    recall = tp.astype(float) / num_gt
    recall = np.concatenate([[0], recall, [1]])
    precision = np.concatenate([[0], precision, [0]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    changed = np.where(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[changed] - recall[changed - 1]) * precision[changed]))


def reference_frame_map(gt_by_key, det_by_key, class_ids, excluded_keys=(), thresholds=(0.5,)):
    """Returns (mAP per threshold, {class_id: [AP per threshold] or None})."""
    num_labels = max(class_ids)
    gt_kept = {key: rows for key, rows in gt_by_key.items() if key not in excluded_keys}
    num_gt = np.zeros(num_labels + 1, dtype=int)
    for rows in gt_kept.values():
        for row in rows:
            num_gt[row[4]] += 1

    scores_per_class = [[[] for _ in range(num_labels + 1)] for _ in thresholds]
    hits_per_class = [[[] for _ in range(num_labels + 1)] for _ in thresholds]
    for key, rows in det_by_key.items():
        if key in excluded_keys:
            continue
        dets = np.array([row[:4] for row in rows], dtype=float).reshape(-1, 4)
        labels = np.array([row[4] for row in rows], dtype=int)
        scores = np.array([row[5] for row in rows], dtype=float)
        valid = (dets[:, 0] < dets[:, 2]) & (dets[:, 1] < dets[:, 3])
        dets, labels, scores = dets[valid], labels[valid], scores[valid]
        gt_rows = gt_kept.get(key, [])
        gts = np.array([row[:4] for row in gt_rows], dtype=float).reshape(-1, 4)
        gt_labels = np.array([row[4] for row in gt_rows], dtype=int)
        for label in range(1, num_labels + 1):
            mine = labels == label
            if not mine.any():
                continue
            for t, threshold in enumerate(thresholds):
                hits = label_one_class(dets[mine], gts[gt_labels == label], threshold)
                scores_per_class[t][label].append(scores[mine])
                hits_per_class[t][label].append(hits)

    per_label = np.full((len(thresholds), num_labels + 1), np.nan)
    for t in range(len(thresholds)):
        for label in range(1, num_labels + 1):
            if num_gt[label] == 0:
                continue
            parts = scores_per_class[t][label]
            scores = np.concatenate(parts) if parts else np.array([], dtype=float)
            hits = np.concatenate(hits_per_class[t][label]) if parts else np.array([], dtype=bool)
            per_label[t, label] = voc_average_precision(scores, hits, num_gt[label])
    with np.errstate(all="ignore"):
        map_per_threshold = [float(np.nanmean(row[1:])) if not np.isnan(row[1:]).all() else float("nan")
                             for row in per_label]
    per_class = {class_id: (None if num_gt[class_id] == 0 else [float(v) for v in per_label[:, class_id]])
                 for class_id in class_ids}
    return map_per_threshold, per_class


def reference_evaluate_files(labelmap, groundtruth, detections, exclusions=None, thresholds=(0.5,)):
    class_ids = read_class_ids(labelmap)
    excluded = read_excluded_keys(exclusions)
    gt_by_key = read_rows_by_key(groundtruth, set(class_ids), with_score=False)
    det_by_key = read_rows_by_key(detections, set(class_ids), with_score=True)
    return reference_frame_map(gt_by_key, det_by_key, class_ids, excluded, thresholds)
