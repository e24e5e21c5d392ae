import re
import shutil
import warnings
from fractions import Fraction
from pathlib import Path

import av
import decord
import numpy as np
import pytest
from PIL import Image

from evadlab.pipelines.ava import (
    ALL_ACTION_IDS,
    AVA_ACTION_NAMES,
    DETECTION_ROW_COLUMNS,
    EVALUATED_ACTION_IDS,
    DroppedRowsWarning,
    SuspectRowsWarning,
    clip_frame_indices,
    clip_sample_times,
    detection_rows,
    distinct_class_names,
    group_keyframes,
    keyframe_frame_index,
    nearest_frame_indices,
    read_annotations,
    read_boxes_csv,
    read_exclusions,
    read_frame_list,
    read_label_map,
    stack_detection_rows,
    write_detections_csv,
)

ACTIVITYNET_PBTXT = "activitynet_evaluation_ava/ava_action_list_v2.1_for_activitynet_2018.pbtxt.txt"
MMACTION_LABEL_MAP = "mmaction2_tools_data_ava/label_map.txt"
MMACTION_FRAMES = "mmaction2_tests_data_imgs"


def test_the_released_label_maps_give_the_60_evaluated_classes(tmp_path, test_data):
    samples = test_data / "ava_samples"
    label_id_form = tmp_path / "ava_action_list_v2.2_for_activitynet_2019.pbtxt"
    label_id_form.write_text((samples / ACTIVITYNET_PBTXT).read_text().replace("  id:", "  label_id:"))
    one_line_items = tmp_path / "one_line.pbtxt"
    one_line_items.write_text("".join(
        f'item {{ name: "{AVA_ACTION_NAMES[i]}" id: {i} label_type: PERSON_MOVEMENT }}\n' for i in EVALUATED_ACTION_IDS
    ))
    official_v22_form = tmp_path / "label_blocks.pbtxt"
    official_v22_form.write_text("".join(
        f'label {{\n  name: "{AVA_ACTION_NAMES[i]}"\n  label_id: {i}\n  label_type: PERSON_MOVEMENT\n}}\n'
        for i in EVALUATED_ACTION_IDS
    ))
    expected = {i: AVA_ACTION_NAMES[i] for i in EVALUATED_ACTION_IDS}
    for path in (samples / ACTIVITYNET_PBTXT, samples / MMACTION_LABEL_MAP, label_id_form, one_line_items,
                 official_v22_form):
        assert read_label_map(path) == expected, path
    assert len(AVA_ACTION_NAMES) == 80 and len(EVALUATED_ACTION_IDS) == 60


def test_class_names_that_two_ids_share_are_told_apart_by_id():
    labels = {1: "action1", 79: "action3", 80: "action3"}
    assert distinct_class_names(labels) == {1: "action1", 79: "action3 (id 79)", 80: "action3 (id 80)"}


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('item {\n  name: "stand"\n  id: 12\n}\nitem {\n  name: "sit"\n  id = 11\n}\n', 7, "cannot parse"),
        ('item {\n  name: "stand"\n  id: 12\n', 1, "never closed"),
        ('item {\n  name: "stand"\n}\n', 1, "needs a name and an id"),
        ('item {\n  name: "stand"\n  id: twelve\n}\n', 1, "not a non-negative integer"),
        ('item {\n  name: "stand"\n  id: 12\n}\nitem {\n  name: "walk"\n  id: 12\n}\n', 5, "appears twice"),
        ("12: stand\n14: walk\nsit\n", 3, "expected 'id: name'"),
    ],
)
def test_a_broken_label_map_names_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "labels.pbtxt"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}:{line}: .*{message}"):
        read_label_map(path)


GOOD_AND_BAD_ROWS = """\
vid_a,0902,0.077,0.151,0.283,0.811,80,1
vid_a,0902,0.077,0.151,0.283,0.811
vid_a,0902,0.077,0.151,0.283,0.811,80,1,7
vid_a,09o2,0.077,0.151,0.283,0.811,80,1
vid_a,0902,abc,0.151,0.283,0.811,80,1
vid_a,0902,0.300,0.151,0.283,0.811,80,1
vid_a,0902,0.077,0.811,0.283,0.811,80,1
vid_a,0902,0.077,0.151,1.200,0.811,80,1
vid_a,0902,0.077,0.151,0.283,0.811,81,1
vid_a,0902,0.077,0.151,0.283,0.811,0,1

vid_a,0902,0.077,0.151,0.283,0.811,12,one
,0902,0.077,0.151,0.283,0.811,12,1
vid_b,0903,-0.0004,0.5,1.0004,1.0,12,2
"""


