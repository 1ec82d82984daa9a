"""DQN with prioritized replay on gymnasium's CartPole-v1, with isample's buffer or cpprb's.

    pip install "isample[rl]"                              # gymnasium and cpprb
    python examples/dqn_cartpole.py --buffer isample       # 30k steps, about a minute on a CPU
    python examples/dqn_cartpole.py --buffer cpprb

Both buffers go through the same cpprb-style calls (``add(**transition)``, ``sample(k,
beta=...)``, ``batch["indexes"]``, ``update_priorities(indexes, numpy |TD|)``): the
migration from cpprb is the constructor alone (``make_buffer``). The run prints the returns
as it goes, then the mean return of the last 20 episodes and the median time of each buffer
call inside the loop (``add`` of one transition, ``sample`` of a batch, ``update_priorities``
of a batch). ``benchmarks/replay_dqn.py`` runs it for both buffers, interleaved, and records
the numbers.

The setting is the one the buffers were compared in: capacity 50,000, batch 64, alpha 0.6,
beta annealed from 0.4 to 1, Huber loss weighted by the importance weights, a target network
copied every 500 steps, epsilon-greedy from 1 to 0.05 over the first third of the steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

CALLS = ("add", "sample", "update_priorities")


def make_buffer(kind: str, capacity: int, *, alpha: float, eps: float, normalize: str, seed: int) -> Any:
    """The replay buffer `kind` ("isample" or "cpprb") for CartPole's transitions."""
    if kind == "isample":
        from isample.integrations.replay import PrioritizedReplayBuffer

        # no env_dict: the first add defines the fields; bool_as_float stores gymnasium's bool
        # `terminated` as 0./1. (cpprb's float32), so `1 - done` works
        return PrioritizedReplayBuffer(
            capacity, alpha=alpha, eps=eps, normalize=normalize, bool_as_float=True, seed=seed
        )
    if kind == "cpprb":
        import cpprb

        env_dict = {"obs": {"shape": 4}, "act": {"dtype": np.int64}, "rew": {}, "next_obs": {"shape": 4}, "done": {}}
        return cpprb.PrioritizedReplayBuffer(capacity, env_dict, alpha=alpha, eps=eps)
    raise ValueError(f"buffer must be 'isample' or 'cpprb', got {kind!r}")


class TimedBuffer:
    """Times each add / sample / update_priorities call of a buffer (perf_counter_ns)."""

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer
        self.ns: Dict[str, List[int]] = {name: [] for name in CALLS}

    def add(self, **transition: Any) -> None:
        start = time.perf_counter_ns()
        self.buffer.add(**transition)
        self.ns["add"].append(time.perf_counter_ns() - start)

    def sample(self, batch_size: int, beta: float) -> Dict[str, Any]:
        start = time.perf_counter_ns()
        batch = self.buffer.sample(batch_size, beta=beta)
        self.ns["sample"].append(time.perf_counter_ns() - start)
        return batch

    def update_priorities(self, indexes: Any, priorities: np.ndarray) -> None:
        start = time.perf_counter_ns()
        self.buffer.update_priorities(indexes, priorities)
        self.ns["update_priorities"].append(time.perf_counter_ns() - start)

    def on_episode_end(self) -> None:
        self.buffer.on_episode_end()  # cpprb's call; isample accepts it (nothing to do)

    def medians_us(self) -> Dict[str, float]:
        return {name: statistics.median(ns) / 1e3 for name, ns in self.ns.items() if ns}

    def totals_s(self) -> Dict[str, float]:
        return {name: sum(ns) / 1e9 for name, ns in self.ns.items()}


def q_network(hidden: int = 128) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2)
    )


