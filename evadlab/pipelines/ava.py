"""AVA files: one reader and one writer per format, and the keyframe arithmetic of the clips.

Formats: the box CSVs (ground truth ``video_id,timestamp,x1,y1,x2,y2,action_id,person_id`` and detections
``...,action_id,score``, no header), the excluded-timestamps CSV (``video_id,timestamp``), the label map (pbtxt or
mmaction2's ``id: name`` text) and the LFB frame lists. Detection rows are built from a model's arrays by
``detection_rows`` and written by ``write_detections_csv``.

What makes a CSV line malformed is written once, in ``_RULES``; a *mode* says what is done with such a line:

* ``mode="prepare"`` (building training data, following PySlowFast's ``ava_helper.load_boxes_and_labels``): a bad
  line becomes a ``Rejection`` naming the file and the 1-based line, and every other line is kept. Blank lines hold
  no data and are skipped.
* ``mode="official"`` (scoring, following the official ActivityNet / SlowFast evaluator,
  ``slowfast/utils/ava_eval_helper.py`` ``read_csv`` / ``read_exclusions`` and the TF Object Detection API's
  ``PerImageEvaluation``): every line the official reader reads is read as it reads it, so that the metric agrees
  with the official evaluation on any file it accepts. Some such lines are announced by a warning giving their count
  and first line: detections without extent (``x2 <= x1`` or ``y2 <= y1``, NaN included), which the metric leaves out
  as ``PerImageEvaluation._remove_invalid_boxes`` does (DroppedRowsWarning; they stay in the table because their
  keyframe's first appearance orders the official ranking), and what the official evaluation scores although it
  looks wrong: ground truth without extent (never filtered there, never matched), coordinates outside [0, 1],
  non-finite scores (SuspectRowsWarning). A line the official reader cannot read either (a wrong number of fields, a
  field ``int()`` / ``float()`` refuses, a blank line) refuses the whole file with a ValueError naming the file and
  line, and so does a timestamp outside 0..MAX_TIMESTAMP, which names no keyframe.

Every text file may start with a UTF-8 byte-order mark and end its lines with CRLF, as Windows editors write them.

The keyframe arithmetic maps a keyframe second to the frames of its clip, following PySlowFast's ``ava_helper`` and
``utils.get_sequence``.
"""

from __future__ import annotations

import codecs
import csv
import enum
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from evadlab import storage

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
ALL_ACTION_IDS = tuple(AVA_ACTION_NAMES)

BOX_COLUMNS = ("x1", "y1", "x2", "y2")
GROUNDTRUTH_COLUMNS = ("video_id", "timestamp", *BOX_COLUMNS, "action_id", "person_id")
DETECTION_COLUMNS = ("video_id", "timestamp", *BOX_COLUMNS, "action_id", "score")
EXCLUSION_COLUMNS = ("video_id", "timestamp")
# ``detection_rows`` adds the box's position among its keyframe's boxes, so that rows can be put in box order.
DETECTION_ROW_COLUMNS = (*DETECTION_COLUMNS, "box_index")

# What a video id cannot hold in a CSV field written without quotes, as the official files are.
VIDEO_ID_FORBIDDEN = r'[,"\r\n]'
# Released annotations round to 3 decimals, so a corner may sit a rounding step outside the frame.
COORDINATE_TOLERANCE = 1e-3
# The evaluator packs a timestamp next to a video code into one int64 image id.
MAX_TIMESTAMP = 2**31 - 1

AVA_FPS = 30
AVA_VIDEO_OFFSET_SEC = 900.0

Mode = Literal["prepare", "official"]
MODES: tuple[Mode, ...] = ("prepare", "official")
GROUNDTRUTH, DETECTIONS, EXCLUSIONS = "ground truth", "detections", "exclusions"
_BOX_FILES = (GROUNDTRUTH, DETECTIONS)
_ALL_FILES = (GROUNDTRUTH, DETECTIONS, EXCLUSIONS)

_VIDEO_ID_TYPE = pa.dictionary(pa.int32(), pa.string())
_FIELD_TYPES = {"video_id": _VIDEO_ID_TYPE, "timestamp": pa.int64(), **dict.fromkeys(BOX_COLUMNS, pa.float64()),
                "action_id": pa.int64(), "score": pa.float64(), "person_id": pa.int64()}
_FIELD_WORDS = {"video_id": "video id", "action_id": "action id", "person_id": "person id"}
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


class DroppedRowsWarning(UserWarning):
    """Rows of a file that the official evaluation leaves out (official mode reads them, the metric drops them)."""


class SuspectRowsWarning(UserWarning):
    """Rows of a file that official mode keeps and scores as the official evaluator does, although they look wrong."""


