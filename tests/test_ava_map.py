"""AVA frame-mAP: the fast evaluator against a plain per-keyframe oracle, plus the official quirks it must keep."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from evadlab.cli import main
from evadlab.pipelines.ava import (
    DroppedRowsWarning,
    SuspectRowsWarning,
    read_annotations,
    read_boxes_csv,
    read_exclusions,
    write_detections_csv,
)
from evadlab.pipelines.ava_map import (
    STRICT_IOU_THRESHOLDS,
    ava_map_command,
    evaluate_files,
    frame_map,
    parse_iou_thresholds,
)

sys.path.insert(0, str(Path(__file__).parent))
from reference_frame_map import (
    reference_evaluate_files,
    reference_frame_map,
    rows_by_key_from_table,
)

# Rows read as the official evaluator reads them are announced by warnings; the tests that check them catch them.
pytestmark = [pytest.mark.filterwarnings("ignore::evadlab.pipelines.ava.DroppedRowsWarning"),
              pytest.mark.filterwarnings("ignore::evadlab.pipelines.ava.SuspectRowsWarning")]

LABEL_MAP = 'item {\n  name: "stand"\n  label_id: 1\n}\nitem {\n  name: "sit"\n  label_id: 2\n}\n' \
            'item {\n  name: "talk to"\n  label_id: 4\n}\nitem {\n  name: "watch"\n  label_id: 7\n}\n'
CLASS_IDS = (1, 2, 4, 7)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def labelmap(tmp_path) -> Path:
    return write(tmp_path / "labels.pbtxt", LABEL_MAP)


def evaluate_text(tmp_path, labelmap, groundtruth: str, detections: str, exclusions: str | None = None, **kwargs):
    gt = write(tmp_path / "gt.csv", groundtruth)
    det = write(tmp_path / "det.csv", detections)
    excluded = write(tmp_path / "excluded.csv", exclusions) if exclusions is not None else None
    return evaluate_files(labelmap, gt, det, excluded, **kwargs)


def agree(value: float, expected: float) -> bool:
    """Equal to 1e-9, NaN (no class with ground truth) agreeing with NaN."""
    return math.isclose(value, expected, rel_tol=0, abs_tol=1e-9) or (math.isnan(value) and math.isnan(expected))


def assert_matches_reference(result, reference, thresholds):
    reference_maps, reference_per_class = reference
    assert all(agree(result.mAP_per_iou[t], expected) for t, expected in zip(thresholds, reference_maps))
    assert agree(result.mAP, float(np.mean(reference_maps)))
    for class_id, aps in reference_per_class.items():
        assert (result.per_class[class_id] is None) if aps is None else agree(result.per_class[class_id], np.mean(aps))


# ----------------------------------------------------------------------------------------------------------------
# Random inputs: ties, duplicates, keyframes and classes without ground truth, exclusions, IoU on the 0.5 boundary


def random_box(rng) -> tuple[float, float, float, float]:
    """Mostly boxes on a 1/8 grid (exact in binary, so IoU lands exactly on 0.5 and duplicates are common); a few
    without extent (flat or inverted), reaching out of the frame or not finite, which the official evaluator scores
    too."""
    if rng.random() < 0.7:
        x1, x2 = sorted(rng.choice(9, size=2, replace=False) / 8)
        y1, y2 = sorted(rng.choice(9, size=2, replace=False) / 8)
    else:
        x1, x2 = sorted(np.round(rng.random(2), 3))
        y1, y2 = sorted(np.round(rng.random(2), 3))
        if rng.random() < 0.05:
            x2 = x1  # zero width, as rounding sometimes makes it
    odd = rng.random()
    if odd < 0.04:
        x1, x2 = x2, x1  # inverted, as a broken writer makes it
    elif odd < 0.06:
        y1, y2 = y2, y1
    elif odd < 0.08:
        x2 = x2 + 0.125  # past the frame's edge
    elif odd < 0.09:
        y2 = rng.choice([np.nan, np.inf])  # what float() reads from "nan" and "inf"
    return float(x1), float(y1), float(x2), float(y2)


def random_case(rng):
    """Ground-truth, detection and exclusion CSV text for one random evaluation."""
    videos = [f"vid{index}" for index in range(rng.integers(1, 4))]
    keyframes = [(video, int(second)) for video in videos for second in rng.choice(np.arange(900, 906), 3, False)]

    def timestamp_text(second: int) -> str:
        return str(second) if rng.random() < 0.3 else f"{second:04d}"  # both spell the same keyframe

    gt_lines, gt_boxes = [], []
    with_person_id = rng.random() < 0.7
    for video, second in keyframes[: rng.integers(0, len(keyframes) + 1)]:
        for _ in range(rng.integers(0, 4)):
            box = random_box(rng)
            for class_id in rng.choice(np.arange(1, 9), rng.integers(1, 4), replace=False):
                copies = 2 if rng.random() < 0.1 else 1
                for _ in range(copies):
                    person = f",{rng.integers(0, 9)}" if with_person_id else ""
                    gt_lines.append(f"{video},{timestamp_text(second)},{','.join(map(str, box))},{class_id}{person}")
            gt_boxes.append((video, second, box))
    det_lines = []
    score_values = np.round(rng.random(rng.integers(2, 6)), 2)
    if rng.random() > 0.05:
        for _ in range(rng.integers(0, 60)):
            if gt_boxes and rng.random() < 0.6:
                video, second, box = gt_boxes[rng.integers(len(gt_boxes))]
                if rng.random() < 0.5:
                    box = random_box(rng)
            else:
                (video, second), box = keyframes[rng.integers(len(keyframes))], random_box(rng)
            class_id = rng.integers(1, 9)
            score = rng.choice(score_values) if rng.random() < 0.8 else round(float(rng.random()), 4)
            score = score if rng.random() > 0.01 else np.inf
            det_lines.append(f"{video},{timestamp_text(second)},{','.join(map(str, box))},{class_id},{score}")
    excluded = [f"{video},{second}" for video, second in keyframes if rng.random() < 0.15]
    return ("\n".join(gt_lines) + "\n" if gt_lines else "", "\n".join(det_lines) + "\n" if det_lines else "",
            "\n".join(excluded) + "\n" if excluded else "")


@pytest.mark.parametrize("thresholds", [(0.5,), STRICT_IOU_THRESHOLDS], ids=["iou0.5", "iou0.5:0.95"])
def test_random_files_match_the_per_keyframe_reference(tmp_path, labelmap, thresholds):
    rng = np.random.default_rng(1234 + len(thresholds))
    for _ in range(150 if len(thresholds) == 1 else 40):
        groundtruth, detections, exclusions = random_case(rng)
        gt = write(tmp_path / "gt.csv", groundtruth)
        det = write(tmp_path / "det.csv", detections)
        excluded = write(tmp_path / "excluded.csv", exclusions)
        result = evaluate_files(labelmap, gt, det, excluded, iou_thresholds=thresholds)
        assert_matches_reference(result, reference_evaluate_files(labelmap, gt, det, excluded, thresholds),
                                 thresholds)


def test_random_tables_with_degenerate_boxes_match_the_reference():
    """frame_map on tables (no reader checks): zero-area, inverted and NaN boxes behave as in the official code."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        tables = []
        for is_detection in (False, True):
            rows = int(rng.integers(0, 40))
            coordinates = rng.choice(np.arange(9) / 8, size=(rows, 4))
            if is_detection and rows:
                coordinates[rng.random(rows) < 0.05, 0] = np.nan
            tables.append(pa.table({
                "key": pa.array([f"v,{second:04d}" for second in rng.integers(0, 4, rows)], pa.string()),
                "x1": coordinates[:, 0], "y1": coordinates[:, 1], "x2": coordinates[:, 2], "y2": coordinates[:, 3],
                "class_id": rng.integers(1, 4, rows),
                "score": np.round(rng.random(rows), 1),
            }))
        groundtruth, detections = tables
        with np.errstate(all="ignore"):
            result = frame_map(groundtruth, detections, [1, 2, 3])
            reference = reference_frame_map(rows_by_key_from_table(groundtruth), rows_by_key_from_table(detections),
                                            [1, 2, 3])
        assert_matches_reference(result, reference, (0.5,))


