"""Scoring workers beside one trainer: the second seed's system (Alain et al. 2015) on Fashion-MNIST.

    python examples/scoring_workers.py                           # 1 worker process, 10,000 images
    python examples/scoring_workers.py --workers 2 --score loss
    torchrun --nproc_per_node 3 examples/scoring_workers.py --scorer-ranks 1   # 2 trainers, 1 scorer rank

Workers sweep the training set over and over, scoring every image with a recent copy of the
parameters (the gradient-norm bound by default); the trainer draws each epoch in proportion
to those scores, mixed with 10% uniform, and weights its losses by 1 / (N p). The loop:

    with ScorerPool(sampler, model, train, score=args.score, workers=args.workers) as pool:
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            for index, x, y in loader:
                losses = F.cross_entropy(model(x), y, reduction="none")
                loss = (losses * sampler.weights(index).to(losses)).mean()
                optimizer.zero_grad(); loss.backward(); optimizer.step()
                pool.step(model)
            print(epoch, pool.stats())

Each epoch prints the test accuracy and the pool's coverage, staleness and items/s. Needs
the Fashion-MNIST files (``apt-get install dataset-fashion-mnist``, or ``--data-dir``).
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import isample
from isample.experiments.data import load_dataset
from isample.experiments.models import small_cnn
from isample.scoring import ScorerPool


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[s : s + 1000]).argmax(1) == y[s : s + 1000]).sum()) for s in range(0, len(y), 1000))
    model.train()
    return correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000, help="training images (the first ones)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples-per-epoch", type=int, default=5_000, help="draws per epoch (with replacement)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="scoring processes on this machine")
    parser.add_argument("--scorer-ranks", type=int, default=0, help="under torchrun: the last K ranks score")
    parser.add_argument("--score", default="grad_norm", choices=["grad_norm", "loss", "grad_norm_exact"])
    parser.add_argument("--publish-every", type=int, default=20)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the trainer and the workers share the cores

    data = load_dataset("fashion-mnist", args.data_dir)
    normalise = lambda images: (images.float() / 255.0 - data.mean[0]) / data.std[0]  # noqa: E731
    train = TensorDataset(normalise(data.train_images[: args.items]), data.train_labels[: args.items])
    test_x, test_y = normalise(data.test_images), data.test_labels
    torch.manual_seed(0)
    model = small_cnn()

    ranks, pool_options = None, {"workers": args.workers}
    if args.scorer_ranks:
        from isample.scoring import ScorerRanks

        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
        ranks = ScorerRanks.split(scorers=args.scorer_ranks)
        if ranks.is_scorer:
            done = ranks.serve(model, train)  # until the trainers close their pool
            print(f"scorer rank {ranks.rank}: {done['items']:,} items in {done['chunks']} chunks")
            dist.destroy_process_group()
            return
        from isample.distributed import DistributedImportanceSampler
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, process_group=ranks.trainers)
        sampler = DistributedImportanceSampler(len(train), group=ranks.trainers, transform="proportional",
                                               uniform_mix=0.1, samples_per_epoch=args.samples_per_epoch)
        pool_options = {"ranks": ranks}
    else:
        sampler = isample.ImportanceSampler(len(train), transform="proportional", uniform_mix=0.1,
                                            samples_per_epoch=args.samples_per_epoch)
    loader = DataLoader(isample.IndexedDataset(train), batch_size=args.batch_size, sampler=sampler)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lead = ranks is None or ranks.is_lead

    with ScorerPool(sampler, model, train, score=args.score, publish_every=args.publish_every, **pool_options) as pool:
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            for index, x, y in loader:
                losses = F.cross_entropy(model(x), y, reduction="none")
                loss = (losses * sampler.weights(index).to(losses)).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                pool.step(model)
            stats = pool.stats()  # a collective across trainer ranks
            if lead:
                inner = getattr(model, "module", model)  # evaluate the plain module on this rank alone
                print(f"epoch {epoch}: test accuracy {accuracy(inner, test_x, test_y):.3f}, coverage "
                      f"{stats['coverage']:.2f}, staleness median {stats['staleness']['median']} max "
                      f"{stats['staleness']['max']} steps, {stats['items_per_second']:,.0f} items/s, "
                      f"workers alive {stats['workers_alive']}, rejected {stats['rejected']}", flush=True)
    if ranks is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
