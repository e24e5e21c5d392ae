"""The synthetic mini-AVA: small videos of cartoon actors, written in the official AVA layout.

Each video is the start of a "15-minute cut": file time 0 is AVA second 900, so the keyframes at
seconds 902, 903, ... sit at frames 60, 90, ... . Every actor keeps its actions for the whole video, so
the label of a keyframe describes its whole clip window. The actions are real AVA ids with cues a tiny
model can learn in minutes:

- pose, by colour and shape: stand (12) and walk (14) share one blue upright figure and differ only in
  motion (walkers move sideways at a steady speed, standers are still); sit (11) is a red seated
  figure; bend/bow (1) is a green figure bowing at the waist;
- interaction, by a marker on the figure: talk to (79) is a yellow chest band; watch (a person) (80)
  is a cyan head (the plain head is dark brown).

Actors never overlap or leave the frame, boxes are the figure's exact extent at the keyframe, and the
background is a plain tone with mild noise. Everything is drawn from one seed, so a seed always gives
byte-identical CSVs and identical decoded frames.

A custom vocabulary (``label_map``: id -> name, any ids) draws only the listed actions and writes them with the
listed ids, so a custom AVA-format dataset of a few classes can be made: each name is matched to an action the
generator draws by its first word (stand, walk, sit, bend, talk, watch).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from evadlab.config import AVA_ANNOTATIONS
from evadlab.pipelines.ava import (
    AVA_ACTION_NAMES,
    AVA_FPS,
    AVA_VIDEO_OFFSET_SEC,
    EVALUATED_ACTION_IDS,
    keyframe_frame_index,
)
from evadlab.storage import atomic_path, write_text

FIRST_KEYFRAME_SEC = 902
# The last keyframe is 2 s before the end of the file, like the first is 2 s after its start.
END_MARGIN_SEC = 2

BEND, SIT, STAND, WALK = 1, 11, 12, 14
TALK, WATCH = 79, 80
# Consecutive actors take consecutive poses, so each split sees every pose and a video of at most 3
# actors never holds two walkers (walkers need the free width of the frame).
POSE_CYCLE = (STAND, WALK, SIT, BEND)
INTERACTIONS = (TALK, WATCH)
# The first word of a label-map name that selects each action the generator draws.
ACTION_WORDS = {STAND: "stand", WALK: "walk", SIT: "sit", BEND: "bend", TALK: "talk", WATCH: "watch"}

BODY_COLOURS = {STAND: (45, 85, 215), WALK: (45, 85, 215), SIT: (215, 70, 45), BEND: (35, 150, 55)}
HEAD_COLOUR = (70, 45, 30)
WATCH_HEAD_COLOUR = (70, 225, 235)
TALK_BAND_COLOUR = (250, 220, 40)

# Figure size: the height of an upright figure as a fraction of the frame height; the seated and bowing
# figures are shorter (0.75 and 0.7 of it), so all boxes stay between 38 % and 66 % of the frame height.
# Box width in the same unit: figures are stocky because a box only a few pixels wide after the model's
# downscaling is hard to localise to IoU 0.5.
FIGURE_HEIGHT_RANGE = (0.55, 0.66)
FIGURE_WIDTHS = {STAND: 0.42, WALK: 0.42, SIT: 0.55, BEND: 0.6}
FEET_RANGE = (0.9, 0.97)  # where the figures stand, as a fraction of the frame height
MARGIN = 0.02  # free space on each side of an actor, as a fraction of the frame width
MIN_TRAVEL = 0.2  # the shortest back-and-forth path of a walker, as a fraction of the frame width
WALK_SPEED_RANGE = (0.09, 0.12)  # frame widths per second
GRAIN_SIGMA = 4.0  # fixed background texture
NOISE_SIGMA = 2.0  # changes every frame, so that nothing in the video is perfectly still
NOISE_BANK = 8  # noise frames cycled through, so a long video costs no more noise than a short one

FRAME_LIST_HEADER = "original_vido_id video_id frame_id path labels"


@dataclass(frozen=True)
class Actor:
    """One person: a rigid sprite, where it stands, and (for walkers) how it moves."""

    person_id: int
    actions: tuple[int, ...]  # sorted AVA action ids
    sprite: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) bool, True on the figure; every edge row and column has a True pixel
    top: int
    lane_left: int  # leftmost x the sprite may take
    travel: int  # how far right of lane_left it goes; 0 for actors that stay still
    speed: float  # pixels per second
    phase: float  # pixels along the back-and-forth path at time 0

    def left(self, frame_index: int) -> int:
        """x of the sprite's left edge: a walker goes back and forth along its lane at a steady speed."""
        if self.travel == 0:
            return self.lane_left
        along = (self.phase + self.speed * frame_index / AVA_FPS) % (2 * self.travel)
        return self.lane_left + round(min(along, 2 * self.travel - along))

    def box(self, frame_index: int, width: int, height: int) -> tuple[float, float, float, float]:
        """The figure's exact extent, normalised x1, y1, x2, y2."""
        left = self.left(frame_index)
        h, w = self.mask.shape
        return left / width, self.top / height, (left + w) / width, (self.top + h) / height