def test_many_ties_in_long_score_arrays_match_the_reference(tmp_path, labelmap):
    """Per-class arrays longer than numpy's insertion-sort cutoff, with heavy score ties."""
    rng = np.random.default_rng(99)
    gt_lines, det_lines = [], []
    for second in range(900, 1000):
        boxes = [random_box(rng) for _ in range(3)]
        for box in boxes:
            gt_lines.append(f"v,{second},{','.join(map(str, box))},{rng.choice(CLASS_IDS)},0")
        for box in boxes + [random_box(rng)]:
            for class_id in CLASS_IDS:
                det_lines.append(f"v,{second},{','.join(map(str, box))},{class_id},{rng.choice([0.25, 0.5, 0.75])}")
    gt = write(tmp_path / "gt.csv", "\n".join(gt_lines) + "\n")
    det = write(tmp_path / "det.csv", "\n".join(det_lines) + "\n")
    result = evaluate_files(labelmap, gt, det)
    assert_matches_reference(result, reference_evaluate_files(labelmap, gt, det), (0.5,))


# ----------------------------------------------------------------------------------------------------------------
# The official evaluator's semantics, one by one

GT_ONE_BOX = "v,0902,0.0,0.0,0.5,0.5,1,0\n"


def test_equal_scores_rank_later_rows_first_as_reversed_argsort_does(tmp_path, labelmap):
    # A hit and a miss with the same score: argsort(...)[::-1] puts the later row (the miss) first.
    result = evaluate_text(tmp_path, labelmap, GT_ONE_BOX,
                           "v,0902,0.0,0.0,0.5,0.5,1,0.5\nv,0902,0.6,0.6,0.9,0.9,1,0.5\n")
    assert result.per_class[1] == pytest.approx(0.5)
    result = evaluate_text(tmp_path, labelmap, GT_ONE_BOX,
                           "v,0902,0.6,0.6,0.9,0.9,1,0.5\nv,0902,0.0,0.0,0.5,0.5,1,0.5\n")
    assert result.per_class[1] == pytest.approx(1.0)


