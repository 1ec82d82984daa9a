"""Scoring workers as processes on this machine: started, watched, restarted and stopped.

Parameters reach the workers through the shared-memory ``ParameterBoard``; scores come back
through one pipe per worker (``multiprocessing.Pipe``), which the trainer polls without
waiting. A pipe holds about 64 KiB, some fifteen messages of 256 items: a worker that gets that
far ahead of a trainer that has stopped stepping blocks on its send until the trainer drains
it (back-pressure, never the other way round).

A worker is a daemon process: it dies with the interpreter that started it. It also checks,
before every chunk, that its parent is still the trainer, so a trainer killed by SIGKILL
leaves no worker behind for longer than one chunk.
"""

from __future__ import annotations

import copy
import select
import signal
import time
import warnings
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.multiprocessing as multiprocessing

from . import messages
from .layout import ParameterLayout
from .shared import ParameterBoard
from .worker import ScorerConfig, worker_main

__all__ = ["LocalWorkers"]


@dataclass
class _Slot:
    index: int
    process: Any = None
    connection: Any = None
    generation: int = 0
    failed: bool = False  # it sent an error: its exit is expected, and already reported


class LocalWorkers:
    """The transport of a ScorerPool on one machine (see the module docstring)."""

    collective = False  # scores are applied at every step, by this process alone

    def __init__(self, count: int, config: ScorerConfig, model: torch.nn.Module, dataset: Any,
                 layout: ParameterLayout, start_method: str) -> None:
        self.count = count
        self.config = config
        self.model = model
        self.dataset = dataset
        self.start_method = start_method
        self.context = multiprocessing.get_context(start_method)
        self.board = ParameterBoard(layout)
        self.slots = [_Slot(i) for i in range(count)]
        self.restarts = 0
        self._poller = select.poll()
        self._by_fd: Dict[int, _Slot] = {}

    # -- life cycle -----------------------------------------------------------------------
    def start(self, publish: Callable[[], None]) -> None:
        """Publish first (a worker's first read must find parameters), then start the workers."""
        publish()
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        receiving, sending = self.context.Pipe(duplex=False)
        # spawn/forkserver pickle the model: send a copy, or torch would move the trainer's own
        # parameters into shared memory and the worker would score the live, moving weights
        model = self.model if self.start_method == "fork" else copy.deepcopy(self.model).to("cpu")
        config = copy.copy(self.config)
        config.generation = slot.generation  # a restarted worker sweeps in a new order
        process = self.context.Process(
            target=worker_main,
            args=(slot.index, config, model, self.dataset, self.board, sending),
            name=f"isample-scorer-{slot.index}",
            daemon=True,
        )
        try:
            process.start()
        except Exception as error:
            receiving.close()
            sending.close()
            raise TypeError(
                f"could not start scoring worker {slot.index} ({type(error).__name__}: {error}). With "
                f"start_method={self.start_method!r} the model, the data set and the score travel to the "
                "worker by pickling: define them at module level (no lambdas or local classes), and guard "
                "the script's entry point with `if __name__ == '__main__':`; or pass start_method='fork'"
            ) from error
        finally:
            sending.close()  # the worker holds the only sending end: its exit closes the pipe
        slot.process, slot.connection, slot.failed = process, receiving, False
        self._by_fd[receiving.fileno()] = slot
        self._poller.register(receiving.fileno(), select.POLLIN)

    def _forget(self, slot: _Slot) -> None:
        """Close the slot's pipe and stop polling it."""
        if slot.connection is not None:
            fd = slot.connection.fileno()
            self._poller.unregister(fd)
            del self._by_fd[fd]
            slot.connection.close()
            slot.connection = None

    def restart(self) -> int:
        """Start again every worker that is no longer running; returns how many."""
        started = 0
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                continue
            self._retire(slot)
            slot.generation += 1
            self._spawn(slot)
            started += 1
        self.restarts += started
        return started

    def _retire(self, slot: _Slot) -> None:
        self._forget(slot)
        if slot.process is not None:
            slot.process.join(timeout=1.0)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.process.close()
            slot.process = None

    # -- the trainer's calls --------------------------------------------------------------
    def publish(self, tensors: List[torch.Tensor], version: int) -> bool:
        """Into shared memory; never waits, so it always publishes."""
        self.board.publish(tensors, version)
        return True

    def receive(self) -> List[messages.Message]:
        """Every message that has arrived, without waiting: one poll(2) over all the pipes
        (``Connection.poll`` builds a selector per call, ten times the cost)."""
        out: List[messages.Message] = []
        while True:
            ready = self._poller.poll(0)
            if not ready:
                return out
            for fd, _ in ready:
                slot = self._by_fd[fd]
                try:
                    message = messages.decode(slot.connection.recv_bytes(), slot.index)
                except (EOFError, OSError):
                    self._lost(slot)
                    continue
                if isinstance(message, messages.Error):
                    slot.failed = True
                out.append(message)

    def _lost(self, slot: _Slot) -> None:
        """The worker's pipe closed: it exited (after an error, or killed)."""
        self._forget(slot)
        process = slot.process
        process.join(timeout=0.05)  # reap it if it is already gone (a few ms at most)
        if slot.failed or self.board.stop_requested:
            return
        code = process.exitcode
        if code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited (exit code {code})"
        warnings.warn(
            f"scoring worker {slot.index} (pid {process.pid}) {how}; training goes on with the scores "
            "it has. pool.restart() starts it again.",
            RuntimeWarning,
            stacklevel=4,
        )

    def alive(self) -> int:
        """Worker processes running now."""
        return sum(1 for s in self.slots if s.process is not None and s.process.is_alive())

    @property
    def pids(self) -> List[Optional[int]]:
        """Each worker's process id, None for one not running."""
        return [s.process.pid if s.process is not None and s.process.is_alive() else None for s in self.slots]

    def close(self, timeout: float) -> List[messages.Message]:
        """Ask every worker to stop, drain their pipes while they finish their chunk, and
        terminate (then kill) those still running after `timeout` seconds. Returns the
        messages that arrived meanwhile."""
        self.board.request_stop()
        late: List[messages.Message] = []
        deadline = time.monotonic() + timeout
        while True:
            late.extend(self.receive())
            running = [s for s in self.slots if s.process is not None and s.process.is_alive()]
            left = deadline - time.monotonic()
            if not running or left <= 0:
                break
            handles = [s.process.sentinel for s in running] + [s.connection for s in running if s.connection]
            wait(handles, timeout=min(left, 0.1))
        for slot in self.slots:
            process = slot.process
            if process is not None and process.is_alive():
                process.terminate()
                process.join(timeout=1.0)
                if process.is_alive():
                    process.kill()
            self._retire(slot)
        return late