@dataclass(frozen=True)
class Scene:
    video_id: str
    background: np.ndarray  # (H, W, 3) uint8
    noise: np.ndarray  # (NOISE_BANK, H, W, 1) int16, the same for the 3 channels
    actors: tuple[Actor, ...]


def _fill_rectangle(canvas: np.ndarray, mask: np.ndarray, y0: float, y1: float, x0: float, x1: float,
                    colour: tuple[int, int, int]) -> None:
    rows = slice(round(y0), round(y1))
    columns = slice(round(x0), round(x1))
    canvas[rows, columns] = colour
    mask[rows, columns] = True


def _fill_disk(canvas: np.ndarray, mask: np.ndarray, top: float, left: float, diameter: float,
               colour: tuple[int, int, int]) -> None:
    ys, xs = np.mgrid[: canvas.shape[0], : canvas.shape[1]]
    radius = diameter / 2
    inside = (ys + 0.5 - top - radius) ** 2 + (xs + 0.5 - left - radius) ** 2 <= radius**2
    canvas[inside] = colour
    mask |= inside


Rectangle = tuple[float, float, float, float]  # y0, y1, x0, x1 in sprite pixels


def _blank(height: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    height, width = round(height), round(width)
    return np.zeros((height, width, 3), np.uint8), np.zeros((height, width), bool)


def _upright_figure(u: float, body: tuple[int, int, int], head: tuple[int, int, int]):
    """A standing person seen from the front: head over a body with a gap between the legs."""
    canvas, mask = _blank(u, FIGURE_WIDTHS[STAND] * u)
    height, width = mask.shape
    neck = 0.22 * u
    _fill_rectangle(canvas, mask, neck, height, 0, width, body)
    gap = max(2.0, 0.08 * u)
    legs = slice(round(0.62 * u), height), slice(round(width / 2 - gap / 2), round(width / 2 + gap / 2))
    mask[legs] = False
    _fill_disk(canvas, mask, 0, width / 2 - neck / 2, neck, head)
    chest: Rectangle = (neck + 0.06 * u, neck + 0.2 * u, 0, width)
    return canvas, mask, chest


def _seated_figure(u: float, body: tuple[int, int, int], head: tuple[int, int, int]):
    """A person sitting, seen from the side (facing right): upright torso, level thighs, shins down."""
    canvas, mask = _blank(0.75 * u, FIGURE_WIDTHS[SIT] * u)
    height, width = mask.shape
    neck, torso, limb, hip = 0.22 * u, 0.3 * u, 0.14 * u, 0.56 * u
    _fill_rectangle(canvas, mask, neck, hip, 0, torso, body)
    _fill_rectangle(canvas, mask, hip - limb, hip, 0, width, body)  # thighs
    _fill_rectangle(canvas, mask, hip - limb, height, width - limb, width, body)  # shins
    _fill_disk(canvas, mask, 0, torso / 2 - neck / 2, neck, head)
    chest: Rectangle = (neck + 0.04 * u, neck + 0.16 * u, 0, torso)
    return canvas, mask, chest


def _bowing_figure(u: float, body: tuple[int, int, int], head: tuple[int, int, int]):
    """A person bent at the waist, seen from the side (facing right): legs down, torso level, head low."""
    head_size, thickness = 0.2 * u, 0.2 * u
    torso_length = (FIGURE_WIDTHS[BEND] - 0.2) * u
    canvas, mask = _blank(0.7 * u, torso_length + head_size)
    height = mask.shape[0]
    _fill_rectangle(canvas, mask, 0, thickness, 0, torso_length, body)
    _fill_rectangle(canvas, mask, thickness, height, 0, 0.2 * u, body)  # legs
    _fill_disk(canvas, mask, 0.08 * u, torso_length, head_size, head)
    chest: Rectangle = (0, thickness, torso_length - 0.14 * u, torso_length)
    return canvas, mask, chest


FIGURES = {STAND: _upright_figure, WALK: _upright_figure, SIT: _seated_figure, BEND: _bowing_figure}


def figure_sprite(pose: int, height_unit: int, *, talks: bool, watches: bool,
                  faces_left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The RGB sprite and mask of a figure whose upright height is ``height_unit`` pixels.

    stand and walk give the very same sprite: only their motion tells them apart.
    """
    if pose not in FIGURES:
        raise ValueError(f"no figure for action {pose}")
    head = WATCH_HEAD_COLOUR if watches else HEAD_COLOUR
    canvas, mask, chest = FIGURES[pose](float(height_unit), BODY_COLOURS[pose], head)
    if talks:
        _fill_rectangle(canvas, mask, *chest, TALK_BAND_COLOUR)
    if faces_left:
        canvas, mask = canvas[:, ::-1].copy(), mask[:, ::-1].copy()
    return canvas, mask


@dataclass(frozen=True)
class Vocabulary:
    """The actions a dataset shows (AVA ids of what the generator draws) and how they are written."""

    poses: tuple[int, ...]  # in cycle order
    interactions: tuple[int, ...]
    ids: Mapping[int, int]  # AVA id of a drawn action -> the action id written in the CSVs
    labels: Mapping[int, str]  # the label map written: id -> name

    @property
    def interaction_sets(self) -> tuple[tuple[int, ...], ...]:
        """Every combination of the interactions, the empty one first: (), (TALK,), (WATCH,), (TALK, WATCH)."""
        return tuple(subset for size in range(len(self.interactions) + 1)
                     for subset in itertools.combinations(self.interactions, size))


AVA_VOCABULARY = Vocabulary(POSE_CYCLE, INTERACTIONS, {action: action for action in ACTION_WORDS},
                            {action: AVA_ACTION_NAMES[action] for action in EVALUATED_ACTION_IDS})


def vocabulary_of(label_map: Mapping[int, str]) -> Vocabulary:
    """The vocabulary of a custom label map (id -> name, as ``read_label_map`` gives it). Raises ValueError for a
    name the generator cannot draw, an action listed twice, a name a pbtxt cannot hold, or no pose at all."""
    ids: dict[int, int] = {}
    for label_id, name in sorted(label_map.items()):
        word = re.match(r"[a-z]*", name.strip().lower())[0]
        action = next((action for action, known in ACTION_WORDS.items() if known == word), None)
        if action is None or label_id < 1 or re.search(r'["\\\n]', name):
            raise ValueError(f"label {label_id} {name!r}: the generator draws ids >= 1 named after one of "
                             f"{', '.join(ACTION_WORDS.values())} (by the first word), without quotes or backslashes")
        if action in ids:
            raise ValueError(f"label {label_id} {name!r}: '{word}' is already label {ids[action]}")
        ids[action] = label_id
    poses = tuple(pose for pose in POSE_CYCLE if pose in ids)
    if not poses:
        raise ValueError(f"the label map must list at least one pose ({', '.join(ACTION_WORDS[p] for p in POSE_CYCLE)})")
    return Vocabulary(poses, tuple(action for action in INTERACTIONS if action in ids), ids, dict(label_map))


def _keyframe_seconds(seconds: int) -> range:
    return range(FIRST_KEYFRAME_SEC, int(AVA_VIDEO_OFFSET_SEC) + seconds - END_MARGIN_SEC + 1)


def _video_ids(videos: int) -> list[str]:
    return [f"synth_{index:03d}" for index in range(videos)]


def _actor_roles(videos: int, rng: np.random.Generator,
                 vocabulary: Vocabulary) -> list[list[tuple[int, tuple[int, ...]]]]:
    """(pose, interactions) of the actors of each video: 2 or 3 actors, poses in cycle order, and each
    block of actors taking the interaction sets (4 of them for AVA's) in a random order."""
    counts = rng.integers(2, 4, size=videos).tolist()
    cycle, sets = vocabulary.poses, vocabulary.interaction_sets
    first_pose = int(rng.integers(len(cycle)))
    total = sum(counts)
    interactions = [sets[i] for _ in range(0, total, len(sets)) for i in rng.permutation(len(sets))]
    roles = [(cycle[(first_pose + n) % len(cycle)], interactions[n]) for n in range(total)]
    ends = np.cumsum(counts).tolist()
    return [roles[end - count: end] for end, count in zip(ends, counts)]


def _plan_actors(roles: list[tuple[int, tuple[int, ...]]], width: int, height: int,
                 rng: np.random.Generator) -> tuple[Actor, ...]:
    """Sprites and non-overlapping lanes, left to right in a random order; walkers share the free width."""
    margin = round(MARGIN * width)
    min_travel = round(MIN_TRAVEL * width)
    units = rng.uniform(*FIGURE_HEIGHT_RANGE, size=len(roles)) * height
    faces_left = rng.random(len(roles)) < 0.5
    walkers = sum(pose == WALK for pose, _ in roles)
    # Shrink all figures if the frame is too narrow for them and the walkers' paths (one pixel per actor
    # spare for rounding).
    figure_widths = sum(FIGURE_WIDTHS[pose] * unit for (pose, _), unit in zip(roles, units))
    available = width - walkers * min_travel - len(roles) * (2 * margin + 1)
    units *= min(1.0, available / figure_widths)
    sprites = [
        figure_sprite(pose, round(unit), talks=TALK in acts, watches=WATCH in acts, faces_left=bool(left))
        for (pose, acts), unit, left in zip(roles, units, faces_left)
    ]
    # Walkers share all the free width as their path; without walkers it spreads at random between actors.
    free = width - sum(mask.shape[1] + 2 * margin for _, mask in sprites)
    is_walker = np.array([pose == WALK for pose, _ in roles])
    if walkers:
        extras = np.where(is_walker, free / walkers, 0.0)
    else:
        extras = rng.dirichlet(np.ones(len(roles))) * free
    x = 0.0
    actors: dict[int, Actor] = {}
    for position in rng.permutation(len(roles)):
        pose, acts = roles[position]
        sprite, mask = sprites[position]
        travel = int(extras[position]) if is_walker[position] else 0
        offset = 0.0 if is_walker[position] else rng.uniform(0, extras[position])
        feet = rng.uniform(*FEET_RANGE) * height
        actors[position] = Actor(
            person_id=int(position) + 1,  # from 1: the released val reader keeps only ids >= 0.7 (a "score")
            actions=tuple(sorted((pose, *acts))),
            sprite=sprite,
            mask=mask,
            top=round(feet) - mask.shape[0],
            lane_left=int(x + margin + offset),
            travel=travel,
            speed=float(rng.uniform(*WALK_SPEED_RANGE) * width) if travel else 0.0,
            phase=float(rng.uniform(0, 2 * travel)) if travel else 0.0,
        )
        x += mask.shape[1] + 2 * margin + extras[position]
    return tuple(actors[position] for position in range(len(roles)))


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A plain wall over a slightly darker floor, in a muted grey-green tone that varies by video, with a
    faint fixed grain (fixed, so that it costs the encoder almost nothing)."""
    tone = rng.uniform(110, 150) + rng.uniform(-8, 8, size=3)
    shade = np.linspace(6, -6, height)[:, None, None]  # a faint vertical gradient
    floor = np.where(np.arange(height)[:, None, None] >= rng.uniform(0.7, 0.8) * height, -18.0, 0.0)
    grain = rng.normal(0, GRAIN_SIGMA, size=(height, width, 1))
    return np.clip(np.round(tone + shade + floor + grain), 0, 255).astype(np.uint8)


def _build_scene(video_id: str, roles: list[tuple[int, tuple[int, ...]]], width: int, height: int,
                 rng: np.random.Generator) -> Scene:
    background = _background(width, height, rng)
    noise = np.round(rng.normal(0, NOISE_SIGMA, size=(NOISE_BANK, height, width, 1))).astype(np.int16)
    return Scene(video_id, background, noise, _plan_actors(roles, width, height, rng))


def _render_frames(scene: Scene, seconds: int) -> Iterator[np.ndarray]:
    """The RGB frames (H, W, 3) uint8 of a scene, 30 per second."""
    for frame_index in range(seconds * AVA_FPS):
        canvas = scene.background.copy()
        for actor in scene.actors:
            left = actor.left(frame_index)
            h, w = actor.mask.shape
            region = canvas[actor.top: actor.top + h, left: left + w]
            region[actor.mask] = actor.sprite[actor.mask]
        noisy = canvas.astype(np.int16) + scene.noise[frame_index % NOISE_BANK]
        yield np.clip(noisy, 0, 255).astype(np.uint8)


def _write_video(scene: Scene, seconds: int, video_path: Path, frame_dir: Path | None) -> None:
    """Encode the scene as 30 fps H.264 and, if asked, write the same frames as JPEGs
    (``<id>_000001.jpg``, ...). Both appear under their final names only once complete."""
    height, width = scene.background.shape[:2]
    frames_written = atomic_path(frame_dir) if frame_dir is not None else contextlib.nullcontext()
    # The temporary name ends in .tmp, so the container format is named rather than guessed from the name.
    with (atomic_path(video_path) as temporary_video, frames_written as temporary_frames,
          av.open(str(temporary_video), mode="w", format="mp4") as container):
        if temporary_frames is not None:
            temporary_frames.mkdir()
        stream = container.add_stream("libx264", rate=AVA_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for frame_index, pixels in enumerate(_render_frames(scene, seconds)):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            if temporary_frames is not None:
                name = f"{scene.video_id}_{frame_index + 1:06d}.jpg"
                Image.fromarray(pixels).save(temporary_frames / name, quality=95)
        container.mux(stream.encode())
        if frame_dir is not None:
            # A folder is renamed only onto a missing or empty one: the frames of an earlier run go first.
            shutil.rmtree(frame_dir, ignore_errors=True)


def _write_videos(out_dir: Path, video_ids: list[str], roles: list[list[tuple[int, tuple[int, ...]]]],
                  size: tuple[int, int], seconds: int, seed: int, frames: bool) -> list[Scene]:
    """Builds and writes the scene of every video (``videos/<id>.mp4``, and ``frames/<id>/`` with ``frames``), in
    the order of ``video_ids``. Each video has its own generator, seeded by (``seed``, its index), so the videos are
    written side by side (the encoder and numpy release the GIL: ~1.8x on 2 cores) and the files are those of
    writing them one at a time."""
    width, height = size

    def write_video(index: int) -> Scene:
        video_id = video_ids[index]
        scene = _build_scene(video_id, roles[index], width, height, np.random.default_rng([seed, index]))
        _write_video(scene, seconds, out_dir / "videos" / f"{video_id}.mp4",
                     out_dir / "frames" / video_id if frames else None)
        return scene

    pool = ThreadPoolExecutor(max_workers=min(len(video_ids), os.cpu_count() or 1))
    try:
        return list(pool.map(write_video, range(len(video_ids))))
    finally:
        pool.shutdown(cancel_futures=True)


def _annotation_lines(scene: Scene, seconds: int, width: int, height: int, ids: Mapping[int, int]) -> list[str]:
    """Official CSV rows, e.g. ``synth_000,0902,0.077,0.151,0.283,0.811,12,1``: one per person and action, each
    action written with its id in ``ids``."""
    lines = []
    for second in _keyframe_seconds(seconds):
        frame_index = keyframe_frame_index(second)
        for actor in scene.actors:
            x1, y1, x2, y2 = actor.box(frame_index, width, height)
            for action in actor.actions:
                lines.append(f"{scene.video_id},{second:04d},{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f},"
                             f"{ids[action]},{actor.person_id}")
    return lines


def _frame_list_lines(video_ids: list[str], seconds: int) -> list[str]:
    lines = [FRAME_LIST_HEADER]
    for video_index, video_id in enumerate(video_ids):
        lines += [f'{video_id} {video_index} {frame} {video_id}/{video_id}_{frame + 1:06d}.jpg ""'
                  for frame in range(seconds * AVA_FPS)]
    return lines


def label_map_text(labels: Mapping[int, str]) -> str:
    """A label map in the ``label_id:`` pbtxt form of the v2.2 release (for AVA: the 60 evaluated classes)."""
    return "".join(f'item {{\n  name: "{name}"\n  label_id: {i}\n}}\n' for i, name in sorted(labels.items()))


def generate_mini_ava(out_dir: str | Path, *, videos: int = 6, seconds: int = 12, seed: int = 0,
                      frames: bool = False, width: int = 320, height: int = 240,
                      label_map: Mapping[int, str] | None = None) -> dict:
    """Write a synthetic mini-AVA under ``out_dir`` in the official layout and return a summary.

    ``videos/<id>.mp4`` (30 fps H.264, file time 0 = AVA second 900), optionally ``frames/<id>/``
    JPEGs of every frame, ``annotations/`` (train and val CSVs, excluded timestamps, label map) and
    ``frame_lists/{train,val}.csv``. The last third of the videos (at least one) is the val split.
    Keyframes are the seconds 902 .. 900 + seconds - 2; one val keyframe is listed as excluded, unless it is the
    split's only one (which would leave nothing to score).
    ``label_map`` (id -> name) makes a custom vocabulary (see ``vocabulary_of``); by default the actions are AVA's
    and the label map is the 60 evaluated AVA classes. Raises ValueError for impossible arguments.
    """
    if videos < 2:
        raise ValueError(f"videos={videos}: need at least 2 (one for training, one for validation)")
    if seed < 0:
        raise ValueError(f"seed={seed}: must be >= 0 (numpy's generators take no negative seeds)")
    if not _keyframe_seconds(seconds):
        shortest = FIRST_KEYFRAME_SEC - int(AVA_VIDEO_OFFSET_SEC) + END_MARGIN_SEC
        raise ValueError(f"seconds={seconds}: need at least {shortest} for one keyframe with a full clip window")
    if width < 64 or height < 64 or width % 2 or height % 2:
        raise ValueError(f"frame size {width}x{height}: width and height must be even and at least 64")
    vocabulary = AVA_VOCABULARY if label_map is None else vocabulary_of(label_map)
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    video_ids = _video_ids(videos)
    num_val = max(1, round(videos / 3))
    splits = {"train": video_ids[:-num_val], "val": video_ids[-num_val:]}
    roles = _actor_roles(videos, rng, vocabulary)

    keyframes = list(_keyframe_seconds(seconds))
    rows: dict[str, list[str]] = {"train": [], "val": []}
    boxes = {"train": 0, "val": 0}
    actions: set[int] = set()
    scenes = _write_videos(out_dir, video_ids, roles, (width, height), seconds, seed, frames)
    for video_id, scene in zip(video_ids, scenes):
        split = "train" if video_id in splits["train"] else "val"
        rows[split] += _annotation_lines(scene, seconds, width, height, vocabulary.ids)
        boxes[split] += len(scene.actors) * len(keyframes)
        actions.update(vocabulary.ids[action] for actor in scene.actors for action in actor.actions)

    excluded = [(splits["val"][0], keyframes[len(keyframes) // 2])] if len(splits["val"]) * len(keyframes) > 1 else []
    _write_annotations(out_dir, rows, excluded, vocabulary.labels)
    for split, ids in splits.items():
        write_text(out_dir / "frame_lists" / f"{split}.csv", "\n".join(_frame_list_lines(ids, seconds)) + "\n")

    return {
        "root": str(out_dir),
        "videos": splits,
        "seconds": seconds,
        "fps": AVA_FPS,
        "width": width,
        "height": height,
        "frames": frames,
        "keyframes": {split: len(ids) * len(keyframes) for split, ids in splits.items()},
        "boxes": boxes,
        "rows": {split: len(split_rows) for split, split_rows in rows.items()},
        "action_ids": sorted(actions),
        "excluded": [list(keyframe) for keyframe in excluded],
    }


def _write_annotations(out_dir: Path, rows: dict[str, list[str]], excluded: list[tuple[str, int]],
                       labels: Mapping[int, str]) -> None:
    """The annotation files. ``evadlab run`` takes their presence for a complete dataset, so they are written after
    the videos and frames."""
    annotations = out_dir / "annotations"
    write_text(annotations / AVA_ANNOTATIONS["train_annotations"], "\n".join(rows["train"]) + "\n")
    write_text(annotations / AVA_ANNOTATIONS["val_annotations"], "\n".join(rows["val"]) + "\n")
    write_text(annotations / AVA_ANNOTATIONS["exclusions"], "".join(f"{video},{second:04d}\n" for video, second in excluded))
    write_text(annotations / AVA_ANNOTATIONS["label_map"], label_map_text(labels))
