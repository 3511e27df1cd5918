"""Pixel-level style transfer by a translator: CycleGAN, with CyCADA's semantic consistency.

``cyclegan`` trains the translator, not the segmenter (it returns no ``losses``, only side losses):
it is the training part of the ``translate`` stage, which then writes the whole translated source
to disk as a new domain (``da_seg/stages/translate.py``); recipes train on that domain like any other.
Per step, with x_s, x_t in [-1, 1], G_st: source -> target style, G_ts: target -> source style:

    generator terms (discriminators frozen, as in the release's ``set_requires_grad(D, False)``):
        LSGAN  MSE(D_t(G_st(x_s)), 1) + MSE(D_s(G_ts(x_t)), 1)
        cycle  lambda (|G_ts(G_st(x_s)) - x_s|_1 + |G_st(G_ts(x_t)) - x_t|_1)         lambda = 10
        ident  lambda lambda_id (|G_st(x_t) - x_t|_1 + |G_ts(x_s) - x_s|_1)           lambda_id = 0.5
        CyCADA semantic consistency (optional, frozen source-trained segmenter f):
               w (CE(f(G_st(x_s)), y_s) + CE(f(G_ts(x_t)), argmax f(x_t)))
        DPL's dual-path semantic terms (optional, frozen M_S and M_T: ``dual_path_weight`` > 0;
               ``da_seg/methods/dual_path.py``): instance-normalized logit MSE on the
               reconstructions (lambda * dual_path_weight) and translations (0.1)
    discriminator terms (on detached fakes drawn through a 50-image pool):
        0.5 (MSE(D_t(x_t), 1) + MSE(D_t(pool_t(G_st(x_s))), 0)), the same for D_s.

All of them are ``side_losses``: the trainer backpropagates their sum once and steps both Adam
optimizers (generators, discriminators). That single backward gives each network exactly the
release's gradients: the generator terms reach no discriminator parameter (frozen), and the
discriminator terms reach no generator parameter (detached fakes). The discriminators score the
generator terms with their pre-step weights and are trained on the pre-step fakes, as in the
release, where D's update follows G's but uses fakes computed before it.

"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from da_seg.methods.base import Component, ComponentSetup, OptionError, StepContext
from da_seg.methods.common import bare, check_nonnegative, check_pair, check_positive_int, frozen, frozen_copy
from da_seg.methods.dual_path import dpit_semantic_terms
from da_seg.models.cyclegan import ImagePool, PatchDiscriminator, ResnetGenerator
from da_seg.models.segmenter import upsample_logits
from da_seg.utils.visualize import side_by_side, to_uint8

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
    # DPL's DPIT (royee182/DPL cycle_diff_model.py): frozen M_S / M_T checkpoints (da_seg last.pt).
    dual_path_weight: float = 0.0       # lambda_semantic: reconstructions x lambda_cycle * this (DPL: 1); 0 = off
    dual_path_translation_weight: float = 0.1  # translations (the release's fixed 0.1)
    source_path_checkpoint: str = ""    # M_S, trained on the source style
    target_path_checkpoint: str = ""    # M_T, trained on the target style
    init_checkpoint: str = ""           # start g_st, g_ts, d_s, d_t from this translate run's checkpoint

    def __post_init__(self):
        check_nonnegative(self, ("lr", "lambda_cycle", "lambda_identity", "semantic_weight", "pool_size",
                                 "dual_path_weight", "dual_path_translation_weight"))
        if self.dual_path_weight > 0 and not (self.source_path_checkpoint and self.target_path_checkpoint):
            raise OptionError("dual_path_weight", "> 0 needs source_path_checkpoint and target_path_checkpoint "
                              "(M_S and M_T: da_seg checkpoints); the dual_path stage sets them")
        check_positive_int(self, ("ngf", "ndf", "n_blocks"))
        check_pair(self, "betas", "[beta1, beta2]")
        if not 0.0 <= self.decay_start <= 1.0:
            raise OptionError("decay_start", f"= {self.decay_start!r}; expected a fraction in [0, 1]")
        if self.semantic_weight > 0 and not self.semantic_checkpoint:
            raise OptionError("semantic_weight", "> 0 needs semantic_checkpoint (a source-trained da_seg "
                              "checkpoint, e.g. runs/.../source_only/<seed>-<time>/last.pt)")


class CycleGAN(Component):
    """CycleGAN translator training (+ CyCADA semantic consistency); trains no segmenter.

    Networks ``g_st``, ``g_ts``, ``d_s``, ``d_t``; optimizers ``generators``,
    ``discriminators`` (Adam 2e-4, betas (0.5, 0.999), constant then linear decay). Side losses
    ``g_adv_t``, ``g_adv_s``, ``cycle_s``, ``cycle_t``, ``idt_s``, ``idt_t``, ``sem_s``,
    ``sem_t`` (CyCADA), ``dp_rec_sem_s``, ``dp_rec_sem_t``, ``dp_sem_s``, ``dp_sem_t`` (DPL), ``d_t``,
    ``d_s``. Visual: source | G_st(source) | target | G_ts(target).
    """

    name = "cyclegan"
    Options = CycleGANOptions
    uses_source = True
    uses_target = True
    stage = "translate"

    def __init__(self, options: CycleGANOptions, setup: ComponentSetup):
        super().__init__(options, setup)
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
        factor = linear_decay(setup.iterations, options.decay_start)
        self.schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, factor) for k, o in self.optimizers.items()}
        self.pools = {"s": ImagePool(options.pool_size), "t": ImagePool(options.pool_size)}
        self.segmenter: nn.Module | None = None
        if options.semantic_weight > 0:
            self.segmenter = frozen_copy(setup.load_trained(options.semantic_checkpoint))
            if self.segmenter.num_classes != setup.num_classes:
                raise OptionError("semantic_checkpoint", f"= {options.semantic_checkpoint!r} predicts "
                                  f"{self.segmenter.num_classes} classes, the domains have {setup.num_classes}")
        self.path_models: tuple[nn.Module, nn.Module] | None = None
        if options.dual_path_weight > 0:
            self.path_models = tuple(self._frozen_segmenter(key) for key in ("source_path_checkpoint",
                                                                             "target_path_checkpoint"))
        if options.init_checkpoint:
            saved = torch.load(options.init_checkpoint, map_location="cpu", weights_only=True)
            networks = saved.get("components", {}).get(self.name, {}).get("networks")
            if networks is None:
                raise OptionError("init_checkpoint", f"= {options.init_checkpoint!r} is not a translate run's "
                                  f"checkpoint (no components.{self.name} networks)")
            for key, net in self.networks.items():
                net.load_state_dict(networks[key])
        self._panel: list[Tensor] = []

    def _frozen_segmenter(self, key: str) -> nn.Module:
        model = frozen_copy(self.setup.load_trained(getattr(self.options, key)))
        if model.num_classes != self.setup.num_classes:
            raise OptionError(key, f"= {getattr(self.options, key)!r} predicts {model.num_classes} classes, "
                              f"the domains have {self.setup.num_classes}")
        return model

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
        rec_s, rec_t = nets["g_ts"](fake_t), nets["g_st"](fake_s)
        terms["cycle_s"] = o.lambda_cycle * F.l1_loss(rec_s.float(), real_s.float())
        terms["cycle_t"] = o.lambda_cycle * F.l1_loss(rec_t.float(), real_t.float())
        if o.lambda_identity > 0:
            weight = o.lambda_cycle * o.lambda_identity
            terms["idt_t"] = weight * F.l1_loss(nets["g_st"](real_t).float(), real_t.float())
            terms["idt_s"] = weight * F.l1_loss(nets["g_ts"](real_s).float(), real_s.float())
        if self.segmenter is not None:
            terms.update(self._semantic_terms(ctx, fake_t, fake_s))
        if self.path_models is not None:
            images = {"real_s": real_s, "real_t": real_t, "fake_t": fake_t, "fake_s": fake_s, "rec_s": rec_s,
                      "rec_t": rec_t}
            terms.update(dpit_semantic_terms(*self.path_models, images,
                                             reconstruction_weight=o.lambda_cycle * o.dual_path_weight,
                                             translation_weight=o.dual_path_translation_weight))
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
            out = f(ctx.target.images)
            pseudo = upsample_logits(out.logits.float(), target_size, out.align_corners).argmax(1)  # (N, H_t, W_t)
        labels = ctx.source.labels
        out_s, out_t = f((fake_t + 1) / 2), f((fake_s + 1) / 2)
        logits_s = upsample_logits(out_s.logits.float(), labels.shape[-2:], out_s.align_corners)
        logits_t = upsample_logits(out_t.logits.float(), target_size, out_t.align_corners)
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
