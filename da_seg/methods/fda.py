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
    """FDA's source-to-target transfer: the target's low-frequency amplitude, the source's phase.

    source: (N, 3, H, W) float; target: (N, 3, H', W') float, resized to (H, W) if it differs.
    Returns (N, 3, H, W) float32: the real part of the inverse FFT, not clipped (as the official
    code, which feeds it to the network directly). The band (frequencies -b .. b - 1) is one
    wider on the negative side, so the real output carries the mean of the source and target
    amplitudes at frequency +b; the phase is the source's everywhere. The amplitude swap is linear in the intensity
    scale, so images in [0, 1] give the official result on 0-255 images divided by 255.
    """
    height, width = source.shape[-2:]
    if math.floor(min(height, width) * beta + 1e-9) == 0:  # decided on the host: no device sync per step
        return source
    band = low_frequency_band(height, width, beta, source.device)
    if target.shape[-2:] != source.shape[-2:]:
        target = F.interpolate(target.float(), size=(height, width), mode="bilinear", align_corners=False)
    spectrum = torch.fft.fft2(source.float())                        # (N, 3, H, W) complex
    amplitude = torch.where(band, torch.fft.fft2(target.float()).abs(), spectrum.abs())
    mixed = torch.polar(amplitude, spectrum.angle())
    return torch.fft.ifft2(mixed).real


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
