"""Pixel-level style transfer: CycleGAN networks and training terms, the translate stage, FDA and
the multi-band ensemble (tiny networks and images, CPU)."""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from da_seg.engine.trainer import component_setup
from da_seg.cli import main
from da_seg.config import ConfigError, load_recipe, recipe_from_dict
from da_seg.data.domains import load_domain
from da_seg.engine.checkpoint import load_checkpoint
from da_seg.engine.evaluate import SoftmaxEnsemble, predict
from da_seg.engine.checkpoint import restore_model
from da_seg.engine.trainer import Trainer
from da_seg.methods import build_components
from da_seg.methods.base import DomainBatch, StepContext
from da_seg.methods.cyclegan import linear_decay
from da_seg.methods.fda import fda_transfer, low_frequency_band
from da_seg.models.cyclegan import ImagePool, PatchDiscriminator, ResnetGenerator, translate
from da_seg.models.small import build_deeplab_small
from da_seg.runs import find_runs, train
from da_seg.stages.translate import TranslationExistsError, run_translate

TINY_CYCLEGAN = "[components.cyclegan]\nngf = 8\nn_blocks = 2\nndf = 8\npool_size = 4\n"


def _count(module):
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------- networks

def test_generator_and_discriminator_parameter_counts_and_shapes():
    assert _count(ResnetGenerator(ngf=64, n_blocks=9)) == 11_378_179    # the release's resnet_9blocks
    assert _count(PatchDiscriminator(ndf=64)) == 2_764_737               # the release's basic D
    generator = ResnetGenerator(ngf=8, n_blocks=2)
    out = generator(torch.rand(2, 3, 32, 48) * 2 - 1)
    assert out.shape == (2, 3, 32, 48) and out.abs().max() <= 1
    norms = [m for m in generator.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert norms and not any(m.affine or m.track_running_stats for m in norms)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in generator.modules())
    assert sum(isinstance(m, torch.nn.ReflectionPad2d) for m in generator.modules()) == 2 + 2 * 2
    # 70x70 PatchGAN: three stride-2 convs, then two stride-1 4x4 convs (-1 each).
    assert PatchDiscriminator(ndf=8)(torch.rand(1, 3, 64, 128)).shape == (1, 1, 6, 14)
    convs = [m for m in PatchDiscriminator(ndf=8).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.out_channels, m.stride[0]) for m in convs] == [(8, 2), (16, 2), (32, 2), (64, 1), (1, 1)]
    weights = torch.cat([m.weight.flatten() for m in ResnetGenerator(16, 2).modules()
                         if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)         # N(0, 0.02) init


def test_image_pool_stores_then_mixes_history():
    torch.manual_seed(0)
    pool = ImagePool(size=3)
    first = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    assert torch.equal(pool.query(first), first)                       # filling: returned as given
    new = torch.full((40, 3, 2, 2), 9.0)
    out = pool.query(new)
    from_history = (out[:, 0, 0, 0] != 9).sum().item()
    assert 0 < from_history < 40                                         # about half are old fakes
    assert len(pool.images) == 3
    assert torch.equal(ImagePool(size=0).query(new), new)
    restored = ImagePool(size=3)
    restored.load_state_dict(pool.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.images, pool.images))


def test_linear_decay_is_constant_then_linear_to_zero():
    factor = linear_decay(100, 0.5)
    assert [factor(i) for i in (0, 49, 50, 75, 100)] == [1.0, 1.0, 1.0, 0.5, 0.0]


# --------------------------------------------------------------------------------------- gradients

NUM_CLASSES = 3


def _setup(tmp_path=None, **options):
    recipe = recipe_from_dict({"name": "unit", "data": {"source": "a", "target": "b"}, "schedule": {"iters": 10}})
    model = build_deeplab_small(NUM_CLASSES, width=4, aspp_channels=8)
    setup = component_setup(recipe, model, torch.device("cpu"))
    (component,) = build_components({"cyclegan": {"ngf": 4, "n_blocks": 1, "ndf": 4, **options}}, setup)
    return component


