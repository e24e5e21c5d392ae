"""Reading and writing EVAD checkpoints (always read with ``torch.load(..., weights_only=True)``).

A file is read once, by :func:`read_checkpoint` (a local path or an open binary file; storage and MLflow URIs are
resolved by ``evadlab.platform.modeling.open_checkpoint``), into a :class:`Checkpoint`; the loaders take that.

- Complete detectors load strictly (:func:`load_evad_checkpoint`): the released files
  (``{"epoch", "model_state", "optimizer_state", "cfg", ...}``), files whose weights sit under ``model`` or ``module``
  (as the released test loader accepts), bare state_dicts and our own training checkpoints. No key map is needed:
  the module names of :class:`~evadlab.models.evad.EVAD` equal the released keys.
- VideoMAE / VideoMAEv2 backbones, fine-tuned classifiers or self-supervised pre-training files, are renamed to EVAD
  names and loaded partially (:func:`load_pretrained_backbone`): the backbone must fit completely, the rest of the
  detector keeps its initialisation.
- Our training checkpoints are written atomically in the released layout plus a few fields of our own
  (:func:`save_training_checkpoint`, :func:`load_training_checkpoint`).
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from evadlab.storage import write_bytes

# Keys under which a checkpoint file keeps the weights, in the order the original loaders look for them.
_WEIGHT_KEYS = ("model", "module", "model_state")
_DDP_PREFIX = "module."
# Backbone parameters that every usable pre-trained checkpoint provides. The final ``norm`` is not among them: the
# fine-tuned VideoMAE classifiers have none (they pool into ``fc_norm``), so EVAD's stays at its initialisation.
_REQUIRED_BACKBONE_PREFIXES = ("patch_embed.", "blocks.")
_BACKBONE_PREFIXES = (*_REQUIRED_BACKBONE_PREFIXES, "norm.")
# The self-supervised VideoMAE decoder and its projection map onto the Context Refinement Decoder of the head.
_PRETRAIN_HEAD_PREFIXES = ("decoder.", "encoder_to_decoder.")

TRAINING_CHECKPOINT_FORMAT = "evadlab-training-1"
_TRAINING_FIELDS = ("epoch", "model_state", "optimizer_state", "cfg")
# Key lists in error messages stop after this many per kind; the count says how many there are.
_KEYS_SHOWN = 5


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint, or does not fit the model; the one-line message names the file and,
    for a misfit, the first offending keys with both shapes."""


