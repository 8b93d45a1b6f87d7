"""Building blocks of a DVT stage: attention with relation reuse, a block with feature
reuse, the Performer token mixer of T2T-ViT, and the grid resampling both reuse paths share."""
from __future__ import annotations

import contextlib
import math
from functools import lru_cache, partial
from typing import Any, Callable, Optional, Sequence, Type

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, use_fused_attn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.weak import WeakIdKeyDictionary


class Attention(nn.Module):
    """Multi-head self-attention with an optional additive bias on the pre-softmax logits.

    The bias carries the relations reused from the previous stage. When the caller asks for
    the logits (because a later stage reuses them) the attention is computed explicitly;
    otherwise the fused ``scaled_dot_product_attention`` kernel is used where it is the faster
    of the two (:func:`fused_attention_is_faster`), which gives the same result without
    materialising the (N, N) maps. ``fused_attn = False`` forces the explicit path.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
            self,
            x: torch.Tensor,
            bias: Optional[torch.Tensor] = None,
            return_logits: bool = False,
            consume_bias: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Args:
            x: tokens (B, N, C).
            bias: added to the attention logits, (B, heads, N, N), or None.
            return_logits: also return the pre-softmax logits (bias included).
            consume_bias: ``bias`` is a temporary of this call alone: without gradients it
                becomes the buffer of the logits (the products are accumulated onto it).

        Returns:
            The attended tokens (B, N, C) and the logits (B, heads, N, N) or None.
        """
        return self.attend(run_linear(self.qkv, x), bias, return_logits, consume_bias)

    def attend(
            self,
            qkv: torch.Tensor,
            bias: Optional[torch.Tensor] = None,
            return_logits: bool = False,
            consume_bias: bool = False,
            queries: Optional[int] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`forward` from the ``qkv`` product of the tokens, (B, N, 3 * C). With ``queries``
        only the first ``queries`` tokens attend (to every token): the result is (B, queries, C)
        and ``bias``, when given, holds those rows alone, (B, heads, queries, N)."""
        B, N, C3 = qkv.shape
        H, D = self.num_heads, self.head_dim
        C = C3 // 3
        qkv = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, head_dim)
        if queries is not None:
            return self._attend_first(qkv, queries, bias), None
        logits = None
        if self.fused_attn and not return_logits and fused_attention_is_faster(qkv, bias):
            q, k, v = qkv.unbind(0)
            if bias is not None:
                bias = bias.to(q.dtype)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.)
            x = x.transpose(1, 2).reshape(B, N, C)
        else:
            # One copy to heads-major order; the products then read q, k, v in place, and the
            # scale rides on the product (alpha), not on a pass over q.
            q, k, v = qkv.contiguous().view(3, B * H, N, D).unbind(0)
            if consume_bias and _accumulates_onto(bias, q):
                acc = bias.view(B * H, N, N)  # logits = bias + scale q k^T, written over the bias
                logits = torch.baddbmm(acc, q, k.transpose(1, 2), alpha=self.scale, out=acc)
            else:
                logits = torch.baddbmm(q.new_zeros(1, 1, 1), q, k.transpose(1, 2), beta=0, alpha=self.scale)
                if bias is not None:
                    logits = logits.view(B, H, N, N).add_(bias).view(B * H, N, N)
            attn = self.attn_drop(_softmax(logits, in_place=not return_logits))
            x = torch.bmm(attn, v).view(B, H, N, D).transpose(1, 2).reshape(B, N, C)
            logits = logits.view(B, H, N, N)
        x = self.proj_drop(run_linear(self.proj, x))
        return x, (logits if return_logits else None)

    def _attend_first(self, qkv: torch.Tensor, queries: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The first ``queries`` tokens' attention output (B, queries, C) from qkv (3, B, heads, N, head_dim)."""
        q, k, v = qkv.unbind(0)
        B, H, _, D = q.shape
        logits = torch.matmul(q[:, :, :queries], k.transpose(-2, -1)).mul_(self.scale)  # (B, heads, queries, N)
        if bias is not None:
            logits = logits.add_(bias.to(logits.dtype))
        x = torch.matmul(self.attn_drop(logits.softmax(dim=-1)), v)  # (B, heads, queries, head_dim)
        return self.proj_drop(run_linear(self.proj, x.transpose(1, 2).reshape(B, queries, H * D)))


def capturing_graph() -> bool:
    """Whether a graph is being captured: ``torch.compile`` / ``torch.export`` or
    ``torch.jit.trace`` (and so the legacy ONNX exporter). The eager CPU inference paths
    (writes over their inputs, oneDNN's own operators, loops over chunks of the batch) then give
    way to the plain operations, which every capture knows."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _softmax(logits: torch.Tensor, in_place: bool) -> torch.Tensor:
    """Softmax over the last axis. With ``in_place`` (nobody reads the logits again) CPU
    inference writes the probabilities over the logits: no fresh (N, N) maps, which saves
    12-16% of the explicit attention at 197 tokens x 64 images (2 cores); same values."""
    if (in_place and logits.device.type == "cpu" and not torch.is_grad_enabled()
            and not capturing_graph()):
        return torch.ops.aten._softmax.out(logits, -1, False, out=logits)
    return logits.softmax(dim=-1)


# Measured on CPUs (2 threads, batch 16, 6 heads of 64): torch's fused CPU kernel is slower
# than the explicit products in bfloat16/float16 at every DVT length (about 2x at 101 and 197
# tokens), and in float32 up to about a hundred tokens (2.1 vs 2.9 ms at 101); in float32 at
# 197 tokens the fused kernel wins (8.1 vs 8.8 ms). With a relation bias the explicit products
# accumulate onto the bias (no separate add), which matches or beats the fused kernel with a
# mask at every length and dtype measured (197 tokens, float32: 1.70 vs 1.76 ms at batch 5).
CPU_FUSED_MIN_TOKENS = 129


def fused_attention_is_faster(q: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether the fused attention kernel beats the explicit products for queries ``q``
    (..., N, head_dim): always on accelerators; on the CPU only without a bias, in
    float32 and from ``CPU_FUSED_MIN_TOKENS`` tokens on. Both paths give the same result up
    to rounding."""
    if q.device.type != "cpu":
        return True
    return bias is None and q.dtype == torch.float32 and q.shape[-2] >= CPU_FUSED_MIN_TOKENS


def _accumulates_onto(bias: Optional[torch.Tensor], q: torch.Tensor) -> bool:
    """Whether the logits can be accumulated onto ``bias`` in place: a contiguous tensor of
    the queries' dtype, no gradients recorded, not traced by the compiler."""
    return (bias is not None and bias.dtype == q.dtype and bias.is_contiguous() and not torch.is_grad_enabled()
            and not capturing_graph())


class Block(nn.Module):
    """Pre-norm transformer block; with feature reuse, the MLP also reads features of the
    previous stage.

    Feature reuse: ``feature_reuse_mlp`` (LayerNorm, then Mlp dim -> hidden -> reuse_dim)
    maps the previous stage's final tokens to a few channels. They are resampled to this
    stage's grid (zeros at the class token) and concatenated to the MLP input, so ``norm2``
    and ``mlp.fc1`` see ``dim + reuse_dim`` channels while the residual stays ``dim`` wide.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            reuse_dim: int = 0,
            reuse_hidden: int = 128,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.reuse_dim = reuse_dim
        self.norm2 = norm_layer(dim + reuse_dim)
        self.mlp = Mlp(dim + reuse_dim, int(dim * mlp_ratio), dim, act_layer=nn.GELU, drop=proj_drop)
        if reuse_dim:
            self.feature_reuse_mlp = nn.Sequential(
                norm_layer(dim),
                Mlp(dim, reuse_hidden, reuse_dim, act_layer=nn.GELU, drop=proj_drop),
            )

    def forward(
            self,
            x: torch.Tensor,
            reused: Optional[torch.Tensor] = None,
            bias: Optional[torch.Tensor] = None,
            return_logits: bool = False,
            consume_bias: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Args:
            x: tokens (B, N, C).
            reused: reused features already mapped and resampled, (B, N, reuse_dim).
            bias: relation bias (B, heads, N, N) for the attention logits.
            return_logits: also return the attention logits.
            consume_bias: the bias is this call's alone (see :class:`Attention`).
        """
        y, logits = self.attn(self.norm1(x), bias=bias, return_logits=return_logits, consume_bias=consume_bias)
        return self._feed_forward(x + self.drop_path(y), reused), logits

    def attention_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The first half of the block, tokens (B, N, C) -> their ``qkv`` product (B, N, 3 * C):
        with :meth:`finish`, the block in two steps (early exit runs a stage's last block for
        the class token first, and for the other tokens only when a later stage needs them)."""
        return run_linear(self.attn.qkv, self.norm1(x))

    def finish(
            self,
            x: torch.Tensor,
            qkv: torch.Tensor,
            reused: Optional[torch.Tensor] = None,
            bias: Optional[torch.Tensor] = None,
            return_logits: bool = False,
            queries: Optional[int] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The block from ``qkv = attention_inputs(x)``, as :meth:`forward` (the bias is read,
        never written over). With ``queries``, the output of the first ``queries`` tokens alone,
        (B, queries, C), which attend to every token; no logits then."""
        if queries is not None:
            x = x[:, :queries]
            reused = None if reused is None else reused[:, :queries]
            bias = None if bias is None else bias[:, :, :queries]
            return_logits = False
        y, logits = self.attn.attend(qkv, bias=bias, return_logits=return_logits, queries=queries)
        return self._feed_forward(x + self.drop_path(y), reused), logits

    def _feed_forward(self, x: torch.Tensor, reused: Optional[torch.Tensor]) -> torch.Tensor:
        """The block's second half: the MLP (reading the reused features too) and its residual."""
        h = x if reused is None else torch.cat((x, reused.to(x.dtype)), dim=-1)  # (B, N, C + reuse_dim)
        return x + self.drop_path(self._mlp(self.norm2(h)))

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        if (not m.training and isinstance(m.act, nn.GELU) and m.act.approximate == "none"
                and isinstance(m.norm, nn.Identity) and _fuses(m.fc1, h) and _fuses(m.fc2, h)):
            return inference_linear(inference_linear(h, m.fc1.weight, m.fc1.bias, gelu=True), m.fc2.weight, m.fc2.bias)
        return m(h)


def inference_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     gelu: bool = False) -> torch.Tensor:
    """``F.linear`` (then exact GELU when ``gelu``) for inference: on the CPU in float32 or
    bfloat16, one oneDNN product with the bias (and the GELU) applied as it writes its result,
    instead of a pass that copies the bias into the output and another for the GELU (in float32
    with AVX2 code the GELU runs after the product: faster there); a frozen parameter is read in
    oneDNN's own layout (:func:`packed_weight`). Elsewhere, where
    torch lacks the fused kernel, and under a dispatch mode (a FLOP counter, which knows the
    plain operations only), the plain operations. Under CPU autocast the operands are cast to its
    dtype first (:func:`autocast_weight`, a frozen weight cast and packed once), as autocast casts
    ``F.linear``'s. No gradients."""
    if x.device.type == "cpu" and _get_current_dispatch_mode() is None:
        dtype = _autocast_dtype()
        if dtype is not None and fused_linear_works(dtype):
            # oneDNN's operator has no autocast rule: cast as autocast casts F.linear's arguments
            x, weight = x.to(dtype), autocast_weight(weight, dtype, packed=True)
            bias = None if bias is None else bias.to(dtype)
        if fused_linear_works(x.dtype):
            weight = packed_weight(weight) if weight.dtype == x.dtype else weight
            if x.dtype == torch.float32 and gelu and torch.backends.cpu.get_cpu_capability() != "AVX512":
                return torch.ops.aten.gelu_(torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""))
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                      "none" if gelu else "")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