def test_matching_follows_file_order_not_score_order(tmp_path, labelmap):
    # Both detections pick the same box; the first in the file takes it although it scores lower.
    result = evaluate_text(tmp_path, labelmap, GT_ONE_BOX,
                           "v,0902,0.0,0.0,0.5,0.5,1,0.2\nv,0902,0.0,0.0,0.5,0.5,1,0.9\n")
    assert result.per_class[1] == pytest.approx(0.5)


def test_detection_whose_best_box_is_taken_is_a_false_positive(tmp_path, labelmap):
    groundtruth = "v,0902,0.0,0.0,0.5,0.5,1,0\nv,0902,0.0,0.0,0.5,0.6,1,1\n"
    # Both detections overlap both boxes by >= 0.5 but prefer the first box; the second box stays unmatched.
    detections = "v,0902,0.0,0.0,0.5,0.5,1,0.9\nv,0902,0.0,0.0,0.5,0.5,1,0.8\n"
    result = evaluate_text(tmp_path, labelmap, groundtruth, detections)
    assert result.per_class[1] == pytest.approx(0.5)


def test_iou_exactly_at_the_threshold_is_a_hit(tmp_path, labelmap):
    result = evaluate_text(tmp_path, labelmap, "v,0902,0.0,0.0,1.0,1.0,1,0\n", "v,0902,0.0,0.0,0.5,1.0,1,0.9\n")
    assert result.per_class[1] == 1.0