@dataclass
class Keyframe:
    """One annotated keyframe with its boxes grouped by their exact CSV text, as the released reader does."""

    video_id: str
    timestamp: int
    boxes: np.ndarray  # (n, 4) float32, normalised x1, y1, x2, y2
    actions: list[list[int]]  # action ids (1..num_actions) of each box, in file order
    person_ids: list[int]  # of each box, as first seen; -1 for detections


def _require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path once it names a text file: FileNotFoundError when it does not exist, IsADirectoryError for a
    folder, ValueError when its first 64 KiB hold a NUL byte or are not UTF-8 (a checkpoint or an image passed by
    mistake), each naming ``what`` and the path, before any parser sees the bytes."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{what} file {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    with path.open("rb") as file:
        head = file.read(1 << 16)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} file {path} is not a text file (not UTF-8 at byte {error.start})") from None
    nul = head.find(b"\0")
    if nul >= 0:
        raise ValueError(f"{what} file {path} is not a text file (a NUL byte at byte {nul})")
    return path


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------------------------------
# What makes a line malformed, once, and what each mode does with it


class _Action(enum.Enum):
    """What a mode does with a line that breaks a rule, from mildest to strictest."""

    KEEP = "keep"  # read as it is
    WARN = "warn"  # read as it is, and announced with the rule's warning
    SKIP = "skip"  # left out without a word: the line holds no data
    REJECT = "reject"  # left out and reported as a Rejection naming the file and line
    REFUSE = "refuse"  # the whole file is refused: ValueError naming the file and line


@dataclass
class _Rows:
    """The lines of a CSV that hold the expected number of fields, converted field by field."""

    path: Path
    video_ids: pa.DictionaryArray
    values: dict[str, np.ndarray]  # the numeric fields; 0 where a field did not convert
    unconverted: dict[str, np.ndarray]  # for the columns where some field did not convert: True there
    text: dict[str, pa.Array]  # every field as written, when the file was read as text
    lines: np.ndarray  # the 1-based line of each row
    other_lines: list[tuple[int, _Rule, str]]  # blank lines and lines with the wrong number of fields, and why
    num_actions: int = NUM_ACTIONS  # action ids 1..num_actions are known

    def __len__(self) -> int:
        return len(self.lines)

    def among_converted(self, failing: np.ndarray, *names: str) -> np.ndarray:
        """``failing`` where the fields ``names`` converted (elsewhere their values are placeholders)."""
        for name in names:
            if name in self.unconverted:
                failing = failing & ~self.unconverted[name]
        return failing


# Rows that break a rule in one way (one field, one pair of fields), and a description of one such row.
_Finding = tuple[np.ndarray, Callable[[int], str]]


@dataclass(frozen=True)
class _Rule:
    """One way a line can be malformed, the files it concerns and what each mode does about it."""

    prepare: _Action
    official: _Action
    files: tuple[str, ...]
    # The row-wise check; None for the two rules applied while lines are split into fields.
    check: Callable[[_Rows], list[_Finding]] | None = None
    # What announces the lines a WARN action keeps: DroppedRowsWarning when the metric leaves them out.
    warning: type[UserWarning] = SuspectRowsWarning

    def action(self, mode: Mode) -> _Action:
        return self.prepare if mode == "prepare" else self.official


def _unconverted_fields(rows: _Rows) -> list[_Finding]:
    def describe(name: str) -> Callable[[int], str]:
        kind = "an integer" if pa.types.is_integer(_FIELD_TYPES[name]) else "a number"
        return lambda row: f"{_FIELD_WORDS.get(name, name)} {rows.text[name][row].as_py()!r} is not {kind}"

    return [(failing, describe(name)) for name, failing in rows.unconverted.items()]


def _empty_video_id(rows: _Rows) -> list[_Finding]:
    empty = pc.equal(rows.video_ids.dictionary, "").to_numpy(zero_copy_only=False)
    return [(empty[rows.video_ids.indices.to_numpy(zero_copy_only=False)], lambda row: "empty video id")]


def _timestamp_outside(rows: _Rows) -> list[_Finding]:
    timestamps = rows.values["timestamp"]
    outside = rows.among_converted((timestamps < 0) | (timestamps > MAX_TIMESTAMP), "timestamp")
    return [(outside, lambda row: f"timestamp {timestamps[row]} outside 0..{MAX_TIMESTAMP}")]


def _outside_frame(rows: _Rows) -> list[_Finding]:
    """Coordinates beyond the rounding tolerance of [0, 1]; NaN too."""
    findings = []
    for name in BOX_COLUMNS:
        value = rows.values[name]
        inside = (value >= -COORDINATE_TOLERANCE) & (value <= 1 + COORDINATE_TOLERANCE)
        findings.append((rows.among_converted(~inside, name),
                         lambda row, name=name, value=value: f"{name} {value[row]} outside [0, 1]"))
    return findings


