import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from da_seg.engine.evaluate import evaluate, predict, recompute_batchnorm
from da_seg.utils.windows import sliding_windows
from da_seg.utils.metrics import ConfusionMatrix
from da_seg.models.segmenter import InputNorm, Segmenter, SegmenterOutput


class PixelwiseSegmenter(Segmenter):
    """Output stride 1, 1x1 conv: every pixel's logits depend on that pixel only."""

    output_stride = 1

    def __init__(self, num_classes=4, kernel=1):
        super().__init__()
        self.num_classes = num_classes
        self.input_norm = InputNorm.named("imagenet")
        self.backbone = nn.Conv2d(3, num_classes, kernel, padding=kernel // 2)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.backbone.weight.copy_(2 * torch.randn(self.backbone.weight.shape, generator=generator))
            self.backbone.bias.zero_()

    def forward_normalized(self, x):
        return SegmenterOutput(logits=self.backbone(x))


class StridedSegmenter(PixelwiseSegmenter):
    """Output stride 2 with a BatchNorm, to exercise upsampling and train/eval modes."""

    output_stride = 2

    def __init__(self, num_classes=3):
        super().__init__(num_classes)
        self.norm = nn.BatchNorm2d(num_classes)

    def forward_normalized(self, x):
        return SegmenterOutput(logits=self.norm(self.backbone(x[:, :, ::2, ::2])))


def _images(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size, crop, stride", [((13, 17), (6, 8), (4, 5)), ((7, 5), (9, 9), (3, 3)),
                                                ((11, 9), (4, 4), (4, 4)), ((30, 31), (7, 9), (7, 9)),
                                                ((12, 40), (12, 5), (1, 5))])
def test_sliding_windows_cover_every_pixel(size, crop, stride):
    covered = torch.zeros(size, dtype=torch.int64)
    windows = sliding_windows(size, crop, stride)
    for top, left, bottom, right in windows:
        assert (bottom - top, right - left) == (min(crop[0], size[0]), min(crop[1], size[1]))
        assert bottom <= size[0] and right <= size[1]
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1


@pytest.mark.parametrize("crop, stride", [((4, 4), (5, 4)), ((4, 4), (4, 6)), ((6, 8), (7, 9))])
def test_a_stride_larger_than_the_crop_is_refused(crop, stride):
    # (10, 10), crop 4, stride 5 would give windows at 0, 5, 6: rows 4 and 5 never predicted.
    message = (f"eval.stride {stride} is larger than eval.crop {crop}: pixels between windows would "
               f"never be predicted")
    with pytest.raises(ValueError) as err:
        sliding_windows((20, 20), crop, stride)
    assert str(err.value) == message
    forwards = []
    model = PixelwiseSegmenter().eval()
    model.register_forward_hook(lambda *args: forwards.append(1))
    with pytest.raises(ValueError, match="larger than eval.crop"):
        predict(model, _images(1, 3, 20, 20), mode="slide", crop=crop, stride=stride)
    assert forwards == []  # refused before any window ran


def test_a_recipe_with_a_slide_stride_larger_than_the_crop_fails_to_load(write_recipe):
    # Before any training: when the recipe loads, naming the file.
    from da_seg.config import load_recipe

    path = write_recipe()
    with pytest.raises(ValueError, match=rf"{path}: eval.stride \(24, 8\) is larger than eval.crop \(16, 16\)"):
        load_recipe(path, ['eval.mode="slide"', "eval.crop=[16, 16]", "eval.stride=[24, 8]"])
    with pytest.raises(ValueError, match=r"eval.mode = 'slid'; valid"):
        load_recipe(path, ['eval.mode="slid"'])


def test_slide_equals_whole_for_a_pixelwise_model_on_odd_sizes():
    model = PixelwiseSegmenter().eval()
    images = _images(2, 3, 13, 17)
    with torch.no_grad():
        whole = predict(model, images, output_size=(13, 17))
        slide = predict(model, images, output_size=(13, 17), mode="slide", crop=(6, 8), stride=(4, 5))
    assert slide.shape == (2, 4, 13, 17)
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(whole.sum(1), torch.ones(2, 13, 17))


