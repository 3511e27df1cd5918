"""Pixel-level style transfer: CycleGAN (with CyCADA's semantic consistency) and FDA.

``cyclegan`` trains the translator, not the segmenter (``trains_segmenter = False``): it is the
training part of the ``da-seg translate`` stage, which then writes the whole translated source
to disk as a new domain (``da_seg/translate.py``); recipes train on that domain like any other.
Per step, with x_s, x_t in [-1, 1], G_st: source -> target style, G_ts: target -> source style:

    generator terms (discriminators frozen, as in the release's ``set_requires_grad(D, False)``):
        LSGAN  MSE(D_t(G_st(x_s)), 1) + MSE(D_s(G_ts(x_t)), 1)
        cycle  lambda (|G_ts(G_st(x_s)) - x_s|_1 + |G_st(G_ts(x_t)) - x_t|_1)         lambda = 10
        ident  lambda lambda_id (|G_st(x_t) - x_t|_1 + |G_ts(x_s) - x_s|_1)           lambda_id = 0.5
        CyCADA semantic consistency (optional, frozen source-trained segmenter f):
               w (CE(f(G_st(x_s)), y_s) + CE(f(G_ts(x_t)), argmax f(x_t)))
    discriminator terms (on detached fakes drawn through a 50-image pool):
        0.5 (MSE(D_t(x_t), 1) + MSE(D_t(pool_t(G_st(x_s))), 0)), the same for D_s.

All of them are ``side_losses``: the trainer backpropagates their sum once and steps both Adam
optimizers (generators, discriminators). That single backward gives each network exactly the
release's gradients: the generator terms reach no discriminator parameter (frozen), and the
discriminator terms reach no generator parameter (detached fakes). The discriminators score the
generator terms with their pre-step weights and are trained on the pre-step fakes, as in the
release, where D's update follows G's but uses fakes computed before it.

``fda`` (Yang & Soatto, FDA, CVPR 2020) is cheap enough to run online: before any forward it
replaces each source image's low-frequency amplitude spectrum by a target image's
(``prepare_batches``). Its robust entropy term is ``minent`` with ``robust_eta = 2``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from da_seg.config import ConfigError
from da_seg.methods.adversarial import bare, frozen
from da_seg.methods.base import Component, ComponentSetup, StepContext
from da_seg.methods.entropy import check_nonnegative
from da_seg.models.cyclegan import ImagePool, PatchDiscriminator, ResnetGenerator
from da_seg.models.segmenter import upsample_logits

REAL, FAKE = 1.0, 0.0


def lsgan_loss(scores: Tensor, label: float) -> Tensor:
    """Least-squares GAN loss of raw PatchGAN scores (N, 1, h, w) against a constant label."""
    scores = scores.float()
    return F.mse_loss(scores, torch.full_like(scores, label))


def linear_decay(total: int, decay_start: float):
    """LR multiplier of the release's ``linear`` policy in iterations: 1 for the first
    ``decay_start`` fraction of ``total``, then linearly to 0 at ``total``."""
    start = int(round(total * decay_start))

    def factor(iteration: int) -> float:
        if iteration < start:
            return 1.0
        return max(0.0, 1.0 - (iteration - start) / max(total - start, 1))
    return factor


def to_uint8(images: Tensor) -> Tensor:
    """(..., 3, H, W) in [0, 1] -> uint8 on the CPU."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def side_by_side(images: list[Tensor]) -> Tensor:
    """(3, h_i, w_i) uint8 images -> one (3, H, sum w) row at the first image's height."""
    height = images[0].shape[-2]
    row = []
    for image in images:
        if image.shape[-2] != height:
            width = max(1, round(image.shape[-1] * height / image.shape[-2]))
            image = F.interpolate(image[None].float(), size=(height, width), mode="bilinear",
                                  align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        row.append(image)
    return torch.cat(row, dim=2)


@dataclass(frozen=True)
class CycleGANOptions:
    ngf: int = 64                       # generator width (ResnetGenerator)
    n_blocks: int = 9                   # residual blocks: 9 (release, 256px crops) or 6
    ndf: int = 64                       # PatchGAN width
    lr: float = 2e-4                    # Adam, generators and discriminators
    betas: tuple[float, float] = (0.5, 0.999)
    decay_start: float = 0.5            # constant LR for this fraction of schedule.iters, then linear to 0
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5        # identity loss weight, in units of lambda_cycle (0 = off)
    pool_size: int = 50
    # CyCADA semantic consistency: a frozen source-trained segmenter (a da_seg last.pt / best.pt).
    semantic_weight: float = 0.0        # 0 = off (plain CycleGAN)
    semantic_checkpoint: str = ""
    # The writing half of `da-seg translate` (not used in training).
    output_domain: str = ""             # name of the translated domain; "" = <source>_cyclegan
    output_dir: str = ""                # its folder: absolute or under $DA_SEG_DATA; "" = beside the source root
    splits: tuple[str, ...] = ()        # source splits to translate; () = all of them
    tile: int = 2048                    # frames larger than this (either side) are translated in tiles ...
    tile_overlap: int = 256             # ... overlapping by this much, blended; 0 = always whole

    def __post_init__(self):
        object.__setattr__(self, "splits", tuple(self.splits))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


class CycleGAN(Component):
    """CycleGAN translator training (+ CyCADA semantic consistency); trains no segmenter.

    Networks ``g_st``, ``g_ts``, ``d_s``, ``d_t``; optimizers ``generators``,
    ``discriminators`` (Adam 2e-4, betas (0.5, 0.999), constant then linear decay). Side losses
    ``g_adv_t``, ``g_adv_s``, ``cycle_s``, ``cycle_t``, ``idt_s``, ``idt_t``, ``sem_s``,
    ``sem_t``, ``d_t``, ``d_s``. Visual: source | G_st(source) | target | G_ts(target).
    """

    name = "cyclegan"
    Options = CycleGANOptions
    uses_source = True
    uses_target = True
    trains_segmenter = False

    def __init__(self, options: CycleGANOptions, setup: ComponentSetup):
        super().__init__(options, setup)
        where = f"recipe {setup.recipe.name!r}: components.{self.name}"
        check_nonnegative(options, ("lr", "lambda_cycle", "lambda_identity", "semantic_weight", "pool_size",
                                    "tile", "tile_overlap"), where)
        for key in ("ngf", "ndf", "n_blocks"):
            if not isinstance(getattr(options, key), int) or getattr(options, key) < 1:
                raise ConfigError(f"{where}.{key} = {getattr(options, key)!r}; expected a positive integer")
        if not 0.0 <= options.decay_start <= 1.0:
            raise ConfigError(f"{where}.decay_start = {options.decay_start!r}; expected a fraction in [0, 1]")
        if len(options.betas) != 2:
            raise ConfigError(f"{where}.betas = {list(options.betas)!r}; expected [beta1, beta2]")
        if options.tile and options.tile_overlap >= options.tile:
            raise ConfigError(f"{where}.tile_overlap = {options.tile_overlap} must be smaller than tile = {options.tile}")
        device = setup.device
        self.networks = {
            "g_st": ResnetGenerator(options.ngf, options.n_blocks).to(device),
            "g_ts": ResnetGenerator(options.ngf, options.n_blocks).to(device),
            "d_s": PatchDiscriminator(options.ndf).to(device),
            "d_t": PatchDiscriminator(options.ndf).to(device),
        }
        nets = self.networks
        generators = [*nets["g_st"].parameters(), *nets["g_ts"].parameters()]
        discriminators = [*nets["d_s"].parameters(), *nets["d_t"].parameters()]
        self.optimizers = {"generators": torch.optim.Adam(generators, lr=options.lr, betas=options.betas),
                           "discriminators": torch.optim.Adam(discriminators, lr=options.lr, betas=options.betas)}
        factor = linear_decay(setup.recipe.schedule.iters, options.decay_start)
        self.schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, factor) for k, o in self.optimizers.items()}
        self.pools = {"s": ImagePool(options.pool_size), "t": ImagePool(options.pool_size)}
        self.segmenter: nn.Module | None = None
        if options.semantic_weight > 0:
            if not options.semantic_checkpoint:
                raise ConfigError(f"{where}.semantic_weight > 0 needs semantic_checkpoint (a source-trained "
                                  "da_seg checkpoint, e.g. runs/.../source_only/<seed>-<time>/last.pt)")
            self.segmenter = load_frozen_segmenter(options.semantic_checkpoint, setup.num_classes, device)
        self._panel: list[Tensor] = []

    def side_losses(self, ctx: StepContext) -> dict[str, Tensor]:
        o, nets = self.options, self.networks
        real_s = ctx.source.images * 2 - 1                               # (N, 3, H_s, W_s) in [-1, 1]
        real_t = ctx.target.images * 2 - 1                               # (N, 3, H_t, W_t)
        fake_t = nets["g_st"](real_s)                                    # source content, target style
        fake_s = nets["g_ts"](real_t)
        terms = {}
        # Generator terms: through the bare (not DDP-wrapped) discriminators with their parameters
        # frozen, so these terms send gradient to the generators only.
        with frozen(bare(nets["d_t"])) as d_t, frozen(bare(nets["d_s"])) as d_s:
            terms["g_adv_t"] = lsgan_loss(d_t(fake_t), REAL)
            terms["g_adv_s"] = lsgan_loss(d_s(fake_s), REAL)
        terms["cycle_s"] = o.lambda_cycle * F.l1_loss(nets["g_ts"](fake_t).float(), real_s.float())
        terms["cycle_t"] = o.lambda_cycle * F.l1_loss(nets["g_st"](fake_s).float(), real_t.float())
        if o.lambda_identity > 0:
            weight = o.lambda_cycle * o.lambda_identity
            terms["idt_t"] = weight * F.l1_loss(nets["g_st"](real_t).float(), real_t.float())
            terms["idt_s"] = weight * F.l1_loss(nets["g_ts"](real_s).float(), real_s.float())
        if self.segmenter is not None:
            terms.update(self._semantic_terms(ctx, fake_t, fake_s))
        # Discriminator terms: on detached fakes, drawn through the image pools.
        pooled_t = self.pools["t"].query(fake_t.detach().float())
        pooled_s = self.pools["s"].query(fake_s.detach().float())
        terms["d_t"] = 0.5 * (lsgan_loss(nets["d_t"](real_t), REAL) + lsgan_loss(nets["d_t"](pooled_t), FAKE))
        terms["d_s"] = 0.5 * (lsgan_loss(nets["d_s"](real_s), REAL) + lsgan_loss(nets["d_s"](pooled_s), FAKE))
        self._panel = [ctx.source.images[0].detach(), (fake_t[0].detach() + 1) / 2,
                       ctx.target.images[0].detach(), (fake_s[0].detach() + 1) / 2]
        return terms

    def _semantic_terms(self, ctx: StepContext, fake_t: Tensor, fake_s: Tensor) -> dict[str, Tensor]:
        """CyCADA: the translated source keeps its labels; the translated target keeps f's own
        prediction on the untranslated target image."""
        f, weight, ignore = self.segmenter, self.options.semantic_weight, self.setup.ignore_index
        with torch.no_grad():
            target_size = ctx.target.images.shape[-2:]
            pseudo = upsample_logits(f(ctx.target.images).logits.float(), target_size).argmax(1)  # (N, H_t, W_t)
        labels = ctx.source.labels
        logits_s = upsample_logits(f((fake_t + 1) / 2).logits.float(), labels.shape[-2:])
        logits_t = upsample_logits(f((fake_s + 1) / 2).logits.float(), target_size)
        return {"sem_s": weight * F.cross_entropy(logits_s, labels, ignore_index=ignore),
                "sem_t": weight * F.cross_entropy(logits_t, pseudo)}

    def visuals(self, ctx: StepContext) -> dict[str, Tensor]:
        if not self._panel:
            return {}
        return {"translation": side_by_side([to_uint8(image) for image in self._panel])}

    def state_dict(self) -> dict[str, Any]:
        return {"pools": {k: pool.state_dict() for k, pool in self.pools.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, pool in self.pools.items():
            pool.load_state_dict(state["pools"][k], self.setup.device)


def load_frozen_segmenter(path: str, num_classes: int, device: torch.device) -> nn.Module:
    """A trained da_seg segmenter in eval mode with frozen parameters (CyCADA's fixed f)."""
    from da_seg.engine.checkpoint import load_checkpoint
    from da_seg.engine.trainer import restore_model

    model = restore_model(load_checkpoint(path), device).eval()
    if model.num_classes != num_classes:
        raise ConfigError(f"semantic_checkpoint {path} predicts {model.num_classes} classes, the domains have "
                          f"{num_classes}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# FDA

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
        check_nonnegative(options, ("beta",), f"recipe {setup.recipe.name!r}: components.{self.name}")
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
