"""Dynamic Vision Transformer: a cascade of transformers on ever finer token grids.

Stage k embeds the image into a g_k x g_k grid of tokens (7x7, 10x10, 14x14 for the released
models) and classifies it with its own head. Later stages reuse the previous stage's final
tokens (feature reuse) and its attention logits (relation reuse). ``model(x)`` runs every
stage and returns the per-exit logits; ``model.forward_early_exit`` runs each stage only on
the samples that earlier exits were not confident about, and ``model.queued_early_exit`` does so
over a stream of batches, each later stage on full batches of such samples
(``model.early_exit_stream``: the same with the batches handed in one by one).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from .layers import (Block, GridResample, TokenPerformer, capturing_graph, channels_last_weight, derived_from_frozen,
                     fused_inference, inference_linear, plain_layer, pointwise_conv_weight, sinusoid_table)

__all__ = ["DVT", "DVTStage", "T2TStage", "ViTStage", "StageOutput", "EarlyExitOutput", "ExitStep", "run_early_exit",
           "queued_early_exit", "EarlyExitStream", "unfold_grid"]


def unfold_grid(size: int, kernel: int, stride: int, padding: int) -> int:
    """Side of the grid produced by a convolution or unfold over ``size`` pixels."""
    return (size + 2 * padding - kernel) // stride + 1


def vit_patch_geometry(img_size: int, grid: int) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a non-overlapping patch embedding giving ``grid`` x ``grid``
    tokens: the smallest patch that covers the image, padded evenly. At 224 pixels this is
    32/0 for 7x7, 23/3 for 10x10 and 16/0 for 14x14, the geometries of DVT-DeiT."""
    kernel = math.ceil(img_size / grid)
    padding = (kernel * grid - img_size + 1) // 2
    return kernel, kernel, padding


class StageOutput(NamedTuple):
    """What a stage hands to the next one.

    logits: (B, num_classes) of this exit.
    tokens: (B, N + 1, C) output of the last block, before the final norm.
    relations: per-block attention logits (B, heads, N + 1, N + 1), or None when no later
        stage reuses them.
    """
    logits: torch.Tensor
    tokens: torch.Tensor
    relations: Optional[tuple[torch.Tensor, ...]]

    def select(self, index: torch.Tensor) -> "StageOutput":
        """The same output for a subset of the batch."""
        relations = None if self.relations is None else tuple(r[index] for r in self.relations)
        return StageOutput(self.logits[index], self.tokens[index], relations)


class EarlyExitOutput(NamedTuple):
    """logits: (B, num_classes) of the exit each sample left at; exit_index: (B,) long;
    confidence: (B,) max softmax probability at that exit."""
    logits: torch.Tensor
    exit_index: torch.Tensor
    confidence: torch.Tensor


