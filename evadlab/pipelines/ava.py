"""AVA files and keyframe arithmetic.

Readers for the official annotation CSVs (ground truth and detections), the label map (pbtxt or
mmaction2's ``id: name`` text), the excluded-timestamps CSV and the LFB frame lists, plus the maths that
maps a keyframe second to the frames of its clip, following PySlowFast's ``ava_helper`` and
``utils.get_sequence``. Every reader names the file and the 1-based line of anything it cannot accept.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

# The full AVA v2.2 action vocabulary; the 60 evaluated ids are those of the label map file.
AVA_ACTION_NAMES: dict[int, str] = {
    1: "bend/bow (at the waist)",
    2: "crawl",
    3: "crouch/kneel",
    4: "dance",
    5: "fall down",
    6: "get up",
    7: "jump/leap",
    8: "lie/sleep",
    9: "martial art",
    10: "run/jog",
    11: "sit",
    12: "stand",
    13: "swim",
    14: "walk",
    15: "answer phone",
    16: "brush teeth",
    17: "carry/hold (an object)",
    18: "catch (an object)",
    19: "chop",
    20: "climb (e.g., a mountain)",
    21: "clink glass",
    22: "close (e.g., a door, a box)",
    23: "cook",
    24: "cut",
    25: "dig",
    26: "dress/put on clothing",
    27: "drink",
    28: "drive (e.g., a car, a truck)",
    29: "eat",
    30: "enter",
    31: "exit",
    32: "extract",
    33: "fishing",
    34: "hit (an object)",
    35: "kick (an object)",
    36: "lift/pick up",
    37: "listen (e.g., to music)",
    38: "open (e.g., a window, a car door)",
    39: "paint",
    40: "play board game",
    41: "play musical instrument",
    42: "play with pets",
    43: "point to (an object)",
    44: "press",
    45: "pull (an object)",
    46: "push (an object)",
    47: "put down",
    48: "read",
    49: "ride (e.g., a bike, a car, a horse)",
    50: "row boat",
    51: "sail boat",
    52: "shoot",
    53: "shovel",
    54: "smoke",
    55: "stir",
    56: "take a photo",
    57: "text on/look at a cellphone",
    58: "throw",
    59: "touch (an object)",
    60: "turn (e.g., a screwdriver)",
    61: "watch (e.g., TV)",
    62: "work on a computer",
    63: "write",
    64: "fight/hit (a person)",
    65: "give/serve (an object) to (a person)",
    66: "grab (a person)",
    67: "hand clap",
    68: "hand shake",
    69: "hand wave",
    70: "hug (a person)",
    71: "kick (a person)",
    72: "kiss (a person)",
    73: "lift (a person)",
    74: "listen to (a person)",
    75: "play with kids",
    76: "push (another person)",
    77: "sing to (e.g., self, a person, a group)",
    78: "take (an object) from (a person)",
    79: "talk to (e.g., self, a person, a group)",
    80: "watch (a person)",
}
NUM_ACTIONS = len(AVA_ACTION_NAMES)

# The 20 ids the official evaluation leaves out; the remaining 60 form the released label map.
UNEVALUATED_ACTION_IDS = frozenset({2, 16, 18, 19, 21, 23, 25, 31, 32, 33, 35, 39, 40, 42, 44, 50, 53, 55, 71, 75})
EVALUATED_ACTION_IDS = tuple(sorted(set(AVA_ACTION_NAMES) - UNEVALUATED_ACTION_IDS))

BOX_COLUMNS = ("x1", "y1", "x2", "y2")
GROUNDTRUTH_COLUMNS = ("video_id", "timestamp", *BOX_COLUMNS, "action_id", "person_id")
DETECTION_COLUMNS = ("video_id", "timestamp", *BOX_COLUMNS, "action_id", "score")

# Released annotations round to 3 decimals, so a corner may sit a rounding step outside the frame.
COORDINATE_TOLERANCE = 1e-3

AVA_FPS = 30
AVA_VIDEO_OFFSET_SEC = 900.0

# Patterns of the values pyarrow's cast accepts; anything else is reported instead of failing the cast.
_INTEGER_PATTERN = r"^-?\d{1,18}$"
_NUMBER_PATTERN = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})?$"
# A separator that never occurs in a text file, so that each physical line arrives as one field.
_NO_SEPARATOR = "\x1f"


@dataclass(frozen=True)
class Rejection:
    """An input line (or a whole video) that was left out, and why."""

    source: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.reason}"


@dataclass
class Keyframe:
    """One annotated keyframe with its boxes grouped by their exact CSV text, as the released reader does."""

    video_id: str
    timestamp: int
    boxes: np.ndarray  # (n, 4) float32, normalised x1, y1, x2, y2
    actions: list[list[int]]  # action ids (1..80) of each box, in file order
    person_ids: list[int]  # of each box, as first seen; -1 for detections


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    return path


def _read_string_columns(path: Path, names: Sequence[str]) -> tuple[pa.Table, np.ndarray, list[Rejection]]:
    """A header-less CSV with every field as a (whitespace-trimmed) string.

    Returns the table, the 1-based line of each of its rows, and the lines with the wrong number of
    fields. Blank lines hold no data and are left out without a report.
    """
    skipped_lines: list[int] = []
    wrong_width: list[Rejection] = []

    def skip_invalid(row: pacsv.InvalidRow) -> str:
        skipped_lines.append(row.number)
        if row.text.strip():
            wrong_width.append(Rejection(
                str(path), row.number,
                f"{row.actual_columns} fields, expected {row.expected_columns}: {row.text!r}",
            ))
        return "skip"

    if path.stat().st_size == 0:
        empty = pa.table({name: pa.array([], pa.string()) for name in names})
        return empty, np.zeros(0, np.int64), []
    try:
        table = pacsv.read_csv(
            path,
            # Single-threaded so that every skipped row reports its line number.
            read_options=pacsv.ReadOptions(column_names=list(names), use_threads=False),
            # Blank lines become rows (not skipped) so that row order maps to line numbers.
            parse_options=pacsv.ParseOptions(invalid_row_handler=skip_invalid, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in names}, strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as error:
        raise ValueError(f"{path}: cannot read as CSV: {error}") from error
    table = pa.table({name: pc.utf8_trim_whitespace(table[name]) for name in names})
    every_line = np.arange(1, table.num_rows + len(skipped_lines) + 1)
    lines = np.setdiff1d(every_line, np.asarray(skipped_lines, np.int64), assume_unique=True)
    blank = np.ones(table.num_rows, bool)
    for name in names:
        blank &= pc.equal(table[name], "").to_numpy(zero_copy_only=False)
    return table.filter(pa.array(~blank)), lines[~blank], wrong_width


def _parse_column(column: pa.ChunkedArray, pattern: str, type_: pa.DataType) -> tuple[np.ndarray, np.ndarray]:
    """Values of a string column as ``type_`` and a mask of the rows that parsed (the others hold 0)."""
    parsed = pc.match_substring_regex(column, pattern)
    values = pc.cast(pc.if_else(parsed, column, "0"), type_)
    return values.to_numpy(zero_copy_only=False), parsed.to_numpy(zero_copy_only=False)


class _RowChecks:
    """Vectorised row checks that remember, for the failing rows only, a readable reason."""

    def __init__(self, num_rows: int) -> None:
        self.failed = np.zeros(num_rows, bool)
        self._checks: list[tuple[np.ndarray, Callable[[int], str]]] = []

    def add(self, failing: np.ndarray, describe: Callable[[int], str]) -> None:
        self.failed |= failing
        self._checks.append((failing, describe))

    def rejections(self, source: Path, lines: np.ndarray) -> list[Rejection]:
        return [
            Rejection(str(source), int(lines[row]),
                      "; ".join(describe(row) for failing, describe in self._checks if failing[row]))
            for row in np.flatnonzero(self.failed)
        ]


def read_annotations(path: str | Path, *, is_detection: bool = False) -> tuple[pa.Table, list[Rejection]]:
    """An official AVA annotation CSV (8 columns, no header), validated row by row.

    Ground truth ends with ``action_id, person_id``; detections (``is_detection``) with
    ``action_id, score``. The returned table holds the good rows with the columns ``video_id``,
    ``timestamp``, ``x1``, ``y1``, ``x2``, ``y2`` (float64), ``box_key`` (the box as written, which is
    what the released reader groups by), ``action_id``, ``person_id`` or ``score``, and ``line``
    (1-based line in the file). Every other line comes back as a Rejection.
    """
    path = _require_file(path, "annotation")
    names = DETECTION_COLUMNS if is_detection else GROUNDTRUTH_COLUMNS
    raw, lines, rejections = _read_string_columns(path, names)
    checks = _RowChecks(raw.num_rows)

    def quoted(name: str, row: int) -> str:
        return repr(raw[name][int(row)].as_py())

    checks.add(pc.equal(raw["video_id"], "").to_numpy(zero_copy_only=False), lambda row: "empty video id")
    timestamps, ok = _parse_column(raw["timestamp"], _INTEGER_PATTERN, pa.int64())
    checks.add(~ok, lambda row: f"timestamp {quoted('timestamp', row)} is not an integer")

    coordinates: dict[str, np.ndarray] = {}
    coordinate_ok: dict[str, np.ndarray] = {}
    for name in BOX_COLUMNS:
        coordinates[name], coordinate_ok[name] = _parse_column(raw[name], _NUMBER_PATTERN, pa.float64())
        checks.add(~coordinate_ok[name], lambda row, name=name: f"{name} {quoted(name, row)} is not a number")
        value = coordinates[name]
        outside = coordinate_ok[name] & ((value < -COORDINATE_TOLERANCE) | (value > 1 + COORDINATE_TOLERANCE))
        checks.add(outside, lambda row, name=name: f"{name} {coordinates[name][row]} outside [0, 1]")
    for low, high in (("x1", "x2"), ("y1", "y2")):
        both = coordinate_ok[low] & coordinate_ok[high]
        checks.add(both & (coordinates[high] <= coordinates[low]),
                   lambda row, low=low, high=high: f"{high} {coordinates[high][row]} <= {low} {coordinates[low][row]}")

    action_ids, ok = _parse_column(raw["action_id"], _INTEGER_PATTERN, pa.int64())
    checks.add(~ok, lambda row: f"action id {quoted('action_id', row)} is not an integer")
    checks.add(ok & ((action_ids < 1) | (action_ids > NUM_ACTIONS)),
               lambda row: f"action id {action_ids[row]} outside 1..{NUM_ACTIONS}")

    last = names[-1]
    if is_detection:
        last_values, ok = _parse_column(raw[last], _NUMBER_PATTERN, pa.float64())
        checks.add(~ok, lambda row: f"score {quoted(last, row)} is not a number")
    else:
        last_values, ok = _parse_column(raw[last], _INTEGER_PATTERN, pa.int64())
        checks.add(~ok, lambda row: f"person id {quoted(last, row)} is not an integer")

    keep = ~checks.failed
    mask = pa.array(keep)
    table = pa.table({
        "video_id": raw["video_id"].filter(mask),
        "timestamp": timestamps[keep],
        **{name: coordinates[name][keep] for name in BOX_COLUMNS},
        "box_key": pc.binary_join_element_wise(*(raw[name] for name in BOX_COLUMNS), ",").filter(mask),
        "action_id": action_ids[keep],
        last: last_values[keep],
        "line": lines[keep],
    })
    rejections += checks.rejections(path, lines)
    rejections.sort(key=lambda rejection: rejection.line or 0)
    return table, rejections


def group_keyframes(table: pa.Table) -> list[Keyframe]:
    """Rows of ``read_annotations`` grouped by (video, second, box text), like ``parse_bboxes_file``.

    Keyframes come sorted by video then timestamp; boxes keep their first-seen order, and each box lists
    its action ids once, in file order.
    """
    coordinates = np.stack([table[name].to_numpy() for name in BOX_COLUMNS], axis=1).astype(np.float32)
    person_ids = table["person_id"].to_pylist() if "person_id" in table.column_names else [-1] * table.num_rows
    boxes_of_keyframe: dict[tuple[str, int], dict[str, int]] = {}  # box text -> box number
    first_rows: list[int] = []  # of each box number
    box_actions: list[list[int]] = []
    rows = zip(*(table[name].to_pylist() for name in ("video_id", "timestamp", "box_key", "action_id")))
    for row, (video_id, timestamp, box_key, action_id) in enumerate(rows):
        boxes = boxes_of_keyframe.get((video_id, timestamp))
        if boxes is None:
            boxes = boxes_of_keyframe[video_id, timestamp] = {}
        box = boxes.get(box_key)
        if box is None:
            box = boxes[box_key] = len(first_rows)
            first_rows.append(row)
            box_actions.append([])
        if action_id not in box_actions[box]:
            box_actions[box].append(action_id)
    keyframes = []
    for (video_id, timestamp), boxes in sorted(boxes_of_keyframe.items(), key=lambda item: item[0]):
        rows_of_boxes = [first_rows[box] for box in boxes.values()]
        keyframes.append(Keyframe(
            video_id=video_id,
            timestamp=timestamp,
            boxes=coordinates[rows_of_boxes],
            actions=[box_actions[box] for box in boxes.values()],
            person_ids=[person_ids[row] for row in rows_of_boxes],
        ))
    return keyframes


_PBTXT_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<comment>\#[^\n]*)
      | (?P<open>(?:item|label)\s*\{)
      | (?P<close>\})
      | (?P<key>\w+)\s*:\s*(?P<value>"(?:[^"\\\n]|\\.)*"|[^\s{}"\#]+)""",
    re.VERBOSE,
)
_TEXT_LABEL = re.compile(r"^\s*(\d+)\s*:\s*(\S.*?)\s*$")


