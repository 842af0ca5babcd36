"""PixelDiT: a patch-level DiT (or MM-DiT) for semantics plus pixel-level PiT blocks for detail.

The network maps a noisy image x_t (B, 3, H, W), a time t in [0, 1] and a condition to a velocity of
the same shape as x_t. H and W may be any multiples of the patch size p (2D RoPE on the patch grid,
positions per ``ModelArgs.rope_positions``).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LabelEmbedder, RMSNorm, TimestepEmbedder, rope_2d, rope_text
from .patch_blocks import AdaLNZero, MMDiTBlock, PatchBlock
from .pixel_blocks import PiTBlock, PixelEmbed, PixelHead, PixelwiseAdaLN, patchify_pixels, unpatchify_pixels
from .sizes import ModelArgs


class PixelDiT(nn.Module):
    """Dual-level pixel diffusion transformer; class-conditional or text-to-image per ``args.conditioning``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        D, p = args.hidden_size, args.patch_size
        official = args.layer_style == "official"
        self.patch_embed = nn.Linear(p * p * args.in_channels, D)
        if official:  # the reference's time input: 1000 t for text models, 1 - t (data at 1) for class models
            class_model = args.conditioning == "class"
            self.t_embed = TimestepEmbedder(D, max_period=10.0, scale=1.0 if class_model else 1000.0,
                                            reverse=class_model)
        else:
            self.t_embed = TimestepEmbedder(D)
        if args.conditioning == "class":
            self.y_embed = LabelEmbedder(args.num_classes, D)
            self.patch_blocks = nn.ModuleList(
                [PatchBlock(D, args.num_heads, args.mlp_hidden, args.qk_norm, official=official)
                 for _ in range(args.depth)]
            )
        else:
            if official:  # Linear then RMSNorm, plus a learned position embedding of the text tokens
                self.text_proj = nn.Sequential(nn.Linear(args.text_dim, D), RMSNorm(D))
                self.text_pos = nn.Parameter(torch.empty(1, args.text_len, D))
            else:
                self.text_proj = nn.Sequential(RMSNorm(args.text_dim), nn.Linear(args.text_dim, D))
            self.patch_blocks = nn.ModuleList(
                [MMDiTBlock(D, args.num_heads, args.mlp_hidden, args.qk_norm, last=i == args.depth - 1,
                            official=official)
                 for i in range(args.depth)]
            )
        self.pixel_embed = PixelEmbed(args.in_channels, args.pixel_dim, p, column_first=official)
        self.pixel_blocks = nn.ModuleList(
            [PiTBlock(D, args.pixel_dim, p, args.attn_dim, args.attn_heads, args.pixel_mlp_ratio, args.qk_norm,
                      post_modulation=args.post_modulation, official=official)
             for _ in range(args.pixel_depth)]
        )
        self.head = PixelHead(args.pixel_dim, args.in_channels)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initialisation in one place (works on the meta device and under ZeRO-3 init).

        - every Linear: Xavier-uniform weight, zero bias (DiT); every RMSNorm weight: one;
        - timestep MLP and label table: N(0, 0.02);
        - text position embedding (official layers): N(0, 1), as the reference initialises it;
        - AdaLN-Zero modulation of patch blocks and per-pixel AdaLN of PiT blocks: zero, so every
          pre-modulated block starts as the identity (a post-modulated PiT block starts unscaled);
        - output head linear: zero, so a fresh model predicts exactly zero velocity.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if hasattr(self, "y_embed"):
            nn.init.normal_(self.y_embed.table.weight, std=0.02)
        if hasattr(self, "text_pos"):
            nn.init.normal_(self.text_pos, std=1.0)
        for m in self.modules():
            if isinstance(m, (AdaLNZero, PixelwiseAdaLN)):
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)
        nn.init.zeros_(self.head.linear.weight)
        nn.init.zeros_(self.head.linear.bias)

    def null_condition(self, batch: int, device=None) -> dict[str, torch.Tensor]:
        """Class-conditional: the null-class ids for classifier-free guidance."""
        if self.args.conditioning != "class":
            raise ValueError("null_condition is for class-conditional models; text models take the encoder's empty-prompt embedding")
        return {"y": torch.full((batch,), self.args.num_classes, dtype=torch.long, device=device)}

    def _check_input(self, x: torch.Tensor) -> None:
        p = self.args.patch_size
        if x.dim() != 4 or x.shape[1] != self.args.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(
                f"expected images (B, {self.args.in_channels}, H, W) with H, W multiples of patch size {p}; got {tuple(x.shape)}"
            )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        return_features_at: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict the velocity.

        x: (B, 3, H, W) noisy image; t: (B,) time in [0, 1];
        y: (B,) class ids (class-conditional; ``num_classes`` is the null class);
        context: (B, T, text_dim) text-encoder states and context_mask: (B, T) bool (text-to-image; ignored
        when ``args.text_padding == "unmasked"``, T <= text_len with the official layers);
        return_features_at: 1-based patch block whose image-token output (B, L, D) is also returned (REPA).
        Returns v (B, 3, H, W), or (v, features) when return_features_at is set.
        """
        self._check_input(x)
        a = self.args
        B, _, H, W = x.shape
        p = a.patch_size
        gh, gw = H // p, W // p
        pos = a.rope_positions
        rope_patch = rope_2d(a.hidden_size // a.num_heads, gh, gw, x.device, positions=pos)  # 2 x (L, hd)
        rope_pixel = rope_2d(a.attn_dim // a.attn_heads, gh, gw, x.device, positions=pos)  # 2 x (L, hd_pix)

        t_emb = self.t_embed(t)  # (B, D)
        s = self.patch_embed(patchify_pixels(x, p).reshape(B, gh * gw, -1))  # (B, L, D)
        features = None
        if a.conditioning == "class":
            if y is None:
                raise ValueError("class-conditional PixelDiT needs y (B,) class ids")
            c = F.silu(t_emb + self.y_embed(y))  # (B, D)
            for i, block in enumerate(self.patch_blocks):
                s = block(s, c, rope_patch)  # (B, L, D)
                if return_features_at == i + 1:
                    features = s
        else:
            if context is None:
                raise ValueError("text-to-image PixelDiT needs context (B, T, text_dim) text-encoder states")
            T = context.shape[1]
            txt = self.text_proj(context)  # (B, T, D)
            rope_txt = None
            if a.layer_style == "official":
                if T > a.text_len:
                    raise ValueError(f"context has {T} tokens; this model's text position embedding covers "
                                     f"text_len={a.text_len}")
                txt = txt + self.text_pos[:, :T].to(txt.dtype)  # (B, T, D)
                rope_txt = rope_text(a.hidden_size // a.num_heads, T, device=x.device)  # 2 x (T, hd)
            mask = None if a.text_padding == "unmasked" else context_mask
            c = F.silu(t_emb)  # (B, D): both streams modulated by the timestep only
            for i, block in enumerate(self.patch_blocks):
                s, txt = block(s, txt, c, rope_patch, mask, rope_txt)  # (B, L, D), (B, T, D)
                if return_features_at == i + 1:
                    features = s

        s_cond = F.silu(t_emb[:, None, :] + s).reshape(B * gh * gw, a.hidden_size)  # (B*L, D)
        pix = self.pixel_embed(x)  # (B*L, p*p, Dp)
        for block in self.pixel_blocks:
            pix = block(pix, s_cond, B, rope_pixel)  # (B*L, p*p, Dp)
        v = unpatchify_pixels(self.head(pix), B, H, W, p)  # (B, 3, H, W)
        if return_features_at is not None:
            if features is None:
                raise ValueError(f"return_features_at={return_features_at} outside 1..{a.depth}")
            return v, features
        return v


def build_model(args: ModelArgs, device: torch.device | str | None = None) -> PixelDiT:
    """Build a PixelDiT; ``device="meta"`` builds it without allocating weights."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return PixelDiT(args)