@lru_cache(maxsize=None)
def fused_linear_works(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU run oneDNN's fused linear in ``dtype`` (float32 or bfloat16),
    tried once on a tiny product: bfloat16 has no oneDNN kernel on a CPU without AVX-512
    (or with oneDNN capped to AVX2), and torch may be built without oneDNN."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.ones(2, 4, dtype=dtype), torch.ones(3, 4, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(x, w, torch.zeros(3, dtype=dtype), "gelu", [], "none")
    except (AttributeError, RuntimeError):
        return False
    return True


# float32 and bfloat16 weights in oneDNN's blocked layout, one per frozen parameter, made when first read and
# made again when the parameter may have changed: other storage (``module.to``,
# ``param.data = ...``; told by a weak reference to the storage, so a new one at a freed one's
# address is not taken for it), an in-place write (the version counter), or any optimizer step
# in this process (fused optimizers write without moving the version counter). Outside the
# modules: deepcopy, pickling and state dicts never see them.
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_CAST: WeakIdKeyDictionary = WeakIdKeyDictionary()  # the same for autocast's dtype (:func:`autocast_weight`)
_CAST_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # the same, cast and packed
_REORDERED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # the same for :func:`channels_last_weight`
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(*_) -> None:
    _OPTIMIZER_STEPS[0] += 1


def optimizer_steps() -> int:
    """Optimizer steps taken in this process so far (any optimizer, fused ones included)."""
    return _OPTIMIZER_STEPS[0]


register_optimizer_step_post_hook(_count_optimizer_step)


def packs(weight: torch.Tensor) -> bool:
    """Whether :func:`packed_weight` packs ``weight``: a frozen (``requires_grad=False``)
    float32 or bfloat16 ``nn.Parameter``, where this torch and CPU can. Trainable weights are
    not packed: an optimizer may change them in place between two evaluations."""
    return _frozen(weight) and weight.dtype in (torch.float32, torch.bfloat16) and packing_works(weight.dtype)


def _frozen(weight: torch.Tensor) -> bool:
    """A frozen (``requires_grad=False``) ``nn.Parameter``: what the kept derived weights
    (:func:`packed_weight`, :func:`autocast_weight`, :func:`channels_last_weight`) are made for."""
    return isinstance(weight, nn.Parameter) and not weight.requires_grad


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """A frozen float32 or bfloat16 ``nn.Parameter`` (:func:`packs`) reordered once into oneDNN's
    layout for the fused product (which then skips that reorder on every call); anything else as
    it is. A convolution's weight (out, in, kh, kw) is packed flattened, as (out, in * kh * kw).
    Same results; on 2 cores with AVX-512 the float32 DVT_Deit_small stages run 2-9% faster
    with fused packed products than with the plain ones, at 16 and at 64 images, and bfloat16
    stages up to 14% faster than with unpacked weights at one image (no AMX). Costs a second
    copy of each weight packed, freed with the parameter. Not seen: in-place changes through
    ``param.data`` (use ``load_state_dict``, or ``copy_`` under ``torch.no_grad()``)."""
    if not packs(weight):
        return weight
    return _derived(_PACKED, weight, lambda w: torch.ops.mkldnn._reorder_linear_weight(w.flatten(1), None))


def pointwise_conv_weight(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A convolution's weight (out, in, kh, kw) as the weight of :func:`inference_linear` on rows
    ``x`` of ``in * kh * kw`` values (a 1x1 convolution's positions, or the patches of one whose
    patches do not overlap): packed once where it can be (a frozen weight of ``x``'s dtype without
    autocast, see :func:`packed_weight`), else (out, in * kh * kw) in ``x``'s dtype. Never packed under a
    dispatch mode (a FLOP counter), where :func:`inference_linear` runs the plain operations."""
    if (x.dtype == weight.dtype and _autocast_dtype() is None and x.device == weight.device and packs(weight)
            and _get_current_dispatch_mode() is None):
        return packed_weight(weight)
    return weight.flatten(1).to(x.dtype)


def autocast_weight(weight: torch.Tensor, dtype: torch.dtype, packed: bool = False) -> torch.Tensor:
    """``weight`` in ``dtype``, as autocast casts a linear layer's weight; for a frozen float32
    ``nn.Parameter`` cast once and kept (:func:`packed_weight`'s rules), where autocast, which
    keeps casts of trainable weights only, would cast it again on every call. With ``packed``,
    such a kept cast is also in oneDNN's layout where this torch packs ``dtype`` (the weight of
    oneDNN's fused product only)."""
    if weight.dtype == dtype:
        return weight
    if _frozen(weight) and weight.dtype == torch.float32:
        if packed and packing_works(dtype):
            return _derived(_CAST_PACKED, weight,
                            lambda w: torch.ops.mkldnn._reorder_linear_weight(w.flatten(1).to(dtype), None), dtype)
        return _derived(_CAST, weight, lambda w: w.to(dtype), dtype)
    return weight.to(dtype)


def channels_last_order(channels: int, positions: int, device: torch.device) -> torch.Tensor:
    """Index ``perm`` with ``w[..., perm]`` = weights over (position, channel) patches of weights
    ``w`` laid out over (channel, position) patches, the order of ``nn.Unfold``."""
    return torch.arange(channels * positions, device=device).view(channels, positions).t().reshape(-1)


def channels_last_weight(weight: torch.Tensor, positions: int) -> torch.Tensor:
    """``weight`` over (channel, position) patches (its last axis, ``nn.Unfold``'s order) as the
    weight over (position, channel) patches: ``weight[..., channels_last_order(...)]``. For a
    frozen ``nn.Parameter`` made once and kept (the rules of :func:`packed_weight`), outside a
    graph capture: the T2T embedding reads three such weights per call, and gathering them
    anew took about 0.2 ms each (2 cores)."""
    channels = weight.shape[-1] // positions
    make = lambda w: w[..., channels_last_order(channels, positions, w.device)]  # noqa: E731
    if _frozen(weight) and not capturing_graph():
        return _derived(_REORDERED, weight, make, positions)
    return make(weight)


def tensor_state(t: torch.Tensor) -> tuple:
    """What tells that a tensor's values may have changed while its storage stayed: its version
    counter (None for a tensor made under inference mode, which keeps none; in-place writes),
    storage offset, shape and strides. With :func:`same_storages` (``.to()``, ``param.data =
    ...``) and the optimizer steps (fused optimizers move no version counter), the check of
    every kept derived weight (:func:`packed_weight`) and of frozen compiled graphs."""
    try:
        version = t._version
    except RuntimeError:
        version = None
    return version, t.storage_offset(), t.shape, t.stride()


def storage_refs(tensors: Sequence[torch.Tensor]) -> list[StorageWeakRef]:
    """A weak reference to each tensor's storage, for :func:`same_storages`."""
    return [StorageWeakRef(t.untyped_storage()) for t in tensors]


def same_storages(refs: Sequence[StorageWeakRef], tensors: Sequence[torch.Tensor]) -> bool:
    """Whether each tensor still has the storage its reference was taken of: told by a weak
    reference, so new storage at a freed one's address is not taken for it."""
    return all(not ref.expired() and ref.cdata == t.untyped_storage()._cdata for ref, t in zip(refs, tensors))


def _derived(cache: WeakIdKeyDictionary, weight: torch.Tensor, make: Callable[..., Any],
             *tag, also: Sequence[torch.Tensor] = ()) -> Any:
    """``make(weight, *also)``, kept in ``cache`` until ``weight`` or one of ``also`` may have
    changed (see ``_PACKED`` and :func:`tensor_state`). Made with inference mode off, also when
    first asked for under ``torch.inference_mode()``: ordinary tensors, which a later pass with
    gradients may save for backward. On every linear layer's call: kept lean for one tensor."""
    storage = weight.untyped_storage()
    key = (weight._version, _OPTIMIZER_STEPS[0], weight.storage_offset(), weight.shape, weight.stride(), *tag)
    if also:
        key += tuple(tensor_state(t) for t in also)
    hit = cache.get(weight)
    if (hit is None or hit[0].expired() or hit[0].cdata != storage._cdata or hit[1] != key
            or (also and not same_storages(hit[3], also))):
        with torch.inference_mode(False):
            made = make(weight.detach(), *(t.detach() for t in also))
        hit = cache[weight] = (StorageWeakRef(storage), key, made, storage_refs(also))
    return hit[2]


def derived_from_frozen(cache: WeakIdKeyDictionary, params: Sequence[torch.Tensor],
                        make: Callable[..., Any], *tag) -> Any:
    """``make(*params, kept=...)``: kept in ``cache`` (one entry per first parameter) until one
    of ``params`` may have changed, by :func:`packed_weight`'s rules, when they are all frozen
    ``nn.Parameter``s and no graph is being captured (``kept=True``); else made anew on every
    call (``kept=False``)."""
    if capturing_graph() or not all(_frozen(p) for p in params):
        return make(*params, kept=False)
    return _derived(cache, params[0], partial(make, kept=True), *tag, also=params[1:])


@lru_cache(maxsize=None)
def packing_works(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch and CPU reorder linear weights of ``dtype`` for oneDNN's fused product
    (tried once per dtype; bfloat16 needs that product in bfloat16, :func:`fused_linear_works`)."""
    if not fused_linear_works(dtype):
        return False
    try:
        w = torch.ones(3, 4, dtype=dtype)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4, dtype=dtype),
                                                 torch.ops.mkldnn._reorder_linear_weight(w, None), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return bool((out == 4).all())


# Measured with AVX2 code only (AMD EPYC, 2 threads, each layer's weights read from 12 copies in
# turn, as a stage's blocks read theirs; `scripts/benchmark.py --products` for whole stages):
# oneDNN's product on packed float32 weights beats the plain one on weights of 442k-885k values
# (DeiT-S's and T2T-ViT-14's qkv and MLP layers) by 1.05-1.8x at 1-50 rows and is even at 128,
# but loses on smaller weights (147k-197k values: 0.35-0.9x at 1-16 rows, up to 1.1x at 50) and
# from 300 rows on (0.85-0.94x); one image's last stage (197 rows) gained nothing. Its fused GELU
# is slower than a separate one there.
AVX2_PACKED_MAX_ROWS = 128
AVX2_PACKED_MIN_WEIGHT = 1 << 18  # values


def fused_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a block's linear layers run as :func:`inference_linear`: CPU inference in
    bfloat16, and in float32 with frozen weights (packed, :func:`packed_weight`) where torch runs
    AVX-512 code, or AVX2 code on at most ``AVX2_PACKED_MAX_ROWS`` rows (tokens x images) and a
    weight of at least ``AVX2_PACKED_MIN_WEIGHT`` values. Fusing
    the bias and the GELU into the product saves a pass over each output: a DeiT-S block is
    4-14% faster in bfloat16 (2 cores, AMX). Under CPU autocast the autocast dtype decides
    (bfloat16 only), whatever ``x``'s dtype: :func:`inference_linear` casts as autocast would."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or capturing_graph():
        return False
    dtype = _autocast_dtype()
    if dtype is not None:  # the product runs as autocast would run F.linear: in its dtype
        return dtype == torch.bfloat16 and weight.dtype in (torch.float32, dtype) and fused_linear_works(dtype)
    if weight.dtype != x.dtype or not fused_linear_works(x.dtype):
        return False
    if x.dtype == torch.float32:
        capability = torch.backends.cpu.get_cpu_capability()
        rows = x.numel() // max(x.shape[-1], 1)
        few_rows_big_weight = rows <= AVX2_PACKED_MAX_ROWS and weight.numel() >= AVX2_PACKED_MIN_WEIGHT
        return packs(weight) and (capability == "AVX512" or (capability == "AVX2" and few_rows_big_weight))
    return x.dtype == torch.bfloat16


def _autocast_dtype() -> Optional[torch.dtype]:
    """The CPU autocast dtype when CPU autocast is on, else None."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def plain_layer(layer: nn.Module, kind: type = nn.Linear) -> bool:
    """A ``kind`` itself (not a subclass or a wrapper) with no forward hooks: replacing its call
    by a product that computes the same changes nothing but speed."""
    return type(layer) is kind and not layer._forward_hooks and not layer._forward_pre_hooks


def _fuses(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer(x)`` may run as :func:`inference_linear`: a plain linear layer in eval
    mode, in the inference :func:`fused_inference` allows."""
    return not layer.training and plain_layer(layer) and fused_inference(x, layer.weight)


def run_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, as :func:`inference_linear` where :func:`_fuses` allows it."""
    if _fuses(layer, x):
        return inference_linear(x, layer.weight, layer.bias)
    return layer(x)


@lru_cache(maxsize=None)
def _axis_resample_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) float64 matrix of nearest upsampling src -> 2*src, then adaptive average
    pooling 2*src -> dst, along one axis."""
    up = 2 * src
    nearest = np.zeros((up, src))
    nearest[np.arange(up), (np.arange(up) * src) // up] = 1.0  # PyTorch 'nearest': floor(i * src / up)
    pool = np.zeros((dst, up))
    for i in range(dst):  # PyTorch adaptive pooling windows: [floor(i*L/d), ceil((i+1)*L/d))
        start, end = (i * up) // dst, -((-(i + 1) * up) // dst)
        pool[i, start:end] = 1.0 / (end - start)
    return pool @ nearest


def _stacked_bags(index: torch.Tensor, weight: torch.Tensor, rows: int, maps: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One map's ``index`` and ``weight`` (out, k) repeated for ``maps`` maps of ``rows`` source
    rows each, stacked: (maps * out, k) each, the indices offset to each map's rows."""
    index = index + rows * torch.arange(maps, device=index.device)[:, None, None]
    return index.view(-1, index.shape[-1]), weight.to(dtype).repeat(maps, 1)


class GridResample(nn.Module):
    """Resample token maps from a ``src x src`` grid to a ``dst x dst`` grid.

    DVT upsamples the previous grid by nearest neighbour to twice its size and then
    average-pools it adaptively to the new grid (7 -> 14 -> 10, 10 -> 20 -> 14): upsampling
    first makes every output cell an area-weighted average of the source cells it overlaps,
    rather than a plain subsample. Both steps are linear and separable, so the whole
    operation is one fixed (dst, src) matrix ``A`` per axis: ``X -> A X A^T``. Applying the
    matrices costs a small fraction of building the upsampled maps and pooling them.

    The class token is not on the grid: it is carried over unchanged (and, for relation
    maps, so are its row and column).
    """

    def __init__(self, src: int, dst: int) -> None:
        super().__init__()
        self.src, self.dst = src, dst
        axis = torch.from_numpy(_axis_resample_matrix(src, dst))  # (dst, src) float64
        # Relation maps: one (dst^2 + 1, src^2 + 1) map on each token axis, class token kept.
        full = torch.zeros(dst * dst + 1, src * src + 1, dtype=torch.float64, device="cpu")
        full[0, 0] = 1.0
        full[1:, 1:] = torch.kron(axis, axis)
        # torch.empty follows the default device (e.g. meta); copy_ fills it where it has storage.
        self.register_buffer("axis_matrix", torch.empty(axis.shape).copy_(axis), persistent=False)
        self.register_buffer("token_matrix", torch.empty(full.shape).copy_(full), persistent=False)
        # The same map as rows of at most k weighted source tokens (k = 4 here: two per axis).
        k = int((full != 0).sum(1).max())
        index, weight = torch.zeros(full.shape[0], k, dtype=torch.long), torch.zeros(full.shape[0], k)
        for i, row in enumerate(full):
            (nz,) = row.nonzero(as_tuple=True)
            index[i, :len(nz)], weight[i, :len(nz)] = nz, row[nz].float()  # padding: token 0, weight 0
        self.register_buffer("row_index", torch.empty(index.shape, dtype=torch.long).copy_(index), persistent=False)
        self.register_buffer("row_weight", torch.empty(weight.shape).copy_(weight), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.src}x{self.src} -> {self.dst}x{self.dst}"

    def relation_bags(self, maps: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and weights that resample the query axis of ``maps`` relation maps stacked as
        rows (``forward(..., bags=)``): (maps * N, k) each, N = dst^2 + 1."""
        return _stacked_bags(self.row_index, self.row_weight, self.src * self.src + 1, maps, dtype)

    def token_bags(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and weights that resample ``batch`` token maps stacked as rows
        (``forward(..., bags=)``): (batch * dst^2, k) each."""
        index = (self.row_index[1:] - 1).clamp(min=0)  # no class token; padding: token 0, weight 0
        return _stacked_bags(index, self.row_weight[1:], self.src * self.src, batch, dtype)

    def forward(self, x: torch.Tensor, relations: bool = False,
                bags: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Args:
            x: patch tokens (B, src*src, C) -> (B, dst*dst, C); or, with ``relations``,
                relation maps (B, H, src^2 + 1, src^2 + 1) -> (B, H, dst^2 + 1, dst^2 + 1), contiguous.
            bags: ``relation_bags(B * H, x.dtype)`` for relations, ``token_bags(B, x.dtype)`` for
                tokens: the (query) axis is then resampled as weighted sums of k rows each
                (``F.embedding_bag``) instead of dense products (for relations, 25 times the
                multiply-adds; for tokens, two products that run as many small ones); same values
                up to rounding.
        """
        if relations:
            m = self.token_matrix.to(x.dtype)
            # The right product first: it folds into one large GEMM over every map.
            y = x @ m.transpose(0, 1)
            if bags is None:
                return m @ y
            B, H, n, N = y.shape
            return F.embedding_bag(bags[0], y.view(B * H * n, N), per_sample_weights=bags[1],
                                   mode="sum").view(B, H, N, N)
        B, _, C = x.shape
        if bags is not None:
            return F.embedding_bag(bags[0], x.reshape(B * self.src * self.src, C), per_sample_weights=bags[1],
                                   mode="sum").view(B, self.dst * self.dst, C)
        a = self.axis_matrix.to(x.dtype)
        x = x.reshape(B, self.src, self.src, C)
        x = torch.einsum("ih,bhwc->biwc", a, x)  # (B, dst, src, C)
        x = torch.einsum("jw,biwc->bijc", a, x)  # (B, dst, dst, C)
        return x.reshape(B, self.dst * self.dst, C)


class TokenPerformer(nn.Module):
    """Single-head Performer token mixer of the T2T module (linear attention with positive
    orthogonal random features), with a skip connection from the values.

    The random-feature products are computed in float32 even under autocast and in a model
    converted to bfloat16/float16: exponentials of large dot products overflow half precision,
    and rounding them to 8 bits of mantissa would distort the attention weights.
    """

    def __init__(self, dim: int, in_dim: int, kernel_ratio: float = 0.5, drop: float = 0.1, eps: float = 1e-8):
        super().__init__()
        self.emb = in_dim
        self.m = int(in_dim * kernel_ratio)
        self.eps = eps
        self.kqv = nn.Linear(dim, 3 * in_dim)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(in_dim, in_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, in_dim), nn.Dropout(drop))
        w = nn.init.orthogonal_(torch.empty(self.m, in_dim)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)  # fixed random features, kept in the state dict

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """exp(w^T x - |x|^2 / 2) / sqrt(m): (B, T, emb) -> (B, T, m)."""
        wtx = x @ self.w.to(x.dtype).t()
        return torch.exp(wtx - 0.5 * (x * x).sum(dim=-1, keepdim=True)) / math.sqrt(self.m)

    def attention(self, x: torch.Tensor, kqv_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.kqv.weight if kqv_weight is None else kqv_weight
        k, q, v = F.linear(x, weight, self.kqv.bias).split(self.emb, dim=-1)  # (B, T, emb) each
        with _autocast_off(x.device.type):
            k, q, vf = k.float(), q.float(), v.float()
            kp, qp = self._features(k), self._features(q)  # (B, T, m)
            denom = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, T, 1)
            kptv = vf.transpose(1, 2) @ kp  # (B, emb, m)
            y = (qp @ kptv.transpose(1, 2)) / (denom + self.eps)  # (B, T, emb)
        return v + self.dp(self.proj(y.to(v.dtype)))

    def forward(self, x: torch.Tensor, positions: Optional[int] = None) -> torch.Tensor:
        """Args:
            x: patches (B, T, dim).
            positions: the patches' channels are laid out (position, channel) over this many
                positions, not in the parameters' (channel, position) order (``norm1`` and ``kqv``
                then read their weights reordered, :func:`channels_last_weight`); None: the
                parameters' own order.
        """
        if positions is None:
            x = self.attention(self.norm1(x))
        else:
            n = self.norm1
            x = F.layer_norm(x, n.normalized_shape, channels_last_weight(n.weight, positions),
                             channels_last_weight(n.bias, positions), n.eps)
            x = self.attention(x, channels_last_weight(self.kqv.weight, positions))
        return x + self.mlp(self.norm2(x))


def _autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """Fixed sinusoid position table (1, n_position, dim): sin on even, cos on odd channels."""
    pos = np.arange(n_position)[:, None]
    freq = np.power(10000.0, 2 * (np.arange(dim) // 2) / dim)[None, :]
    table = pos / freq
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.from_numpy(table).float().unsqueeze(0)