def read_label_map(path: str | Path) -> dict[int, str]:
    """Action id -> name from a label map: the pbtxt (``item {`` or, as the official v2.2 file,
    ``label {`` blocks; ``name:`` with ``id:`` or ``label_id:``, one
    field per line or several items on one line) or mmaction2's ``id: name`` text file."""
    path = _require_file(path, "label map")
    text = path.read_text()
    first = next((line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")), "")
    labels = _parse_text_label_map(path, text) if _TEXT_LABEL.match(first) else _parse_pbtxt_label_map(path, text)
    if not labels:
        raise ValueError(f"{path}: no labels found")
    return labels


def _parse_text_label_map(path: Path, text: str) -> dict[int, str]:
    labels: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _TEXT_LABEL.match(line)
        if not match:
            raise ValueError(f"{path}:{number}: expected 'id: name', got {line!r}")
        _add_label(labels, int(match[1]), match[2], path, number)
    return labels


def _parse_pbtxt_label_map(path: Path, text: str) -> dict[int, str]:
    labels: dict[int, str] = {}
    item: dict[str, str] | None = None
    item_line = 0
    position = 0
    while position < len(text):
        match = _PBTXT_TOKEN.match(text, position)
        line = text.count("\n", 0, position) + 1
        if not match:
            raise ValueError(f"{path}:{line}: cannot parse {text[position:].splitlines()[0]!r}")
        position = match.end()
        if match["open"]:
            if item is not None:
                raise ValueError(f"{path}:{line}: an item opens inside the item opened on line {item_line}")
            item, item_line = {}, line
        elif match["close"]:
            if item is None:
                raise ValueError(f"{path}:{line}: '}}' without an open item")
            _add_label(labels, *_label_of_item(item, path, item_line), path, item_line)
            item = None
        elif match["key"]:
            if item is None:
                raise ValueError(f"{path}:{line}: field {match['key']!r} outside an item")
            item[match["key"]] = match["value"]
    if item is not None:
        raise ValueError(f"{path}:{item_line}: item is never closed")
    return labels


def _label_of_item(item: dict[str, str], path: Path, line: int) -> tuple[int, str]:
    """(id, name) of a pbtxt item; fields such as ``label_type`` are not needed and are ignored."""
    raw_id = item.get("id", item.get("label_id"))
    name = item.get("name", item.get("display_name"))
    if raw_id is None or name is None:
        raise ValueError(f"{path}:{line}: item needs a name and an id (or label_id)")
    if not re.fullmatch(r"\d+", raw_id):
        raise ValueError(f"{path}:{line}: id {raw_id!r} is not a non-negative integer")
    if not (name.startswith('"') and name.endswith('"')):
        raise ValueError(f"{path}:{line}: name {name} must be a quoted string")
    return int(raw_id), name[1:-1]


def _add_label(labels: dict[int, str], action_id: int, name: str, path: Path, line: int) -> None:
    if action_id in labels:
        raise ValueError(f"{path}:{line}: id {action_id} appears twice")
    labels[action_id] = name


def read_exclusions(path: str | Path) -> set[tuple[str, int]]:
    """The (video_id, timestamp) keyframes listed in an excluded-timestamps CSV."""
    path = _require_file(path, "exclusions")
    raw, lines, wrong_width = _read_string_columns(path, ("video_id", "timestamp"))
    if wrong_width:
        raise ValueError(str(wrong_width[0]))
    timestamps, ok = _parse_column(raw["timestamp"], _INTEGER_PATTERN, pa.int64())
    empty_id = pc.equal(raw["video_id"], "").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~ok | empty_id)
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"{path}:{lines[row]}: expected 'video_id,timestamp', got "
                         f"{raw['video_id'][row].as_py()!r}, {raw['timestamp'][row].as_py()!r}")
    return set(zip(raw["video_id"].to_pylist(), timestamps.tolist()))


