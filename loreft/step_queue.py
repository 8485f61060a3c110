"""Training steps queued ahead of the one being read, undone on a stop; the stop vote across processes."""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterator, NamedTuple

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from .model import Reft


class Queued(NamedTuple):
    step: int
    results: tuple  # the step's outputs, still on the device: loss, targets, tokens, learning rate
    before: tuple  # the weights, optimizer state and gradient sum before the step, to roll it back


class StepQueue:
    """Dispatches steps so the device never waits for the host's bookkeeping, and ends training exactly where asked.

    The next step is queued before this one's results are read. A step after which the weights are needed
    (an evaluation, a checkpoint, the end: `barrier`) is read before anything else is queued. A stop rolls the
    queued steps back. With several processes, stopping is a vote (all ranks leave together); when a step is
    queued behind the one just read, its vote is read with that step's results, so that reading the vote
    does not wait for the queued step.
    """

    def __init__(self, step_fn: Callable, state: list, reft: Reft, optimizer: optim.Optimizer, *, group,
                 seed: int, accumulation: int, total_steps: int, queue_ahead: int = 1,
                 barrier: Callable[[int], bool] = lambda done: False, stop_vote: bool = True):
        self.step_fn, self.state, self.reft, self.optimizer, self.group = step_fn, state, reft, optimizer, group
        self.seed, self.accumulation, self.total_steps = seed, accumulation, total_steps
        self.depth = 1 + queue_ahead  # steps on the device at once
        self.barrier, self.stop_vote = barrier, stop_vote
        self.accumulated = None  # gradient sum and target count of the update's earlier batches; None between updates
        self.queued: deque[Queued] = deque()
        self.vote_pending: mx.array | None = None  # several processes: the vote to read with the next results
        self.stopped = False

    def run(self, steps: Iterator[tuple[int, tuple]]) -> Iterator[tuple[int, tuple]]:
        """(step, results) for each step of `steps` in order, until they run out or a stop is agreed."""
        upcoming = next(steps, None)
        while True:
            while (upcoming is not None and not self.stopped and len(self.queued) < self.depth
                   and not (self.queued and self.barrier(self.queued[-1].step + 1))):
                self._dispatch(*upcoming)
                upcoming = next(steps, None)  # prepare the next batch on the host while the device works
            if not self.queued:
                return
            step, results, before = self.queued.popleft()
            if self.vote_pending is not None and self.vote_pending.item() > 0:  # a rank asked before this step
                self._roll_back(before)
                self.stopped = True
                return
            self.vote_pending = None
            yield step, results

    def stop_if(self, asked: bool) -> None:
        """After a step is read: stop there if this process (or any, under a vote) asks to."""
        if self.stopped:
            return
        if self.group.size() > 1 and self.queued:
            self.vote_pending = self._vote(asked)  # read with the next step's results
        elif asked if self.group.size() == 1 else self._vote(asked).item() > 0:
            self.stopped = True
            if self.queued:  # undo the steps queued behind the one just read
                self._roll_back(self.queued[0].before)

    def _dispatch(self, step: int, inputs: tuple) -> None:
        # references to the state before this step (arrays are immutable), to roll it back on a stop
        before = (self.reft.parameters(), tree_map(lambda x: x, self.optimizer.state), self.accumulated)
        # dropout keys depend on (seed, step, rank) alone: resumable, and ranks draw different masks
        mx.random.seed((self.seed * 1_000_003 + step) * self.group.size() + self.group.rank())
        update = (step + 1) % self.accumulation == 0 or step + 1 == self.total_steps
        *results, self.accumulated = self.step_fn(inputs, self.accumulated, update)
        mx.async_eval(self.state, results, self.accumulated)
        self.queued.append(Queued(step, tuple(results), before))

    def _roll_back(self, before: tuple) -> None:
        params, self.optimizer.state, self.accumulated = before
        self.reft.load_parameters(params)
        self.queued.clear()

    def _vote(self, asked: bool) -> mx.array:
        """How many ranks ask to stop, queued on the device and not read: all ranks leave the loop together."""
        if not self.stop_vote:  # benchmarks measure the vote's cost: such a run cannot be stopped
            return mx.array(int(asked))
        vote = mx.distributed.all_sum(mx.array(int(asked)), group=self.group)
        mx.async_eval(vote)
        return vote