def _context(size=(32, 32)):
    torch.manual_seed(1)
    source = DomainBatch(torch.rand(2, 3, *size), torch.randint(0, NUM_CLASSES, (2, *size)))
    target = DomainBatch(torch.rand(2, 3, *size))
    return StepContext(model=None, iteration=0, max_iters=10, source=source, target=target, autocast=nullcontext)


def _grads(net):
    return [p.grad for p in net.parameters()]


def _segmenter_checkpoint(tmp_path: Path) -> Path:
    """A da_seg checkpoint of a tiny segmenter, as a source-only run would leave it."""
    model = build_deeplab_small(NUM_CLASSES, width=4, aspp_channels=8)
    meta = {"name": "deeplab_small", "options": {"width": 4, "aspp_channels": 8}, "num_classes": NUM_CLASSES,
            "input_norm": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "bgr": False, "scale": 1.0},
            "class_names": ["a", "b", "c"], "colors": [[0, 0, 0]] * 3}
    path = tmp_path / "source_only.pt"
    torch.save({"iteration": 1, "model_meta": meta, "model": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("semantic", [False, True])
def test_generator_terms_reach_only_generators_and_discriminator_terms_only_discriminators(semantic, tmp_path):
    options = {"semantic_weight": 1.0, "semantic_checkpoint": str(_segmenter_checkpoint(tmp_path))} if semantic else {}
    component = _setup(**options)
    nets = component.networks
    assert set(nets) == {"g_st", "g_ts", "d_s", "d_t"} and set(component.optimizers) == {"generators", "discriminators"}
    terms = component.side_losses(_context())
    expected = {"g_adv_t", "g_adv_s", "cycle_s", "cycle_t", "idt_s", "idt_t", "d_t", "d_s"}
    assert set(terms) == expected | ({"sem_s", "sem_t"} if semantic else set())
    generator_terms = [v for k, v in terms.items() if not k.startswith("d_")]
    sum(generator_terms).backward(retain_graph=True)
    for name in ("d_s", "d_t"):
        assert all(g is None for g in _grads(nets[name])), f"a generator term reached {name}"
        assert all(p.requires_grad for p in nets[name].parameters())  # unfrozen again
    for name in ("g_st", "g_ts"):
        assert all(g is not None and g.abs().sum() > 0 for g in _grads(nets[name]))
    if semantic:
        assert all(p.grad is None and not p.requires_grad for p in component.segmenter.parameters())
        assert not component.segmenter.training
    for net in nets.values():
        net.zero_grad(set_to_none=True)
    (terms["d_s"] + terms["d_t"]).backward()
    for name in ("g_st", "g_ts"):
        assert all(g is None for g in _grads(nets[name])), f"a discriminator term reached {name}"
    for name in ("d_s", "d_t"):
        assert all(g is not None and torch.isfinite(g).all() for g in _grads(nets[name]))
    panel = component.visuals(None)["translation"]
    assert panel.dtype == torch.uint8 and panel.shape == (3, 32, 4 * 32)


def test_bad_options_fail_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match="semantic_weight > 0 needs semantic_checkpoint"):
        _setup(semantic_weight=1.0)
    with pytest.raises(ConfigError, match="components.cyclegan.decay_start"):
        _setup(decay_start=1.5)
    with pytest.raises(ConfigError, match="did you mean 'components.cyclegan.lambda_cycle'"):
        _setup(lambda_cycel=5)


# --------------------------------------------------------------------------------------- training

def test_cycle_loss_decreases_and_segmenter_is_never_stepped(write_recipe):
    # One fixed source/target pair (batch 1, no flip), overfit in the real loop.
    text = write_recipe(TINY_CYCLEGAN + "lambda_identity = 0.0\nlr = 2e-3\n", iters=60).read_text()
    text = text.replace("batch_size = 2", "batch_size = 1")
    path = write_recipe(name="overfit.toml")
    path.write_text(text + '\n[augment.source]\nflip = false\n[augment.target]\nflip = false\n')
    trainer = Trainer(load_recipe(path), None, progress=False)
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4) * 255, size=(32, 32), mode="bilinear")
    one = {"image": smooth.to(torch.uint8), "label": torch.zeros(1, 32, 32).long(), "index": torch.zeros(1).long()}
    trainer.source_stream._iterator = trainer.target_stream._iterator = iter(lambda: one, None)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    cycle = []
    for _ in range(6):
        for _ in range(10):
            trainer.step()
        logs = trainer.flush_logs()
        cycle.append(logs["side/cyclegan/cycle_s"] + logs["side/cyclegan/cycle_t"])
    assert cycle[-1] < 0.5 * cycle[0], cycle
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert trainer.optimizer.state_dict()["state"] == {}
    assert trainer.components[0].optimizers["generators"].param_groups[0]["lr"] == 0.0  # decayed to 0 at the end


