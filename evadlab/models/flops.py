"""FLOPs and parameters of the whole EVAD detector, in the convention of the paper's table (spec §7).

The published GFLOPs (424.5 / 242.8 / 208.9 / 737.1 at 16x288x288) are fvcore ``FlopCountAnalysis`` counts of an
eval-mode forward: one multiply-add is one FLOP; linear / matmul / bmm / conv / einsum count their multiply-adds, a
LayerNorm 5 per element (4 without affine) and a nearest upsampling 1 per output element; softmax, GELU, RoIAlign,
pooling and the bicubic position-table resize count nothing. ``torch.utils.flop_counter`` counts 2 per multiply-add
and has no LayerNorm or upsampling formula, so those two are added here at the same 2x scale and the total is halved.

The forward runs under ``FakeTensorMode``: only shapes are computed, so ViT-L at 288x288 counts in seconds and the
weights may be real, on the meta device or random. Token pruning keeps a data-dependent *choice* of tokens, but the
number kept depends only on shapes, so the count is exact. The one data-dependent *shape* (which proposals go to which
FPN level, a ``nonzero``) only feeds RoIAlign, which counts nothing, so a symbolic size for it changes no count.

Our counts exceed the table by the action heads of the non-final decoder blocks (0.48 GFLOPs for ViT-B, 1.35 for
ViT-L, about 0.2 %): the spec's CRD numbers include only the last block's head, while our eval forward runs them all.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .config import EVADConfig
from .evad import EVAD

# The input of the published table: 16 frames, short side 288, square.
REFERENCE_INPUT_SIZE = (16, 288, 288)
# torch.utils.flop_counter counts a multiply-add as 2 FLOPs; fvcore (and the paper) as 1.
_COUNTER_FLOPS_PER_MULTIPLY_ADD = 2
_aten = torch.ops.aten


def _layer_norm_flops(input_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    # fvcore: mean, variance, normalise (4 per element) plus the affine scale-and-shift counted as one.
    per_element = 5 if weight_shape is not None else 4
    return _COUNTER_FLOPS_PER_MULTIPLY_ADD * per_element * math.prod(input_shape)


def _nearest_upsample_flops(*args, out_shape=None, **kwargs) -> int:
    return _COUNTER_FLOPS_PER_MULTIPLY_ADD * math.prod(out_shape)


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_FVCORE_EXTRA_FORMULAS = {
    _aten.native_layer_norm: _layer_norm_flops,
    _aten.upsample_nearest2d: _nearest_upsample_flops,
    # Real CPU tensors dispatch fused attention to this kernel, which some torch releases leave uncounted.
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
}


def count_flops(model: nn.Module, input_size: tuple[int, int, int] = REFERENCE_INPUT_SIZE, batch: int = 1) -> int:
    """fvcore-convention FLOPs of one eval-mode forward of ``batch`` clips of ``input_size`` = (frames, height, width).

    The model's weights are never read, so a model built on the meta device counts the same as a trained one.
    """
    frames, height, width = input_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Gradients stay enabled: under no_grad a view of a parameter still requires grad but has no grad_fn, which the
    # module tracker of FlopCounterMode rejects. Fake tensors make the autograd graph free anyway.
    # The ShapeEnv lets `nonzero` return a symbolic size instead of failing, see the module docstring.
    try:
        with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()):
            clips = [torch.empty(3, frames, height, width, device=device) for _ in range(batch)]
            with FlopCounterMode(display=False, custom_mapping=_FVCORE_EXTRA_FORMULAS) as counter:
                model(clips)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // _COUNTER_FLOPS_PER_MULTIPLY_ADD


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def flops_report(config: EVADConfig, input_size: tuple[int, int, int]) -> dict[str, float | int]:
    """GFLOPs of ``EVAD(config)`` at ``input_size`` = (frames, height, width) and at the paper's 16x288x288, and its
    parameter count, as ``{"gflops", "gflops_16x288x288", "params"}``. Builds the model on the meta device (no
    weights); the keep rates counted are ``config.keep_rates``."""
    with torch.device("meta"):
        model = EVAD(config)
    reference_gflops = count_flops(model, REFERENCE_INPUT_SIZE) / 1e9
    # The released configs run at the reference size itself: one count of a few seconds, not two.
    same_size = tuple(input_size) == REFERENCE_INPUT_SIZE
    return {
        "gflops": reference_gflops if same_size else count_flops(model, input_size) / 1e9,
        "gflops_16x288x288": reference_gflops,
        "params": count_parameters(model),
    }