def test_malformed_rows_are_reported_with_file_and_line_and_good_rows_kept(tmp_path):
    path = tmp_path / "ava_train_v2.2.csv"
    path.write_text(GOOD_AND_BAD_ROWS)
    table, rejections = read_annotations(path)

    assert table["line"].to_pylist() == [1, 14]  # line 14 is inside the rounding tolerance
    assert table["video_id"].to_pylist() == ["vid_a", "vid_b"]
    assert table["timestamp"].to_pylist() == [902, 903]
    assert table["action_id"].to_pylist() == [80, 12]
    assert table["person_id"].to_pylist() == [1, 2]
    assert table["box_key"].to_pylist()[0] == "0.077,0.151,0.283,0.811"
    expected = {
        2: "6 fields, expected 8",
        3: "9 fields, expected 8",
        4: "timestamp '09o2' is not an integer",
        5: "x1 'abc' is not a number",
        6: "x2 0.283 <= x1 0.3",
        7: "y2 0.811 <= y1 0.811",
        8: "x2 1.2 outside [0, 1]",
        9: "action id 81 outside 1..80",
        10: "action id 0 outside 1..80",
        12: "person id 'one' is not an integer",
        13: "empty video id",
    }  # the blank line 11 holds no data and is not a rejection
    assert [r.line for r in rejections] == sorted(expected)
    for rejection in rejections:
        assert rejection.source == str(path)
        assert expected[rejection.line] in rejection.reason
        assert str(rejection).startswith(f"{path}:{rejection.line}: ")


def test_detections_read_the_eighth_column_as_a_score(tmp_path):
    path = tmp_path / "detections.csv"
    path.write_text("vid,0902,0.1,0.2,0.3,0.4,12,0.93\nvid,0902,0.1,0.2,0.3,0.4,14,high\n")
    table, rejections = read_annotations(path, is_detection=True)
    assert table["score"].to_pylist() == [pytest.approx(0.93)]
    assert "person_id" not in table.column_names
    assert [(r.line, r.reason) for r in rejections] == [(2, "score 'high' is not a number")]
    assert group_keyframes(table)[0].person_ids == [-1]


GOOD_DETECTION = "vid,0902,0.1,0.2,0.3,0.4,12,0.5"
GOOD_GROUNDTRUTH = "vid,0902,0.1,0.2,0.3,0.4,12,1"


NAN_WIDTH = "x2 0.3 <= x1 nan: the box has no width"


