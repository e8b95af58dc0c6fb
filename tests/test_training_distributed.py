"""training/distributed.py on one process (torchrun with two gloo processes: tests/test_train_cls.py): the
per-epoch seeds, the sums over ranks, the loaders' step counts."""

import torch
from torch.utils.data import TensorDataset

from training.distributed import all_reduce_sum, epoch_seed, seed_everything, setup_distributed, train_loader_for


def test_epoch_seeds_differ_for_every_epoch_and_rank():
    seeds = {epoch_seed(0, e, r) for e in range(300) for r in range(64)}
    assert len(seeds) == 300 * 64  # a collision would give two (epoch, rank) pairs the same data order
    assert epoch_seed(1, 0, 0) != epoch_seed(0, 0, 0)


def test_seed_everything_repeats_the_draws():
    seed_everything(epoch_seed(3, 2, 1))
    a = torch.rand(5)
    seed_everything(epoch_seed(3, 2, 1))
    assert torch.equal(a, torch.rand(5))


def test_one_process_is_not_ddp_and_sums_are_the_values(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    dist = setup_distributed("cpu")
    assert (dist.ddp, dist.rank, dist.world_size, dist.master, dist.device.type) == (False, 0, 1, True, "cpu")
    assert all_reduce_sum([3.0, 7], dist) == [3.0, 7]


def test_train_loader_drops_the_last_partial_batch(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    dist = setup_distributed("cpu")
    ds = TensorDataset(torch.arange(10))
    loader = train_loader_for(ds, batch_size=4, dist=dist, seed=0, workers=0)
    batches = [b[0] for b in loader]
    assert len(loader) == 2 and [len(b) for b in batches] == [4, 4]  # 10 // 4 steps, whatever the world size
    assert len(set(torch.cat(batches).tolist())) == 8  # a permutation: no sample twice in an epoch