def test_keyframes_without_ground_truth_count_as_false_positives(tmp_path, labelmap):
    result = evaluate_text(tmp_path, labelmap, GT_ONE_BOX,
                           "w,0902,0.0,0.0,0.5,0.5,1,0.9\nv,0902,0.0,0.0,0.5,0.5,1,0.8\n")
    assert result.per_class[1] == pytest.approx(0.5)


def test_classes_without_ground_truth_have_no_ap_and_stay_out_of_the_mean(tmp_path, labelmap):
    result = evaluate_text(tmp_path, labelmap, GT_ONE_BOX + "v,0902,0.0,0.0,0.5,0.5,2,0\n",
                           "v,0902,0.0,0.0,0.5,0.5,1,0.9\nv,0902,0.0,0.0,0.5,0.5,4,0.9\n")
    assert result.per_class == {1: 1.0, 2: 0.0, 4: None, 7: None}
    assert result.mAP == pytest.approx(0.5)


def test_excluded_keyframes_and_unlisted_classes_are_ignored(tmp_path, labelmap):
    result = evaluate_text(tmp_path, labelmap, GT_ONE_BOX + "x,0903,0.0,0.0,0.5,0.5,1,0\n",
                           "v,902,0.0,0.0,0.5,0.5,1,0.9\nx,0903,0.6,0.6,0.9,0.9,1,0.95\nv,0902,0.1,0.1,0.2,0.2,3,1\n",
                           exclusions="x,903\n")
    assert result.per_class[1] == 1.0
    assert (result.num_groundtruth, result.num_detections) == (1, 1)


def test_zero_extent_boxes_are_accepted_and_treated_as_the_official_code_does(tmp_path, labelmap):
    # Rounding to 3 decimals can collapse a box: such a detection is dropped, such ground truth never matched.
    result = evaluate_text(tmp_path, labelmap, GT_ONE_BOX + "v,0902,0.7,0.7,0.7,0.9,1,0\n",
                           "v,0902,0.0,0.0,0.5,0.5,1,0.9\nv,0902,0.7,0.7,0.7,0.9,1,0.95\n")
    assert result.per_class[1] == pytest.approx(0.5)
    assert (result.num_groundtruth, result.num_detections) == (2, 1)


def test_a_zero_width_box_in_both_modes(tmp_path, labelmap):
    """One rule set: prepare mode rejects the flat boxes by file and line; official mode reads both, as the official
    reader does, and announces them: the metric never matches the ground truth and leaves the detection out."""
    gt = write(tmp_path / "gt.csv", GT_ONE_BOX + "v,0902,0.7,0.7,0.7,0.9,1,0\n")
    det = write(tmp_path / "det.csv", "v,0902,0.0,0.0,0.5,0.5,1,0.9\nv,0902,0.7,0.7,0.7,0.9,1,0.95\n")
    for path, is_detection in ((gt, False), (det, True)):
        _, rejections = read_annotations(path, is_detection=is_detection, mode="prepare")
        assert [str(rejection) for rejection in rejections] == [f"{path}:2: x2 0.7 <= x1 0.7: the box has no width"]
    with pytest.warns(DroppedRowsWarning, match=r"det\.csv: 1 row\(s\) left out.* line 2: x2 0\.7 <= x1 0\.7"):
        assert read_boxes_csv(det, is_detection=True).num_rows == 2
    with pytest.warns(SuspectRowsWarning, match=r"gt\.csv: 1 row\(s\) kept.* line 2: x2 0\.7 <= x1 0\.7"):
        assert read_boxes_csv(gt, is_detection=False).num_rows == 2
    result = evaluate_files(labelmap, gt, det)
    assert (result.num_groundtruth, result.num_detections) == (2, 1)
    assert_matches_reference(result, reference_evaluate_files(labelmap, gt, det), (0.5,))


def test_empty_detections_give_zero_ap(tmp_path, labelmap):
    result = evaluate_text(tmp_path, labelmap, GT_ONE_BOX, "")
    assert result.per_class[1] == 0.0 and result.mAP == 0.0 and result.num_detections == 0