def _no_extent(rows: _Rows) -> list[_Finding]:
    """Boxes whose second corner is not beyond the first (``x2 <= x1`` or ``y2 <= y1``, NaN included): what
    ``PerImageEvaluation._remove_invalid_boxes`` removes (it keeps ``x1 < x2 and y1 < y2``)."""
    findings = []
    for low, high, extent in (("x1", "x2", "width"), ("y1", "y2", "height")):
        first, second = rows.values[low], rows.values[high]
        failing = rows.among_converted(~(first < second), low, high)
        findings.append((failing, lambda row, low=low, high=high, first=first, second=second, extent=extent:
                         f"{high} {second[row]} <= {low} {first[row]}: the box has no {extent}"))
    return findings


def _unknown_action(rows: _Rows) -> list[_Finding]:
    actions = rows.values["action_id"]
    unknown = rows.among_converted((actions < 1) | (actions > rows.num_actions), "action_id")
    return [(unknown, lambda row: f"action id {actions[row]} outside 1..{rows.num_actions}")]


def _score_not_finite(rows: _Rows) -> list[_Finding]:
    scores = rows.values["score"]
    not_finite = rows.among_converted(~np.isfinite(scores), "score")
    return [(not_finite, lambda row: f"score {scores[row]} is not a finite number")]


# A blank line holds no data, so training skips it (PySlowFast's reader would fail on it); the official reader
# asserts 2, 7 or 8 fields on every line.
_BLANK_LINE = _Rule(prepare=_Action.SKIP, official=_Action.REFUSE, files=_ALL_FILES)
_WRONG_WIDTH = _Rule(prepare=_Action.REJECT, official=_Action.REFUSE, files=_ALL_FILES)
_RULES = (
    _BLANK_LINE,
    _WRONG_WIDTH,
    # A field its column's type cannot hold, as pyarrow's CSV reader parses numbers (blanks around them ignored).
    _Rule(prepare=_Action.REJECT, official=_Action.REFUSE, files=_ALL_FILES, check=_unconverted_fields),
    # The official key "%s,%04d" takes any video id; training needs one to find the video.
    _Rule(prepare=_Action.REJECT, official=_Action.KEEP, files=_ALL_FILES, check=_empty_video_id),
    _Rule(prepare=_Action.REJECT, official=_Action.REFUSE, files=_ALL_FILES, check=_timestamp_outside),
    # The official evaluation takes coordinates as they are (IoU of the boxes as written, NaN included).
    _Rule(prepare=_Action.REJECT, official=_Action.WARN, files=_BOX_FILES, check=_outside_frame),
    # Ground truth without extent is kept by the official evaluation and never matched; such detections are left
    # out before matching (``_remove_invalid_boxes``), which the metric does. Zero extent is what rounding to 3
    # decimals makes of a thin box; an inverted box means a broken writer.
    _Rule(prepare=_Action.REJECT, official=_Action.WARN, files=(GROUNDTRUTH,), check=_no_extent),
    _Rule(prepare=_Action.REJECT, official=_Action.WARN, files=(DETECTIONS,), check=_no_extent,
          warning=DroppedRowsWarning),
    # The official reader leaves ids the label map does not list out of the evaluation, whatever they are.
    _Rule(prepare=_Action.REJECT, official=_Action.KEEP, files=_BOX_FILES, check=_unknown_action),
    # The official ranking sorts whatever float() read (np.argsort puts NaN last, so first once reversed).
    _Rule(prepare=_Action.REJECT, official=_Action.WARN, files=(DETECTIONS,), check=_score_not_finite),
)


@dataclass
class _Verdict:
    """What ``_enforce`` decided: the rows kept, the lines left out with a reason, the kept rows announced."""

    keep: np.ndarray  # bool, one per row
    rejected: list[Rejection]  # in line order
    announced: dict[type[UserWarning], list[Rejection]]  # rows kept by a WARN action, by warning, in line order


