"""Fourier Domain Adaptation (Yang & Soatto, FDA, CVPR 2020) as an online batch transform.

``fda`` is cheap enough to run online: before any forward it replaces each source image's
low-frequency amplitude spectrum by a target image's (``prepare_batches``). Its robust entropy
term is ``minent`` with ``robust_eta = 2``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from da_seg.methods.base import Component, ComponentSetup, StepContext
from da_seg.methods.common import check_nonnegative
from da_seg.utils.visualize import side_by_side, to_uint8

def low_frequency_band(height: int, width: int, beta: float, device=None) -> Tensor:
    """(H, W) bool mask of the unshifted 2-D spectrum that FDA swaps: b = floor(min(H, W) beta),
    the four b x b corners (the official training code's ``low_freq_mutate``), i.e. integer
    frequencies -b .. b - 1 along each axis. Empty for b = 0 (beta = 0.01 on 64-pixel images)."""
    b = int(math.floor(min(height, width) * beta + 1e-9))
    rows = torch.zeros(height, dtype=torch.bool, device=device)
    cols = torch.zeros(width, dtype=torch.bool, device=device)
    if b > 0:
        rows[:b] = rows[height - b:] = True
        cols[:b] = cols[width - b:] = True
    return rows[:, None] & cols[None, :]


def fda_transfer(source: Tensor, target: Tensor, beta: float) -> Tensor:
    """FDA's source-to-target transfer: the target's low-frequency amplitude, the source's phase,
    inverted as the official code inverts it.

    source: (N, 3, H, W) float; target: (N, 3, H', W') float, resized to (H, W) if it differs.
    Returns (N, 3, H, W) float32, not clipped (the official code feeds it to the network as is).

    The official ``FDA_source_to_target`` takes the full spectrum (``torch.rfft(onesided=False)``),
    swaps the amplitude of the four b x b corners (``low_freq_mutate``), rebuilds the spectrum
    from that amplitude and the source phase, and inverts it with the legacy
    ``torch.irfft(onesided=False, signal_sizes=[H, W])``: a complex-to-real transform, which
    first narrows its input to the columns 0 .. W // 2 and takes the negative column frequencies
    to be the conjugate mirrors of those. The mixed spectrum is not Hermitian-symmetric (the
    band -b .. b - 1 holds -b but not +b), so this is not ``ifft2(mixed).real``, which instead
    averages every frequency with the conjugate of its mirror. The two agree on the inner square
    -(b - 1) .. b - 1 (target amplitude) and outside the band (source amplitude), and differ on
    the band's rim: ifft2().real puts the mean of source and target amplitude on row and
    column -b and their mirrors; the official inverse keeps the source's on columns +-b, the
    target's on row -b at columns 1 .. b - 1 (and their mirrors), the source's on the rest of
    rows +-b, and the mean only in column 0. The phase is the source's everywhere in both.

    Only columns 0 .. W // 2 are ever read, so they are all that is computed: ``rfft2`` of the
    real images gives exactly those columns of the full spectrum, and ``irfft2`` is the same
    complex-to-real inverse. The amplitude swap is linear in the intensity scale, so images in
    [0, 1] give the official result on 0-255 images divided by 255.
    """
    height, width = source.shape[-2:]
    if math.floor(min(height, width) * beta + 1e-9) == 0:  # decided on the host: no device sync per step
        return source
    band = low_frequency_band(height, width, beta, source.device)[:, : width // 2 + 1]  # (H, W // 2 + 1)
    if target.shape[-2:] != source.shape[-2:]:
        target = F.interpolate(target.float(), size=(height, width), mode="bilinear", align_corners=False)
    spectrum = torch.fft.rfft2(source.float())                       # (N, 3, H, W // 2 + 1) complex
    amplitude = torch.where(band, torch.fft.rfft2(target.float()).abs(), spectrum.abs())
    mixed = torch.polar(amplitude, spectrum.angle())
    return torch.fft.irfft2(mixed, s=(height, width))                # (N, 3, H, W)


@dataclass(frozen=True)
class FDAOptions:
    beta: float = 0.01                  # band size: b = floor(min(H, W) * beta); FDA: 0.01, 0.05, 0.09

    def __post_init__(self):
        check_nonnegative(self, ("beta",))


class FDA(Component):
    """Fourier Domain Adaptation as an online batch transform: each source image takes the
    low-frequency amplitude spectrum of a random image of the target batch, before any forward.
    No loss of its own: list ``source_ce`` (and ``minent`` with robust_eta = 2) beside it.
    Visual: source | source in target style | that target image."""

    name = "fda"
    Options = FDAOptions
    uses_source = True
    uses_target = True
    loss_domains = ()  # a batch transform: no loss

    def __init__(self, options: FDAOptions, setup: ComponentSetup):
        super().__init__(options, setup)
        self._panel: list[Tensor] = []

    def prepare_batches(self, ctx: StepContext) -> None:
        source, target = ctx.source.images, ctx.target.images
        pick = torch.randint(target.shape[0], (source.shape[0],), device=target.device)
        with torch.no_grad():
            styled = fda_transfer(source, target[pick], self.options.beta)
        if source.is_contiguous(memory_format=torch.channels_last):
            styled = styled.contiguous(memory_format=torch.channels_last)
        self._panel = [source[0].detach(), styled[0].detach(), target[pick[0]].detach()]
        ctx.source.images = styled

    def visuals(self, ctx: StepContext) -> dict[str, Tensor]:
        if not self._panel:
            return {}
        return {"fda": side_by_side([to_uint8(image) for image in self._panel])}
