"""The alignment picture and the domain-separability score."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from da_seg.engine.alignment import SOURCE_COLOR, TARGET_COLOR, alignment_image, domain_separability, pixel_vectors
from da_seg.models.small import build_deeplab_small


def test_separability_is_chance_for_one_distribution_and_full_for_two():
    rng = np.random.default_rng(0)
    same = domain_separability(rng.normal(size=(300, 4)), rng.normal(size=(300, 4)))
    apart = domain_separability(rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) + 5)
    assert 35 <= same <= 65 and apart > 99


def test_pixel_vectors_sample_a_grid_within_budget():
    model = build_deeplab_small(3, width=4, aspp_channels=8).eval()
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    vectors = pixel_vectors(model, images, "output", budget=50)
    assert vectors.shape[1] == 3 and 20 <= len(vectors) <= 50
    np.testing.assert_allclose(vectors.sum(1), 1.0, rtol=1e-5)
    assert pixel_vectors(model, images, "features", budget=1000).shape == (3 * 8 * 8, 32)


@pytest.mark.parametrize("kind,method", [("output", "pca"), ("features", "tsne")])
def test_alignment_image_draws_both_domains_and_restores_the_mode(kind, method):
    torch.manual_seed(0)
    model = build_deeplab_small(3, width=4, aspp_channels=8).train()
    source = torch.rand(2, 3, 64, 64) * 0.3
    target = torch.rand(2, 3, 64, 64) * 0.3 + 0.7
    result = alignment_image(model, source, target, kind=kind, method=method, max_points=160, size=128)
    image, separability = result  # unpacks like a tuple
    assert image.dtype == torch.uint8 and image.shape == (3, 128, 128)
    colours = {tuple(c) for c in image.reshape(3, -1).T.tolist()}
    assert tuple(SOURCE_COLOR) in colours and tuple(TARGET_COLOR) in colours
    assert 0 <= separability <= 100 and separability == result.separability
    assert model.training
    with pytest.raises(ValueError, match="kind"):
        alignment_image(model, source, target, kind="logits")
