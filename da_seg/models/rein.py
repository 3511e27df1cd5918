"""Rein (Wei et al., "Stronger, Fewer, & Superior", CVPR 2024): learnable tokens that refine the
features of a frozen vision foundation model after every block.

Official code: w1oves/Rein, ``rein/models/backbones/reins.py`` (``Reins``, ``LoRAReins``) and
``reins_dinov2.py`` (called after each block on the tokens without the class token). For block
``l`` with tokens T_l (m, D) and patch features f (N, L, D):

    S      = softmax(f T_l^T / sqrt(D))                        (N, L, m)
    delta  = S[..., 1:] @ MLP_token2feat(T_l[1:])               (N, L, D)  token 0 takes part in the
                                                                           softmax only (official)
    f     <- f + scale * MLP_delta_f(delta + f)                 scale: one learnable scalar, 1e-3 at init

``rank > 0`` is ``LoRAReins``: T_l = A_l B_l with A_l (m, rank), B_l (rank, D). The two MLPs
(single Linear layers, D -> D) and ``scale`` are shared by all blocks, as in the official code.
Not here: ``link_token_to_query`` (the tokens turned into Mask2Former queries: ``transform``,
D -> 256, and ``merge``, 768 -> 256, 0.46M parameters for ViT-L), since our head has no queries.

Initialization (official): tokens U(-v, v) with v = sqrt(6 / (3 * 16 * 16 + D)) (LoRA:
sqrt(6 / (3 * 16 * 16 + sqrt(D * rank))), the patch size 16 of their converted weights); the
MLPs with PyTorch's Linear default.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REIN_KEYS = ("tokens", "rank", "layers")
# The official initialization bound uses the patch size of the checkpoint it was written for:
# Rein converts DINOv2's 14x14 patch embedding to 16x16 (tools/convert_models/convert_dinov2_*.py).
_INIT_PATCH = 16


def parse_rein(options: dict | None, depth: int) -> tuple[int, int, tuple[int, ...]] | None:
    """``{tokens = 100, rank = 16, layers = "all" | [i, ...]}`` -> (tokens, rank, block indices)."""
    if options is None:
        return None
    if not isinstance(options, dict):
        raise ValueError(f"model.options.rein must be a table like {{ tokens = 100, rank = 16, layers = \"all\" }}, "
                         f"got {options!r}")
    unknown = sorted(set(options) - set(REIN_KEYS))
    if unknown:
        raise ValueError(f"model.options.rein: unknown key(s) {unknown}; valid: {list(REIN_KEYS)}")
    tokens, rank, layers = int(options.get("tokens", 100)), int(options.get("rank", 16)), options.get("layers", "all")
    if tokens < 2:
        raise ValueError(f"model.options.rein.tokens must be >= 2 (token 0 only normalizes), got {tokens}")
    if rank < 0:
        raise ValueError(f"model.options.rein.rank must be >= 0 (0 = full-rank tokens), got {rank}")
    if layers == "all":
        blocks = tuple(range(depth))
    elif isinstance(layers, (list, tuple)) and layers and all(isinstance(i, int) and 0 <= i < depth for i in layers):
        blocks = tuple(sorted(set(layers)))
    else:
        raise ValueError(f'model.options.rein.layers must be "all" or a list of block indices in [0, {depth}), '
                         f"got {layers!r}")
    return tokens, rank, blocks


class Rein(nn.Module):
    """Token refinement for the blocks ``layers`` of a ViT of width ``dim``.

    ``forward(features, block)``: patch tokens (N, L, D) after block ``block`` -> refined (N, L, D).
    """

    def __init__(self, dim: int, layers: tuple[int, ...], tokens: int = 100, rank: int = 16,
                 scale_init: float = 1e-3):
        super().__init__()
        self.dim, self.layers, self.rank = dim, tuple(layers), rank
        self.slot = {block: i for i, block in enumerate(self.layers)}  # block index -> token set
        count = len(self.layers)
        if rank > 0:
            bound = math.sqrt(6.0 / (3 * _INIT_PATCH ** 2 + math.sqrt(dim * rank)))
            self.tokens_a = nn.Parameter(torch.empty(count, tokens, rank).uniform_(-bound, bound))
            self.tokens_b = nn.Parameter(torch.empty(count, rank, dim).uniform_(-bound, bound))
        else:
            bound = math.sqrt(6.0 / (3 * _INIT_PATCH ** 2 + dim))
            self.tokens = nn.Parameter(torch.empty(count, tokens, dim).uniform_(-bound, bound))
        self.scale = nn.Parameter(torch.tensor(scale_init))
        self.token_to_feature = nn.Linear(dim, dim)   # official mlp_token2feat
        self.delta_mlp = nn.Linear(dim, dim)          # official mlp_delta_f

    def layer_tokens(self, block: int) -> Tensor:
        """(m, D) tokens of block ``block``."""
        i = self.slot[block]
        return self.tokens_a[i] @ self.tokens_b[i] if self.rank > 0 else self.tokens[i]

    def forward(self, features: Tensor, block: int) -> Tensor:
        if block not in self.slot:
            return features
        tokens = self.layer_tokens(block)                                                 # (m, D)
        attention = F.softmax(features @ tokens.t() * self.dim ** -0.5, dim=-1)           # (N, L, m)
        delta = attention[..., 1:] @ self.token_to_feature(tokens[1:])                    # (N, L, D)
        return features + self.scale * self.delta_mlp(delta + features)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, blocks={len(self.layers)}, rank={self.rank}"


def rein_parameter_count(dim: int, blocks: int, tokens: int, rank: int) -> int:
    """Closed form of ``Rein``'s parameter count (tests compare it with the module)."""
    token_params = blocks * (tokens * rank + rank * dim) if rank > 0 else blocks * tokens * dim
    return token_params + 1 + 2 * (dim * dim + dim)
