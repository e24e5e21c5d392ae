"""Speed of the vectorised AVA frame-mAP against the plain per-keyframe reference (tests/reference_frame_map.py).

Synthetic data with the shape of an AVA evaluation: keyframes of 15-minute videos, a few ground-truth persons
per keyframe with one to three actions each, and detections = every detected box (the persons, jittered, plus
false boxes) x the 60 label-map classes, scores with 4 decimals as in the written CSV.

    python benchmarks/eval_speed.py                       # 100k and 1M detection rows
    python benchmarks/eval_speed.py --rows 10000000 --reference-max-rows 0

Times are medians over ``--repeats`` runs (at most two at 10M rows, one for the reference above 1M rows). "in memory"
compares ``frame_map`` on tables with the reference on per-keyframe dicts; "from files" compares
``evaluate_files`` with the reference reading the same CSVs with the ``csv`` module.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_frame_map import (
    reference_evaluate_files,
    reference_frame_map,
    rows_by_key_from_table,
)

from evadlab.pipelines.ava import write_detections_csv
from evadlab.pipelines.ava_map import evaluate_files, frame_map

# The 60 evaluated AVA ids (ActivityNet 2018/2019 label map).
AVA_CLASS_IDS = (1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 20, 22, 24, 26, 27, 28, 29, 30, 34, 36, 37,
                 38, 41, 43, 45, 46, 47, 48, 49, 51, 52, 54, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69,
                 70, 72, 73, 74, 76, 77, 78, 79, 80)
KEYFRAMES_PER_VIDEO = 897  # seconds 902..1798
BOXES_PER_KEYFRAME = 5  # on average: the detected persons plus false boxes


def synthesize(num_detection_rows: int, seed: int = 0) -> tuple[dict, dict]:
    """Ground-truth and detection columns (video_id, timestamp, x1..y2, action_id, score)."""
    rng = np.random.default_rng(seed)
    keyframes = max(1, num_detection_rows // (BOXES_PER_KEYFRAME * len(AVA_CLASS_IDS)))
    video = np.arange(keyframes) // KEYFRAMES_PER_VIDEO
    second = 902 + np.arange(keyframes) % KEYFRAMES_PER_VIDEO
    persons = rng.integers(1, 6, keyframes)
    person_keyframe = np.repeat(np.arange(keyframes), persons)
    person_boxes = random_boxes(rng, len(person_keyframe))

    actions = rng.integers(1, 4, len(person_keyframe))
    gt_person = np.repeat(np.arange(len(person_keyframe)), actions)
    popularity = 1.0 / np.arange(1, len(AVA_CLASS_IDS) + 1)  # a long tail of rare classes, as in AVA
    gt_action = rng.choice(AVA_CLASS_IDS, len(gt_person), p=popularity / popularity.sum())
    groundtruth = columns(video[person_keyframe[gt_person]], second[person_keyframe[gt_person]],
                          person_boxes[gt_person], gt_action, np.ones(len(gt_person)))

    # Detected boxes: each person (jittered), plus false boxes, until the keyframe has its share of boxes.
    detected = np.clip(person_boxes + rng.normal(0, 0.03, person_boxes.shape), 0, 1)
    extra = np.maximum(0, rng.integers(BOXES_PER_KEYFRAME - 2, BOXES_PER_KEYFRAME + 3, keyframes) - persons)
    box_keyframe = np.concatenate([person_keyframe, np.repeat(np.arange(keyframes), extra)])
    box_person = np.concatenate([np.arange(len(person_keyframe)), np.full(int(extra.sum()), -1)])
    boxes = np.concatenate([detected, random_boxes(rng, int(extra.sum()))])
    order = np.argsort(box_keyframe, kind="stable")
    box_keyframe, box_person, boxes = box_keyframe[order], box_person[order], boxes[order]
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.01)
    boxes = np.round(np.clip(boxes, 0, 1), 3)

    # Scores: a sigmoid of a logit that is higher where the box's person really does the action.
    row_box = np.repeat(np.arange(len(boxes)), len(AVA_CLASS_IDS))
    row_action = np.tile(AVA_CLASS_IDS, len(boxes))
    person_of_row = box_person[row_box]
    performed = (person_of_row >= 0) & np.isin(person_of_row * 100 + row_action, gt_person * 100 + gt_action)
    logits = np.where(performed, rng.normal(0.5, 1.5, len(row_box)), rng.normal(-3, 2, len(row_box)))
    scores = np.round(1 / (1 + np.exp(-logits)), 4)
    detections = columns(video[box_keyframe[row_box]], second[box_keyframe[row_box]], boxes[row_box], row_action,
                         scores)
    return groundtruth, detections


def random_boxes(rng, count: int) -> np.ndarray:
    corner = rng.uniform(0, 0.7, (count, 2))
    size = rng.uniform(0.1, 0.3, (count, 2))
    return np.round(np.concatenate([corner, np.minimum(corner + size, 1)], axis=1), 3)


def columns(video, second, boxes, action, score) -> dict:
    names = pa.array([f"video{index}" for index in range(int(video.max(initial=0)) + 1)])
    return {"video_id": names.take(pa.array(video)), "timestamp": second,
            "x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 2], "y2": boxes[:, 3], "action_id": action,
            "score": score}


def as_evaluator_table(data: dict) -> pa.Table:
    seconds = pc.utf8_lpad(pc.cast(pa.array(data["timestamp"]), pa.string()), width=4, padding="0")
    keys = pc.binary_join_element_wise(data["video_id"], seconds, ",")
    return pa.table({"key": keys.dictionary_encode(), "x1": data["x1"], "y1": data["y1"],
                     "x2": data["x2"], "y2": data["y2"], "class_id": data["action_id"], "score": data["score"]})


def median_seconds(run, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def benchmark(rows: int, repeats: int, reference_max_rows: int, folder: Path) -> dict:
    groundtruth, detections = synthesize(rows)
    gt_table, det_table = as_evaluator_table(groundtruth), as_evaluator_table(detections)
    fast_repeats = min(repeats, 2) if rows >= 10_000_000 else repeats
    fast_memory, fast = median_seconds(lambda: frame_map(gt_table, det_table, AVA_CLASS_IDS), fast_repeats)

    labelmap = folder / "labels.pbtxt"
    labelmap.write_text("".join(f'item {{\n  name: "action {i}"\n  id: {i}\n}}\n' for i in AVA_CLASS_IDS))
    gt_csv, det_csv = folder / "gt.csv", folder / "det.csv"
    write_detections_csv(gt_csv, groundtruth)  # ground truth with a trailing 1.0 column: read as a person id
    write_detections_csv(det_csv, detections)
    fast_files, from_files = median_seconds(lambda: evaluate_files(labelmap, gt_csv, det_csv), fast_repeats)

    row = {"rows": len(detections["score"]), "keyframes": len(gt_table.column("key").unique()),
           "fast_memory": fast_memory, "fast_files": fast_files, "mAP": fast.mAP,
           "reference_memory": math.nan, "reference_files": math.nan, "max_difference": math.nan}
    if rows <= reference_max_rows:
        reference_repeats = repeats if rows <= 1_000_000 else 1
        gt_by_key, det_by_key = rows_by_key_from_table(gt_table), rows_by_key_from_table(det_table)
        row["reference_memory"], (reference_maps, _) = median_seconds(
            lambda: reference_frame_map(gt_by_key, det_by_key, AVA_CLASS_IDS), reference_repeats)
        row["reference_files"], (file_maps, _) = median_seconds(
            lambda: reference_evaluate_files(labelmap, gt_csv, det_csv), 1)
        row["max_difference"] = max(abs(fast.mAP - reference_maps[0]), abs(from_files.mAP - file_maps[0]))
    return row


def seconds(value: float) -> str:
    return "skipped" if math.isnan(value) else f"{value:.2f}"


def ratio(reference: float, fast: float) -> str:
    return "-" if math.isnan(reference) else f"{reference / fast:.1f}x"


def markdown(results: list[dict]) -> str:
    lines = [("| detection rows | keyframes | frame_map (s) | reference, in memory (s) | speed-up | "
              "evaluate_files (s) | reference from files (s) | speed-up | mAP | max |Δ mAP| |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        difference = "-" if math.isnan(r["max_difference"]) else f"{r['max_difference']:.1e}"
        lines.append(
            f"| {r['rows']:,} | {r['keyframes']:,} | {seconds(r['fast_memory'])} | {seconds(r['reference_memory'])} | "
            f"{ratio(r['reference_memory'], r['fast_memory'])} | {seconds(r['fast_files'])} | "
            f"{seconds(r['reference_files'])} | {ratio(r['reference_files'], r['fast_files'])} | {r['mAP']:.4f} | "
            f"{difference} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-max-rows", type=int, default=1_000_000,
                        help="skip the (slow) reference above this many detection rows")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for rows in args.rows:
            results.append(benchmark(rows, args.repeats, args.reference_max_rows, Path(folder)))
            print(markdown(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