def test_strict_thresholds_are_evads_linspace_and_average_per_class(tmp_path, labelmap):
    assert parse_iou_thresholds("0.5:0.95") == STRICT_IOU_THRESHOLDS == tuple(np.linspace(0.5, 0.95, 10))
    assert parse_iou_thresholds("0.5") == (0.5,)
    with pytest.raises(ValueError, match="IoU"):
        parse_iou_thresholds("half")
    # IoU 0.5 exactly: a hit at the first threshold only.
    result = evaluate_text(tmp_path, labelmap, "v,0902,0.0,0.0,1.0,1.0,1,0\n", "v,0902,0.0,0.0,0.5,1.0,1,0.9\n",
                           iou_thresholds=STRICT_IOU_THRESHOLDS)
    assert result.mAP_per_iou[0.5] == 1.0 and result.mAP_per_iou[0.55] == 0.0
    assert result.per_class[1] == pytest.approx(0.1) and result.mAP == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing files


@pytest.mark.parametrize("text, is_detection, line, message", [
    ("v,0902,0.1,0.1,0.5,0.5,1,0.9\nv,0902,0.1,0.1,0.5,0.5,1\n", True, 2, "expected 8"),
    ("v,0902,0.1,0.1,0.5,0.5,1,0.9\nv,0902,0.1,0.1,0.5,0.5,1,0.9\nv,0902,abc,0.1,0.5,0.5,1,0.9\n", True, 3, "x1"),
    ("v,0902,0.1,0.1,0.5,0.5,1.5,0.9\n", True, 1, "action id"),
    ("v,0902,0.1,0.1,0.5,0.5,1,0.9\n\nv,0902,0.1,0.1,0.5,0.5,1,0.9\n", True, 2, "blank line"),
    ("v,-1,0.1,0.1,0.5,0.5,1,0.9\n", True, 1, "timestamp"),
    ("v,0902,0.1,0.1,0.5,0.5,1,3\nv,0902,0.1,0.1,0.5,0.5,1,3,9\n", False, 2, "expected 8"),
    ("v,0902,0.1,0.1,0.5,0.5,1\nv,0902,0.1,0.1,0.5,0.5,x\n", False, 2, "action id"),
])
def test_malformed_rows_name_file_and_line(tmp_path, text, is_detection, line, message):
    path = write(tmp_path / "boxes.csv", text)
    with pytest.raises(ValueError, match=rf"boxes\.csv:{line}: .*{message}"):
        read_boxes_csv(path, is_detection=is_detection)


def test_read_boxes_keeps_file_order_and_scores(tmp_path):
    path = write(tmp_path / "gt.csv", "b,902,0.1,0.2,0.3,0.4,5,1\na,0903,0.0,0.0,1.0,1.0,3,2\nb,0902,0,0,1,1,2,3\n")
    table = read_boxes_csv(path, is_detection=False, class_ids=[2, 5])
    assert table.column("key").to_pylist() == ["b,0902", "b,0902"]
    assert table.column("class_id").to_pylist() == [5, 2]
    assert table.column("score").to_pylist() == [1.0, 1.0]
    assert table.column("x2").to_pylist() == [0.3, 1.0]


def test_exclusions_match_official_keys(tmp_path):
    excluded = write(tmp_path / "excluded.csv", "abc,902\nabc,0903\n")
    assert read_exclusions(excluded) == {("abc", 902), ("abc", 903)}
    assert read_exclusions(write(tmp_path / "none.csv", "")) == set()
    boxes = write(tmp_path / "gt.csv", "abc,0902,0,0,1,1,1\nabc,903,0,0,1,1,1\nabc,0904,0,0,1,1,1\n")
    table = read_boxes_csv(boxes, is_detection=False, excluded=read_exclusions(excluded))
    assert table.column("key").to_pylist() == ["abc,0904"]


