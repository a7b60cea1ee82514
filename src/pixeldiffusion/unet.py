"""The DDPM UNet (Ho et al. 2020, appendix B; ``diffusion_tf/models/unet.py``).

A noise-conditional UNet ``model(x_t, t, y) -> output`` of the same shape as ``x_t``:

* the timestep ``t`` enters as a sinusoidal embedding and a two-layer MLP (``temb``), to which an
  optional class embedding is added;
* each resolution level has ``num_res_blocks`` residual blocks, with self-attention at the
  resolutions in ``attn_resolutions``, then a stride-2 convolution down (up: nearest 2x and a
  convolution), and every up-path block sees the matching down-path activation;
* the last convolution of every residual branch and of the output is initialised to zero (as in
  the DDPM code and improved-diffusion), so a fresh model outputs exactly 0.

``channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)`` at 32x32x3
is the paper's CIFAR-10 model: 35,746,307 parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, check_architecture

GROUP_NORM_EPS = 1e-6  # tf.contrib.layers.group_norm, as in the DDPM code


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, *,
                       flip_sin_to_cos: bool = False, freq_shift: float = 1.0,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as ``get_timestep_embedding``.

    t: [N] timesteps, any real dtype. Returns [N, dim] of ``dtype`` (float32, or float64 for a
    model in double precision): ``sin`` in the first half and
    ``cos`` in the second (swapped with ``flip_sin_to_cos``), frequencies
    ``max_period ** (-i / (dim // 2 - freq_shift))``; an odd ``dim`` is padded with one zero
    column. The defaults are the DDPM code's; diffusers' ``Timesteps`` names the same two knobs.
    Computed in ``dtype`` whatever the autocast state.
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=dtype) / max(half - freq_shift, 1)
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout of ``x``: channels_last if it is stored that way, else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _zero(module: nn.Conv2d) -> nn.Conv2d:
    """Set the weight and bias of ``module`` to zero (``init_scale=0.`` in the DDPM code)."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """Residual block with a per-channel timestep bias (``resnet_block`` in the DDPM code).

    forward(x [N, in_ch, H, W], temb [N, temb_ch]) -> [N, out_ch, H, W].
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int,
                 eps: float = GROUP_NORM_EPS):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()  # NIN

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.

    forward(x [N, C, H, W]) -> [N, C, H, W]; ``num_heads`` must divide C. Keeps the memory
    layout of ``x`` (contiguous or channels_last).
    """

    def __init__(self, ch: int, num_heads: int, groups: int, eps: float = GROUP_NORM_EPS):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, height, width = x.shape
        # [N, 3C, H, W] -> [N, 3, heads, C/heads, H*W]: views for both memory layouts
        qkv = self.qkv(self.norm(x)).flatten(2).unflatten(1, (3, self.num_heads, -1))
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [N, heads, H*W, C/heads]
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        h = h.transpose(1, 2).reshape(n, height, width, c).permute(0, 3, 1, 2)
        return x + self.proj_out(h.contiguous(memory_format=_memory_format(x)))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: [N, C, H, W] -> [N, C, H/2, W/2].

    ``padding=1`` pads one pixel on every side; ``padding=0`` pads only the right and bottom
    edges, which is TensorFlow's "SAME" for stride 2 as in the released DDPM models (diffusers'
    ``downsample_padding=0``).
    """

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x if self.padding else F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 convolution: [N, C, H, W] -> [N, C, 2H, 2W]."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """Its blocks in order, ``temb`` going to the ResBlocks: [N, C, H, W] -> [N, C', H', W']."""

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:  # type: ignore[override]
        for block in self:
            x = block(x, temb) if isinstance(block, ResBlock) else block(x)
        return x


class UNet(nn.Module):
    """The DDPM noise-prediction network ``model(x_t, t, y) -> eps | x0 | v``.

    Args:
        in_channels: image channels C (1 or 3).
        image_size: the training resolution; fixes at which levels attention runs.
        channels: ``ch``, the width of the first level; the time embedding has 4 * ch.
        channel_mult: width multiplier per resolution level (one level per entry).
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attn_resolutions: resolutions (in pixels, at ``image_size``) with self-attention.
        dropout: dropout inside every ResBlock.
        num_heads: attention heads.
        norm_groups: GroupNorm groups; must divide every level's width.
        num_classes: 0 for an unconditional model, else the number of class labels; label
            ``num_classes`` (``null_class``) means "no label" for classifier-free guidance.
        out_channels: output channels, ``in_channels`` by default.
        flip_sin_to_cos: ``cos`` before ``sin`` in the timestep embedding (``timestep_embedding``).
        freq_shift: the timestep embedding's frequency shift (``timestep_embedding``).
        norm_eps: epsilon of every GroupNorm.
        downsample_padding: 1 (pad all sides) or 0 (right/bottom only, TF "SAME"); ``Downsample``.
    """

    def __init__(self, *, in_channels: int, image_size: int, channels: int = 64,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 num_heads: int = 1, norm_groups: int = 32, num_classes: int = 0,
                 out_channels: int | None = None, flip_sin_to_cos: bool = False,
                 freq_shift: float = 1.0, norm_eps: float = GROUP_NORM_EPS,
                 downsample_padding: int = 1):
        super().__init__()
        check_architecture(
            ModelConfig(channels=channels, channel_mult=tuple(channel_mult),
                        num_res_blocks=num_res_blocks, attn_resolutions=tuple(attn_resolutions),
                        dropout=dropout, num_heads=num_heads, norm_groups=norm_groups,
                        num_classes=num_classes, flip_sin_to_cos=flip_sin_to_cos,
                        freq_shift=freq_shift, norm_eps=norm_eps,
                        downsample_padding=downsample_padding),
            image_size=image_size, in_channels=in_channels, out_channels=out_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.channels = channels
        self.num_levels = len(channel_mult)
        self.num_classes = num_classes
        self.null_class = num_classes
        self.flip_sin_to_cos, self.freq_shift = flip_sin_to_cos, freq_shift
        temb_ch = 4 * channels

        self.temb = nn.Sequential(nn.Linear(channels, temb_ch), nn.SiLU(),
                                  nn.Linear(temb_ch, temb_ch))
        self.class_emb = nn.Embedding(num_classes + 1, temb_ch) if num_classes > 0 else None

        def res_block(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, temb_ch, dropout, norm_groups, norm_eps)

        def attn_block(ch: int) -> AttnBlock:
            return AttnBlock(ch, num_heads, norm_groups, norm_eps)

        # Down path: every block's output is a skip connection for the up path.
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs, ch, res = [channels], channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [res_block(ch, channels * mult)]
                ch = channels * mult
                if res in attn_resolutions:
                    blocks.append(attn_block(ch))
                self.down.append(EmbedSequential(*blocks))
                skip_chs.append(ch)
            if level != self.num_levels - 1:
                self.down.append(EmbedSequential(Downsample(ch, downsample_padding)))
                skip_chs.append(ch)
                res //= 2

        self.mid = EmbedSequential(res_block(ch, ch), attn_block(ch), res_block(ch, ch))

        # Up path: each block takes the concatenation [h, skip] along channels.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for block_idx in range(num_res_blocks + 1):
                blocks = [res_block(ch + skip_chs.pop(), channels * mult)]
                ch = channels * mult
                if res in attn_resolutions:
                    blocks.append(attn_block(ch))
                if level != 0 and block_idx == num_res_blocks:
                    blocks.append(Upsample(ch))
                    res *= 2
                self.up.append(EmbedSequential(*blocks))

        self.norm_out = nn.GroupNorm(norm_groups, ch, eps=norm_eps)
        self.conv_out = _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1))

    def _embed(self, t: Tensor | float, y: Tensor | None, n: int, device: torch.device) -> Tensor:
        """temb [N, 4 * ch] from timesteps t ([N] or scalar) and labels y ([N] or None)."""
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"timesteps t must have shape [{n}] or be a scalar; "
                             f"got shape {list(t.shape)}")
        # float32, or float64 when the model was converted with .double() (reference checks)
        dtype = torch.float64 if self.temb[0].weight.dtype == torch.float64 else torch.float32
        temb = self.temb(timestep_embedding(t, self.channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                            freq_shift=self.freq_shift, dtype=dtype))
        if self.class_emb is None:
            if y is not None:
                raise ValueError("class labels y were given to an unconditional model; "
                                 "set model.num_classes > 0 or call it without y")
            return temb
        if y is None:
            y = torch.full((n,), self.null_class, dtype=torch.long, device=device)
        if y.shape != (n,) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"class labels y must be an int64 or int32 tensor of shape [{n}]; "
                             f"got {y.dtype} of shape {list(y.shape)}")
        # Checking values costs a host sync on accelerators; there out-of-range y is left to
        # the embedding's own device-side check.
        if y.device.type == "cpu" and n and (int(y.min()) < 0 or int(y.max()) > self.null_class):
            raise ValueError(f"class labels y must lie in [0, {self.null_class}] "
                             f"({self.null_class} = no label); got {int(y.min())}..{int(y.max())}")
        return temb + self.class_emb(y)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Predict from the noisy image.

        Args:
            x: [N, in_channels, H, W] noisy images; H and W divisible by 2**(levels - 1).
                Contiguous or channels_last (the output keeps the layout).
            t: [N] timesteps in [0, T - 1], integer or real (fractional steps allowed), or a
                scalar / 0-dim tensor used for the whole batch.
            y: [N] integer labels in [0, num_classes] (num_classes = no label) for a
                class-conditional model; None means no label. Must be None when unconditional.

        Returns:
            [N, out_channels, H, W] with the dtype of ``x``.
        """
        down = 2 ** (self.num_levels - 1)
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % down \
                or x.shape[3] % down:
            raise ValueError(f"x must have shape [N, {self.in_channels}, H, W] with H and W "
                             f"divisible by {down}; got {list(x.shape)}")
        temb = self._embed(t, y, x.shape[0], x.device)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, temb)
            skips.append(h)
        h = self.mid(h, temb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), temb)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h.to(x.dtype)


def build_unet(cfg: ModelConfig, *, in_channels: int, image_size: int) -> UNet:
    """The UNet described by the ``model`` config section, for C x image_size^2 images."""
    return UNet(in_channels=in_channels, image_size=image_size, channels=cfg.channels,
                channel_mult=tuple(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
                attn_resolutions=tuple(cfg.attn_resolutions), dropout=cfg.dropout,
                num_heads=cfg.num_heads, norm_groups=cfg.norm_groups,
                num_classes=cfg.num_classes, flip_sin_to_cos=cfg.flip_sin_to_cos,
                freq_shift=cfg.freq_shift, norm_eps=cfg.norm_eps,
                downsample_padding=cfg.downsample_padding)


def count_parameters(model: nn.Module) -> int:
    """The number of parameters, frozen ones (an EMA copy) included; works on the meta device."""
    return sum(p.numel() for p in model.parameters())