def read_frame_list(path: str | Path) -> dict[str, list[str]]:
    """An LFB frame list: video -> frame paths (relative to ``frames/``) in file order.

    The header line is skipped; each other line holds 5 whitespace-separated fields
    ``original_video_id video_idx frame_idx path labels``, of which the 1st and 4th are used. The
    position of a path in its video's list is the 0-based frame index, as in ``load_image_lists``.
    """
    path = _require_file(path, "frame list")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file; a frame list starts with a header line")

    unreadable: list[pacsv.InvalidRow] = []

    def set_aside(row: pacsv.InvalidRow) -> str:
        unreadable.append(row)
        return "skip"

    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=["line"], skip_rows=1, use_threads=False),
        parse_options=pacsv.ParseOptions(
            delimiter=_NO_SEPARATOR, quote_char=False, ignore_empty_lines=False, invalid_row_handler=set_aside,
        ),
        convert_options=pacsv.ConvertOptions(column_types={"line": pa.string()}, strings_can_be_null=False),
    )
    if unreadable:
        raise ValueError(f"{path}:{unreadable[0].number}: unexpected control character in {unreadable[0].text!r}")
    lines = pc.utf8_trim_whitespace(table["line"])
    fields = pc.utf8_split_whitespace(lines)
    blank = pc.equal(lines, "").to_numpy(zero_copy_only=False)
    counts = pc.list_value_length(fields).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(~blank & (counts != 5))
    if wrong.size:
        row = int(wrong[0])
        raise ValueError(f"{path}:{row + 2}: expected 5 whitespace-separated fields, got {counts[row]}: "
                         f"{table['line'][row].as_py()!r}")
    fields = fields.filter(pa.array(~blank))
    videos = pc.list_element(fields, 0).combine_chunks()
    frame_paths = pc.list_element(fields, 3).combine_chunks()
    return _group_runs(videos, frame_paths)