@pytest.mark.parametrize(("line", "is_detection", "prepare_reason", "official", "official_reason"), [
    # Zero extent: rounding made a thin box flat. The official evaluation keeps such ground truth (never matched) and
    # leaves such detections out before matching; inverted boxes the same way.
    ("vid,0902,0.3,0.2,0.3,0.4,12,1", False, "x2 0.3 <= x1 0.3: the box has no width", "warn", None),
    ("vid,0902,0.1,0.4,0.3,0.4,12,0.5", True, "y2 0.4 <= y1 0.4: the box has no height", "drop", None),
    ("vid,0902,0.3,0.2,0.1,0.4,12,0.5", True, "x2 0.1 <= x1 0.3: the box has no width", "drop", None),
    ("vid,0902,0.3,0.2,0.1,0.4,12,1", False, "x2 0.1 <= x1 0.3: the box has no width", "warn", None),
    (",0902,0.1,0.2,0.3,0.4,12,1", False, "empty video id", "keep", None),
    ("vid,0902,0.1,0.2,0.3,0.4,81,1", False, "action id 81 outside 1..80", "keep", None),
    ("vid,-1,0.1,0.2,0.3,0.4,12,0.5", True, "timestamp -1 outside 0..2147483647", "refuse", None),
    ("vid,09o2,0.1,0.2,0.3,0.4,12,0.5", True, "timestamp '09o2' is not an integer", "refuse", None),
    # NaN compares false: the official code drops such a detection (for its extent) and keeps such ground truth.
    ("vid,0902,nan,0.2,0.3,0.4,12,0.5", True, f"x1 nan outside [0, 1]; {NAN_WIDTH}", "drop", NAN_WIDTH),
    ("vid,0902,nan,0.2,0.3,0.4,12,1", False, f"x1 nan outside [0, 1]; {NAN_WIDTH}", "warn", None),
    ("vid,0902,0.1,0.2,0.3,1.2,12,0.5", True, "y2 1.2 outside [0, 1]", "warn", None),
    ("vid,0902,0.1,0.2,0.3,1.2,12,1", False, "y2 1.2 outside [0, 1]", "warn", None),
    ("vid,0902,0.1,0.2,0.3,0.4,12,inf", True, "score inf is not a finite number", "warn", None),
    ("vid,0902,0.1,0.2,0.3,0.4,12", True, "7 fields, expected 8: 'vid,0902,0.1,0.2,0.3,0.4,12'", "refuse", None),
    ("", True, None, "refuse", None),  # a blank line holds no data: prepare skips it
])
def test_one_rule_set_read_in_two_modes(tmp_path, line, is_detection, prepare_reason, official, official_reason):
    """Prepare mode rejects every malformed line by file and line; official mode reads what the official evaluator
    reads as it reads it, silently, with a SuspectRowsWarning (scored although it looks wrong) or with a
    DroppedRowsWarning (left out by the metric), each giving the count and the first line; or it refuses the whole
    file where the official reader cannot read it."""
    path = tmp_path / "boxes.csv"
    path.write_text((GOOD_DETECTION if is_detection else GOOD_GROUNDTRUTH) + "\n" + line + "\n")

    table, rejections = read_annotations(path, is_detection=is_detection, mode="prepare")
    assert table["line"].to_pylist() == [1]
    if prepare_reason is None:
        assert rejections == []
    else:
        assert [str(rejection) for rejection in rejections] == [f"{path}:2: {prepare_reason}"]

    if official == "refuse":
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: "):
            read_annotations(path, is_detection=is_detection, mode="official")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table, dropped = read_annotations(path, is_detection=is_detection, mode="official")
    reason = official_reason or prepare_reason
    if official == "keep":
        assert caught == [] and dropped == [] and table["line"].to_pylist() == [1, 2]
    elif official == "warn":
        assert [str(warning.message) for warning in caught] == [
            f"{path}: 1 row(s) kept and scored as the official evaluator scores them; the first, line 2: {reason}"]
        assert caught[0].category is SuspectRowsWarning and dropped == [] and table["line"].to_pylist() == [1, 2]
    else:
        # Read as the official reader reads it (its keyframe's first appearance orders the ranking); the metric
        # leaves it out.
        assert [str(warning.message) for warning in caught] == [
            f"{path}: 1 row(s) left out, as the official evaluator leaves them out; the first, line 2: {reason}"]
        assert caught[0].category is DroppedRowsWarning and dropped == [] and table["line"].to_pylist() == [1, 2]


@pytest.mark.parametrize("field", ["0.25", ".25", "2.5e-1", "+0.25", " 0.25 ", "0x1", "1_0", "abc", "", "0,25", "--1"])
def test_both_modes_read_a_number_alike(tmp_path, field):
    """Prepare reads text and converts it field by field, official mode reads typed columns: one syntax for both."""
    path = tmp_path / "detections.csv"
    path.write_text(f"vid,0902,{field},0.2,0.5,0.4,12,0.5\n")
    table, rejections = read_annotations(path, is_detection=True, mode="prepare")
    try:
        official, _ = read_annotations(path, is_detection=True, mode="official")
    except ValueError:
        official = None
    assert (official is not None) == (table.num_rows == 1) == (not rejections)
    if official is not None:
        assert official["x1"].to_pylist() == table["x1"].to_pylist() == [0.25]


