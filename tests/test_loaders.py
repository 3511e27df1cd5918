import itertools

import pytest

from da_seg.data.domains import DomainError
from da_seg.data.loaders import InfiniteSampler, eval_loader, infinite_loader, worker_error_message


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_each_epoch_is_a_permutation_and_epochs_differ():
    stream = take(InfiniteSampler(10, seed=3), 30)
    epochs = [stream[i:i + 10] for i in (0, 10, 20)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]


def test_start_skips_exactly():
    full = take(InfiniteSampler(7, seed=1), 40)
    for start in (0, 3, 7, 15):
        assert take(InfiniteSampler(7, seed=1, start=start), 40 - start) == full[start:]


def test_ranks_partition_each_epoch():
    ranks = [take(InfiniteSampler(10, seed=0, rank=r, world_size=2), 5) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))
    # 11 items over 3 ranks: padded to 12, every item appears at least once per epoch
    ranks = [take(InfiniteSampler(11, seed=0, rank=r, world_size=3), 4) for r in range(3)]
    assert set(sum(ranks, [])) == set(range(11))


def _corrupt(root, how: str):
    """A tiny on-disk domain (2 train, 2 val 16x16 images) with one bad val sample; returns the
    dataset over val and the path its error must name."""
    import numpy as np
    from PIL import Image

    from conftest import TINY_COLORS, write_tiny_domain
    from da_seg.data.datasets import SegmentationDataset
    from da_seg.data.domains import load_domain

    descriptor = write_tiny_domain(root, "tiny_bad", TINY_COLORS["src"], n_train=2, n_val=2, size=(16, 16))
    image, label = (root / "tiny_bad" / "val" / kind / "001.png" for kind in ("images", "labels"))
    if how == "truncated image":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
        bad = image
    elif how == "label of another size":
        Image.fromarray(np.zeros((8, 16), np.uint8)).save(label)
        bad = label
    else:  # a raw value the descriptor neither maps nor ignores, with unknown = "error"
        Image.fromarray(np.full((16, 16), 7, np.uint8)).save(label)
        bad = label
    return SegmentationDataset(load_domain(str(descriptor)), "val", with_labels=True), bad


def _error_of(iterable, batches: int):
    it = iter(iterable)
    with pytest.raises(DomainError) as err:
        for _ in range(batches):
            next(it)
    return str(err.value)


@pytest.mark.parametrize("how", ["truncated image", "label of another size", "unknown label value"])
def test_a_data_error_in_a_worker_reaches_the_caller_as_its_own_one_line_message(tmp_path, how):
    dataset, bad = _corrupt(tmp_path, how)
    in_process = _error_of(eval_loader(dataset, 1, num_workers=0), 2)
    in_worker = _error_of(eval_loader(dataset, 1, num_workers=1), 2)
    assert str(bad) in in_worker and "Traceback" not in in_worker and "worker process" not in in_worker
    assert in_worker == in_process and "\n" not in in_worker


def test_the_training_loader_reports_a_worker_data_error_the_same_way(tmp_path):
    dataset, bad = _corrupt(tmp_path, "truncated image")
    loader = infinite_loader(dataset, 1, seed=0, num_workers=1)
    message = _error_of(loader, 4)  # 2 samples, one of them bad: within the first two batches
    assert message.startswith(f"cannot read image file {bad} (domain 'tiny_bad')") and "Traceback" not in message
    loader._shutdown_workers()  # the trainer's close_loaders reaches through the wrapper


def test_worker_error_message_is_recovered_only_from_torchs_reraised_copy():
    wrapped = DomainError("Caught DomainError in DataLoader worker process 0.\nOriginal Traceback "
                          "(most recent call last):\n  File \"x.py\", line 1, in f\n"
                          "da_seg.data.domains.DomainError: label file a.png: values [7]\n  on two lines\n")
    assert worker_error_message(wrapped) == "label file a.png: values [7]\n  on two lines"
    assert worker_error_message(DomainError("label file a.png: values [7]")) is None
    assert worker_error_message(ValueError("Caught DomainError in DataLoader worker process 0.")) is None
