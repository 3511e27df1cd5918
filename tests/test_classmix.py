"""ClassMix masks and the mixed batch (DACS / DAFormer)."""
from __future__ import annotations

import math

import pytest
import torch

from da_seg.methods.mixing import choose_half, class_mix, class_mix_masks, present_classes


def _labels(seed: int = 0, n: int = 4, c: int = 6, size=(12, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n, size[0] // 4, size[1] // 4), generator=g)
    labels = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)
    labels[:, 0, :3] = 255           # some ignore pixels
    labels[1][labels[1] == 2] = 5    # image 1 lacks class 2
    return labels


def test_per_image_masks_paste_exactly_half_of_each_images_classes():
    torch.manual_seed(0)
    labels = _labels()
    for _ in range(20):
        mask = class_mix_masks(labels, 6, "per_image")
        assert mask.shape == labels.shape and mask.dtype == torch.bool
        for i in range(labels.shape[0]):
            present = [c for c in range(6) if (labels[i] == c).any()]
            pasted = sorted({int(c) for c in labels[i][mask[i]].unique()})
            # ceil(n / 2) of the image's own classes, all-or-nothing per class, never ignore
            assert len(pasted) == math.ceil(len(present) / 2) and set(pasted) <= set(present)
            expected = torch.isin(labels[i], torch.tensor(pasted, dtype=labels.dtype))
            assert torch.equal(mask[i], expected)
            assert not mask[i][labels[i] == 255].any()


def test_per_batch_choice_draws_from_the_classes_of_the_whole_batch():
    present = torch.tensor([[True, True, False, False, True, False],
                            [False, False, False, False, False, True]])
    union = present.any(0, keepdim=True).expand_as(present)
    for _ in range(20):
        chosen = choose_half(union)
        assert (chosen.sum(1) == 2).all() and not (chosen & ~union).any()   # ceil(4 / 2) of the union
    labels = _labels()
    batch_classes = {int(c) for c in labels.unique() if c != 255}
    for _ in range(20):
        mask = class_mix_masks(labels, 6, "per_batch")
        for i in range(labels.shape[0]):
            pasted = {int(c) for c in labels[i][mask[i]].unique()}
            assert pasted <= batch_classes
            assert torch.equal(mask[i], torch.isin(labels[i], torch.tensor(sorted(pasted), dtype=labels.dtype)))


def test_each_class_is_chosen_about_half_the_time():
    torch.manual_seed(1)
    present = torch.ones(2000, 4, dtype=torch.bool)
    share = choose_half(present).float().mean(0)
    assert torch.allclose(share, torch.full((4,), 0.5), atol=0.05)


def test_present_classes_ignores_255():
    labels = torch.tensor([[[0, 255], [2, 2]]])
    assert present_classes(labels, 3).tolist() == [[True, False, True]]


def test_mixed_images_labels_and_weights():
    torch.manual_seed(2)
    labels = _labels(n=2)
    source, target = torch.rand(2, 3, 12, 16), torch.rand(2, 3, 12, 16)
    pseudo = torch.randint(0, 6, (2, 12, 16))
    q = 0.37
    weights = torch.full((2, 12, 16), q)
    weights[:, :2] = 0.0  # border rows of target pixels
    mask = class_mix_masks(labels, 6)
    mixed = class_mix(source, labels, target, pseudo, weights, mask)
    m = mask.unsqueeze(1).expand_as(source)
    assert torch.equal(mixed.images[m], source[m]) and torch.equal(mixed.images[~m], target[~m])
    assert torch.equal(mixed.labels[mask], labels[mask]) and torch.equal(mixed.labels[~mask], pseudo[~mask])
    assert (mixed.weights[mask] == 1.0).all()                        # pasted source pixels: weight 1
    assert torch.equal(mixed.weights[~mask], weights[~mask])        # the rest: q (0 on the border rows)
    with pytest.raises(ValueError, match="same data.batch_size"):
        class_mix(source, labels, target[:1], pseudo, weights, mask)