def _enforce(rows: _Rows, file: str, mode: Mode) -> _Verdict:
    """Applies the rules for ``file`` in ``mode``.

    Raises ValueError naming the file and line of the first line a rule refuses. A row that breaks several rules
    gets the strictest action, and its reason lists every rule it breaks with that action; a kept row is announced
    once, by a DroppedRowsWarning rather than a SuspectRowsWarning.
    """
    found: dict[_Action, list[_Finding]] = {action: [] for action in _Action if action is not _Action.KEEP}
    warned: dict[type[UserWarning], list[_Finding]] = {DroppedRowsWarning: [], SuspectRowsWarning: []}
    for rule in _RULES:
        action = rule.action(mode)
        if rule.check is not None and file in rule.files and action is not _Action.KEEP:
            findings = [finding for finding in rule.check(rows) if finding[0].any()]
            (warned[rule.warning] if action is _Action.WARN else found[action]).extend(findings)
    other_lines: dict[_Action, list[tuple[int, str]]] = {action: [] for action in _Action}
    for line, rule, reason in rows.other_lines:
        other_lines[rule.action(mode)].append((line, reason))
    _refuse_first(rows, found[_Action.REFUSE], other_lines[_Action.REFUSE])
    rejected = _flagged(found[_Action.REJECT], len(rows))
    left_out = rejected | _flagged(found[_Action.SKIP], len(rows))
    rejections = [Rejection(str(rows.path), int(rows.lines[row]), _reason(found[_Action.REJECT], row))
                  for row in np.flatnonzero(rejected)]
    rejections += [Rejection(str(rows.path), line, reason) for line, reason in other_lines[_Action.REJECT]]
    rejections.sort(key=lambda rejection: rejection.line)
    announced, already = {}, left_out
    for category, findings in warned.items():
        flagged = _flagged(findings, len(rows)) & ~already
        announced[category] = [Rejection(str(rows.path), int(rows.lines[row]), _reason(findings, row))
                               for row in np.flatnonzero(flagged)]
        already = already | flagged
    return _Verdict(~left_out, rejections, announced)


def _flagged(findings: list[_Finding], num_rows: int) -> np.ndarray:
    flagged = np.zeros(num_rows, bool)
    for failing, _ in findings:
        flagged |= failing
    return flagged


def _reason(findings: list[_Finding], row: int) -> str:
    return "; ".join(describe(row) for failing, describe in findings if failing[row])


def _refuse_first(rows: _Rows, findings: list[_Finding], other_lines: list[tuple[int, str]]) -> None:
    refused = list(other_lines)
    if findings:
        row = min(int(np.argmax(failing)) for failing, _ in findings)
        refused.append((int(rows.lines[row]), _reason(findings, row)))
    if refused:
        line, reason = min(refused)
        raise ValueError(f"{rows.path}:{line}: {reason}")


# ----------------------------------------------------------------------------------------------------------------
# Splitting a CSV into typed fields


def _split_rows(path: Path, names: Sequence[str], parsed: Sequence[str], *, as_text: bool) -> _Rows:
    """The lines of a header-less CSV whose lines hold the fields ``names``, with the fields ``parsed`` converted.

    Typed reading is the fast path. A file that does not read that way, or ``as_text``, is read as text and
    converted field by field, which finds every line and field that is wrong.
    """
    if path.stat().st_size == 0:
        return _Rows(path, pa.array([], _VIDEO_ID_TYPE), {name: np.zeros(0, _numpy_type(name)) for name in parsed[1:]},
                     {}, {name: pa.array([], pa.string()) for name in parsed}, np.zeros(0, np.int64), [])
    if not as_text:
        try:
            return _read_typed(path, names, parsed)
        except pa.ArrowInvalid:
            pass  # the text reading finds and names what is wrong
    return _read_text(path, names, parsed)


def _numpy_type(name: str) -> np.dtype:
    return np.dtype(_FIELD_TYPES[name].to_pandas_dtype())


def _convert_options(column_types: Mapping[str, pa.DataType]) -> pacsv.ConvertOptions:
    # No null spellings: an empty or "NA" field is malformed, not missing.
    return pacsv.ConvertOptions(column_types=dict(column_types), include_columns=list(column_types), null_values=[],
                                quoted_strings_can_be_null=False, strings_can_be_null=False)


def _read_typed(path: Path, names: Sequence[str], parsed: Sequence[str]) -> _Rows:
    """Raises ArrowInvalid at the first line that does not split or convert (a blank line fails its timestamp)."""
    table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=list(names)),
                           parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
                           convert_options=_convert_options({name: _FIELD_TYPES[name] for name in parsed}))
    values = {name: table.column(name).to_numpy() for name in parsed[1:]}
    return _Rows(path, table.column("video_id").combine_chunks(), values, {}, {}, np.arange(1, table.num_rows + 1), [])


def _read_text(path: Path, names: Sequence[str], parsed: Sequence[str]) -> _Rows:
    other_lines: list[tuple[int, _Rule, str]] = []

    def set_aside(row: pacsv.InvalidRow) -> str:
        if row.text.strip():
            reason = f"{row.actual_columns} fields, expected {row.expected_columns}: {row.text!r}"
            other_lines.append((row.number, _WRONG_WIDTH, reason))
        else:
            other_lines.append((row.number, _BLANK_LINE, "blank line"))
        return "skip"

    table = pacsv.read_csv(
        path,
        # Single-threaded so that every line set aside reports its number.
        read_options=pacsv.ReadOptions(column_names=list(names), use_threads=False),
        # A blank line becomes a row of empty fields (not skipped), so that row order maps to line numbers.
        parse_options=pacsv.ParseOptions(ignore_empty_lines=False, invalid_row_handler=set_aside),
        convert_options=_convert_options(dict.fromkeys(parsed, pa.string())),
    )
    set_aside_lines = np.asarray([line for line, _, _ in other_lines], np.int64)
    lines = np.setdiff1d(np.arange(1, table.num_rows + len(set_aside_lines) + 1), set_aside_lines, assume_unique=True)
    blank = np.ones(table.num_rows, bool)
    for name in parsed:
        blank &= pc.equal(table.column(name), "").to_numpy(zero_copy_only=False)
    other_lines += [(int(line), _BLANK_LINE, "blank line") for line in lines[blank]]
    text = {name: table.column(name).filter(pa.array(~blank)).combine_chunks() for name in parsed}
    values, unconverted = {}, {}
    for name in parsed[1:]:
        values[name], failing = _convert(text[name], _FIELD_TYPES[name])
        if failing.any():
            unconverted[name] = failing
    return _Rows(path, pc.dictionary_encode(text["video_id"]), values, unconverted, text, lines[~blank], other_lines)


