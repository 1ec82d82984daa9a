"""DDP training with one global importance distribution across ranks.

    torchrun --nproc_per_node 2 examples/ddp_train.py                    # CPU: gloo
    torchrun --nproc_per_node 8 examples/ddp_train.py --sharded          # GPUs: NCCL, scores sharded
    torchrun --nproc_per_node 2 examples/ddp_train.py --exchange step    # the per-step exchange
    torchrun --nproc_per_node 2 examples/ddp_train.py --uniform          # DistributedSampler, to compare

A small MLP on synthetic 10-class data (built from the seed on every rank, so nothing is
downloaded): most points sit near their class centre, 20% are hard ones near the origin,
where the classes overlap. Each rank draws its part of a global importance sample, weights
its losses by 1 / (N p), and hands the losses back with ``sampler.update``: recorded locally,
and exchanged once per epoch, when the next epoch begins (``--exchange`` picks another
setting). Each epoch's line gives the sampler's share of the training time: its calls on the
steps (``weights``, ``update``) plus its exchange and draw at the epoch's start.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import isample
from isample.distributed import DistributedImportanceSampler


def make_data(n: int, dim: int, classes: int, seed: int) -> Tuple[TensorDataset, TensorDataset]:
    """Train and test sets: class centres on a sphere, 20% of the points pulled to the origin."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1) * 3.0

    def draw(count: int) -> TensorDataset:
        y = torch.randint(classes, (count,), generator=g)
        scale = torch.where(torch.rand(count, generator=g) < 0.2, 0.25, 1.0)
        x = centres[y] * scale[:, None] + torch.randn(count, dim, generator=g)
        return TensorDataset(x, y)

    return draw(n), draw(n // 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--samples-per-epoch", type=int, default=None, help="global; default N")
    parser.add_argument("--sharded", action="store_true", help="each rank holds 1/W of the scores")
    parser.add_argument(
        "--exchange", default="epoch", help="when updates travel: epoch (default), step, or a number of steps K"
    )
    parser.add_argument("--uniform", action="store_true", help="torch's DistributedSampler instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="save model and sampler state here at the end")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # ranks share the machine's cores

    train, test = make_data(args.items, 32, 10, args.seed)
    if args.uniform:
        sampler = DistributedSampler(train, seed=args.seed)
    else:
        sampler = DistributedImportanceSampler(
            len(train),
            sharded=args.sharded,
            samples_per_epoch=args.samples_per_epoch,  # the library's defaults otherwise (docs/policies.md)
            seed=args.seed,
            exchange=int(args.exchange) if args.exchange.isdigit() else args.exchange,
        )
    loader = DataLoader(isample.IndexedDataset(train), batch_size=args.batch_size, sampler=sampler)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    model = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if rank == 0:
        mode = "uniform" if args.uniform else ("sharded" if args.sharded else "replicated") + f", exchange={args.exchange}"
        print(
            f"{world} ranks ({dist.get_backend()}), N={len(train)}, {mode}, {len(sampler)} items per rank per epoch",
            flush=True,
        )

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        started, on_steps, loss_sum, steps = time.perf_counter(), 0.0, 0.0, 0
        before, first = (None if args.uniform else sampler.stats), None
        model.train()
        for index, x, y in loader:
            if first is None and not args.uniform:
                first = sampler.stats  # the loader's first batch started the epoch: exchange, then draw
            x, y = x.to(device), y.to(device)
            losses = F.cross_entropy(model(x), y, reduction="none")
            tick = time.perf_counter()
            weights = torch.ones_like(losses) if args.uniform else sampler.weights(index).to(losses)
            on_steps += time.perf_counter() - tick
            optimizer.zero_grad()
            (losses * weights).mean().backward()
            optimizer.step()
            if not args.uniform:
                tick = time.perf_counter()
                sampler.update(index, losses.detach())  # local: the next epoch's iter() exchanges it
                on_steps += time.perf_counter() - tick
            loss_sum += float((losses.detach() * weights).mean())  # unbiased for the mean train loss
            steps += 1
        seconds = time.perf_counter() - started
        if not args.uniform:
            at_start = sum(first[k] - before[k] for k in ("exchange_seconds", "draw_seconds"))
            sampler.check_consistency()  # exchanges this epoch's updates, then compares the replicas' scores
        model.eval()
        with torch.no_grad():
            x, y = test.tensors
            accuracy = float((model(x.to(device)).argmax(1) == y.to(device)).double().mean())
        if rank == 0:
            line = (
                f"epoch {epoch}: {steps} steps/rank, weighted train loss {loss_sum / max(steps, 1):.3f}, "
                f"test acc {accuracy:.3f}"
            )
            if not args.uniform:
                info = sampler.history[-1]
                line += (
                    f", {info['kind']}, max weight {info.get('max_weight', 1.0):.2f}; sampler "
                    f"{1e6 * on_steps / max(steps, 1):.0f} us/step + {1e3 * at_start:.1f} ms at the epoch's start "
                    f"= {100 * (on_steps + at_start) / seconds:.1f}% of {1e3 * seconds / max(steps, 1):.2f} ms/step"
                )
            print(line, flush=True)

    if args.checkpoint and not args.uniform:
        sampler.flush()  # every rank: the last updates are exchanged, so rank 0's state serves all
        state = {"model": model.module.state_dict(), "sampler": sampler.state_dict()}
        if args.sharded:  # each rank saves its own shard
            torch.save(state, f"{args.checkpoint}.rank{rank}")
        elif rank == 0:  # replicated: identical on every rank, rank 0 saves
            torch.save(state, args.checkpoint)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
