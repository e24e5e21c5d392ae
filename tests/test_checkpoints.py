import argparse
import copy
import fractions
from pathlib import Path

import pytest
import torch

from evadlab.models import EVAD, EVADConfig
from evadlab.models.checkpoints import (
    CheckpointError,
    load_evad_checkpoint,
    load_pretrained_backbone,
    load_training_checkpoint,
    read_checkpoint,
    save_training_checkpoint,
)

BACKBONE_PREFIXES = ("patch_embed.", "blocks.")
# Parts of a VideoMAE pre-training decoder block; EVAD's decoder blocks add an action head on top.
PRETRAIN_DECODER_PARTS = ("norm1.", "attn.", "norm2.", "mlp.")


def read_key_list(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """The companion files: one `name (shape) dtype` line per state_dict entry."""
    keys = {}
    for line in path.read_text().splitlines():
        name, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        keys[name] = (tuple(int(size) for size in shape.strip("()").split(",") if size.strip()), dtype)
    return keys


def tiny_model(seed: int) -> EVAD:
    torch.manual_seed(seed)
    return EVAD(EVADConfig.tiny())


def assert_same_values(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def built_models() -> tuple[EVAD, EVAD]:
    """Two tiny models of different seeds, built once: each test gets its own copies (:func:`copy.deepcopy` takes
    ~30 ms, building one ~0.3 s)."""
    return tiny_model(seed=0), tiny_model(seed=1)


@pytest.fixture
def source_model(built_models) -> EVAD:
    return copy.deepcopy(built_models[0])


@pytest.fixture
def target_model(built_models) -> EVAD:
    return copy.deepcopy(built_models[1])


@pytest.mark.parametrize(
    ("variant", "key_file", "num_keys"),
    [("vit_b", "evad_vit_b_state_dict.txt", 529), ("vit_l", "evad_vit_l_state_dict.txt", 793)],
)
def test_state_dict_equals_the_released_key_list(test_data, variant, key_file, num_keys):
    with torch.device("meta"):
        model = EVAD(EVADConfig.from_variant(variant, keep_rate=0.7))
    ours = {
        name: (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        for name, tensor in model.state_dict().items()
    }
    released = read_key_list(test_data / "spec" / key_file)
    assert len(released) == num_keys
    assert sorted(set(ours) - set(released)) == []
    assert sorted(set(released) - set(ours)) == []
    assert {name: spec for name, spec in released.items() if ours[name] != spec} == {}


@pytest.mark.parametrize("container", ["model_state", "model", "module"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_released_format_loads_strictly(tmp_path, source_model, target_model, container, prefix):
    state = {prefix + key: value for key, value in source_model.state_dict().items()}
    path = tmp_path / "evad.pyth"
    torch.save({"epoch": 12, container: state, "optimizer_state": {}, "cfg": "MODEL:\n  ARCH: vit\n"}, path)

    report = load_evad_checkpoint(target_model, read_checkpoint(path))

    assert sorted(report.loaded) == sorted(source_model.state_dict())
    assert report.ignored == {} and report.not_loaded == []
    assert_same_values(source_model.state_dict(), target_model.state_dict())


def test_missing_unexpected_and_wrong_shape_keys_are_all_listed(tmp_path, source_model, target_model):
    state = source_model.state_dict()
    del state["blocks.1.attn.q_bias"], state["criterion.empty_weight"]
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(5, 7)
    state["blocks.0.gamma_1"] = torch.zeros(96)
    path = tmp_path / "broken.pyth"
    torch.save({"model_state": state}, path)
    before = {key: value.clone() for key, value in target_model.state_dict().items()}

    with pytest.raises(CheckpointError) as error:
        load_evad_checkpoint(target_model, read_checkpoint(path))

    message = str(error.value)
    assert "2 missing keys: blocks.1.attn.q_bias, criterion.empty_weight" in message
    assert "1 unexpected keys: blocks.0.gamma_1" in message
    assert "blocks.0.mlp.fc1.weight (5, 7) vs model (384, 96)" in message
    assert_same_values(before, target_model.state_dict())


def test_a_file_without_weights_is_refused(tmp_path, target_model):
    path = tmp_path / "empty.pyth"
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointError, match="has no weights"):
        load_evad_checkpoint(target_model, read_checkpoint(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_evad_checkpoint(target_model, read_checkpoint(tmp_path / "absent.pyth"))


def test_videomae_finetuned_checkpoint_loads_the_backbone(tmp_path, source_model, target_model):
    backbone = {key: value for key, value in source_model.state_dict().items() if key.startswith(BACKBONE_PREFIXES)}
    classifier_extras = {
        "fc_norm.weight": torch.ones(96),
        "fc_norm.bias": torch.zeros(96),
        "head.weight": torch.zeros(400, 96),
        "head.bias": torch.zeros(400),
        "pos_embed": torch.zeros(1, 1568, 96),
    }
    path = tmp_path / "videomae_k400_finetuned.pth"
    args = argparse.Namespace(model="vit_base_patch16_224", nb_classes=400)
    torch.save({"model": {**backbone, **classifier_extras}, "epoch": 34, "args": args}, path)
    untouched = {key: value.clone() for key, value in target_model.state_dict().items() if key not in backbone}

    report = load_pretrained_backbone(target_model, read_checkpoint(path))

    assert sorted(report.loaded) == sorted(backbone)
    assert sorted(report.ignored) == sorted(classifier_extras)
    assert "norm.weight" in report.not_loaded and "det_head.mask_token" in report.not_loaded
    assert_same_values(backbone, target_model.state_dict())
    assert_same_values(untouched, target_model.state_dict())
    assert "recomputed" in report.ignored["pos_embed"]
    assert "keep their initial values" in report.summary()


def test_videomae_pretraining_checkpoint_loads_backbone_norm_and_first_decoder_blocks(
    tmp_path, source_model, target_model
):
    state = source_model.state_dict()
    encoder = {key: value for key, value in state.items() if key.startswith((*BACKBONE_PREFIXES, "norm."))}
    # A pre-training decoder shallower than the CRD: only its one block has a counterpart.
    decoder_block = {
        key: value
        for key, value in state.items()
        if key.startswith("det_head.decoder.blocks.0.")
        and key.removeprefix("det_head.decoder.blocks.0.").startswith(PRETRAIN_DECODER_PARTS)
    }
    crd_dim = state["det_head.mask_token"].shape[-1]
    checkpoint = {
        **{"encoder." + key: value for key, value in encoder.items()},
        "encoder_to_decoder.weight": state["det_head.encoder_to_decoder.weight"],
        "mask_token": torch.full((1, 1, crd_dim), 7.0),
        **{key.removeprefix("det_head."): value for key, value in decoder_block.items()},
        "decoder.norm.weight": torch.ones(crd_dim),
        "decoder.norm.bias": torch.zeros(crd_dim),
        "decoder.head.weight": torch.zeros(1536, crd_dim),
        "decoder.head.bias": torch.zeros(1536),
    }
    path = tmp_path / "videomae_pretrain.pth"
    torch.save({"model": {"backbone." + key: value for key, value in checkpoint.items()}}, path)
    mask_token_before = target_model.det_head.mask_token.detach().clone()

    report = load_pretrained_backbone(target_model, read_checkpoint(path))

    expected = {
        **encoder,
        "det_head.encoder_to_decoder.weight": state["det_head.encoder_to_decoder.weight"],
        **decoder_block,
    }
    assert sorted(report.loaded) == sorted(expected)
    assert sorted(report.ignored) == sorted(
        "backbone." + key
        for key in (
            "mask_token",
            "decoder.norm.weight",
            "decoder.norm.bias",
            "decoder.head.weight",
            "decoder.head.bias",
        )
    )
    assert_same_values(expected, target_model.state_dict())
    torch.testing.assert_close(target_model.det_head.mask_token.detach(), mask_token_before)
    assert "det_head.decoder.blocks.1.attn.qkv.weight" in report.not_loaded
    assert "det_head.decoder.blocks.0.action_logits.weight" in report.not_loaded


def test_backbone_of_another_width_fails_listing_the_keys(tmp_path, target_model):
    torch.manual_seed(2)
    wider = EVAD(EVADConfig.tiny(embed_dim=128))
    path = tmp_path / "wider.pth"
    torch.save({"model": wider.state_dict()}, path)

    with pytest.raises(CheckpointError) as error:
        load_pretrained_backbone(target_model, read_checkpoint(path))

    message = str(error.value)
    assert "patch_embed.proj.weight (128, 3, 2, 16, 16) vs model patch_embed.proj.weight (96, 3, 2, 16, 16)" in message
    # Every backbone tensor is counted (the final norm included); the first few are named with both shapes.
    backbone = [key for key in wider.state_dict() if key.startswith((*BACKBONE_PREFIXES, "norm."))]
    assert f"{len(backbone)} wrong shapes (checkpoint vs model)" in message


def test_backbone_checkpoint_must_cover_every_block(tmp_path, source_model, target_model):
    state = source_model.state_dict()
    shallow = {
        key: value
        for key, value in state.items()
        if key.startswith(BACKBONE_PREFIXES) and not key.startswith("blocks.3.")
    }
    extra_block = {
        "blocks.4." + key.removeprefix("blocks.0."): value
        for key, value in state.items()
        if key.startswith("blocks.0.")
    }
    path = tmp_path / "other_depth.pth"
    torch.save({"model": {**shallow, **extra_block}}, path)

    with pytest.raises(CheckpointError) as error:
        load_pretrained_backbone(target_model, read_checkpoint(path))

    message = str(error.value)
    assert "missing keys: blocks.3.norm1.weight" in message
    assert "unexpected keys: blocks.4.norm1.weight" in message


def test_checkpoint_without_any_backbone_fails(tmp_path, target_model):
    path = tmp_path / "head_only.pth"
    torch.save({"model": {"head.weight": torch.zeros(400, 96)}}, path)
    with pytest.raises(CheckpointError, match="missing keys: patch_embed.proj.weight, patch_embed.proj.bias, blocks.0"):
        load_pretrained_backbone(target_model, read_checkpoint(path))


def test_training_checkpoint_round_trip(tmp_path, source_model, target_model):
    optimizer = torch.optim.AdamW(source_model.parameters(), lr=1e-4)
    for parameter in source_model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    ddp_state = {"module." + key: value for key, value in source_model.state_dict().items()}
    path = tmp_path / "checkpoints" / "epoch_0003.pt"

    save_training_checkpoint(
        path,
        model_state=ddp_state,
        optimizer_state=optimizer.state_dict(),
        epoch=3,
        config_yaml="model:\n  variant: tiny\n",
        extra={"best_map": 0.25, "global_step": 120, "rng": torch.get_rng_state()},
    )
    payload = load_training_checkpoint(path)

    assert payload["epoch"] == 3 and payload["cfg"] == "model:\n  variant: tiny\n"
    assert payload["extra"]["best_map"] == 0.25 and payload["extra"]["global_step"] == 120
    assert sorted(payload["model_state"]) == sorted(source_model.state_dict())
    torch.optim.AdamW(target_model.parameters(), lr=1e-4).load_state_dict(payload["optimizer_state"])
    load_evad_checkpoint(target_model, read_checkpoint(path))
    assert_same_values(source_model.state_dict(), target_model.state_dict())


def test_training_checkpoint_write_is_atomic(tmp_path, monkeypatch, source_model):
    path = tmp_path / "last.pt"
    fields = {"model_state": source_model.state_dict(), "optimizer_state": {}, "config_yaml": ""}
    save_training_checkpoint(path, epoch=1, **fields)
    assert [entry.name for entry in tmp_path.iterdir()] == ["last.pt"]

    real_save = torch.save

    def save_then_crash(obj, file):
        real_save(obj, file)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_training_checkpoint(path, epoch=2, **fields)
    monkeypatch.undo()

    assert [entry.name for entry in tmp_path.iterdir()] == ["last.pt"]
    assert load_training_checkpoint(path)["epoch"] == 1


def test_released_file_is_not_a_training_checkpoint(tmp_path, source_model):
    path = tmp_path / "videomae.pth"
    torch.save({"model": source_model.state_dict()}, path)
    with pytest.raises(CheckpointError, match="lacks epoch, model_state, optimizer_state, cfg"):
        load_training_checkpoint(path)


def test_arbitrary_pickled_objects_are_refused(tmp_path, target_model):
    path = tmp_path / "pickled.pth"
    torch.save({"model": target_model.state_dict(), "learning_rate": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_evad_checkpoint(target_model, read_checkpoint(path))


def test_damaged_files_are_named_in_one_line_that_never_suggests_unsafe_loading(tmp_path, source_model):
    valid = tmp_path / "valid.pt"
    torch.save({"model_state": source_model.state_dict()}, valid)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(valid.read_bytes()[: valid.stat().st_size // 2])
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n" * 20)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": source_model.state_dict(), "callback": argparse.ArgumentParser}, pickled)
    for path, reason in ((truncated, "is not a PyTorch checkpoint or is truncated"),
                         (text, "is not a PyTorch checkpoint"),
                         (pickled, "holds Python objects that weights_only loading refuses (argparse.ArgumentParser)")):
        with pytest.raises(CheckpointError) as error:
            read_checkpoint(path)
        message = str(error.value)
        assert message.startswith(str(path)) and reason in message, message
        assert "\n" not in message and "weights_only=False" not in message and "weights_only` set" not in message


def test_a_misfit_names_the_first_keys_with_both_shapes_in_one_line(tmp_path, target_model):
    wider = EVAD(EVADConfig.tiny(embed_dim=128))
    path = tmp_path / "wider.pt"
    torch.save({"model_state": wider.state_dict()}, path)
    with pytest.raises(CheckpointError) as error:
        load_evad_checkpoint(target_model, read_checkpoint(path))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path} does not fit the configured model")
    assert "patch_embed.proj.weight (128, 3, 2, 16, 16) vs model (96, 3, 2, 16, 16)" in message
    assert message.count(" vs model ") == 5 and ", ..." in message
