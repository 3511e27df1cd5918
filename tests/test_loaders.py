import itertools

from da_seg.data.loaders import InfiniteSampler


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
