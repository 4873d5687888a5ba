"""torch.autocast for tensors on the meta device, so that the memory planner (memplan.py) can trace a
mixed-precision step as the run computes it.

    with MetaAutocast("cuda", torch.bfloat16) as mode, autocast_region(unet, torch.bfloat16, mode):
        loss(batch).backward()        # meta tensors, cast as CUDA autocast would cast them

"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map


# torch.autocast acts through per-device dispatch keys, and the meta device has none: a trace there would run
# every op in fp32. MetaAutocast redoes autocast's casts at the torch-function level, which is above autograd
# as autocast is, so the casts are recorded (a cast weight is saved for backward, its gradient cast back).
# The op lists are PyTorch's own (aten/src/ATen/autocast_mode.cpp, as tested in
# torch/testing/_internal/autocast_test_lists.py): "cuda" for the run, "cpu" for the CPU run that validates
# the emulation (tests/test_memplan.py checks the cpu lists op by op against the real CPU autocast). The CUDA
# lists matter: there GroupNorm, LayerNorm, softmax, exp and upsampling run in fp32, so e.g. every GroupNorm
# of the UNet keeps an fp32 copy of its bf16 input for backward.
_LOW = "low"          # cast floating inputs to the half dtype
_FP32 = "fp32"        # cast floating inputs to fp32
_FP32_OUT = "fp32out"  # no dtype given: compute (and return) fp32
_PROMOTE = "promote"  # cast floating inputs to the widest of their dtypes
_LISTS = {
    "cuda": {
        _LOW: "conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d convolution "
              "_convolution prelu addmm addmv addr matmul einsum mm mv linalg_vecdot linear addbmm baddbmm bmm "
              "chain_matmul linalg_multi_dot scaled_dot_product_attention cudnn_convolution "
              "cudnn_convolution_transpose lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell",
        _FP32: "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus "
               "layer_norm group_norm rms_norm norm frobenius_norm nuclear_norm cosine_similarity "
               "poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss "
               "smooth_l1_loss huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss "
               "triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm "
               "logsumexp interpolate upsample_nearest2d upsample_bilinear2d",
        _FP32_OUT: "prod softmax log_softmax cumprod cumsum linalg_vector_norm linalg_matrix_norm sum",
        _PROMOTE: "addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put scatter_add tensordot "
                  "cat stack index_copy",
    },
    "cpu": {
        # einsum is on no CPU list, but the bmm it calls is
        _LOW: "conv1d conv2d conv3d bmm mm linalg_vecdot baddbmm addmm addbmm linear _convolution matmul conv_tbc "
              "conv_transpose1d conv_transpose2d conv_transpose3d prelu scaled_dot_product_attention einsum",
        _FP32: "avg_pool3d binary_cross_entropy grid_sampler prod quantile nanquantile cdist trace max_pool3d "
               "adaptive_avg_pool3d reflection_pad1d reflection_pad2d replication_pad1d replication_pad2d "
               "replication_pad3d mse_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss "
               "poisson_nll_loss smooth_l1_loss cross_entropy l1_loss huber_loss margin_ranking_loss "
               "soft_margin_loss triplet_margin_loss multi_margin_loss kl_div multilabel_margin_loss "
               "binary_cross_entropy_with_logits",
        _FP32_OUT: "",
        _PROMOTE: "stack cat index_copy",
    },
}
_DUNDER = {"__matmul__": "matmul", "__rmatmul__": "matmul", "__pow__": "pow", "__rpow__": "pow"}
_INTERPOLATED = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear")  # upsample_* ops


def autocast_kind(device: str, func, kwargs: dict) -> str | None:
    """What autocast on `device` does to a call of func: one of the kinds above, or None (runs as given)."""
    name = getattr(func, "__name__", "")
    name = _DUNDER.get(name, name)
    if name == "interpolate" and kwargs.get("mode", "nearest") not in _INTERPOLATED:
        return None  # "area" is adaptive_avg_pool2d, on no list
    for kind, names in _LISTS[device].items():
        if name in names.split():
            return kind
    return None


class MetaAutocast(TorchFunctionMode):
    """torch.autocast(device, dtype) for meta tensors, wherever CPU autocast is on (the mark of the run's autocast
    region, see autocast_region: it leaves meta tensors alone, and torch.utils.checkpoint records and restores it
    for its recompute, so the emulation follows the region into a checkpointed backward). As autocast does, a
    trained fp32 leaf is cast once per forward and the cast kept until the forward ends (the cache; off for the
    CUDA-graph probe). A recomputation's region ends with its block, and keeps its casts only where backward
    saved them: there the emulation caches nothing, which is the same while a block uses each weight once."""

    def __init__(self, device: str, dtype: torch.dtype):
        super().__init__()
        self.device, self.dtype = device, dtype
        self.cache: dict[int, torch.Tensor] = {}
        self.caching = False  # inside autocast_region's forward

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = autocast_kind(self.device, func, kwargs) if torch.is_autocast_enabled("cpu") else None
        if kind is None:
            return func(*args, **kwargs)
        if kind == _FP32_OUT:
            first = next((t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)), None)
            if first is not None and self._eligible(first) and kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": torch.float32}
            return func(*args, **kwargs)
        floats = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and self._eligible(t)]
        if kind == _PROMOTE:
            to = floats[0].dtype if floats else None
            for t in floats[1:]:
                to = torch.promote_types(to, t.dtype)
        else:
            to = self.dtype if kind == _LOW else torch.float32
        args, kwargs = tree_map(lambda t: self._cast(t, to) if isinstance(t, torch.Tensor) else t, (args, kwargs))
        return func(*args, **kwargs)

    @staticmethod
    def _eligible(t: torch.Tensor) -> bool:
        return t.device.type == "meta" and t.is_floating_point() and t.dtype != torch.float64

    def _cast(self, t: torch.Tensor, to: torch.dtype | None) -> torch.Tensor:
        if to is None or not self._eligible(t) or t.dtype == to:
            return t
        cached = (self.caching and to == self.dtype and t.dtype == torch.float32 and t.requires_grad and t.is_leaf
                  and torch.is_autocast_cache_enabled())
        if not cached:
            return t.to(to)
        key = id(t)
        if key not in self.cache:
            self.cache[key] = t.to(to)
        return self.cache[key]


@contextlib.contextmanager
def autocast_region(unet, dtype: torch.dtype, mode: MetaAutocast | None = None):
    """The UNet's forward under torch.autocast("cpu", dtype): the trainer's autocast block on CUDA holds
    diffusion_loss, whose listed ops outside the UNet (mse_loss) meet fp32 tensors already, so the UNet is the
    region. On CPU tensors (measure) this is the real autocast; on meta tensors (estimate) it marks the region
    for `mode`, whose cast cache it clears on leaving, as autocast clears its own."""
    forward = unet.forward

    def under_autocast(*args, **kwargs):
        if mode is not None:
            mode.caching = True
        try:
            with torch.autocast("cpu", dtype=dtype):
                return forward(*args, **kwargs)
        finally:
            if mode is not None:
                mode.caching = False
                mode.cache.clear()

    unet.forward = under_autocast
    try:
        yield
    finally:
        del unet.forward