def test_a_column_of_bad_fields_is_reported_line_by_line(tmp_path):
    path = tmp_path / "gt.csv"
    lines = [f"vid,{902 + index},0.1,0.2,0.3,0.4,12,{'p' if index % 2 else index}" for index in range(2000)]
    path.write_text("\n".join(lines) + "\n")
    table, rejections = read_annotations(path)
    assert table["person_id"].to_pylist() == list(range(0, 2000, 2))
    assert [rejection.line for rejection in rejections] == list(range(2, 2001, 2))
    assert {rejection.reason for rejection in rejections} == {"person id 'p' is not an integer"}


def test_detection_rows_of_one_keyframe():
    boxes = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 1.0]], np.float32)
    scores = np.arange(2 * 80, dtype=np.float32).reshape(2, 80) / 1000
    rows = detection_rows("vid", 902, boxes, scores, [12, 1, 80])

    assert tuple(rows) == DETECTION_ROW_COLUMNS
    assert rows["video_id"].tolist() == ["vid"] * 6 and rows["timestamp"].tolist() == [902] * 6
    assert rows["box_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert rows["action_id"].tolist() == [12, 1, 80] * 2
    box_of_row = [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(rows["score"], scores[box_of_row, [11, 0, 79, 11, 0, 79]])
    np.testing.assert_array_equal(np.stack([rows[name] for name in ("x1", "y1", "x2", "y2")], 1), boxes[box_of_row])
    assert rows["x1"].dtype == np.float32 and rows["score"].dtype == np.float32

    none = detection_rows("vid", 903, np.zeros((0, 4)), np.zeros((0, 80)), ALL_ACTION_IDS)
    assert all(len(values) == 0 for values in none.values())
    with pytest.raises(ValueError, match="boxes must be"):
        detection_rows("vid", 902, boxes[:, :3], scores, [1])
    with pytest.raises(ValueError, match="class ids"):
        detection_rows("vid", 902, boxes, scores[:, :60], [80])


def test_detection_rows_written_and_read_back(tmp_path):
    boxes = np.array([[0.1, 0.2, 0.3, 0.4]])
    parts = [detection_rows("b", 903, boxes, np.full((1, 80), 0.25), EVALUATED_ACTION_IDS),
             detection_rows("a", 902, np.zeros((0, 4)), np.zeros((0, 80)), EVALUATED_ACTION_IDS),
             detection_rows("a", 1800, boxes * 2, np.full((1, 80), 0.75), ALL_ACTION_IDS)]
    stacked = stack_detection_rows(parts)
    assert len(stacked["score"]) == 60 + 80 and stack_detection_rows([])["score"].shape == (0,)
    path = tmp_path / "out" / "detections.csv"
    write_detections_csv(path, stacked)
    lines = path.read_text().splitlines()
    assert lines[0] == "b,0903,0.100,0.200,0.300,0.400,1,0.2500"
    assert lines[-1] == "a,1800,0.200,0.400,0.600,0.800,80,0.7500"
    table = read_boxes_csv(path, is_detection=True, class_ids=EVALUATED_ACTION_IDS)
    assert table.column("key").to_pylist() == ["b,0903"] * 60 + ["a,1800"] * 60
    assert table.column("score").to_pylist() == [0.25] * 60 + [0.75] * 60
    assert [p.name for p in path.parent.iterdir()] == ["detections.csv"]


def test_keyframes_group_boxes_by_their_text_like_the_released_reader(tmp_path):
    path = tmp_path / "gt.csv"
    path.write_text(
        "vid_b,0903,0.1,0.1,0.5,0.9,12,4\n"
        "vid_a,0905,0.2,0.2,0.6,0.8,11,3\n"
        "vid_a,0902,0.1,0.1,0.5,0.9,12,1\n"
        "vid_a,0902,0.5,0.1,0.9,0.9,14,2\n"
        "vid_a,0902,0.1,0.1,0.5,0.9,79,1\n"
        "vid_a,0902,0.1,0.1,0.5,0.9,79,1\n"
        "vid_a,0902,0.100,0.1,0.5,0.9,80,1\n"  # same box, other text: the released reader keeps it apart
    )
    table, rejections = read_annotations(path)
    keyframes = group_keyframes(table)
    assert not rejections
    assert [(k.video_id, k.timestamp) for k in keyframes] == [("vid_a", 902), ("vid_a", 905), ("vid_b", 903)]
    first = keyframes[0]
    assert first.boxes.dtype == np.float32 and first.boxes.shape == (3, 4)
    np.testing.assert_allclose(first.boxes[0], [0.1, 0.1, 0.5, 0.9])
    assert first.actions == [[12, 79], [14], [80]]
    assert first.person_ids == [1, 2, 1]


def test_missing_files_raise_naming_them(tmp_path):
    missing = tmp_path / "nowhere.csv"
    for reader in (read_annotations, read_label_map, read_exclusions, read_frame_list):
        with pytest.raises(FileNotFoundError, match="nowhere.csv"):
            reader(missing)


def test_exclusions(tmp_path):
    path = tmp_path / "excluded.csv"
    path.write_text("-5KQ66BBWC4,0902\n1j20qq1JyX4,1798\n")
    assert read_exclusions(path) == {("-5KQ66BBWC4", 902), ("1j20qq1JyX4", 1798)}
    path.write_text("-5KQ66BBWC4,0902\n1j20qq1JyX4,noon\n")
    with pytest.raises(ValueError, match=f"{path}:2: "):
        read_exclusions(path)
    path.write_text("")
    assert read_exclusions(path) == set()


def test_keyframe_and_clip_frame_indices():
    # Spec 5.3: second 902 is frame index 60, the 61st JPEG.
    assert keyframe_frame_index(902) == 60
    assert f"vid_{keyframe_frame_index(902) + 1:06d}.jpg" == "vid_000061.jpg"
    assert keyframe_frame_index(1798) == 26940
    clip = clip_frame_indices(60, 16, 4, 27030)
    assert clip == list(range(28, 92, 4)) and clip[8] == 60
    # Near the ends of the video the indices are clamped to the first and the last frame.
    assert clip_frame_indices(10, 16, 4, 27030) == [0] * 6 + [2, 6, 10, 14, 18, 22, 26, 30, 34, 38]
    assert clip_frame_indices(27025, 16, 4, 27030)[8:] == [27025] + [27029] * 7
    assert clip_frame_indices(3, 4, 2, 5) == [0, 1, 3, 4]
    # An odd number of frames still gives that many, with the keyframe in the middle.
    assert clip_frame_indices(20, 5, 3, 100) == [14, 17, 20, 23, 26]
    assert clip_frame_indices(0, 1, 4, 1) == [0]
    times = clip_sample_times(902, 16, 4)
    np.testing.assert_allclose(times, np.array(clip) / 30)


def test_frame_list_round_trip_with_real_jpegs(tmp_path, test_data):
    images = sorted((test_data / "ava_samples" / MMACTION_FRAMES).glob("img_*.jpg"))
    assert len(images) == 10
    video_id = "-mmaction2xx"
    (tmp_path / "frames" / video_id).mkdir(parents=True)
    lines = ["original_vido_id video_id frame_id path labels"]
    for index, image in enumerate(images):
        relative = f"{video_id}/{video_id}_{index + 1:06d}.jpg"
        shutil.copyfile(image, tmp_path / "frames" / relative)
        separator = "\t  " if index == 3 else " "  # the released reader splits on any whitespace
        lines.append(separator.join([video_id, "0", str(index), relative, '""']))
    frame_list = tmp_path / "frame_lists" / "val.csv"
    frame_list.parent.mkdir()
    frame_list.write_text("\n".join(lines) + "\n\n")

    frames = read_frame_list(frame_list)
    assert list(frames) == [video_id] and len(frames[video_id]) == 10
    clip = clip_frame_indices(4, 4, 2, len(frames[video_id]))
    assert clip == [0, 2, 4, 6]
    for index in clip:
        decoded = np.asarray(Image.open(tmp_path / "frames" / frames[video_id][index]))
        assert decoded.shape == (240, 320, 3)
        np.testing.assert_array_equal(decoded, np.asarray(Image.open(images[index])))

    frame_list.write_text("\n".join(lines[:4] + [f"{video_id} 0 3 missing_labels"] + lines[4:]))
    with pytest.raises(ValueError, match=f"{frame_list}:5: expected 5 whitespace-separated fields, got 4"):
        read_frame_list(frame_list)


def _video_with_numbered_frames(path: Path, rate, count: int) -> None:
    """Frame i is a flat grey of level 4 * i, so a decoded frame tells which one it is."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.options = {"crf": "10"}
        for index in range(count):
            pixels = np.full((64, 64, 3), 4 * index, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.parametrize("rate", [Fraction(25), Fraction(30000, 1001)])
def test_nearest_frames_of_a_clip_on_real_timelines(tmp_path, rate):
    path = tmp_path / "video.mp4"
    _video_with_numbered_frames(path, rate, 60)
    video = decord.VideoReader(str(path))
    starts = video.get_frame_timestamp(range(len(video)))[:, 0]
    # A clip on the 30 fps grid around file second 1 (AVA second 901), 8 frames every 4.
    times = clip_sample_times(901, 8, 4)
    chosen = nearest_frame_indices(times, starts)
    brute_force = np.abs(starts[None, :] - times[:, None]).argmin(axis=1)
    np.testing.assert_array_equal(chosen, brute_force)
    levels = video.get_batch(chosen.tolist()).asnumpy().mean(axis=(1, 2, 3))
    np.testing.assert_allclose(levels, 4 * chosen, atol=1.5)
    # Outside the video: the first and the last frame.
    np.testing.assert_array_equal(nearest_frame_indices([-1.0, 0.0, 99.0], starts), [0, 0, len(video) - 1])


def test_nearest_frame_ties_and_a_single_frame():
    np.testing.assert_array_equal(nearest_frame_indices([0.02, 0.021, 0.019], [0.0, 0.04, 0.08]), [0, 1, 0])
    np.testing.assert_array_equal(nearest_frame_indices([0.5, 3.0], [0.0]), [0, 0])
    with pytest.raises(ValueError):
        nearest_frame_indices([0.0], [])


def windows_text(path: Path, text: str) -> Path:
    """``text`` as Windows editors save "UTF-8 with BOM": a byte-order mark and CRLF line ends."""
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    return path


@pytest.mark.parametrize("text", [
    'item {\n  name: "stand"\n  id: 12\n}\nitem {\n  name: "walk"\n  id: 14\n}\n',
    ('label {\n  name: "stand"\n  label_id: 12\n  label_type: PERSON_MOVEMENT\n}\n'
     'label {\n  name: "walk"\n  label_id: 14\n  label_type: PERSON_MOVEMENT\n}\n'),
    "12: stand\n14: walk\n",
], ids=["pbtxt_item", "pbtxt_label", "id_name_text"])
def test_label_maps_with_a_bom_and_crlf(tmp_path, text):
    assert read_label_map(windows_text(tmp_path / "labels.pbtxt", text)) == {12: "stand", 14: "walk"}


def test_csvs_and_frame_lists_with_a_bom_and_crlf(tmp_path):
    gt = windows_text(tmp_path / "gt.csv", "vid,0902,0.1,0.2,0.3,0.4,12,1\nvid,0903,0.1,0.2,0.3,0.4,14,2\n")
    table, rejections = read_annotations(gt)
    assert rejections == [] and table["video_id"].to_pylist() == ["vid", "vid"]
    assert table["person_id"].to_pylist() == [1, 2] and table["box_key"].to_pylist()[1] == "0.1,0.2,0.3,0.4"
    assert read_boxes_csv(gt, is_detection=False)["key"].to_pylist() == ["vid,0902", "vid,0903"]
    seven_fields = windows_text(tmp_path / "gt7.csv", "vid,0902,0.1,0.2,0.3,0.4,12\n")
    assert read_boxes_csv(seven_fields, is_detection=False)["key"].to_pylist() == ["vid,0902"]
    det = windows_text(tmp_path / "det.csv", "vid,0902,0.1,0.2,0.3,0.4,12,0.75\n")
    assert read_boxes_csv(det, is_detection=True)["score"].to_pylist() == [0.75]
    assert read_exclusions(windows_text(tmp_path / "excluded.csv", "vid,0902\n")) == {("vid", 902)}
    frame_list = windows_text(tmp_path / "val.csv", 'original_vido_id video_id frame_id path labels\n'
                                                    'vid 0 0 vid/vid_000001.jpg ""\nvid 0 1 vid/vid_000002.jpg ""\n')
    assert read_frame_list(frame_list) == {"vid": ["vid/vid_000001.jpg", "vid/vid_000002.jpg"]}
