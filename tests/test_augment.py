import pytest
import torch

from da_seg.config import AugmentConfig
from da_seg.data.augment import IGNORE_INDEX, BatchAugment, random_geometry


def blocky(n=4, h=40, w=56, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n, h // 8, w // 8), generator=g)
    return labels.repeat_interleave(8, 1).repeat_interleave(8, 2)


def test_label_derived_image_stays_aligned_under_scale_crop_flip():
    labels = blocky()
    # The image encodes the label: channel value = 40 * class. After any geometric transform,
    # decoding the image must give back the transformed label (except at block borders, where
    # bilinear image sampling blends two classes).
    images = (labels.float() * 40 / 255).unsqueeze(1).repeat(1, 3, 1, 1)
    torch.manual_seed(0)
    for _ in range(5):
        out_img, out_lab = random_geometry(images, labels, crop=(32, 48), scale=(0.5, 2.0), flip=True)
        assert out_img.shape == (4, 3, 32, 48) and out_lab.shape == (4, 32, 48)
        valid = out_lab != IGNORE_INDEX
        decoded = (out_img[:, 0] * 255 / 40).round().long()
        agreement = (decoded[valid] == out_lab[valid]).float().mean()
        assert agreement > 0.85  # a flip or offset mismatch would give ~0.2 (chance over 5 classes)


def test_flip_only_mirrors_exactly():
    labels = blocky(n=64)
    images = torch.rand(64, 3, 40, 56)
    torch.manual_seed(1)
    out_img, out_lab = random_geometry(images, labels, crop=None, scale=(1.0, 1.0), flip=True)
    flipped = [bool((out_lab[i] == labels[i].flip(-1)).all()) for i in range(64)]
    kept = [bool((out_lab[i] == labels[i]).all()) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54
    for i in range(64):
        expected = images[i].flip(-1) if flipped[i] and not kept[i] else images[i]
        torch.testing.assert_close(out_img[i], expected, atol=1e-5, rtol=0)


def test_padding_is_ignore_never_a_class():
    labels = torch.zeros(8, 16, 16, dtype=torch.long)  # class 0 everywhere: "road"
    images = torch.rand(8, 3, 16, 16)
    torch.manual_seed(0)
    _, out_lab = random_geometry(images, labels, crop=(40, 40), scale=(0.5, 0.5), flip=False)
    values = set(out_lab.unique().tolist())
    assert values == {0, IGNORE_INDEX}
    # The 8x8 rescaled image covers 64 of 1600 pixels per sample: everything else is ignore.
    assert ((out_lab == 0).sum(dim=(1, 2)) == 64).all()


def test_batch_augment_photometric_changes_images_only():
    aug = BatchAugment(AugmentConfig(flip=False, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1,
                                     color_p=1.0, blur_p=1.0))
    images = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    labels = blocky(4, 24, 24)
    out, out_labels = aug(images, labels)
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(out, images.float() / 255)
    assert torch.equal(out_labels, labels)


def test_identity_config_is_identity():
    aug = BatchAugment(AugmentConfig(flip=False))
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    labels = blocky(2, 8, 8)
    out, out_labels = aug(images, labels)
    torch.testing.assert_close(out, images.float() / 255)
    assert torch.equal(out_labels, labels)


@pytest.mark.parametrize("crop, scale", [((41, 16), (1.0, 1.0)), ((24, 57), (0.5, 1.0)), ((81, 40), (0.5, 2.0))])
def test_a_crop_larger_than_the_image_at_every_scale_is_refused(crop, scale):
    aug = BatchAugment(AugmentConfig(crop=crop, scale=scale, flip=False), "source")
    images = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    with pytest.raises(ValueError) as err:
        aug(images, blocky(2, 40, 56))
    message = str(err.value)
    assert message.startswith(f"augment.source.crop {list(crop)} (HxW) is larger than the 40x56 images")
    assert "data.source_size" in message


@pytest.mark.parametrize("crop, scale", [((40, 56), (1.0, 1.0)), ((80, 112), (0.5, 2.0)), ((60, 20), (1.5, 1.5))])
def test_a_crop_that_fits_at_the_largest_scale_is_taken(crop, scale):
    aug = BatchAugment(AugmentConfig(crop=crop, scale=scale, flip=False), "target")
    images, labels = aug(torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8), blocky(2, 40, 56))
    assert images.shape == (2, 3, *crop) and labels.shape == (2, *crop)


def test_trainer_stops_on_a_crop_larger_than_the_loaded_images(write_recipe):
    from da_seg.config import load_recipe
    from da_seg.engine.trainer import Trainer

    # The tiny domains' images are 32x48 (HxW); data.source_size = [16, 24] halves them on load.
    recipe = load_recipe(write_recipe(), ["augment.source.crop=[24, 24]", "data.source_size=[16, 24]"])
    with pytest.raises(ValueError, match=r"augment.source.crop \[24, 24\] \(HxW\) is larger than the 16x24"):
        Trainer(recipe, None, progress=False).step()
