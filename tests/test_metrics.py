import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from da_seg.utils.metrics import ConfusionMatrix


def _random_batch(generator, num_classes, shape=(2, 9, 11)):
    target = torch.randint(0, num_classes, shape, generator=generator)
    pred = torch.randint(0, num_classes, shape, generator=generator)
    # ignore pixels: 255 and labels outside [0, C) must not count, whatever the prediction
    target[torch.rand(shape, generator=generator) < 0.2] = 255
    target[0, 0, :3] = num_classes + 2
    target[1, 0, :2] = -1
    return pred, target


def _reference_iou(pred, target, num_classes):
    valid = (target >= 0) & (target < num_classes)
    mat = confusion_matrix(target[valid].numpy(), pred[valid].numpy(), labels=list(range(num_classes)))
    inter = np.diag(mat).astype(float)
    union = mat.sum(0) + mat.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100 * inter / union, mat


def test_iou_matches_sklearn_confusion_matrix_with_ignore_pixels():
    generator = torch.Generator().manual_seed(0)
    num_classes = 6
    pred, target = _random_batch(generator, num_classes)
    # make class 5 absent from both ground truth and prediction -> NaN, excluded from the mean
    pred[pred == 5] = 0
    target[target == 5] = 1
    cm = ConfusionMatrix(num_classes)
    cm.update(pred, target)
    metrics = cm.compute()

    expected, mat = _reference_iou(pred, target, num_classes)
    assert torch.equal(cm.matrix, torch.from_numpy(mat).long())
    assert math.isnan(metrics.iou[5]) and np.isnan(expected[5])
    np.testing.assert_allclose(metrics.iou, expected, rtol=1e-12)
    assert metrics.miou == pytest.approx(np.nanmean(expected))
    assert metrics.pixel_accuracy == pytest.approx(100 * np.trace(mat) / mat.sum())


def test_updates_accumulate_and_json_has_null_for_absent_classes():
    generator = torch.Generator().manual_seed(1)
    pred_a, target_a = _random_batch(generator, 4)
    pred_b, target_b = _random_batch(generator, 4)
    target_a[target_a == 3] = 255
    target_b[target_b == 3] = 255
    pred_a[pred_a == 3], pred_b[pred_b == 3] = 0, 0
    split, joint = ConfusionMatrix(4), ConfusionMatrix(4)
    split.update(pred_a, target_a)
    split.update(pred_b, target_b)
    joint.update(torch.cat([pred_a, pred_b]), torch.cat([target_a, target_b]))
    assert torch.equal(split.matrix, joint.matrix)

    entry = json.loads(json.dumps(split.compute({"first3": (0, 1, 2)}).to_json(), allow_nan=False))
    assert entry["iou"][3] is None
    assert entry["miou"] == pytest.approx(np.mean(entry["iou"][:3]))
    assert entry["subsets"]["first3"] == pytest.approx(entry["miou"])
    assert set(entry) == {"miou", "iou", "subsets", "pixel_accuracy"}


def test_subsets_average_only_their_classes():
    cm = ConfusionMatrix(3)
    # class 0 perfect, class 1 half right (1 of 2 gt pixels, no false positives), class 2 wrong
    target = torch.tensor([[[0, 0, 1, 1, 2, 2]]])
    pred = torch.tensor([[[0, 0, 1, 0, 1, 1]]])
    cm.update(pred, target)
    metrics = cm.compute({"13": (0, 1), "one": (2,)})
    assert metrics.iou[0] == pytest.approx(200 / 3)  # 2 / (2 + 3 - 2)
    assert metrics.iou[1] == pytest.approx(25.0)  # 1 / (2 + 3 - 1)
    assert metrics.iou[2] == 0.0
    assert metrics.subsets["13"] == pytest.approx((200 / 3 + 25) / 2)
    assert metrics.subsets["one"] == 0.0
    with pytest.raises(ValueError, match="outside"):
        cm.compute({"bad": (0, 3)})


def test_out_of_range_prediction_is_an_error():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="predictions"):
        cm.update(torch.tensor([[[3]]]), torch.tensor([[[0]]]))


def test_all_reduce_is_noop_without_distributed():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 0]]]))
    before = cm.matrix.clone()
    assert torch.equal(cm.all_reduce_().matrix, before)