@dataclass
class Checkpoint:
    """One checkpoint file as read by :func:`read_checkpoint`: ``payload`` is its top-level dict (tensors on the
    CPU), ``source`` where it came from (for messages)."""

    source: str
    payload: dict[str, Any]

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The state_dict inside (under ``model``, ``module`` or ``model_state``, or the file itself when it is a bare
        state_dict), without a DDP ``module.`` prefix. Raises CheckpointError when there is none."""
        return _strip_ddp_prefix(_weights_of(self.payload, self.source))

    @property
    def config_text(self) -> str | None:
        """The evadlab experiment config stored with the weights (YAML), if the file is one of ours."""
        text = self.payload.get("cfg")
        return text if isinstance(text, str) and self.payload.get("format") == TRAINING_CHECKPOINT_FORMAT else None

    @property
    def epoch(self) -> int | None:
        return self.payload.get("epoch")

    @property
    def extra(self) -> dict[str, Any]:
        return dict(self.payload.get("extra") or {})


@dataclass
class LoadReport:
    """What a load did: model keys written, checkpoint keys skipped (with the reason), model keys left as they were."""

    path: str
    loaded: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    not_loaded: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.path}: loaded {len(self.loaded)} tensors"]
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} checkpoint keys:")
            lines += [f"  {key}: {reason}" for key, reason in self.ignored.items()]
        if self.not_loaded:
            # Hundreds of head keys stay at their initialisation after a backbone load; per-module counts read better.
            per_module = Counter(".".join(key.rsplit(".", 1)[0].split(".")[:2]) for key in self.not_loaded)
            counts = ", ".join(f"{module} ({count})" for module, count in per_module.items())
            lines.append(f"{len(self.not_loaded)} model keys keep their initial values: {counts}")
        return "\n".join(lines)


def load_evad_checkpoint(model: nn.Module, checkpoint: Checkpoint) -> LoadReport:
    """Load a complete EVAD checkpoint; any missing, unexpected or wrong-shape key raises :class:`CheckpointError`."""
    state, path = checkpoint.weights, checkpoint.source
    expected = model.state_dict()
    problems = _problem_lines(
        missing=[key for key in expected if key not in state],
        unexpected=[key for key in state if key not in expected],
        wrong_shape=[
            f"{key} {tuple(tensor.shape)} vs model {tuple(expected[key].shape)}"
            for key, tensor in state.items()
            if key in expected and tensor.shape != expected[key].shape
        ],
    )
    if problems:
        raise CheckpointError(f"{path} does not fit the configured model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return LoadReport(path=str(path), loaded=list(expected))


def load_pretrained_backbone(model: nn.Module, checkpoint: Checkpoint) -> LoadReport:
    """Initialise the backbone (and, from a pre-training file, the decoder) from a VideoMAE / VideoMAEv2 checkpoint.

    Keys are renamed to EVAD names (:func:`videomae_to_evad_key`) and loaded where the model has a tensor of that
    name and shape; everything else is reported as ignored. The backbone itself must fit exactly: a missing block, an
    extra block or a wrong shape (say ViT-L weights for a ViT-B model) raises :class:`CheckpointError`, because a
    backbone left partly at random initialisation would only show up weeks later as a poor mAP.
    """
    source, path = checkpoint.weights, checkpoint.source
    expected = model.state_dict()
    report = LoadReport(path=path)
    loadable: dict[str, torch.Tensor] = {}
    unexpected_backbone: list[str] = []
    wrong_shape_backbone: list[str] = []
    for source_key, tensor in source.items():
        key = videomae_to_evad_key(source_key)
        if key not in expected:
            report.ignored[source_key] = _why_unused(key)
            if key.startswith(_REQUIRED_BACKBONE_PREFIXES):
                unexpected_backbone.append(source_key)
        elif tensor.shape != expected[key].shape:
            mismatch = f"{source_key} {tuple(tensor.shape)} vs model {key} {tuple(expected[key].shape)}"
            report.ignored[source_key] = f"wrong shape: {mismatch}"
            if key.startswith(_BACKBONE_PREFIXES):
                wrong_shape_backbone.append(mismatch)
        else:
            loadable[key] = tensor
    problems = _problem_lines(
        missing=[key for key in expected if key.startswith(_REQUIRED_BACKBONE_PREFIXES) and key not in loadable],
        unexpected=unexpected_backbone,
        wrong_shape=wrong_shape_backbone,
    )
    if problems:
        raise CheckpointError(f"{path} does not fit the backbone of the configured model: " + "; ".join(problems))

    model.load_state_dict(loadable, strict=False)
    report.loaded = list(loadable)
    report.not_loaded = [key for key in expected if key not in loadable]
    return report


def videomae_to_evad_key(key: str) -> str:
    """The EVAD name of a VideoMAE / VideoMAEv2 checkpoint key.

    ``backbone.`` and DDP ``module.`` wrappers are dropped; the pre-training encoder (``encoder.X``) is the EVAD
    backbone (``X``); the pre-training decoder and its input projection live in EVAD's detection head. Other names
    (fine-tuned ``blocks.*``, ``patch_embed.*``) are EVAD names already.
    """
    for wrapper in (_DDP_PREFIX, "backbone."):
        key = key.removeprefix(wrapper)
    if key.startswith("encoder."):
        return key.removeprefix("encoder.")
    if key.startswith(_PRETRAIN_HEAD_PREFIXES):
        return "det_head." + key
    return key


def save_training_checkpoint(path: str | Path, **fields: Any) -> str | Path:
    """Write a training checkpoint (:func:`training_checkpoint_bytes` of ``fields``) atomically to ``path``, a local
    path or a storage URI (see :mod:`evadlab.storage`): readers see the previous file or the complete new one, never a
    part. Returns ``path``."""
    write_bytes(path, training_checkpoint_bytes(**fields))
    return path


def training_checkpoint_bytes(
    *,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any],
    epoch: int,
    config_yaml: str,
    extra: Mapping[str, Any] | None = None,
) -> memoryview:
    """The content of a training checkpoint file, serialized in memory (tensors on any device are copied).

    The layout is that of the released EVAD files (``model_state`` without a DDP prefix, ``optimizer_state``,
    ``epoch``, ``cfg`` as YAML text), so :func:`load_evad_checkpoint` reads it too. ``extra`` must hold only what
    ``torch.load(weights_only=True)`` accepts: tensors, numbers, strings, and lists / dicts of them.
    """
    payload = {
        "epoch": epoch,
        "model_state": _strip_ddp_prefix(dict(model_state)),
        "optimizer_state": dict(optimizer_state),
        "cfg": config_yaml,
        "format": TRAINING_CHECKPOINT_FORMAT,
        "extra": dict(extra or {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getbuffer()


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_training_checkpoint` (tensors on the CPU)."""
    payload = read_checkpoint(path).payload
    absent = [name for name in _TRAINING_FIELDS if name not in payload]
    if absent:
        raise CheckpointError(f"{path} is not a training checkpoint: it lacks {', '.join(absent)}")
    return payload