def test_official_label_map_selects_its_60_classes(tmp_path, test_data):
    labelmap = test_data / "ava_samples/activitynet_evaluation_ava/ava_action_list_v2.1_for_activitynet_2018.pbtxt.txt"
    if not labelmap.is_file():
        pytest.skip("shared AVA samples are not available")
    rng = np.random.default_rng(5)
    box = "0.1,0.1,0.5,0.5"
    gt = write(tmp_path / "gt.csv", "".join(f"v,0902,{box},{action},0\n" for action in range(1, 81)))
    det = write(tmp_path / "det.csv", "".join(f"v,0902,{box},{action},{rng.random():.4f}\n" for action in range(1, 81)))
    result = evaluate_files(labelmap, gt, det)
    assert len(result.per_class) == 60 and 2 not in result.per_class and 80 in result.per_class
    assert (result.mAP, result.num_groundtruth, result.num_detections) == (1.0, 60, 60)
    assert_matches_reference(result, reference_evaluate_files(labelmap, gt, det), (0.5,))


def test_written_detections_use_the_official_number_formats(tmp_path):
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.random(3000), np.arange(2001) / 2000, [0.0625, 0.0025, 0.00005, -0.0, 1.0]])
    rows = len(values)
    detections = {"video_id": np.array([f"vid{index % 7}" for index in range(rows)], dtype=object),
                  "timestamp": rng.integers(0, 2000, rows), "x1": values, "y1": values[::-1], "x2": values,
                  "y2": values, "action_id": rng.integers(1, 81, rows), "score": values.astype(np.float32)}
    path = tmp_path / "detections.csv"
    write_detections_csv(path, detections)
    expected = [
        "%s,%04d,%.3f,%.3f,%.3f,%.3f,%d,%.4f" % (video, second, x1, y1, x2, y2, action, score)  # noqa: UP031
        for video, second, x1, y1, x2, y2, action, score in zip(*(detections[name] for name in detections))
    ]
    assert path.read_text().splitlines() == expected
    assert [p.name for p in tmp_path.iterdir()] == ["detections.csv"]


def test_written_detections_read_back_and_evaluate(tmp_path, labelmap):
    detections = pa.table({"video_id": ["b", "a", "b"], "timestamp": [902, 1800, 902], "box_index": [0, 0, 1],
                           "x1": [0.1, 0.0, 0.25], "y1": [0.2, 0.0, 0.25], "x2": [0.3, 1.0, 0.75],
                           "y2": [0.4, 1.0, 0.75], "action_id": [1, 7, 1], "score": [0.5, 0.25, 0.75]})
    path = tmp_path / "detections.csv"
    write_detections_csv(path, detections)
    table = read_boxes_csv(path, is_detection=True)
    assert table.column("key").to_pylist() == ["b,0902", "a,1800", "b,0902"]
    assert table.column("score").to_pylist() == [0.5, 0.25, 0.75]
    with pytest.raises(ValueError, match="video ids"):
        write_detections_csv(path, detections.set_column(0, "video_id", pa.array(["a,b", "a", "b"])))


def test_frame_map_accepts_plain_and_redundant_dictionary_keys():
    columns = {"x1": [0.0, 0.0], "y1": [0.0, 0.0], "x2": [0.5, 0.5], "y2": [0.5, 0.5], "class_id": [1, 1],
               "score": [0.9, 0.8]}
    groundtruth = pa.table({"key": ["v,0902", "w,0902"], **columns})
    # The same key under two dictionary codes must still be one keyframe.
    redundant = pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int32()), pa.array(["v,0902", "v,0902"]))
    result = frame_map(groundtruth, pa.table({"key": redundant, **columns}), [1])
    assert result.per_class[1] == pytest.approx(0.5) and result.num_detections == 2
    with pytest.raises(ValueError, match="lacks column"):
        frame_map(groundtruth.drop_columns(["x1"]), groundtruth, [1])


