from collections import defaultdict
from pathlib import Path

import decord
import numpy as np
import pytest
from PIL import Image

from evadlab.cli import main
from evadlab.pipelines.ava import AVA_FPS as FPS
from evadlab.pipelines.ava import (
    EVALUATED_ACTION_IDS,
    group_keyframes,
    keyframe_frame_index,
    read_annotations,
    read_exclusions,
    read_frame_list,
    read_label_map,
)
from evadlab.pipelines.synthetic import (
    BEND,
    SIT,
    STAND,
    WALK,
    figure_sprite,
    generate_mini_ava,
)

VIDEOS, SECONDS, SEED = 3, 6, 3
WIDTH, HEIGHT = 320, 240
ANNOTATION_FILES = (
    "ava_train_v2.2.csv",
    "ava_val_v2.2.csv",
    "ava_val_excluded_timestamps_v2.2.csv",
    "ava_action_list_v2.2_for_activitynet_2019.pbtxt",
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_ava")
    summary = generate_mini_ava(root, videos=VIDEOS, seconds=SECONDS, seed=SEED, frames=True)
    return root, summary


@pytest.fixture(scope="module")
def keyframes(dataset):
    root, _ = dataset
    result = {}
    for split in ("train", "val"):
        table, rejections = read_annotations(root / "annotations" / f"ava_{split}_v2.2.csv")
        assert rejections == []
        result[split] = group_keyframes(table)
    return result


def _decoded(root: Path, video_id: str) -> np.ndarray:
    return decord.VideoReader(str(root / "videos" / f"{video_id}.mp4")).get_batch(range(SECONDS * FPS)).asnumpy()


def _pixels(box: np.ndarray) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    return round(x1 * WIDTH), round(y1 * HEIGHT), round(x2 * WIDTH), round(y2 * HEIGHT)


def _persons(keyframes) -> dict[tuple[str, int], list[tuple[int, np.ndarray, list[int]]]]:
    """(video, person) -> [(timestamp, box, actions)] over all keyframes."""
    persons = defaultdict(list)
    for keyframe in keyframes:
        for box, actions, person in zip(keyframe.boxes, keyframe.actions, keyframe.person_ids):
            persons[keyframe.video_id, person].append((keyframe.timestamp, box, actions))
    return persons


def test_the_layout_is_complete(dataset):
    root, summary = dataset
    video_ids = summary["videos"]["train"] + summary["videos"]["val"]
    assert len(video_ids) == VIDEOS and len(summary["videos"]["val"]) == 1
    for name in ANNOTATION_FILES:
        assert (root / "annotations" / name).is_file()
    assert read_label_map(root / "annotations" / ANNOTATION_FILES[3]).keys() == set(EVALUATED_ACTION_IDS)
    for split, ids in summary["videos"].items():
        frame_list = read_frame_list(root / "frame_lists" / f"{split}.csv")
        assert list(frame_list) == ids
        for video_id, paths in frame_list.items():
            assert len(paths) == SECONDS * FPS
            assert paths[keyframe_frame_index(902)] == f"{video_id}/{video_id}_000061.jpg"
            assert all((root / "frames" / path).is_file() for path in paths)
    assert sorted(p.name for p in (root / "frames").iterdir()) == sorted(video_ids)
    assert not list(root.rglob("*.tmp"))


def test_decord_reads_every_video_at_30_fps(dataset):
    root, summary = dataset
    for video_id in summary["videos"]["train"] + summary["videos"]["val"]:
        video = decord.VideoReader(str(root / "videos" / f"{video_id}.mp4"))
        assert video.get_avg_fps() == pytest.approx(30)
        assert len(video) == SECONDS * FPS
        assert video[0].shape == (HEIGHT, WIDTH, 3)


def test_jpeg_frames_hold_the_video_pixels(dataset):
    root, summary = dataset
    video_id = summary["videos"]["val"][0]
    decoded = _decoded(root, video_id)
    for index in (0, 60, SECONDS * FPS - 1):
        jpeg = np.asarray(Image.open(root / "frames" / video_id / f"{video_id}_{index + 1:06d}.jpg"))
        assert np.abs(jpeg.astype(float) - decoded[index]).mean() < 6


def test_annotations_are_clean_and_rich(dataset, keyframes):
    _, summary = dataset
    every = keyframes["train"] + keyframes["val"]
    assert {k.timestamp for k in every} == set(range(902, 900 + SECONDS - 1))
    assert len(keyframes["train"]) == summary["keyframes"]["train"]
    assert sum(len(k.person_ids) for k in every) == summary["boxes"]["train"] + summary["boxes"]["val"]
    actions = {a for k in every for box_actions in k.actions for a in box_actions}
    assert len(actions) >= 6 and actions <= set(EVALUATED_ACTION_IDS)
    assert actions == set(summary["action_ids"])
    assert any(len(box_actions) >= 2 for k in every for box_actions in k.actions)
    assert all(2 <= len(k.person_ids) <= 3 for k in every)
    for keyframe in every:
        heights = keyframe.boxes[:, 3] - keyframe.boxes[:, 1]
        assert ((heights >= 0.35) & (heights <= 0.7)).all()
        assert ((keyframe.boxes >= 0) & (keyframe.boxes <= 1)).all()
        # Exactly one pose per person.
        assert all(len({STAND, WALK, SIT, BEND} & set(a)) == 1 for a in keyframe.actions)


def test_splits_are_disjoint_and_one_val_keyframe_is_excluded(dataset, keyframes):
    _, summary = dataset
    root = dataset[0]
    train_videos = {k.video_id for k in keyframes["train"]}
    val_videos = {k.video_id for k in keyframes["val"]}
    assert train_videos == set(summary["videos"]["train"])
    assert val_videos == set(summary["videos"]["val"])
    assert not train_videos & val_videos
    excluded = read_exclusions(root / "annotations" / "ava_val_excluded_timestamps_v2.2.csv")
    assert len(excluded) == 1 and excluded <= {(k.video_id, k.timestamp) for k in keyframes["val"]}


def test_a_person_keeps_its_actions(keyframes):
    for appearances in _persons(keyframes["train"] + keyframes["val"]).values():
        assert len({tuple(actions) for _, _, actions in appearances}) == 1


@pytest.mark.parametrize("pose", [STAND, WALK, SIT, BEND])
@pytest.mark.parametrize("talks", [False, True])
@pytest.mark.parametrize("watches", [False, True])
def test_boxes_are_the_figures_exact_extent(pose, talks, watches):
    for unit in (60, 97, 120, 149):
        sprite, mask = figure_sprite(pose, unit, talks=talks, watches=watches, faces_left=unit % 2 == 1)
        assert sprite.shape[:2] == mask.shape
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()


def test_stand_and_walk_look_the_same_in_one_frame():
    for unit in (100, 131, 149):
        for talks in (False, True):
            for watches in (False, True):
                stand = figure_sprite(STAND, unit, talks=talks, watches=watches)
                walk = figure_sprite(WALK, unit, talks=talks, watches=watches)
                np.testing.assert_array_equal(stand[0], walk[0])
                np.testing.assert_array_equal(stand[1], walk[1])
    sit = figure_sprite(SIT, 131, talks=False, watches=False)[0]
    assert sit.shape != figure_sprite(STAND, 131, talks=False, watches=False)[0].shape


def test_stand_and_walk_differ_only_across_frames(dataset, keyframes):
    root, _ = dataset
    persons = _persons(keyframes["train"] + keyframes["val"])
    colours = {STAND: [], WALK: [], SIT: [], BEND: []}
    motion = {STAND: [], WALK: []}
    for (video_id, _), appearances in persons.items():
        frames = _decoded(root, video_id)
        pose = next(a for a in appearances[0][2] if a in colours)
        for timestamp, box, _ in appearances:
            index = keyframe_frame_index(timestamp)
            x1, y1, x2, y2 = _pixels(box)
            # Appearance: the median colour of the middle of the figure (torso).
            middle = frames[index, (y1 + y2) // 2 - 3: (y1 + y2) // 2 + 3, (x1 + x2) // 2 - 2: (x1 + x2) // 2 + 2]
            colours[pose].append(np.median(middle.reshape(-1, 3), axis=0))
            if pose in motion:
                # Motion: how much the keyframe's box changes over the clip window (32 frames either side).
                crops = frames[[index - 32, index, index + 28], y1:y2, x1:x2].astype(float)
                motion[pose].append(max(np.abs(crops[0] - crops[1]).mean(), np.abs(crops[2] - crops[1]).mean()))
    stand, walk = np.mean(colours[STAND], axis=0), np.mean(colours[WALK], axis=0)
    assert np.abs(stand - walk).max() < 8
    assert np.abs(np.mean(colours[SIT], axis=0) - stand).max() > 60  # (a bowing figure's middle is empty)
    assert max(motion[STAND]) < 4
    assert min(motion[WALK]) > 15
    walker_boxes = [np.stack([box for _, box, actions in a]) for a in persons.values() if WALK in a[0][2]]
    assert all(np.abs(np.diff(boxes[:, 0])).min() > 0.02 for boxes in walker_boxes)


def test_a_seed_gives_the_same_dataset(tmp_path):
    first = generate_mini_ava(tmp_path / "first", videos=3, seconds=4, seed=11)
    second = generate_mini_ava(tmp_path / "second", videos=3, seconds=4, seed=11)
    other = generate_mini_ava(tmp_path / "other", videos=2, seconds=4, seed=12)
    assert {k: v for k, v in first.items() if k != "root"} == {k: v for k, v in second.items() if k != "root"}
    assert other["keyframes"]["val"] == 1 and other["excluded"] == [], "the val split's only keyframe is scored"
    assert read_exclusions(tmp_path / "other" / "annotations" / "ava_val_excluded_timestamps_v2.2.csv") == set()
    texts = [Path("annotations") / name for name in ANNOTATION_FILES]
    texts += [Path("frame_lists") / "train.csv", Path("frame_lists") / "val.csv"]
    for path in texts:
        assert (tmp_path / "first" / path).read_bytes() == (tmp_path / "second" / path).read_bytes()
    assert (tmp_path / "first" / texts[0]).read_bytes() != (tmp_path / "other" / texts[0]).read_bytes()
    for video_id in first["videos"]["train"] + first["videos"]["val"]:
        decoded = [
            decord.VideoReader(str(tmp_path / run / "videos" / f"{video_id}.mp4")).get_batch(range(120)).asnumpy()
            for run in ("first", "second")
        ]
        np.testing.assert_array_equal(*decoded)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"videos": 1}, "videos=1"),
    ({"seed": -1}, "seed=-1: must be >= 0"),
    ({"seconds": 3}, "seconds=3"),
    ({"width": 321}, "321x240"),
    ({"label_map": {1: "dance"}}, "label 1 'dance': the generator draws ids >= 1 named after one of stand, walk"),
    ({"label_map": {1: "stand", 2: "standing up"}}, "label 2 'standing up'"),
    ({"label_map": {1: "stand", 2: "stand still"}}, "label 2 'stand still': 'stand' is already label 1"),
    ({"label_map": {1: "talk to"}}, "the label map must list at least one pose"),
])
def test_bad_arguments_are_refused(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        generate_mini_ava(tmp_path, **arguments)


def test_a_custom_label_map_gives_its_own_ids_and_actions(tmp_path):
    """The synth command with a custom label map (mmaction2's 'id: name' form): only the listed actions are drawn,
    under the listed ids, and the label map written is that one."""
    labels = tmp_path / "labels.txt"
    labels.write_text("3: stand\n7: sit\n9: talk to (e.g., self, a person, a group)\n")
    out = tmp_path / "custom"
    assert main(["synth", "--out", str(out), "--videos", "3", "--seconds", "4", "--label-map", str(labels)]) == 0
    expected = {3: "stand", 7: "sit", 9: "talk to (e.g., self, a person, a group)"}
    assert read_label_map(out / "annotations" / ANNOTATION_FILES[3]) == expected
    for split in ("train", "val"):
        table, rejections = read_annotations(out / "annotations" / f"ava_{split}_v2.2.csv", num_actions=9)
        assert rejections == [] and set(table["action_id"].to_pylist()) <= set(expected)
        for keyframe in group_keyframes(table):
            # Every person shows exactly one pose, stand (3) or sit (7).
            assert all(len({3, 7} & set(actions)) == 1 for actions in keyframe.actions)