def test_resume_restores_translator_optimizers_schedules_and_image_pools(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe(TINY_CYCLEGAN, iters=6))
    trainer = Trainer(recipe, tmp_path / "run", progress=False)
    for _ in range(3):
        trainer.step()
    trainer.flush_logs()
    trainer.save()
    saved = trainer.components[0]
    resumed = Trainer(recipe, tmp_path / "run", resume=True, progress=False).components[0]
    assert resumed.optimizers["generators"].state_dict()["state"].keys() == \
        saved.optimizers["generators"].state_dict()["state"].keys() != set()
    assert resumed.schedulers["discriminators"].last_epoch == 3
    for name in ("g_st", "d_t"):
        for a, b in zip(resumed.networks[name].parameters(), saved.networks[name].parameters()):
            assert torch.equal(a, b)
    for key in ("s", "t"):
        assert len(resumed.pools[key].images) == len(saved.pools[key].images) == 4  # 3 steps x 2, pool of 4
        assert all(torch.equal(a, b) for a, b in zip(resumed.pools[key].images, saved.pools[key].images))


def test_translate_stage_writes_a_domain_that_recipes_train_on_by_name(write_recipe, tiny_domains, tmp_path,
                                                                     monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe_path = write_recipe(TINY_CYCLEGAN, iters=4, extra="eval_every = 2\ncheckpoint_every = 2",
                               name="translate.toml", stage="translate")
    runs, descriptors, out = tmp_path / "runs", tmp_path / "descriptors", tmp_path / "data" / "translated"
    summary = run_translate(recipe_path, runs_root=runs, out=out, descriptor_dir=descriptors, progress=False)
    (run_dir,) = find_runs(runs, load_recipe(recipe_path))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["finished"] and [e["domains"] for e in metrics["evaluations"]] == [{}, {}]
    assert metrics["primary_domain"] == "" and not (run_dir / "best.pt").exists()
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "cyclegan/translation" in acc.Tags()["images"]
    assert {"side/cyclegan/cycle_s", "side/cyclegan/d_t", "lr/cyclegan/generators"} <= set(acc.Tags()["scalars"])
    assert "eval/mIoU" not in acc.Tags()["scalars"]

    source = load_domain(tiny_domains["source"])
    translated = load_domain(summary["descriptor"])
    assert translated.name == "tiny_src_cyclegan" and translated.class_names == source.class_names
    for split in ("train", "val"):
        mine, theirs = translated.samples(split, True), source.samples(split, True)
        assert [s.name for s in mine] == [s.name for s in theirs]
        assert [s.label.resolve() for s in mine] == [s.label.resolve() for s in theirs]  # referenced, not copied
        image, label = translated.read_pair(mine[0])
        assert image.shape[:2] == label.shape == (32, 48)
        assert not (image == source.read_image(theirs[0].image)).all()
    assert not list(out.rglob("*labels*"))
    assert summary["counts"]["train"] == {"images": 12, "translated_now": 12}

    # Run again: training is reused, the images are all there.
    again = run_translate(recipe_path, runs_root=runs, out=out, descriptor_dir=descriptors, progress=False)
    assert again["checkpoint"] == summary["checkpoint"] and again["counts"]["train"]["translated_now"] == 0
    # An interrupted write continues with the missing images only.
    (out / "train" / "images" / "003.png").unlink()
    again = run_translate(recipe_path, runs_root=runs, out=out, descriptor_dir=descriptors, progress=False)
    assert again["counts"]["train"]["translated_now"] == 1
    # Another generator must not mix its images in.
    other = tmp_path / "other.pt"
    other.write_bytes(Path(summary["checkpoint"]).read_bytes())
    with pytest.raises(TranslationExistsError, match="--overwrite"):
        run_translate(recipe_path, checkpoint=other, out=out, descriptor_dir=descriptors, progress=False)
    replaced = run_translate(recipe_path, checkpoint=other, out=out, descriptor_dir=descriptors, overwrite=True,
                             progress=False)
    assert replaced["counts"]["train"]["translated_now"] == 12

    # A recipe names the translated domain like any other.
    monkeypatch.setenv("DA_SEG_DATASETS", str(descriptors))
    text = write_recipe(iters=2, extra="eval_every = 2").read_text()
    train_path = tmp_path / "on_translated.toml"
    train_path.write_text(text.replace(f'source = "{tiny_domains["source"]}"', 'source = "tiny_src_cyclegan"'))
    trained = train(load_recipe(train_path), tmp_path / "runs2", progress=False)
    assert trained["source"] == "tiny_src_cyclegan" and trained["last"]["domains"]["tiny_tgt"]["miou"] is not None


def test_tiled_translation_agrees_with_whole_image():
    torch.manual_seed(0)
    generator = ResnetGenerator(ngf=8, n_blocks=2).eval()
    # A stationary image: every tile's instance-norm statistics are then close to the whole
    # image's (each tile is normalized with its own, as the training crops were).
    image = torch.rand(1, 3, 128, 192)
    whole = translate(generator, image)
    tiled = translate(generator, image, tile=96, overlap=48)
    assert tiled.shape == whole.shape == image.shape
    difference = (tiled - whole).abs()
    assert difference.mean().item() < 0.02 and difference.max().item() < 0.12
    assert difference.mean().item() < 0.2 * (whole - whole.mean()).abs().mean().item()
    assert torch.equal(translate(generator, image, tile=192, overlap=16), whole)  # fits in one tile
    assert translate(generator, image[..., :30, :45]).shape == (1, 3, 30, 45)    # any size (padded to x4)


# --------------------------------------------------------------------------------------- FDA

def test_fda_band_size_follows_beta_and_image_size():
    assert low_frequency_band(64, 128, 0.01).sum() == 0                  # b = floor(0.64) = 0
    assert low_frequency_band(64, 128, 0.05).sum() == 36                 # b = 3: frequencies -3..2
    assert low_frequency_band(512, 1024, 0.01).sum() == 100              # b = 5 at Cityscapes crops


def test_fda_keeps_phase_takes_target_low_frequency_amplitude():
    torch.manual_seed(0)
    source, target = torch.rand(2, 3, 64, 128), torch.rand(2, 3, 64, 128) * 0.5 + 0.3
    out = fda_transfer(source, target, 0.05)
    spectrum_in, spectrum_out = torch.fft.fft2(source.double()), torch.fft.fft2(out.double())
    strong = spectrum_out.abs() > 1e-3 * spectrum_out.abs().amax()
    phase_change = torch.remainder(spectrum_out.angle() - spectrum_in.angle() + math.pi, 2 * math.pi) - math.pi
    assert phase_change[strong].abs().max().item() < 1e-4
    # DC is in the band: each channel's mean is the target's.
    assert torch.allclose(out.mean(dim=(-2, -1)), target.mean(dim=(-2, -1)), atol=1e-5)
    # Outside the band (and the mirror of its one-sided edge, -b -> +b) the amplitude is the source's.
    band = low_frequency_band(64, 128, 0.05)
    mirror = torch.roll(band.flip(0).flip(1), shifts=(1, 1), dims=(0, 1))  # frequency k -> -k
    outside = ~(band | mirror)
    assert torch.allclose(spectrum_out.abs()[..., outside], spectrum_in.abs()[..., outside], rtol=1e-3, atol=1e-3)


def _official_fda_numpy(source: np.ndarray, target: np.ndarray, beta: float, inverse: str) -> np.ndarray:
    """The official FDA_source_to_target in NumPy, float64: full spectra, the four b x b corners of
    the amplitude swapped (low_freq_mutate), the source phase, then ``inverse``:
    "c2r_fft"  np.fft.irfft2 of the first W // 2 + 1 columns (what legacy torch.irfft did),
    "c2r_sum"  the same complex-to-real inverse as an explicit DFT sum (tiny images only),
    "ifft2"    np.fft.ifft2(...).real, da_seg's former inverse."""
    h, w = source.shape[-2:]
    b = int(np.floor(min(h, w) * beta))
    spectrum_s, spectrum_t = np.fft.fft2(source), np.fft.fft2(target)
    amplitude, amplitude_t = np.abs(spectrum_s), np.abs(spectrum_t)
    for rows in (slice(0, b), slice(h - b, h)):
        for cols in (slice(0, b), slice(w - b, w)):
            amplitude[..., rows, cols] = amplitude_t[..., rows, cols]
    mixed = amplitude * np.exp(1j * np.angle(spectrum_s))
    if inverse == "ifft2":
        return np.fft.ifft2(mixed).real
    if inverse == "c2r_fft":
        return np.fft.irfft2(mixed[..., : w // 2 + 1], s=(h, w))
    # x[n, m] = 1/(HW) sum_{k1 < H, k2 <= W/2} c_k2 Re(X[k1, k2] e^{2 pi i (k1 n / H + k2 m / W)}),
    # c = 1 for the columns that are their own mirror (0, and W/2 for even W), else 2.
    n, m = np.arange(h)[:, None], np.arange(w)[None, :]
    out = np.zeros(source.shape)
    for k1 in range(h):
        for k2 in range(w // 2 + 1):
            weight = 1 if k2 == 0 or 2 * k2 == w else 2
            wave = np.exp(2j * np.pi * (k1 * n / h + k2 * m / w))
            out += weight * np.real(mixed[..., k1, k2, None, None] * wave)
    return out / (h * w)


@pytest.mark.parametrize("height, width, beta, inverse", [
    (6, 8, 0.34, "c2r_sum"), (6, 7, 0.34, "c2r_sum"),      # b = 2, even and odd width
    (64, 128, 0.04, "c2r_fft"), (64, 97, 0.05, "c2r_fft"),  # b = 2 and 3
])
def test_fda_inverts_like_the_official_code_not_like_ifft2_real(height, width, beta, inverse):
    rng = np.random.default_rng(height * width)
    source, target = rng.random((2, 3, height, width)), rng.random((2, 3, height, width))
    out = fda_transfer(torch.from_numpy(source).float(), torch.from_numpy(target).float(), beta).double().numpy()
    official = _official_fda_numpy(source, target, beta, inverse)
    np.testing.assert_allclose(out, official, atol=2e-5, rtol=0)
    # The former inverse is a different image on the same input (a margin far above float32 noise).
    assert np.abs(_official_fda_numpy(source, target, beta, "ifft2") - official).max() > 100 * 2e-5


def test_fda_is_the_identity_when_source_is_target_or_beta_is_zero():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 64, 128)
    assert torch.allclose(fda_transfer(image, image, 0.09), image, atol=1e-5)
    assert torch.equal(fda_transfer(image, torch.rand(2, 3, 64, 128), 0.0), image)
    assert torch.equal(fda_transfer(image, torch.rand(2, 3, 64, 128), 0.01), image)  # b = 0 on 64 px
    resized = fda_transfer(image, torch.rand(2, 3, 32, 40), 0.05)                     # target resized first
    assert resized.shape == image.shape


def test_fda_component_changes_source_batch_before_the_forward(write_recipe):
    components = ("[components.fda]\nbeta = 0.1\n[components.source_ce]\n"
                  "[components.minent]\nweight = 0.005\nrobust_eta = 2.0\n")
    trainer = Trainer(load_recipe(write_recipe(components, iters=2)), None, progress=False)
    seen = {}
    original = trainer.model.forward

    def spy(images):
        seen.setdefault("first", images.detach().clone())
        return original(images)
    trainer.model.forward = spy
    source, target = trainer.next_batches()
    trainer.next_batches = lambda: (DomainBatch(source.images.clone(), source.labels, source.indices), target)
    trainer.step()
    assert not torch.allclose(seen["first"], source.images)              # the forward saw FDA's images
    mean_in = seen["first"].mean(dim=(-2, -1))
    assert any(torch.allclose(mean_in[0], t, atol=1e-4) for t in target.images.mean(dim=(-2, -1)))
    assert "fda" in trainer.components[0].visuals(None)


# --------------------------------------------------------------------------------------- ensemble

def test_ensemble_of_one_checkpoint_three_times_equals_that_checkpoint(write_recipe, tiny_domains, tmp_path):
    recipe = load_recipe(write_recipe(iters=2, extra="eval_every = 2"))
    train(recipe, tmp_path / "runs", progress=False)
    checkpoint = find_runs(tmp_path / "runs", recipe)[0] / "last.pt"
    model = restore_model(load_checkpoint(checkpoint)).eval()
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        single = predict(model, images, output_size=(64, 96))
        ensemble = predict(SoftmaxEnsemble([model, model, model]), images, output_size=(64, 96))
    assert torch.allclose(single, ensemble, atol=1e-6)
    runner = CliRunner()
    one = runner.invoke(main, ["eval", str(checkpoint), "--domain", str(tiny_domains["target"])], catch_exceptions=False)
    three = runner.invoke(main, ["eval", *[str(checkpoint)] * 3, "--domain", str(tiny_domains["target"])],
                          catch_exceptions=False)
    assert one.exit_code == three.exit_code == 0, one.output + three.output
    def scores(output):  # "tiny_tgt val: mIoU 41.20  pixel acc 60.10"
        (line,) = [x for x in output.splitlines() if x.startswith("tiny_tgt val: mIoU")]
        return line.split("(")[0]
    assert scores(one.output) == scores(three.output)
    assert "ensemble of 3" in three.output


def test_sweep_runs_a_translation_recipe_once_whatever_the_seeds(write_recipe, tmp_path, monkeypatch):
    import da_seg.stages.translate
    from da_seg.stages import sweep

    calls = []

    def fake_translate(path, **kw):
        calls.append((path, kw["overrides"]))
        return {"run_dir": str(tmp_path)}

    monkeypatch.setattr(da_seg.stages.translate, "run_translate", fake_translate)
    recipe = write_recipe("[components.cyclegan]\n", name="translate.toml", stage="translate")
    sweep([recipe], seeds=3, runs_root=tmp_path / "runs", progress=False)
    assert calls == [(recipe, ())]


def test_style_panel_script_lays_out_label_source_translation_fda_and_target(tiny_domains, tmp_path):
    # The source stands in for its own translation (same file names), so that column must equal
    # the source column; FDA with beta 0 is the identity too.
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "docs" / "style_panels.py"
    out = tmp_path / "panel.png"
    source, target = str(tiny_domains["source"]), str(tiny_domains["target"])
    done = subprocess.run([sys.executable, str(script), "--source", source, "--target", target, "--translated", source,
                           "--beta", "0", "--beta", "0.2", "--rows", "3", "--scale", "1", "--gap", "0",
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    panel = np.asarray(Image.open(out))
    height, width = 32, 48                                    # tiny domain frames
    assert panel.shape == (3 * height, 6 * width, 3)
    tiles = [panel[:height, c * width:(c + 1) * width] for c in range(6)]
    label, image, translated, fda_zero, fda, target = tiles
    assert set(map(tuple, label.reshape(-1, 3))) <= {(255, 0, 0), (0, 255, 0), (0, 0, 255)}
    assert np.array_equal(translated, image) and np.array_equal(fda_zero, image)
    assert not np.array_equal(fda, image) and not np.array_equal(target, image)