class DVTStage(nn.Module):
    """One transformer of the cascade: token embedding (set by subclasses), class token and
    position table, blocks, final norm and head, plus the modules that read the previous
    stage (``feature_reuse_mlp`` in every block, ``relation_reuse_conv`` here)."""

    def __init__(
            self,
            grid: int,
            prev_grid: Optional[int],
            embed_dim: int,
            depth: int,
            num_heads: int,
            mlp_ratio: float,
            qkv_bias: bool,
            norm_layer,
            num_classes: int,
            feature_reuse: bool = False,
            relation_reuse: bool = False,
            reuse_dim: int = 48,
            reuse_hidden: int = 128,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ) -> None:
        super().__init__()
        if prev_grid is None and (feature_reuse or relation_reuse):
            raise ValueError("the first stage has no previous stage to reuse")
        self.grid = grid
        self.num_tokens = grid * grid + 1
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.feature_reuse = feature_reuse
        self.relation_reuse = relation_reuse
        self.num_classes = num_classes
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._build_embed()
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth decay rule
        self.blocks = nn.ModuleList([
            Block(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer,
                reuse_dim=reuse_dim if feature_reuse else 0, reuse_hidden=reuse_hidden)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        if relation_reuse:
            channels = depth * num_heads
            self.relation_reuse_conv = nn.Sequential(
                nn.Conv2d(channels, 3 * channels, kernel_size=1),
                nn.GELU(),
                nn.Conv2d(3 * channels, channels, kernel_size=1),
            )
        self.resample = GridResample(prev_grid, grid) if prev_grid is not None else None
        self.relation_chunk: Optional[int] = None  # samples per relation-reuse step; None: by device
        # CPU inference: relation reuse on fused oneDNN products and sparse resampling (see
        # _relation_biases), reused features resampled sparsely too (_all_reused_features), the
        # patches of ViT stages embedded by a matrix product (PatchEmbed); False keeps the
        # reference operations (what the FLOP counter counts).
        self.cpu_kernels = True
        self.grad_checkpointing = False
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_weights)

    def _build_embed(self) -> None:
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) -> patch tokens (B, grid * grid, C)."""
        raise NotImplementedError

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _relation_biases(self, relations: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Previous stage's per-block logits -> one additive bias per block of this stage.

        ``relation_reuse_conv`` (1x1 convolutions, as matrix products) runs on the previous
        grid, then the maps are resampled to this grid. In training and under
        ``torch.compile`` / ``torch.export`` every bias is built at once, for the whole batch
        (``relation_chunk`` samples at a time when set). In eager inference the convolutions
        run ``relation_chunk`` samples at a time (default: on the CPU, about 16 thousand map
        positions, so the (B, 3 * depth * heads, n, n) hidden tensor is never built whole; the
        whole batch on accelerators), on the CPU as fused products over the positions
        (:meth:`_relation_conv_rows`, unless ``cpu_kernels`` is off), and each block's bias is
        resampled only when that block runs (:class:`BlockBiases`, on the CPU with the sparse
        query-axis resampling): the (B, depth * heads, N + 1, N + 1) tensor of all biases is
        never built either, and the block may take its bias as the buffer of its attention logits.
        """
        B, heads, n, _ = relations[0].shape
        C = len(relations) * heads
        if C != self.depth * self.num_heads:
            raise ValueError(
                f"relation reuse needs depth*heads = {self.depth * self.num_heads} maps from the "
                f"previous stage, got {C}")
        r0 = relations[0]
        training = torch.is_grad_enabled() and (r0.requires_grad or self.relation_reuse_conv[0].weight.requires_grad)
        if capturing_graph() or training:
            chunk = self.relation_chunk
            if capturing_graph() or chunk is None or chunk >= B:  # one graph for every batch size
                maps = self._relation_conv(torch.cat(tuple(relations), dim=1))
            else:
                maps = torch.cat([self._relation_conv(_sample_maps(relations, i, i + chunk))
                                  for i in range(0, B, chunk)])
            return self.resample(maps, relations=True).chunk(self.depth, dim=1)
        if r0.device.type == "cpu" and self.cpu_kernels:
            chunk = self.relation_chunk or max(1, 16384 // (n * n))  # about 10-16 thousand rows per product
            maps = r0.new_empty(self.depth, B, heads, n, n)  # block-major: each block's maps are contiguous
            for start in range(0, B, chunk):
                self._relation_conv_rows(relations, start, start + chunk, out=maps[:, start:start + chunk])
            return BlockBiases(self.resample, maps, sparse=True)
        maps = r0.new_empty(B, C, n, n)
        chunk = self.relation_chunk or (1 if r0.device.type == "cpu" else B)
        hidden = r0.new_empty(min(chunk, B), 3 * C, n * n)  # one buffer for every chunk: no fresh memory per chunk
        for start in range(0, B, chunk):
            self._relation_conv(_sample_maps(relations, start, start + chunk), out=maps[start:start + chunk],
                                hidden=hidden)
        return BlockBiases(self.resample, maps.view(B, self.depth, heads, n, n).transpose(0, 1))

    def _relation_conv_rows(self, relations: Sequence[torch.Tensor], start: int, stop: int,
                            out: torch.Tensor) -> None:
        """CPU inference: ``relation_reuse_conv`` on samples ``start:stop`` of the previous
        stage's relations, written into ``out`` (depth, b, heads, n, n). The maps' positions are the rows
        of two products (b * n * n, C) -> (b * n * n, 3C) -> (b * n * n, C), with the bias and
        the GELU fused into them (:func:`inference_linear`): on the CPU this runs about 1.3x
        (float32) to 2x (bfloat16) faster than the channels-as-rows products of
        :meth:`_relation_conv`. Frozen float32 weights are packed once (:func:`pointwise_conv_weight`):
        the relation reuse into T2T-14's last stage then takes 9% less time (2 cores, AVX-512)."""
        x = torch.cat([r[start:stop].permute(0, 2, 3, 1) for r in relations], dim=-1)  # (b, n, n, C)
        b, n, _, C = x.shape
        conv1, conv2 = self.relation_reuse_conv[0], self.relation_reuse_conv[2]
        h = inference_linear(x.view(-1, C), pointwise_conv_weight(conv1.weight, x), conv1.bias.to(x.dtype), gelu=True)
        y = inference_linear(h, pointwise_conv_weight(conv2.weight, h), conv2.bias.to(x.dtype))
        out.copy_(y.view(b, n, n, self.depth, -1).permute(3, 0, 4, 1, 2))

    def _relation_conv(self, r: torch.Tensor, out: Optional[torch.Tensor] = None,
                       hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``relation_reuse_conv`` on relation maps (b, C, n, n) of the previous grid, as
        matrix products over the maps' positions. Inference passes ``out`` (the result) and
        ``hidden`` (at least b x 3C x n*n, the GELU runs in place there); without them the
        result is a fresh tensor (training, compilation)."""
        b, C, n, _ = r.shape
        conv1, conv2 = self.relation_reuse_conv[0], self.relation_reuse_conv[2]
        w1, w2 = conv1.weight.flatten(1), conv2.weight.flatten(1)  # (3C, C), (C, 3C)
        x = r.flatten(2)  # (b, C, n * n)
        if out is None:
            h = self.relation_reuse_conv[1](torch.baddbmm(conv1.bias[:, None], w1.expand(b, -1, -1), x))
            return torch.baddbmm(conv2.bias[:, None], w2.expand(b, -1, -1), h).view(b, C, n, n)
        # out= takes no autocast: the weights in the maps' dtype
        h = torch.baddbmm(conv1.bias[:, None].to(x.dtype), w1.to(x.dtype).expand(b, -1, -1), x, out=hidden[:b])
        torch.ops.aten.gelu_(h)  # relation_reuse_conv[1], exact GELU
        torch.baddbmm(conv2.bias[:, None].to(h.dtype), w2.to(h.dtype).expand(b, -1, -1), h, out=out.view(b, C, n * n))
        return out

    def _reused_features(self, block: Block, tokens: torch.Tensor) -> torch.Tensor:
        """Previous stage's tokens (B, n + 1, C) -> this block's extra MLP input (B, N + 1, reuse_dim)."""
        f = block.feature_reuse_mlp(tokens)[:, 1:]  # (B, n, reuse_dim)
        f = self.resample(f)  # (B, N, reuse_dim)
        return F.pad(f, (0, 0, 1, 0))  # zeros at the class token

    def _batched_reuse(self) -> bool:
        """Whether every block's reused features are computed at once (:meth:`_all_reused_features`):
        eager inference of an eval-mode stage with feature reuse."""
        return (self.feature_reuse and not self.training and not torch.is_grad_enabled()
                and not capturing_graph())

    def _all_reused_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every block's :meth:`_reused_features` at once: (B, n + 1, C) -> (B, N + 1, depth * reuse_dim),
        block i's in channels [i * reuse_dim, (i + 1) * reuse_dim).

        The blocks' ``feature_reuse_mlp`` read the same tokens: one LayerNorm without affine, the
        blocks' affine factors folded into their first linear layers (one product for all
        blocks, with its bias and GELU fused on the CPU as in the blocks), one batched product
        for the second layers and one resampling, instead of twelve of each. Same
        multiply-adds; equal up to rounding. Frozen weights are folded once and kept
        (:func:`derived_from_frozen`): folding them took 0.5-0.7 ms per call, a third of the
        feature reuse into a stage at one image."""
        mlps = [block.feature_reuse_mlp for block in self.blocks]
        norm, act = mlps[0][0], mlps[0][1].act
        params = [p for m in mlps for p in (m[0].weight, m[0].bias, m[1].fc1.weight, m[1].fc1.bias,
                                            m[1].fc2.weight, m[1].fc2.bias)]
        w1, b1, w2, b2 = derived_from_frozen(_FOLDED_REUSE, params, partial(_fold_reuse_mlps, dtype=tokens.dtype),
                                             tokens.dtype)
        x = F.layer_norm(tokens, norm.normalized_shape, eps=norm.eps)
        if isinstance(act, nn.GELU) and act.approximate == "none" and fused_inference(x, w1):
            h = inference_linear(x, w1, b1, gelu=True)
        else:
            h = act(F.linear(x, w1, b1))
        B, T, _ = h.shape  # (B, n + 1, depth * hidden)
        hidden, reuse = w2.shape[1:]
        f = torch.baddbmm(b2.to(h.dtype), h.view(B * T, self.depth, hidden).transpose(0, 1), w2.to(h.dtype))
        f = f.view(self.depth, B, T, reuse)[:, :, 1:].permute(1, 2, 0, 3).reshape(B, T - 1, self.depth * reuse)
        bags = self.resample.token_bags(B, f.dtype) if self.cpu_kernels and f.device.type == "cpu" else None
        return F.pad(self.resample(f, bags=bags), (0, 0, 1, 0))  # zeros at the class token

    def _run(self, fn: Callable, *args):
        """``fn(*args)``; with gradient checkpointing its activations are recomputed in the
        backward pass instead of being stored (the random layers replay the same draws)."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _block(self, block: Block, x: torch.Tensor, prev: Optional[StageOutput], bias: Optional[torch.Tensor],
               export_relations: bool, consume_bias: bool = False,
               reused: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One block, with the features it reuses from the previous stage (``reused`` when
        already computed)."""
        if reused is None and self.feature_reuse:
            reused = self._reused_features(block, prev.tokens)
        return block(x, reused=reused, bias=bias, return_logits=export_relations, consume_bias=consume_bias)

    def forward(
            self,
            x: Optional[torch.Tensor],
            prev: Optional[StageOutput] = None,
            export_relations: bool = False,
            tokens: Optional[torch.Tensor] = None,
    ) -> StageOutput:
        """Args:
            x: images (B, 3, H, W).
            prev: the previous stage's output; read when this stage reuses features or relations.
            export_relations: keep every block's attention logits for the next stage.
            tokens: the images' :meth:`embed_images`, already computed (``x`` is then not read).
        """
        x, reads = self._enter(x, prev, tokens)
        x, relations = self._blocks(x, prev, reads, export_relations, self.depth)
        out = self.head(self.norm(x)[:, 0])
        return StageOutput(out, x, tuple(relations) if export_relations else None)

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), in any floating dtype -> patch tokens (B, N, C) in the stage's dtype."""
        return self._run(self.embed, x.to(self.cls_token.dtype))  # a bf16/fp16 model takes float32 images

    def _enter(self, x: Optional[torch.Tensor], prev: Optional[StageOutput],
               tokens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, tuple]:
        """Images (or their :meth:`embed_images`, ``tokens``) -> the tokens entering the first block
        (B, N + 1, C), and what the blocks read of the previous stage: their relation biases,
        whether each bias is its block's own to write over, and their reused features (None
        where computed block by block)."""
        if tokens is None:
            tokens = self.embed_images(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = self.pos_drop(torch.cat((cls, tokens), dim=1) + self.pos_embed)  # (B, N + 1, C)
        biases = self._run(self._relation_biases, prev.relations) if self.relation_reuse else (None,) * self.depth
        consume = isinstance(biases, BlockBiases)  # each bias built for its block alone: it may hold the logits
        reused = self._all_reused_features(prev.tokens).chunk(self.depth, dim=-1) if self._batched_reuse() else None
        return x, (biases, consume, reused)

    def _blocks(self, x: torch.Tensor, prev: Optional[StageOutput], reads: tuple, export_relations: bool,
                stop: int) -> tuple[torch.Tensor, list]:
        """Blocks ``0 .. stop - 1`` on the tokens from :meth:`_enter`; their logits when exported."""
        biases, consume, reused = reads
        relations = []
        for i in range(stop):
            x, logits = self._run(self._block, self.blocks[i], x, prev, biases[i], export_relations, consume,
                                  None if reused is None else reused[i])
            relations.append(logits)
        return x, relations

    def forward_class_first(self, x: Optional[torch.Tensor], prev: Optional[StageOutput] = None,
                            export_relations: bool = False,
                            tokens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, "LastBlockInputs", tuple]:
        """The stage as early exit runs it: every block but the last, then the last block for
        the class token alone, which is all the exit reads (the other tokens attend and pass
        their MLP only for the samples that go on: ``stage.blocks[-1].finish(*inputs)``). Inference only.

        ``tokens``: the images' :meth:`embed_images`, already computed (``x`` is then not read).

        Returns:
            The exit's logits (B, num_classes); what the last block needs to finish
            (:class:`LastBlockInputs`); the attention logits of the blocks before it when
            ``export_relations`` (else empty).
        """
        x, reads = self._enter(x, prev, tokens)
        x, relations = self._blocks(x, prev, reads, export_relations, self.depth - 1)
        biases, _, reused = reads
        last = self.blocks[-1]
        if reused is not None:
            reused = reused[-1].contiguous()
        elif self.feature_reuse:
            reused = self._reused_features(last, prev.tokens)
        inputs = LastBlockInputs(x, last.attention_inputs(x), reused, biases[self.depth - 1])
        cls, _ = last.finish(*inputs, queries=1)
        return self.head(self.norm(cls)[:, 0]), inputs, (tuple(relations) if export_relations else ())


class LastBlockInputs(NamedTuple):
    """What a stage's last block reads, kept by early exit for the samples that go on:
    ``tokens`` entering it (B, N + 1, C), their ``qkv`` product (B, N + 1, 3C), the block's
    reused features (B, N + 1, reuse_dim) or None, its relation bias (B, heads, N + 1, N + 1) or None."""
    tokens: torch.Tensor
    qkv: torch.Tensor
    reused: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


def _sample_maps(relations: Sequence[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Samples ``start:stop`` of every block's relations (b, heads, n, n), as one (b, depth * heads, n, n)."""
    return torch.cat([r[start:stop] for r in relations], dim=1)


# The feature-reuse MLPs of a stage's blocks folded for :meth:`DVTStage._all_reused_features`, per
# first parameter, while the parameters stay frozen and unchanged.
_FOLDED_REUSE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _fold_reuse_mlps(*params: torch.Tensor, dtype: torch.dtype, kept: bool) -> tuple[torch.Tensor, ...]:
    """The blocks' ``feature_reuse_mlp`` parameters (per block: norm weight and bias, fc1 weight
    and bias, fc2 weight and bias) -> ``(w1, b1, w2, b2)`` in ``dtype``: the norms' affine factors
    folded into the first layers, stacked over blocks, (depth * hidden, C) and (depth * hidden,);
    the second layers (depth, hidden, reuse_dim) and (depth, 1, reuse_dim). A ``kept`` ``w1`` is a
    frozen parameter, so that the fused product may read it packed (:func:`packed_weight`)."""
    blocks = [params[i:i + 6] for i in range(0, len(params), 6)]
    w1 = torch.cat([fc1_w.float() * norm_w.float() for norm_w, _, fc1_w, *_ in blocks]).to(dtype)
    b1 = torch.cat([(fc1_w.float() * norm_b.float()).sum(-1) + fc1_b.float()
                    for _, norm_b, fc1_w, fc1_b, *_ in blocks]).to(dtype)
    w2 = torch.stack([fc2_w for *_, fc2_w, _ in blocks]).transpose(1, 2).to(dtype)
    b2 = torch.stack([fc2_b for *_, fc2_b in blocks])[:, None].to(dtype)
    return (nn.Parameter(w1, requires_grad=False) if kept else w1), b1, w2, b2


class BlockBiases(Sequence):
    """The relation biases of a stage's blocks, each resampled from the previous grid when
    read: ``biases[i]`` is a fresh (B, heads, N + 1, N + 1) tensor for block ``i``.

    Args:
        resample: the stage's :class:`GridResample`.
        maps: (depth, B, heads, n, n) relation maps after ``relation_reuse_conv``, block by
            block. A block's maps are made contiguous before they are resampled: a product over
            a strided slice runs as many small batched products (several times slower in bfloat16).
        sparse: resample the query axis as weighted sums of rows (:meth:`GridResample.relation_bags`,
            built once here for every block) instead of a dense product.
    """

    def __init__(self, resample: GridResample, maps: torch.Tensor, sparse: bool = False) -> None:
        self.resample, self.maps = resample, maps
        self.bags = resample.relation_bags(maps.shape[1] * maps.shape[2], maps.dtype) if sparse else None

    def __len__(self) -> int:
        return self.maps.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.resample(self.maps[i].contiguous(), relations=True, bags=self.bags)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class T2TEmbed(nn.Module):
    """Tokens-to-token embedding: three soft splits (unfolds) with a Performer in between,
    then a linear projection.

    The soft splits are taken as strided views and copied once, not through ``nn.Unfold``
    (im2col, then a transposed copy: 5-11x slower here). The image split keeps
    ``nn.Unfold``'s channel order (channel, row, column); the splits of the token maps are laid
    out (row, column, channel), so that each patch position's channels are one contiguous run,
    and the layers that read them (the Performer's ``norm1`` and ``kqv``, ``project``) take
    their weights permuted to that order. The result is that of the unfold layout up to
    rounding; parameters and state dicts keep the unfold layout.
    """

    def __init__(self, img_size: int, geometry: tuple[int, int, int], in_chans: int, embed_dim: int,
                 token_dim: int = 64):
        super().__init__()
        kernel, stride, padding = geometry
        self.soft_split0 = nn.Unfold(kernel_size=kernel, stride=stride, padding=padding)
        self.soft_split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.attention1 = TokenPerformer(in_chans * kernel * kernel, token_dim)
        self.attention2 = TokenPerformer(token_dim * 9, token_dim)
        self.project = nn.Linear(token_dim * 9, embed_dim)
        g0 = unfold_grid(img_size, kernel, stride, padding)
        g1 = unfold_grid(g0, 3, 2, 1)
        self.grids = (g0, g1, unfold_grid(g1, 3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g0, g1, _ = self.grids
        x = self.attention1(image_patches(x, *_unfold_geometry(self.soft_split0)))  # (B, g0*g0, token_dim)
        k1, s1, p1 = _unfold_geometry(self.soft_split1)
        x = self.attention2(token_patches(x, g0, k1, s1, p1), positions=k1 * k1)  # (B, g1*g1, token_dim)
        k2, s2, p2 = _unfold_geometry(self.soft_split2)
        p = token_patches(x, g1, k2, s2, p2)  # (B, g2*g2, k2 * k2 * token_dim)
        return F.linear(p, channels_last_weight(self.project.weight, k2 * k2), self.project.bias)  # (B, g2*g2, C)


def _unfold_geometry(unfold: nn.Unfold) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a square ``nn.Unfold``: the soft splits keep their geometry there."""
    return unfold.kernel_size, unfold.stride, unfold.padding


def image_patches(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """``nn.Unfold(kernel, stride=stride, padding=padding)(x).transpose(1, 2)``, contiguous:
    images (B, C, H, W) -> patches (B, g*g, C*kernel*kernel), ordered (channel, row, column)."""
    B, C = x.shape[:2]
    u = F.pad(x, (padding,) * 4).unfold(2, kernel, stride).unfold(3, kernel, stride)  # (B, C, g, g, k, k)
    return u.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, C * kernel * kernel)


def token_patches(x: torch.Tensor, grid: int, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Soft split of a token map: tokens (B, grid*grid, C) -> patches (B, g*g, kernel*kernel*C),
    ordered (row, column, channel): the unfold of the map with its channels last."""
    B, _, C = x.shape
    u = F.pad(x.view(B, grid, grid, C), (0, 0) + (padding,) * 4)  # (B, grid + 2p, grid + 2p, C)
    u = u.unfold(1, kernel, stride).unfold(2, kernel, stride)  # (B, g, g, C, k, k)
    return u.permute(0, 1, 2, 4, 5, 3).reshape(B, -1, kernel * kernel * C)


class T2TStage(DVTStage):
    """A T2T-ViT stage (Performer T2T module, fixed sinusoid positions)."""

    def __init__(self, img_size: int, geometry: tuple[int, int, int], in_chans: int = 3, token_dim: int = 64,
                 prev_grid: Optional[int] = None, **kwargs):
        self._embed_args = (img_size, geometry, in_chans, kwargs["embed_dim"], token_dim)
        super().__init__(_t2t_grid(img_size, geometry), prev_grid, **kwargs)

    def _build_embed(self) -> None:
        table = sinusoid_table(self.num_tokens, self.embed_dim)
        self.pos_embed = nn.Parameter(torch.empty(table.shape).copy_(table), requires_grad=False)
        self.tokens_to_token = T2TEmbed(*self._embed_args)
        self.embed_chunk: Optional[int] = None  # images per embedding call; None: by device and size
        del self._embed_args

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        chunk = self._embed_chunk(x)
        if chunk >= x.shape[0]:
            return self.tokens_to_token(x)
        return torch.cat([self.tokens_to_token(part) for part in x.split(chunk)])

    def _embed_chunk(self, x: torch.Tensor) -> int:
        """Images per call of the T2T embedding. In CPU inference a few at a time, so that its
        largest tensors stay under ``T2T_CHUNK_BYTES``: larger ones are fresh memory from the
        operating system on every call (page faults) and out of cache. Measured at batch 32,
        224 px, 2 threads: the three embeddings take 33% less time in float32 and 21% less in
        bfloat16. Training, accelerators and ``torch.compile`` take the whole batch;
        ``embed_chunk`` overrides the choice."""
        B = x.shape[0]
        if self.embed_chunk is not None:
            return self.embed_chunk
        if x.device.type != "cpu" or torch.is_grad_enabled() or capturing_graph():
            return B
        t2t = self.tokens_to_token
        widest = max(t2t.attention1.kqv.in_features, t2t.attention1.kqv.out_features)
        per_image = t2t.grids[0] ** 2 * widest * x.element_size()
        return max(1, T2T_CHUNK_BYTES // per_image)


# Largest T2T embedding tensor per call in CPU inference (see T2TStage._embed_chunk).
T2T_CHUNK_BYTES = 16 << 20


def _t2t_grid(img_size: int, geometry: tuple[int, int, int]) -> int:
    g = unfold_grid(img_size, *geometry)
    return unfold_grid(unfold_grid(g, 3, 2, 1), 3, 2, 1)


class PatchEmbed(nn.Module):
    """Convolutional patch embedding, flattened to tokens."""

    def __init__(self, geometry: tuple[int, int, int], in_chans: int, embed_dim: int):
        super().__init__()
        kernel, stride, padding = geometry
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor, as_product: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B, grid*grid, embed_dim). ``as_product``: in CPU inference, patches
        that do not overlap (stride = kernel, as in every released geometry) are cut out of the
        image and embedded by one matrix product, with the linear layers' kernels
        (:func:`models.layers.fused_inference`), instead of the convolution, which reorders its
        weight on every call: the same multiply-adds; on 2 cores with AVX2 the first stage's
        32 x 32 patches 1.8x as fast at one image, 1.2x at 16 and 1.1x at 64, the last stage's
        16 x 16 ones within 2% of the convolution either way."""
        conv = self.proj
        if as_product and x.device.type == "cpu" and not torch.is_grad_enabled() and not capturing_graph() \
                and self._plain_patches():
            return self._patch_product(x)
        return conv(x).flatten(2).transpose(1, 2)

    def _plain_patches(self) -> bool:
        """The projection is an ``nn.Conv2d`` itself, without hooks, over patches that do not
        overlap, zero-padded: one matrix product computes what it computes."""
        conv = self.proj
        return (plain_layer(conv, nn.Conv2d) and conv.stride == conv.kernel_size and conv.dilation == (1, 1)
                and conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))

    def _patch_product(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.proj
        (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
        x = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        B, C, H, W = x.shape
        gh, gw = H // kh, W // kw  # the convolution leaves out the rows and columns past the last patch
        patches = x[:, :, :gh * kh, :gw * kw].reshape(B, C, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(B * gh * gw, C * kh * kw)  # each row one patch, (c, i, j) as the weight's
        if fused_inference(patches, conv.weight):
            y = inference_linear(patches, pointwise_conv_weight(conv.weight, patches), conv.bias)
        else:
            y = F.linear(patches, conv.weight.flatten(1), conv.bias)
        return y.view(B, gh * gw, conv.out_channels)


class ViTStage(DVTStage):
    """A ViT/DeiT stage (patch embedding, learned positions)."""

    def __init__(self, img_size: int, geometry: tuple[int, int, int], in_chans: int = 3,
                 prev_grid: Optional[int] = None, **kwargs):
        self._embed_args = (geometry, in_chans, kwargs["embed_dim"])
        super().__init__(unfold_grid(img_size, *geometry), prev_grid, **kwargs)

    def _build_embed(self) -> None:
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, self.embed_dim))
        trunc_normal_(self.pos_embed, std=.02)
        self.patch_embed = PatchEmbed(*self._embed_args)
        del self._embed_args

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x, as_product=self.cpu_kernels)


class DVT(nn.Module):
    """A cascade of transformers, each seeing more tokens than the one before.

    Args:
        backbone: ``"t2t"`` (T2T-ViT stages) or ``"vit"`` (ViT/DeiT stages).
        grids: token grid side of each stage for ``"vit"`` (patch geometry derived from
            ``img_size``); ignored for ``"t2t"``.
        t2t_geometries: (kernel, stride, padding) of the first soft split of each T2T stage.
        img_size: input resolution.
        num_classes: classes of every exit.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, norm_eps: the transformer of each stage.
        feature_reuse, relation_reuse: reuse the previous stage's features / attention logits
            in every stage but the first.
        reuse_dim, reuse_hidden: width of the reused features and of the MLP producing them.
        token_dim: width of the T2T Performer tokens.
        drop_rate, attn_drop_rate, drop_path_rate: regularisation, per stage.
    """

    def __init__(
            self,
            backbone: str = "vit",
            grids: Sequence[int] = (7, 10, 14),
            t2t_geometries: Sequence[tuple[int, int, int]] = ((14, 8, 3), (11, 6, 5), (7, 4, 2)),
            img_size: int = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 6,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            norm_eps: float = 1e-6,
            feature_reuse: bool = True,
            relation_reuse: bool = True,
            reuse_dim: int = 48,
            reuse_hidden: int = 128,
            token_dim: int = 64,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ) -> None:
        super().__init__()
        if backbone not in ("t2t", "vit"):
            raise ValueError(f"backbone must be 't2t' or 'vit', got {backbone!r}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.feature_reuse = feature_reuse
        self.relation_reuse = relation_reuse
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_features = self.embed_dim = embed_dim
        common = dict(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            norm_layer=partial(nn.LayerNorm, eps=norm_eps), num_classes=num_classes, reuse_dim=reuse_dim,
            reuse_hidden=reuse_hidden, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate, in_chans=in_chans)
        if backbone == "t2t":
            make = [partial(T2TStage, img_size, tuple(g), token_dim=token_dim) for g in t2t_geometries]
        else:
            make = [partial(ViTStage, img_size, vit_patch_geometry(img_size, g)) for g in grids]
        stages, prev_grid = [], None
        for k, build in enumerate(make):
            stage = build(prev_grid=prev_grid, feature_reuse=k > 0 and feature_reuse,
                          relation_reuse=k > 0 and relation_reuse, **common)
            stages.append(stage)
            prev_grid = stage.grid
        self.stages = nn.ModuleList(stages)
        self.grids = tuple(s.grid for s in self.stages)
        self.pretrained_cfg = dict(
            input_size=(in_chans, img_size, img_size), interpolation="bicubic", crop_pct=0.875,
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=num_classes,
            classifier=tuple(f"stages.{k}.head" for k in range(len(stages))))
        self.register_load_state_dict_pre_hook(_convert_on_load)

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"stages.{k}.{n}" for k in range(self.num_exits) for n in ("cls_token", "pos_embed")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block, token embedding and relation-reuse path in the backward pass
        instead of keeping their activations (timm convention). Outputs and gradients are
        unchanged; training memory drops, at the cost of running the blocks' forward twice."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth for layer-wise learning-rate decay (timm convention).

        A cascade is several transformers side by side, each with its own exit, so depth is
        counted within a stage: group 0 holds every stage's input side (patch or T2T
        embedding, class token, positions, the relation-reuse convolutions that feed the
        stage), group i + 1 holds block i of every stage (with the feature-reuse MLP it
        owns; the final norm joins the last block), and the heads come last. With
        ``layer_decay`` d and depth L, each exit's transformer gets the scales a plain ViT of
        depth L gets: d^(L+1) for the embeddings up to d for the last block and 1 for the
        heads. Stacking the stages end to end instead would give stage 0 d^(3L+1), which
        freezes the first exit. With ``coarse`` the final norms go with the heads.
        """
        return dict(
            stem=r"^stages\.\d+\.(?:cls_token|pos_embed|patch_embed|tokens_to_token|relation_reuse_conv)",
            blocks=r"^stages\.\d+\.blocks\.(\d+)" if coarse else [
                (r"^stages\.\d+\.blocks\.(\d+)", None),
                (r"^stages\.\d+\.norm", (99999,)),
            ],
        )

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Images (B, 3, H, W) -> every stage's final normed tokens, a tuple of (B, N_k + 1, C)
        with the class token first (N_k = grid_k ** 2). Stages run in order, each reusing the
        previous one as in :meth:`forward`."""
        return tuple(stage.norm(out.tokens) for stage, out in zip(self.stages, self.iter_stages(x)))

    def forward_head(self, features: Sequence[torch.Tensor], pre_logits: bool = False) -> tuple[torch.Tensor, ...]:
        """Per-stage features from :meth:`forward_features` -> per-exit logits (B, num_classes),
        or with ``pre_logits`` the class-token features (B, C) the heads read.
        ``forward(x) == forward_head(forward_features(x))``."""
        if len(features) != self.num_exits:
            raise ValueError(f"expected features of {self.num_exits} stages, got {len(features)}")
        pooled = tuple(f[:, 0] for f in features)  # (B, C) class tokens
        return pooled if pre_logits else tuple(stage.head(p) for stage, p in zip(self.stages, pooled))

    def get_classifier(self) -> nn.ModuleList:
        return nn.ModuleList(s.head for s in self.stages)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New heads for ``num_classes`` on every exit (e.g. for transfer learning)."""
        self.num_classes = num_classes
        for stage in self.stages:
            stage.reset_classifier(num_classes)

    def iter_stages(self, x: Optional[torch.Tensor], num_exits: Optional[int] = None,
                    tokens: Optional[Sequence[torch.Tensor]] = None) -> Iterator[StageOutput]:
        """Run the first ``num_exits`` stages (all by default), yielding each stage's output;
        with ``tokens`` (:meth:`embed_images`, computed beforehand) ``x`` is not read."""
        num_exits = self.num_exits if num_exits is None else num_exits
        if tokens is None:
            self._check_images(x)
        prev = None
        for k in range(num_exits):
            prev = self.stages[k](x, prev, export_relations=self._exports_relations(k),
                                  tokens=None if tokens is None else tokens[k])
            yield prev

    def embed_images(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every stage's patch tokens of images ``x`` (:meth:`DVTStage.embed_images`)."""
        self._check_images(x)
        return tuple(stage.embed_images(x) for stage in self.stages)

    def from_tokens(self, *tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`forward` from every stage's patch tokens, ``embed_images(x)``."""
        if len(tokens) != self.num_exits:
            raise ValueError(f"from_tokens takes the patch tokens of every stage ({self.num_exits}, "
                             f"model.embed_images(x)), got {len(tokens)}")
        return tuple(out.logits for out in self.iter_stages(None, tokens=tokens))

    def _check_images(self, x: torch.Tensor) -> torch.Tensor:
        """``x``, once checked: the stages' token grids and position tables are built for one input
        size, and integer images (raw pixels) are refused."""
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (batch, {', '.join(map(str, expected))}), got {tuple(x.shape)}; "
                f"this model was built for img_size={self.img_size} (build it with img_size=... for other sizes)")
        if not x.is_floating_point():  # the stages cast images to their dtype: 0-255 pixels would pass unnoticed
            raise TypeError(f"expected floating-point images, scaled to 0-1 and normalised with the model's mean "
                            f"and std (timm.data.resolve_model_data_config(model)), got {x.dtype}")
        return x

    def _exports_relations(self, k: int) -> bool:
        return k + 1 < self.num_exits and self.stages[k + 1].relation_reuse

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Images (B, 3, H, W) -> per-exit logits, a tuple of (B, num_classes)."""
        return tuple(out.logits for out in self.iter_stages(x))

    def exit_steps(self) -> list["ExitStep"]:
        """Every stage as a function of tensors alone, :class:`ExitStep`: what
        :meth:`forward_early_exit` runs, and what ``torch.compile`` and ``torch.export`` take
        one stage at a time (the selection of the samples that go on stays outside)."""
        stages = list(self.stages)
        return [ExitStep(stage, export_relations=self._exports_relations(k), last=k + 1 == self.num_exits,
                         prev=stages[k - 1] if k else None,
                         hand_on=k + 1 < len(stages) and (stages[k + 1].feature_reuse or stages[k + 1].relation_reuse))
                for k, stage in enumerate(stages)]

    @torch.no_grad()
    def forward_early_exit(
            self,
            x: torch.Tensor,
            thresholds: Sequence[float] | torch.Tensor,
            steps: Optional[Sequence[Callable[..., tuple[torch.Tensor, ...]]]] = None,
    ) -> EarlyExitOutput:
        """Adaptive inference: every stage runs only on the samples still in the cascade.

        A sample leaves at the first exit whose max softmax probability is >= that exit's
        threshold (the last exit takes everyone left). The reused features and relations of
        the samples that go on are gathered from the previous stage.

        Args:
            x: images (B, 3, H, W).
            thresholds: one confidence threshold per exit.
            steps: one callable per stage with the contract of :class:`ExitStep` (default:
                :meth:`exit_steps`); compiled or exported stages go here.
        """
        self._check_images(x)
        thresholds = self._checked_thresholds(thresholds, x.device)
        return run_early_exit(self._checked_steps(steps), x, thresholds)

    @torch.no_grad()
    def queued_early_exit(
            self,
            batches: Iterable[torch.Tensor],
            thresholds: Sequence[float] | torch.Tensor,
            queue: Optional[int] = None,
            steps: Optional[Sequence[Callable[..., tuple[torch.Tensor, ...]]]] = None,
    ) -> Iterator[EarlyExitOutput]:
        """Real early exit over a stream of batches, the later stages run on full batches: the
        samples that go on wait until ``queue`` of them are there (:func:`queued_early_exit`).
        Yields one :class:`EarlyExitOutput` per batch, in order, once all its samples have left.

        Args:
            batches: image batches (B_i, 3, H, W), e.g. from a data loader.
            thresholds: one confidence threshold per exit.
            queue: samples a later stage waits for (default: the first batch's size).
            steps: as in :meth:`forward_early_exit`.
        """
        yield from self.early_exit_stream(thresholds, queue, steps).over(batches)  # checked before any batch is read

    def early_exit_stream(
            self,
            thresholds: Sequence[float] | torch.Tensor,
            queue: Optional[int] = None,
            steps: Optional[Sequence[Callable[..., tuple[torch.Tensor, ...]]]] = None,
    ) -> "EarlyExitStream":
        """:meth:`queued_early_exit` with the batches handed in: ``stream.push(x)`` returns the
        results of the batches answered so far, ``stream.close()`` the rest (:class:`EarlyExitStream`)."""
        return EarlyExitStream(self._checked_steps(steps), self._checked_thresholds(thresholds, torch.device("cpu")),
                               queue, prepare=self._check_images)

    def _checked_steps(self, steps: Optional[Sequence[Callable]]) -> Sequence[Callable]:
        steps = self.exit_steps() if steps is None else steps
        if len(steps) != self.num_exits:
            raise ValueError(f"expected {self.num_exits} stage steps, got {len(steps)}")
        return steps

    def _checked_thresholds(self, thresholds: Sequence[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
        thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=device)
        if thresholds.shape != (self.num_exits,):
            raise ValueError(f"expected {self.num_exits} thresholds, got shape {tuple(thresholds.shape)}")
        return thresholds


class ExitStep(nn.Module):
    """One stage of the cascade as a function of tensors only, for early exit:
    ``(images, *carry) -> (logits, confidence, *carry_out)``.

    The stage runs its last block for the class token alone (all its exit reads,
    :meth:`DVTStage.forward_class_first`); the rest of that block runs in the next step, for
    the samples that go on, when the next stage reuses the stage's tokens or relations. So
    ``carry`` (empty for the first stage, and when this stage reuses nothing) is the previous
    stage's :class:`LastBlockInputs` (the tokens entering its last block (B, n + 1, C), their
    qkv product (B, n + 1, 3C), then the block's reused features (B, n + 1, reuse_dim) if that
    stage reuses features, its relation bias (B, heads, n + 1, n + 1) if it reuses relations),
    then, when this stage reuses relations, the attention logits (B, heads, n + 1, n + 1) of
    every block of the previous stage but the last (:attr:`carry_names`). ``confidence`` is the
    max softmax probability (B,) in float32. The last stage returns no carry. Everything here
    is batch-size agnostic and free of data-dependent control flow, so a stage compiles to one
    graph with a dynamic batch and exports with ``torch.export``.

    Args:
        stage: the stage; shared, not copied.
        export_relations: hand this stage's attention logits on (the next stage reuses them).
        last: the last exit (nothing to hand on).
        prev: the previous stage (its last block is finished here), or None for the first.
        hand_on: the next stage reuses this one's tokens or relations.
    """

    def __init__(self, stage: DVTStage, export_relations: bool, last: bool, prev: Optional[DVTStage] = None,
                 hand_on: bool = True) -> None:
        super().__init__()
        self.stage = stage
        self.export_relations = export_relations and not last
        self.last = last
        self.hand_on = hand_on and not last
        reads_prev = stage.feature_reuse or stage.relation_reuse
        self.prev_block = prev.blocks[-1] if prev is not None and reads_prev else None
        self.prev_parts = ("reused",) * bool(prev is not None and prev.feature_reuse) + \
            ("bias",) * bool(prev is not None and prev.relation_reuse)

    @property
    def carry_names(self) -> list[str]:
        """Names of the tensors this step hands on, in order (empty for the last stage)."""
        if not self.hand_on:
            return []
        parts = ["block_tokens", "block_qkv"]
        parts += ["block_reused"] * self.stage.feature_reuse + ["block_bias"] * self.stage.relation_reuse
        return parts + [f"relations_{i}" for i in range(self.stage.depth - 1)] * self.export_relations

    def forward(self, x: torch.Tensor, *carry: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.from_tokens(*self.embed_images(x), *carry)

    def embed_images(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        """The stage's patch tokens of images ``x`` (:meth:`DVTStage.embed_images`), as a 1-tuple."""
        return (self.stage.embed_images(x),)

    def from_tokens(self, tokens: torch.Tensor, *carry: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`forward` from the images' patch tokens, ``stage.embed_images(x)``."""
        logits, inputs, relations = self.stage.forward_class_first(None, self._previous(carry), self.export_relations,
                                                                   tokens=tokens)
        confidence = logits.float().softmax(dim=-1).amax(dim=-1)  # (B,)
        if not self.hand_on:
            return logits, confidence
        return (logits, confidence) + tuple(t for t in inputs if t is not None) + relations

    def _previous(self, carry: tuple[torch.Tensor, ...]) -> Optional[StageOutput]:
        """The previous stage's output as this stage reads it, its last block finished from ``carry``."""
        if self.prev_block is None:
            return None
        parts = dict(zip(("tokens", "qkv") + self.prev_parts, carry))
        inputs = LastBlockInputs(parts["tokens"], parts["qkv"], parts.get("reused"), parts.get("bias"))
        relations = carry[2 + len(self.prev_parts):]
        tokens, logits = self.prev_block.finish(*inputs, return_logits=self.stage.relation_reuse)
        return StageOutput(tokens, tokens, relations + (logits,) if self.stage.relation_reuse else None)


def run_early_exit(steps: Sequence[Callable[..., tuple[torch.Tensor, ...]]], x: torch.Tensor,
                   thresholds: torch.Tensor) -> EarlyExitOutput:
    """Run stage steps (:class:`ExitStep` contract: eager, compiled or exported) with real
    early exit: after each stage, the samples whose confidence reaches that exit's threshold
    leave; the images and carried tensors of the others are gathered for the next stage.

    Args:
        steps: one callable per exit.
        x: images (B, 3, H, W).
        thresholds: (num_exits,) float32 tensor; the last entry is ignored.
    """
    B = x.shape[0]
    active = torch.arange(B, device=x.device)  # original indices of the samples still running
    carry: tuple[torch.Tensor, ...] = ()
    logits = exit_index = confidence = None
    for k, step in enumerate(steps):
        out, conf, *rest = step(x, *carry)
        if logits is None:
            logits = out.new_empty(B, out.shape[1])
            exit_index = torch.empty(B, dtype=torch.long, device=x.device)
            confidence = torch.empty(B, dtype=torch.float32, device=x.device)
        leave_mask = conf >= thresholds[k] if k + 1 < len(steps) else torch.ones_like(conf, dtype=torch.bool)
        leave = leave_mask.nonzero().squeeze(1)  # positions in the current batch
        idx = active.index_select(0, leave)
        logits.index_copy_(0, idx, out.index_select(0, leave).to(logits.dtype))
        exit_index.index_fill_(0, idx, k)
        confidence.index_copy_(0, idx, conf.index_select(0, leave))
        if leave.numel() == active.numel():
            break
        if leave.numel():
            stay = (~leave_mask).nonzero().squeeze(1)
            active, x = active.index_select(0, stay), x.index_select(0, stay)
            rest = [t.index_select(0, stay) for t in rest]
        carry = tuple(rest)
    return EarlyExitOutput(logits, exit_index, confidence)


class _Batch:
    """Results of one input batch of :func:`queued_early_exit`, filled as its samples leave."""

    def __init__(self, logits: torch.Tensor) -> None:
        B = logits.shape[0]
        self.left = B
        self.out = EarlyExitOutput(logits.new_empty(B, logits.shape[1]),
                                   torch.empty(B, dtype=torch.long, device=logits.device),
                                   torch.empty(B, dtype=torch.float32, device=logits.device))

    def fill(self, pos: torch.Tensor, logits: torch.Tensor, exit_index: int, conf: torch.Tensor) -> None:
        self.out.logits.index_copy_(0, pos, logits.to(self.out.logits.dtype))
        self.out.exit_index.index_fill_(0, pos, exit_index)
        self.out.confidence.index_copy_(0, pos, conf)
        self.left -= pos.numel()


def queued_early_exit(steps: Sequence[Callable[..., tuple[torch.Tensor, ...]]], batches: Iterable[torch.Tensor],
                      thresholds: torch.Tensor, queue: Optional[int] = None) -> Iterator[EarlyExitOutput]:
    """Real early exit over a stream of batches, the later stages run on full batches.

    :func:`run_early_exit` runs stage k+1 on the samples of one batch that stage k was not
    sure of: a few images, on which a stage runs well below its speed on a full batch (matrix
    products of few rows). Here those samples wait, with what they carry, until ``queue`` of
    them are there, from as many batches as it takes; stage k+1 then runs on exactly ``queue``
    samples. When the stream ends, every stage runs on whatever waits for it. A sample's result
    is the one :func:`run_early_exit` gives (up to the rounding of kernels at another batch
    size); it comes later, with its batch.

    Args:
        steps: one callable per exit (:class:`ExitStep` contract).
        batches: image batches (B_i, 3, H, W); stage 1 runs on each as it comes.
        thresholds: (num_exits,) float32 tensor; the last entry is ignored.
        queue: samples a later stage waits for (default: the first batch's size).

    Yields:
        One :class:`EarlyExitOutput` per input batch, in order, as soon as every sample of it
        and of the batches before it has left.
    """
    yield from EarlyExitStream(steps, thresholds, queue).over(batches)


class EarlyExitStream:
    """:func:`queued_early_exit` one batch at a time, for callers that hand batches in rather
    than being pulled from (a timed validation loop, a server): :meth:`push` runs stage 1 on a
    batch and every later stage whose queue fills, and returns the results of the batches now
    complete, in order; :meth:`flush` runs what waits now and :meth:`close` does so at the end,
    each returning the rest.

    Args:
        steps: one callable per exit (:class:`ExitStep` contract).
        thresholds: (num_exits,) float32 tensor; the last entry is ignored.
        queue: samples a later stage waits for (default: the first batch's size).
        prepare: called on every batch before it runs, returns the batch to run (the model's
            input checks; a runtime's conversion).
    """

    def __init__(self, steps: Sequence[Callable[..., tuple[torch.Tensor, ...]]], thresholds: torch.Tensor,
                 queue: Optional[int] = None,
                 prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        if queue is not None and queue < 1:
            raise ValueError(f"queue must be at least 1, got {queue}")
        self.steps, self.thresholds, self.queue, self.prepare = steps, thresholds, queue, prepare
        self.waiting: list[_Waiting] = []  # per stage; entry 0 unused: stage 1 runs on the input batches
        self.batches: dict[int, _Batch] = {}  # per input batch not yet answered, its results so far
        self.pushed = self.next_answer = 0
        self.closed = False

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> list[EarlyExitOutput]:
        """Stage 1 on batch ``x`` (B_i, 3, H, W), the later stages on each full queue; returns
        the :class:`EarlyExitOutput` of every batch now answered (this one or earlier ones)."""
        if self.closed:
            raise RuntimeError("this early-exit stream is closed")
        if self.prepare is not None:
            x = self.prepare(x)
        if not self.waiting:  # the first batch gives the device, and the first non-empty one the queue unless set
            self.thresholds = self.thresholds.to(x.device)
            self.queue = self.queue or x.shape[0] or None
            if self.queue is not None:
                self.waiting = [_Waiting(self.queue) for _ in self.steps]
        i, self.pushed = self.pushed, self.pushed + 1
        self.run(0, torch.full((x.shape[0],), i, device=x.device), torch.arange(x.shape[0], device=x.device), x,
                 batch=i)
        return self.answered()

    @torch.no_grad()
    def flush(self) -> list[EarlyExitOutput]:
        """Every stage runs now on what waits for it, however few (a server bounding how long an
        image may wait); returns the results of the batches now answered: all pushed so far.
        The stream stays open."""
        for k in range(1, len(self.waiting)):
            if self.waiting[k].count:
                self.run(k, *self.waiting[k].take())
        return self.answered()

    def close(self) -> list[EarlyExitOutput]:
        """The stream has ended: :meth:`flush`, and no more batches."""
        self.closed = True
        return self.flush()

    def over(self, batches: Iterable[torch.Tensor]) -> Iterator[EarlyExitOutput]:
        """Push every batch of ``batches``, then close: each batch's result as soon as it is answered."""
        for x in batches:
            yield from self.push(x)
        yield from self.close()

    def run(self, k: int, owner: torch.Tensor, pos: torch.Tensor, x: torch.Tensor, *carry: torch.Tensor,
            batch: Optional[int] = None) -> None:
        """Stage ``k`` on these samples; those that leave fill their batches' results, the others wait."""
        out, conf, *rest = self.steps[k](x, *carry)
        if batch is not None:  # stage 1 on input batch number ``batch``
            self.batches[batch] = _Batch(out)
        last = k + 1 == len(self.steps)
        leave_mask = torch.ones_like(conf, dtype=torch.bool) if last else conf >= self.thresholds[k]
        leave = leave_mask.nonzero().squeeze(1)
        if leave.numel():
            who, at = owner.index_select(0, leave), pos.index_select(0, leave)
            out, left_conf = out.index_select(0, leave), conf.index_select(0, leave)
            for b in who.unique().tolist():
                mine = (who == b).nonzero().squeeze(1)
                self.batches[b].fill(at.index_select(0, mine), out.index_select(0, mine), k,
                                     left_conf.index_select(0, mine))
        if leave.numel() < conf.numel():
            self.wait(k + 1, (owner, pos, x, *rest), (~leave_mask).nonzero().squeeze(1))

    def wait(self, k: int, parts: tuple[torch.Tensor, ...], rows: torch.Tensor) -> None:
        """Queue ``rows`` of ``parts`` (batch, position, x, *carry) for stage ``k``; run it each
        time ``queue`` samples wait."""
        waiting, done = self.waiting[k], 0
        while done < rows.numel():
            done += waiting.put(parts, rows[done:])
            if waiting.count == self.queue:
                self.run(k, *waiting.take())

    def answered(self) -> list[EarlyExitOutput]:
        """The results of the next batches in order, as long as they are complete."""
        done = []
        while self.next_answer in self.batches and self.batches[self.next_answer].left == 0:
            done.append(self.batches.pop(self.next_answer).out)
            self.next_answer += 1
        return done


class _Waiting:
    """The samples waiting for one stage, gathered into buffers of ``queue`` rows allocated once
    per stream: no fresh memory per batch (a queue of float32 relation maps is hundreds of MB,
    and fresh memory of that size is page-faulted in again on every use)."""

    def __init__(self, queue: int) -> None:
        self.queue, self.count = queue, 0
        self.buffers: tuple[torch.Tensor, ...] = ()

    def put(self, parts: tuple[torch.Tensor, ...], rows: torch.Tensor) -> int:
        """Gather as many of ``rows`` of ``parts`` as there is room for; returns how many."""
        if not self.buffers:
            self.buffers = tuple(t.new_empty((self.queue,) + t.shape[1:]) for t in parts)
        rows = rows[:self.queue - self.count]
        n = rows.numel()
        for src, buf in zip(parts, self.buffers):
            torch.index_select(src, 0, rows, out=buf[self.count:self.count + n])
        self.count += n
        return n

    def take(self) -> tuple[torch.Tensor, ...]:
        """The waiting rows (views of the buffers), the queue left empty: the stage runs on them
        before anything is put into the buffers again."""
        n, self.count = self.count, 0
        return tuple(t[:n] for t in self.buffers)


# Key layout of the released checkpoints: fixed stage names and a misspelt module name.
ORIGINAL_STAGE_NAMES = ("less_less_token", "less_token", "normal_token")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: Optional[DVT] = None) -> dict[str, torch.Tensor]:
    """Convert a state dict of the original implementation (or one saved from a DDP-wrapped
    or compiled model) to this implementation's layout. Keys already in our layout pass
    through unchanged."""
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        head, _, rest = key.partition(".")
        if head in ORIGINAL_STAGE_NAMES:
            key = f"stages.{ORIGINAL_STAGE_NAMES.index(head)}.{rest}"
        key = key.replace(".feature_resuse_mlp.", ".feature_reuse_mlp.")
        out[key] = value
    return out


def to_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout -> the released checkpoints' layout (three-stage cascades only)."""
    out = {}
    for key, value in checkpoint_filter_fn(state_dict).items():
        _, k, rest = key.split(".", 2)
        if int(k) >= len(ORIGINAL_STAGE_NAMES):
            raise ValueError("the original layout only names three stages")
        out[f"{ORIGINAL_STAGE_NAMES[int(k)]}.{rest.replace('.feature_reuse_mlp.', '.feature_resuse_mlp.')}"] = value
    return out


def _convert_on_load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Load-time hook: ``model.load_state_dict`` accepts the original layout directly."""
    mine = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    converted = checkpoint_filter_fn({k[len(prefix):]: v for k, v in mine.items()})
    if len(mine) == len(converted) and all(prefix + k in state_dict for k in converted):
        return
    for k in mine:
        del state_dict[k]
    for k, v in converted.items():
        state_dict[prefix + k] = v