def test_flip_averages_with_the_mirrored_prediction():
    model = PixelwiseSegmenter(kernel=3).eval()  # a 3x3 conv is not mirror-symmetric
    images = _images(1, 3, 8, 10)
    with torch.no_grad():
        plain = predict(model, images)
        mirrored = predict(model, images.flip(-1)).flip(-1)
        flipped = predict(model, images, flip=True)
    assert not torch.allclose(plain, mirrored)
    torch.testing.assert_close(flipped, (plain + mirrored) / 2)


def test_input_size_and_whole_mode_upsampling():
    model = StridedSegmenter().eval()
    images = _images(2, 3, 16, 20)
    with torch.no_grad():
        probs = predict(model, images, output_size=(32, 40), input_size=(8, 10))
    assert probs.shape == (2, 3, 32, 40)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 32, 40))
    with pytest.raises(ValueError, match="valid"):
        predict(model, images, mode="tiles")


def _loader(num_batches=2, size=(10, 12), num_classes=3):
    generator = torch.Generator().manual_seed(3)
    batches = []
    for i in range(num_batches):
        label = torch.randint(0, num_classes, (2, *size), generator=generator)
        label[:, 0] = 255
        image = torch.randint(0, 256, (2, 3, *size), generator=generator, dtype=torch.uint8)
        batches.append({"image": image, "label": label, "index": torch.tensor([2 * i, 2 * i + 1])})
    return batches


def test_evaluate_scores_at_label_resolution_and_restores_train_mode():
    model = StridedSegmenter().train()
    model.backbone.eval()  # a mixed state must come back exactly
    stats = model.norm.running_mean.clone()
    loader = _loader()
    calls = []
    result = evaluate(model, loader, num_classes=3, device="cpu", class_subsets={"two": (0, 1)},
                      max_panels=3, progress=lambda done, total: calls.append((done, total)))
    assert model.training and model.norm.training and not model.backbone.training
    assert torch.equal(model.norm.running_mean, stats)  # evaluated in eval mode

    reference = ConfusionMatrix(3)
    model.eval()
    with torch.no_grad():
        for batch in loader:
            reference.update(predict(model, batch["image"].float() / 255).argmax(1), batch["label"])
    assert torch.equal(result.confusion, reference.matrix)
    assert result.metrics == reference.compute({"two": (0, 1)})
    assert calls == [(1, 2), (2, 2)]
    assert len(result.panels) == 3
    image, pred, gt = result.panels[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 10, 12)
    assert pred.shape == gt.shape == (10, 12)


def test_evaluate_under_initialized_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(StridedSegmenter())
        result = evaluate(model, _loader(1), num_classes=3, device="cpu")
        assert int(result.confusion.sum()) == 2 * 9 * 12  # first row of each label ignored
        assert model.training
    finally:
        dist.destroy_process_group()


def test_recompute_batchnorm_uses_target_statistics_on_a_copy_only():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Dropout(0.5), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    model.eval()
    model[0].running_mean.fill_(5.0)
    original = copy.deepcopy(model.state_dict())
    target = _images(4, 3, 6, 7, seed=1) * 3 + 1
    ignored = _images(4, 3, 6, 7, seed=2)

    adapted = recompute_batchnorm(model, [target, ignored], max_batches=1)

    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert adapted is not model and not adapted.training
    assert adapted[0].momentum == 0.1 and adapted[0].num_batches_tracked == 1
    torch.testing.assert_close(adapted[0].running_mean, target.mean((0, 2, 3)))
    torch.testing.assert_close(adapted[0].running_var, target.var((0, 2, 3), unbiased=True))
    # dropout stayed off, so the second BatchNorm saw the plain conv output
    with torch.no_grad():
        hidden = adapted[2](adapted[0](target))
    torch.testing.assert_close(adapted[3].running_mean, hidden.mean((0, 2, 3)))


def test_recompute_batchnorm_averages_batches_cumulatively():
    model = nn.Sequential(nn.BatchNorm2d(3))
    first, second = _images(2, 3, 4, 4, seed=4), _images(2, 3, 4, 4, seed=5) + 1
    adapted = recompute_batchnorm(model, iter([first, second]))
    expected = (first.mean((0, 2, 3)) + second.mean((0, 2, 3))) / 2
    torch.testing.assert_close(adapted[0].running_mean, expected)
    with pytest.raises(ValueError, match="no batches"):
        recompute_batchnorm(model, [])