def _group_runs(keys: pa.Array, values: pa.Array) -> dict[str, list[str]]:
    """values grouped by key, in order. Goes run by run of equal keys: a frame list keeps each video's
    lines together, so there are few runs."""
    grouped: dict[str, list[str]] = {}
    if len(keys) == 0:
        return grouped
    codes = pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.flatnonzero(codes[1:] != codes[:-1]) + 1])
    ends = np.append(starts[1:], len(codes))
    for start, end in zip(starts.tolist(), ends.tolist()):
        grouped.setdefault(keys[start].as_py(), []).extend(values[start:end].to_pylist())
    return grouped


def keyframe_frame_index(timestamp: int, fps: int = AVA_FPS, video_offset_sec: float = AVA_VIDEO_OFFSET_SEC) -> int:
    """0-based index, in the frames of the 15-minute cut, of the keyframe at AVA second ``timestamp``."""
    return round((timestamp - video_offset_sec) * fps)


def _clip_offsets(num_frames: int, sample_rate: int) -> np.ndarray:
    """Frame offsets of a clip from its keyframe: -(num_frames // 2) * rate, ... in steps of rate.

    For an even ``num_frames`` this is PySlowFast's ``range(center - half, center + half, rate)``; for an
    odd one it still gives ``num_frames`` offsets with the keyframe at position ``num_frames // 2``.
    """
    if num_frames < 1 or sample_rate < 1:
        raise ValueError(f"num_frames ({num_frames}) and sample_rate ({sample_rate}) must be positive")
    return (np.arange(num_frames) - num_frames // 2) * sample_rate


def clip_frame_indices(center: int, num_frames: int, sample_rate: int, num_video_frames: int) -> list[int]:
    """Frame indices of the clip around keyframe index ``center``, clamped to the video's frames.

    The keyframe is element ``num_frames // 2``.
    """
    if num_video_frames < 1:
        raise ValueError(f"a video with {num_video_frames} frames has no clip")
    indices = np.clip(center + _clip_offsets(num_frames, sample_rate), 0, num_video_frames - 1)
    return indices.tolist()


def clip_sample_times(timestamp: int, num_frames: int, sample_rate: int, fps: int = AVA_FPS,
                      video_offset_sec: float = AVA_VIDEO_OFFSET_SEC) -> np.ndarray:
    """Seconds into the video file of the clip's samples on the 30 fps grid, for videos read by time.

    These are the instants of ``clip_frame_indices`` (before clamping) divided by ``fps``;
    ``nearest_frame_indices`` turns them into frames of a video with any frame rate.
    """
    center = keyframe_frame_index(timestamp, fps, video_offset_sec)
    return (center + _clip_offsets(num_frames, sample_rate)) / fps


def nearest_frame_indices(times: np.ndarray | Sequence[float], frame_times: np.ndarray | Sequence[float]) -> np.ndarray:
    """For each wanted time, the index of the frame whose presentation time is nearest.

    ``frame_times`` are the sorted start times of the video's frames (decord's
    ``get_frame_timestamp(...)[:, 0]``). Times before the first or after the last frame take that frame;
    a time exactly between two frames takes the earlier one.
    """
    frame_times = np.asarray(frame_times, np.float64)
    times = np.asarray(times, np.float64)
    if frame_times.size == 0:
        raise ValueError("the video has no frames")
    if frame_times.size == 1:
        return np.zeros(times.shape, np.int64)
    after = np.clip(np.searchsorted(frame_times, times), 1, frame_times.size - 1)
    before = after - 1
    take_after = (frame_times[after] - times) < (times - frame_times[before])
    return np.where(take_after, after, before).astype(np.int64)