def train(
    make: Callable[[], Any],
    *,
    steps: int = 30_000,
    seed: int = 0,
    batch_size: int = 64,
    gamma: float = 0.99,
    lr: float = 1e-3,
    learning_starts: int = 1_000,
    target_every: int = 500,
    beta_start: float = 0.4,
    log_every: Optional[int] = 5_000,
) -> Dict[str, Any]:
    """Train a DQN for `steps` environment steps with the buffer `make()` returns.

    Returns the episode returns, the mean of the last 20, the medians (µs) of each buffer
    call in the loop, and the run's wall time.
    """
    import gymnasium as gym

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=seed)
    q = q_network()
    target = copy.deepcopy(q)
    optimizer = torch.optim.Adam(q.parameters(), lr=lr)
    rb = TimedBuffer(make())
    returns: List[float] = []
    episode_return = 0.0
    start = time.perf_counter()
    for step in range(steps):
        epsilon = max(0.05, 1.0 - step / (steps / 3))
        if rng.random() < epsilon:
            action = int(rng.integers(2))
        else:
            with torch.no_grad():
                action = int(q(torch.as_tensor(obs)).argmax())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rb.add(obs=obs, act=action, rew=reward, next_obs=next_obs, done=terminated)
        obs, episode_return = next_obs, episode_return + reward
        if terminated or truncated:
            rb.on_episode_end()
            returns.append(episode_return)
            obs, _ = env.reset()
            episode_return = 0.0
        if step >= learning_starts:
            beta = beta_start + (1.0 - beta_start) * step / steps
            batch = rb.sample(batch_size, beta=beta)
            # cpprb returns numpy arrays, isample tensors; as_tensor takes both without a copy.
            # cpprb stores scalars as shape (1,): reshape(-1) makes (k, 1) and (k,) agree.
            o, o2 = torch.as_tensor(batch["obs"]), torch.as_tensor(batch["next_obs"])
            a = torch.as_tensor(batch["act"]).reshape(-1).long()
            r, done = torch.as_tensor(batch["rew"]).reshape(-1), torch.as_tensor(batch["done"]).reshape(-1)
            w = torch.as_tensor(batch["weights"]).reshape(-1)
            q_taken = q(o).gather(1, a.unsqueeze(1)).squeeze(1)
            with torch.no_grad():
                y = r + gamma * (1.0 - done) * target(o2).max(dim=1).values
            loss = (w * F.smooth_l1_loss(q_taken, y, reduction="none")).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(q.parameters(), 10.0)
            optimizer.step()
            rb.update_priorities(batch["indexes"], (q_taken - y).abs().detach().numpy())
            if step % target_every == 0:
                target.load_state_dict(q.state_dict())
        if log_every and (step + 1) % log_every == 0:
            recent = returns[-20:]
            print(f"step {step + 1:>7,}: {len(returns)} episodes, mean return of the last 20: "
                  f"{statistics.fmean(recent) if recent else float('nan'):.1f}", flush=True)
    wall = time.perf_counter() - start
    env.close()
    return {
        "steps": steps,
        "seed": seed,
        "episodes": len(returns),
        "returns": returns,
        "last20_mean_return": statistics.fmean(returns[-20:]) if returns else None,
        "median_us": rb.medians_us(),
        "calls": {name: len(ns) for name, ns in rb.ns.items()},
        "total_s": rb.totals_s(),
        "wall_s": wall,
    }


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--buffer", choices=("isample", "cpprb"), default="isample")
    parser.add_argument("--normalize", choices=("buffer", "batch"), default="buffer",
                        help="isample only: 'buffer' is cpprb's weight normalisation (default), 'batch' the PER paper's")
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--capacity", type=int, default=50_000)
    parser.add_argument("--alpha", type=float, default=0.6)
    parser.add_argument("--eps", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the nets are tiny)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.capacity < 1 or args.threads < 1:
        parser.error("--steps, --capacity and --threads must be >= 1")
    torch.set_num_threads(args.threads)

    def make() -> Any:
        return make_buffer(args.buffer, args.capacity, alpha=args.alpha, eps=args.eps, normalize=args.normalize, seed=args.seed)

    result = train(make, steps=args.steps, seed=args.seed)
    label = args.buffer + (f" (normalize={args.normalize!r})" if args.buffer == "isample" else "")
    print(f"{label}: {result['episodes']} episodes, mean return of the last 20: {result['last20_mean_return']:.1f}, "
          f"wall {result['wall_s']:.1f} s")
    for name, us in result["median_us"].items():
        print(f"  {name:<18} median {us:8.1f} µs  ({result['calls'][name]:,} calls)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"buffer": args.buffer, "normalize": args.normalize, **result}, f, indent=1)


if __name__ == "__main__":
    main()