def test_ava_map_command_prints_one_json_object(tmp_path, labelmap, capsys):
    gt = write(tmp_path / "gt.csv", GT_ONE_BOX)
    det = write(tmp_path / "det.csv", "v,0902,0.0,0.0,0.5,0.5,1,0.9\n")
    ava_map_command(labelmap, gt, det, None, True, "0.5")
    report = json.loads(capsys.readouterr().out)
    assert report == {"mAP": 1.0, "per_class": {"1": {"name": "stand", "AP": 1.0}, "2": {"name": "sit", "AP": None},
                                                "4": {"name": "talk to", "AP": None}, "7": {"name": "watch", "AP": None}},
                      "num_groundtruth": 1, "num_detections": 1}
    ava_map_command(labelmap, gt, det, None, False, "0.5:0.95")
    table = capsys.readouterr().out
    assert "talk to" in table and "mAP@0.95" in table and table.rstrip().endswith("mAP: 1.0000")


def test_json_keeps_classes_that_share_a_name(tmp_path, capsys):
    """mmaction2's sample label map names ids 79 and 80 both "action3": each keeps its own AP."""
    labels = write(tmp_path / "labels.txt", "1: action1\n79: action3\n80: action3\n")
    gt = write(tmp_path / "gt.csv", "v,0902,0.1,0.1,0.5,0.5,79,0\nv,0902,0.5,0.5,0.9,0.9,80,0\n")
    det = write(tmp_path / "det.csv", "v,0902,0.1,0.1,0.5,0.5,79,0.9\nv,0902,0.1,0.1,0.5,0.5,80,0.8\n")
    assert main(["ava-map", "--labelmap", str(labels), "--groundtruth", str(gt), "--detections", str(det),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["per_class"] == {"1": {"name": "action1", "AP": None}, "79": {"name": "action3", "AP": 1.0},
                                   "80": {"name": "action3", "AP": 0.0}}
    assert report["mAP"] == 0.5


ISSUE_LABEL_MAP = 'item {\n  name: "stand"\n  id: 12\n}\nitem {\n  name: "walk"\n  id: 14\n}\n'
ISSUE_GROUNDTRUTH = "vidA,0902,0.100,0.100,0.500,0.500,12,0\nvidA,0903,0.200,0.200,0.600,0.700,14,1\n"
ISSUE_DETECTIONS = ("vidA,0902,0.450,0.100,0.400,0.500,12,0.9\n"  # x2 < x1: left out by the official evaluator
                    "vidA,0902,0.110,0.100,0.500,0.510,12,0.8\n"
                    "vidA,0903,0.600,0.200,0.200,0.700,14,0.95\n"  # x2 < x1: left out too
                    "vidA,0903,0.200,0.210,0.600,0.700,14,0.4\n")


def test_inverted_detections_are_left_out_as_the_official_evaluator_does(tmp_path, capsys):
    """The issue's case: the official evaluator gives mAP 1.0 (both classes 1.0); evadlab must agree, and say on
    stderr how many detections it left out and the first line."""
    labels = write(tmp_path / "labels.pbtxt", ISSUE_LABEL_MAP)
    gt = write(tmp_path / "gt.csv", ISSUE_GROUNDTRUTH)
    det = write(tmp_path / "det.csv", ISSUE_DETECTIONS)
    assert main(["ava-map", "--labelmap", str(labels), "--groundtruth", str(gt), "--detections", str(det),
                 "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report == {"mAP": 1.0, "per_class": {"12": {"name": "stand", "AP": 1.0}, "14": {"name": "walk", "AP": 1.0}},
                      "num_groundtruth": 2, "num_detections": 2}
    assert captured.err.splitlines() == [
        (f"evadlab ava-map: warning: {det}: 2 row(s) left out, as the official evaluator leaves them out; the first, "
         f"line 1: x2 0.4 <= x1 0.45: the box has no width")]
    result = evaluate_files(labels, gt, det)
    assert_matches_reference(result, reference_evaluate_files(labels, gt, det), (0.5,))


def test_detections_of_ids_outside_the_label_map_are_announced(tmp_path, capsys):
    """Ids the label map does not list are left out, as officially; those outside its range (1..14 here) are a
    mistake worth a line, and a file of no detections too, or of no ground truth. An unlisted id inside the range (13)
    is routine."""
    labels = write(tmp_path / "labels.pbtxt", ISSUE_LABEL_MAP)
    gt = write(tmp_path / "gt.csv", ISSUE_GROUNDTRUTH)
    det = write(tmp_path / "det.csv", "vidA,0902,0.1,0.1,0.5,0.5,13,0.5\nvidA,0902,0.1,0.1,0.5,0.5,999,0.5\n"
                                      "vidA,0902,0.1,0.1,0.5,0.5,0,0.5\n" + ISSUE_DETECTIONS.splitlines()[1] + "\n")
    assert ava_map_command(labels, gt, det).per_class == {12: 1.0, 14: 0.0}
    assert capsys.readouterr().err.splitlines() == [
        (f"evadlab ava-map: warning: {det}: 2 row(s) left out, as the official evaluator leaves them out; the first, "
        f"line 2: action id 999 is outside the label map's ids 1..14")]
    empty = write(tmp_path / "empty.csv", "")
    assert ava_map_command(labels, gt, empty).mAP == 0.0
    assert capsys.readouterr().err.splitlines() == [
        f"evadlab ava-map: warning: {empty}: no detections: every class scores AP 0"]
    assert math.isnan(ava_map_command(labels, empty, det).mAP)
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"evadlab ava-map: warning: {empty}: no ground-truth box of a class of the label map outside the exclusions: "
        f"no class can be scored, the mAP is NaN")


def test_ground_truth_without_extent_is_kept_as_the_official_evaluator_keeps_it(tmp_path, capsys):
    """The official code filters detections only: an inverted ground-truth box counts (and can never be matched)."""
    labels = write(tmp_path / "labels.pbtxt", ISSUE_LABEL_MAP)
    gt = write(tmp_path / "gt.csv", ISSUE_GROUNDTRUTH + "vidA,0902,0.500,0.100,0.100,0.500,12,2\n")
    det = write(tmp_path / "det.csv", ISSUE_DETECTIONS)
    result = ava_map_command(labels, gt, det)
    captured = capsys.readouterr()
    assert result.per_class == {12: 0.5, 14: 1.0} and result.num_groundtruth == 3
    assert f"{gt}: 1 row(s) kept and scored as the official evaluator scores them; the first, line 3" in captured.err
    assert_matches_reference(result, reference_evaluate_files(labels, gt, det), (0.5,))


def test_a_keyframe_named_first_by_a_detection_without_extent_keeps_its_place_in_the_ranking(tmp_path, labelmap):
    """The official reader adds keyframes in the order their first listed row appears, valid or not; the ranking of
    tied scores follows that order. Here b,0902 appears first through an inverted detection of class 2, so class 1's
    scores are concatenated as [b's miss, a's hit]; reversed argsort ranks the later of two ties first, the hit: AP
    1.0 (0.5 if b,0902 counted from its first valid row, after a,0902)."""
    groundtruth = "a,0902,0.0,0.0,0.5,0.5,1,0\nb,0902,0.0,0.0,0.5,0.5,2,0\n"
    detections = ("b,0902,0.5,0.0,0.1,0.5,2,0.9\n"  # inverted: left out, but b,0902 is the first keyframe
                  "a,0902,0.0,0.0,0.5,0.5,1,0.5\n"
                  "b,0902,0.6,0.6,0.9,0.9,1,0.5\n")
    result = evaluate_text(tmp_path, labelmap, groundtruth, detections)
    assert result.per_class[1] == 1.0
    assert_matches_reference(result, reference_evaluate_files(labelmap, tmp_path / "gt.csv", tmp_path / "det.csv"),
                             (0.5,))