def _convert(text: pa.Array, value_type: pa.DataType) -> tuple[np.ndarray, np.ndarray]:
    """The fields as ``value_type`` (0 where they do not convert) and the mask of those that do not.

    Converts like the typed CSV reader: blanks around a field are ignored. The distinct values that fail are found
    by halving, so a column with many bad fields costs a few conversions per distinct bad value.
    """
    trimmed = pc.utf8_trim_whitespace(text)
    try:
        return pc.cast(trimmed, value_type).to_numpy(zero_copy_only=False), np.zeros(len(text), bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    distinct = pc.unique(trimmed)
    failing = pc.is_in(trimmed, value_set=distinct.filter(pa.array(_unconvertible(distinct, value_type))))
    values = pc.cast(pc.if_else(failing, "0", trimmed), value_type)
    return values.to_numpy(zero_copy_only=False), failing.to_numpy(zero_copy_only=False)


def _unconvertible(values: pa.Array, value_type: pa.DataType) -> np.ndarray:
    """Which of ``values`` do not cast to ``value_type``; a slice that casts as a whole holds none."""
    failing = np.zeros(len(values), bool)
    pending = [(0, len(values))]
    while pending:
        start, stop = pending.pop()
        try:
            pc.cast(values.slice(start, stop - start), value_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            middle = (start + stop) // 2
            if stop - start == 1:
                failing[start] = True
            else:
                pending += [(start, middle), (middle, stop)]
    return failing


# ----------------------------------------------------------------------------------------------------------------
# Readers


def read_annotations(path: str | Path, *, is_detection: bool = False, mode: Mode = "prepare",
                     num_actions: int = NUM_ACTIONS) -> tuple[pa.Table, list[Rejection]]:
    """An AVA box CSV (no header), checked line by line against ``_RULES`` in ``mode``.

    Ground truth ends with ``action_id, person_id``; detections (``is_detection``) with ``action_id, score``. In
    official mode ground truth may have 7 fields (the first line decides) and its person id is not read, as the
    official ``read_csv`` does not read it. Prepare mode rejects action ids outside ``1..num_actions`` (the model's
    outputs, ``model.num_actions``); official mode reads any id.

    Returns the rows kept, in file order, with the columns ``video_id`` (dictionary-encoded string), ``timestamp``
    (int64, AVA seconds), ``x1``, ``y1``, ``x2``, ``y2`` (float64, normalised to [0, 1]), ``action_id`` (int64),
    ``person_id`` (int64, prepare-mode ground truth) or ``score`` (float64, detections), ``line`` (int64, 1-based)
    and, in prepare mode, ``box_key``: the box as written, which is what PySlowFast's ``load_boxes_and_labels``
    groups by. The Rejections are the lines left out and why, in line order. Official mode keeps every line the
    official reader reads and announces those the metric will leave out with one DroppedRowsWarning, those scored
    although they look wrong with one SuspectRowsWarning (each gives the count and the first line). Raises
    FileNotFoundError, IsADirectoryError or ValueError for a path that is no text file (:func:`_require_file`), and
    ValueError naming the file and line of a line official mode refuses.
    """
    _check_mode(mode)
    path = _require_file(path, "detections" if is_detection else "annotation")
    file = DETECTIONS if is_detection else GROUNDTRUTH
    names, parsed = _box_fields(path, file, mode)
    rows = _split_rows(path, names, parsed, as_text=mode == "prepare")
    rows.num_actions = num_actions
    verdict = _enforce(rows, file, mode)
    for category, announced in verdict.announced.items():
        _announce(announced, category)
    return _box_table(rows, parsed, verdict.keep, with_box_key=mode == "prepare"), verdict.rejected


_ANNOUNCEMENTS = {DroppedRowsWarning: "left out, as the official evaluator leaves them out",
                  SuspectRowsWarning: "kept and scored as the official evaluator scores them"}


def _announce(rows: list[Rejection], category: type[UserWarning]) -> None:
    """One warning for some rows of one file: how many, and the first of them."""
    if rows:
        first = rows[0]
        warnings.warn(f"{first.source}: {len(rows)} row(s) {_ANNOUNCEMENTS[category]}; the first, line {first.line}: "
                      f"{first.reason}", category, stacklevel=3)


def _box_fields(path: Path, file: str, mode: Mode) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The fields every line holds and those that are read."""
    if file == DETECTIONS:
        return DETECTION_COLUMNS, DETECTION_COLUMNS
    if mode == "prepare":
        return GROUNDTRUTH_COLUMNS, GROUNDTRUTH_COLUMNS
    without_person = GROUNDTRUTH_COLUMNS[:-1]
    return (GROUNDTRUTH_COLUMNS if _first_line_width(path) == len(GROUNDTRUTH_COLUMNS) else without_person,
            without_person)


def _first_line_width(path: Path) -> int:
    with open(path, newline="", encoding="utf-8") as lines:
        return len(next(csv.reader(lines), []))


def _box_table(rows: _Rows, parsed: Sequence[str], keep: np.ndarray, *, with_box_key: bool) -> pa.Table:
    every_row = bool(keep.all())
    mask = pa.array(keep)
    columns = {"video_id": rows.video_ids if every_row else rows.video_ids.filter(mask)}
    columns.update({name: rows.values[name] if every_row else rows.values[name][keep] for name in parsed[1:]})
    columns["line"] = rows.lines if every_row else rows.lines[keep]
    if with_box_key:
        columns["box_key"] = pc.binary_join_element_wise(*(rows.text[name] for name in BOX_COLUMNS), ",").filter(mask)
    return pa.table(columns)


def read_boxes_csv(path: str | Path, *, is_detection: bool, class_ids: Iterable[int] | None = None,
                   excluded: Iterable[tuple[str, int]] = ()) -> pa.Table:
    """A box CSV as the official evaluator reads it: ``read_annotations(mode="official")`` shaped for ``frame_map``.

    Columns, in file order: ``key`` (the official image key ``"%s,%04d" % (video_id, timestamp)``,
    dictionary-encoded), ``x1``, ``y1``, ``x2``, ``y2``, ``class_id`` and ``score`` (1.0 for ground truth). Only rows
    of ``class_ids`` (all when None) outside the ``excluded`` keyframes (``read_exclusions``) are kept, as
    ``ava_eval_helper.read_csv`` and ``run_evaluation`` keep them. Warns and raises as ``read_annotations``.
    """
    table, _ = read_annotations(path, is_detection=is_detection, mode="official")
    keys = _row_image_keys(table.column("video_id").combine_chunks(), table.column("timestamp").to_numpy())
    score = table.column("score") if is_detection else pa.repeat(pa.scalar(1.0), table.num_rows)
    boxes = pa.table({"key": keys, **{name: table.column(name) for name in BOX_COLUMNS},
                      "class_id": table.column("action_id"), "score": score})
    if is_detection and class_ids is not None:
        _announce_unlisted_classes(path, table.column("action_id").to_numpy(), class_ids)
    keep = _kept_rows(table.column("action_id").to_numpy(), keys, class_ids, excluded)
    return boxes if pc.all(keep).as_py() else boxes.filter(keep)


def _announce_unlisted_classes(path: str | Path, class_of_row: np.ndarray, class_ids: Iterable[int]) -> None:
    """Warns (DroppedRowsWarning) of detections whose action id lies outside the label map's range 1..max id, which
    the official evaluator leaves out without a word (a wrong label map, or ids off by one). Ids inside the range that
    the label map does not list are routine (EVAD scores AVA's 80 actions, its label map lists the 60 evaluated) and
    are left out silently, as there; a file of no detections at all is announced too. Rows are lines in official mode
    (any line it cannot read stops it), so the first one's line is its index + 1."""
    if not len(class_of_row):
        warnings.warn(f"{path}: no detections: every class scores AP 0", DroppedRowsWarning, stacklevel=3)
        return
    highest = max(class_ids, default=0)
    outside = (class_of_row < 1) | (class_of_row > highest)
    if outside.any():
        first = int(np.argmax(outside))
        warnings.warn(f"{path}: {int(outside.sum())} row(s) left out, as the official evaluator leaves them out; the "
                      f"first, line {first + 1}: action id {int(class_of_row[first])} is outside the label map's ids "
                      f"1..{highest}", DroppedRowsWarning, stacklevel=3)


def _row_image_keys(videos: pa.DictionaryArray, timestamps: np.ndarray) -> pa.DictionaryArray:
    """Per-row ``"video,%04d"`` key, dictionary-encoded so each distinct key is formatted once."""
    video_codes = videos.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    images = pc.dictionary_encode(pa.array((video_codes << 32) | timestamps))
    packed = images.dictionary.to_numpy()
    key_strings = _image_key_strings(videos.dictionary.take(pa.array(packed >> 32)), packed & 0xFFFFFFFF)
    return pa.DictionaryArray.from_arrays(images.indices, key_strings)


def _image_key_strings(videos: pa.Array, timestamps: np.ndarray) -> pa.Array:
    """``"%s,%04d" % (video, timestamp)`` (the official ``make_image_key``) for non-negative timestamps, vectorised."""
    seconds = pc.utf8_lpad(pc.cast(pa.array(timestamps, pa.int64()), pa.string()), width=4, padding="0")
    return pc.binary_join_element_wise(videos, seconds, ",")


def _kept_rows(class_of_row: np.ndarray, image_keys: pa.DictionaryArray, class_ids: Iterable[int] | None,
               excluded: Iterable[tuple[str, int]]) -> pa.Array:
    keep = np.ones(len(class_of_row), dtype=bool) if class_ids is None else np.isin(class_of_row, list(class_ids))
    excluded = list(excluded)
    videos, timestamps = zip(*excluded) if excluded else ((), ())
    excluded_keys = _image_key_strings(pa.array(videos, pa.string()), np.asarray(timestamps, np.int64))
    if len(excluded_keys) and len(class_of_row):
        excluded_image = pc.is_in(image_keys.dictionary, value_set=excluded_keys).to_numpy(zero_copy_only=False)
        keep &= ~excluded_image[image_keys.indices.to_numpy()]
    return pa.array(keep)


def read_exclusions(path: str | Path) -> set[tuple[str, int]]:
    """The (video_id, timestamp) keyframes of an excluded-timestamps CSV (``video_id,timestamp`` lines).

    Read in official mode, as the official ``read_exclusions`` (2 fields a line). Raises FileNotFoundError, and
    ValueError naming the file and line of a malformed line.
    """
    path = _require_file(path, "exclusions")
    rows = _split_rows(path, EXCLUSION_COLUMNS, EXCLUSION_COLUMNS, as_text=False)
    keep = _enforce(rows, EXCLUSIONS, "official").keep
    return set(zip(rows.video_ids.filter(pa.array(keep)).to_pylist(), rows.values["timestamp"][keep].tolist()))


def group_keyframes(table: pa.Table) -> list[Keyframe]:
    """Rows of prepare-mode ``read_annotations`` grouped by (video, second, box text), like ``parse_bboxes_file``.

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
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as Windows editors write, is not a field
    first = next((line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")), "")
    labels = _parse_text_label_map(path, text) if _TEXT_LABEL.match(first) else _parse_pbtxt_label_map(path, text)
    if not labels:
        raise ValueError(f"{path}: no labels found")
    return labels


def distinct_class_names(labels: Mapping[int, str]) -> dict[int, str]:
    """The label map's names, each shared name followed by its id (``action3 (id 79)``): label maps may give two ids
    one name (mmaction2's sample names 79 and 80 both "action3"), and results keyed by name would lose one."""
    counts = Counter(labels.values())
    return {class_id: name if counts[name] == 1 else f"{name} (id {class_id})" for class_id, name in labels.items()}


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



# ----------------------------------------------------------------------------------------------------------------
# Detection rows and the detections writer


def detection_rows(video_id: str, timestamp: int, boxes: np.ndarray, action_scores: np.ndarray,
                   class_ids: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """The detection rows of one keyframe: one per box and class id, box by box, classes in the order given.

    ``boxes`` is (n, 4): normalised x1, y1, x2, y2. ``action_scores`` is (n, A), the score of AVA action id ``j`` in
    column ``j - 1`` (A = NUM_ACTIONS for EVAD's head). ``class_ids`` are the action ids to emit: the label map's,
    or ALL_ACTION_IDS. Returns the DETECTION_ROW_COLUMNS, n * len(class_ids) values each: ``video_id`` (object),
    ``timestamp``, ``action_id`` and ``box_index`` (int64), coordinates and ``score`` in the dtype given. Raises
    ValueError when the shapes disagree or a class id has no score column.
    """
    boxes, action_scores = np.asarray(boxes), np.asarray(action_scores)
    class_ids = np.asarray(class_ids, np.int64).reshape(-1)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or action_scores.ndim != 2 or len(action_scores) != len(boxes):
        raise ValueError(f"boxes must be (n, 4) and action scores (n, num_actions), got {boxes.shape} and "
                         f"{action_scores.shape}")
    if class_ids.size and (class_ids.min() < 1 or class_ids.max() > action_scores.shape[1]):
        raise ValueError(f"class ids must lie in 1..{action_scores.shape[1]} (the score columns), got "
                         f"{class_ids.min()}..{class_ids.max()}")
    num_rows, per_box = len(boxes) * len(class_ids), len(class_ids)
    return {
        "video_id": np.full(num_rows, video_id, dtype=object),
        "timestamp": np.full(num_rows, timestamp, dtype=np.int64),
        **{name: np.repeat(boxes[:, axis], per_box) for axis, name in enumerate(BOX_COLUMNS)},
        "action_id": np.tile(class_ids, len(boxes)),
        "score": action_scores[:, class_ids - 1].reshape(-1),
        "box_index": np.repeat(np.arange(len(boxes), dtype=np.int64), per_box),
    }


def stack_detection_rows(parts: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The rows of several ``detection_rows`` results as one set of columns, in the order given."""
    parts = list(parts) or [detection_rows("", 0, np.zeros((0, 4)), np.zeros((0, NUM_ACTIONS)), ())]
    return {name: np.concatenate([part[name] for part in parts]) for name in DETECTION_ROW_COLUMNS}


def write_detections_csv(path: str | Path, detections: pa.Table | Mapping) -> None:
    """Writes detections in the official format ``video_id,%04d,x1,y1,x2,y2,action_id,score`` (``%.3f``
    coordinates, ``%.4f`` score, as SlowFast's ``write_results``), atomically (``storage.atomic_write``).

    ``detections`` has the DETECTION_COLUMNS (others are ignored), one row per line in that order; ``path`` may be a
    storage URI. Raises ValueError for a missing column, a video id with a comma, quote or line break, a timestamp
    outside 0..MAX_TIMESTAMP or a number that is not finite.
    """
    table = detections if isinstance(detections, pa.Table) else pa.table(dict(detections))
    missing = [name for name in DETECTION_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"detections lack column(s) {missing}; they have {table.column_names}")
    lines = _detection_lines(table)
    with storage.atomic_write(path) as out:
        _write_strings(out, lines)


def _detection_lines(table: pa.Table) -> pa.Array:
    videos = pc.cast(table.column("video_id"), pa.string()).combine_chunks()
    if pc.any(pc.match_substring_regex(videos, VIDEO_ID_FORBIDDEN)).as_py():
        raise ValueError("video ids must not contain commas, quotes or line breaks")
    timestamps = table.column("timestamp").to_numpy().astype(np.int64)
    if ((timestamps < 0) | (timestamps > MAX_TIMESTAMP)).any():
        raise ValueError(f"timestamps must be whole seconds between 0 and {MAX_TIMESTAMP}")
    columns = [_image_key_strings(videos, timestamps)]
    columns += [_fixed_point_strings(table.column(name).to_numpy().astype(np.float64), 3) for name in BOX_COLUMNS]
    columns.append(pc.cast(pa.array(table.column("action_id").to_numpy().astype(np.int64)), pa.string()))
    columns.append(_fixed_point_strings(table.column("score").to_numpy().astype(np.float64), 4))
    return pc.binary_join_element_wise(*columns, ",")


def _fixed_point_strings(values: np.ndarray, decimals: int) -> pa.Array:
    """``"%.{decimals}f" % value`` for every value, vectorised.

    Rounding ``value * 10**decimals`` to an integer agrees with Python's exact decimal rounding except within
    the product's rounding error of a half-way point; those few values (and huge ones, where that error grows)
    are formatted by Python itself.
    """
    if not np.isfinite(values).all():
        raise ValueError("detections contain a coordinate or score that is not a finite number")
    scale = 10**decimals
    scaled = np.abs(values) * scale
    rounded = np.rint(scaled)
    exact_only = (np.abs(scaled - np.floor(scaled) - 0.5) < 1e-6) | (scaled >= 1e9)
    rounded = np.where(exact_only, 0, rounded).astype(np.int64)
    whole = pc.cast(pa.array(rounded // scale), pa.string())
    fraction = pc.utf8_lpad(pc.cast(pa.array(rounded % scale), pa.string()), width=decimals, padding="0")
    text = pc.binary_join_element_wise(whole, fraction, ".")
    text = pc.if_else(pa.array(np.signbit(values)), pc.binary_join_element_wise("-", text, ""), text)
    if exact_only.any():
        exact = pa.array([f"{value:.{decimals}f}" for value in values[exact_only]], pa.string())
        text = pc.replace_with_mask(text, pa.array(exact_only), exact)
    return text


def _write_strings(out: IO[bytes], lines: pa.Array) -> None:
    """Writes each string followed by a newline, straight from the Arrow buffers."""
    terminated = pc.cast(pc.binary_join_element_wise(lines, "", "\n"), pa.large_string())
    if len(terminated) == 0:
        return
    offsets = np.frombuffer(terminated.buffers()[1], dtype=np.int64)[terminated.offset:]
    data = terminated.buffers()[2]
    out.write(memoryview(data)[offsets[0]:offsets[len(terminated)]])


# ----------------------------------------------------------------------------------------------------------------
# Keyframe arithmetic


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