def read_checkpoint(source: str | os.PathLike | IO[bytes], name: str | None = None) -> Checkpoint:
    """Read a checkpoint file (a local path, or an open binary file called ``name`` in messages) with
    ``weights_only=True``.

    Raises CheckpointError, naming the file, when it does not exist or is a folder, is not a PyTorch file or is
    truncated, holds Python objects other than tensors and plain containers, or is not a dict.
    """
    name = name or str(source)
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        raise CheckpointError(f"checkpoint {name} is a folder, not a checkpoint file")
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise CheckpointError(f"checkpoint {name} does not exist")
    try:
        # VideoMAE's save_model stores its command-line arguments (an argparse.Namespace) under "args"; a Namespace
        # only holds attributes, so it is safe to allow next to the tensors and plain containers weights_only reads.
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(_unpickling_problem(name, error)) from None
    except Exception as error:  # noqa: BLE001 - a damaged file fails anywhere in torch's reader, in many ways
        raise CheckpointError(f"{name} is not a PyTorch checkpoint or is truncated ({_first_sentence(error)})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{name} holds a {type(payload).__name__}, not a dict of weights")
    return Checkpoint(source=name, payload=payload)


def _unpickling_problem(name: str, error: pickle.UnpicklingError) -> str:
    """One line for a refused unpickle. torch's own message suggests ``weights_only=False``; evadlab never loads
    arbitrary Python objects, so only the object that was refused is named."""
    refused = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", str(error))
    if refused:
        return f"{name} holds Python objects that weights_only loading refuses ({refused[1]}); it is not a checkpoint"
    return f"{name} is not a PyTorch checkpoint ({_first_sentence(error)})"


def _first_sentence(error: BaseException) -> str:
    """The start of an exception's message; torch's errors go on for paragraphs."""
    text = " ".join(str(error).split()).split(". ")[0]
    return text if isinstance(error, RuntimeError) and text else f"{type(error).__name__} {text}".strip()


def _weights_of(payload: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict inside a checkpoint file, or the file itself when it is a bare state_dict."""
    for key in _WEIGHT_KEYS:
        if key in payload:
            return dict(payload[key])
    if payload and all(isinstance(value, torch.Tensor) for value in payload.values()):
        return payload
    raise CheckpointError(f"{path} has no weights: none of {', '.join(_WEIGHT_KEYS)} among {sorted(payload)}")


def _strip_ddp_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.removeprefix(_DDP_PREFIX): value for key, value in state.items()}


def _problem_lines(*, missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> list[str]:
    """One phrase per kind of problem: the count and the first few keys."""
    named = {"missing keys": missing, "unexpected keys": unexpected, "wrong shapes (checkpoint vs model)": wrong_shape}
    return [f"{len(keys)} {what}: {', '.join(keys[:_KEYS_SHOWN])}{', ...' if len(keys) > _KEYS_SHOWN else ''}"
            for what, keys in named.items() if keys]


def _why_unused(evad_key: str) -> str:
    if "pos_embed" in evad_key:
        return "position tables are fixed sinusoids, recomputed rather than loaded"
    return f"EVAD has no {evad_key}"
