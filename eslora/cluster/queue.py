"""The one work queue of the pool, and its one fault policy.

Every fan-out of the driver (a generation's member batches, the update replayed on every
replica, the shards of a held-out score) is a list of `Call`s run here: each actor holds up to
`cluster.calls_in_flight` calls, handed out breadth first (every actor one call before any
gets a second, so a short queue spreads over all actors); as a call finishes its actor takes
the next one, so fast actors take more and actors that come up mid-run get work.

The fault policy, the same for every call:
- a lost actor (RayActorError: killed, its process or node died) and a crashed server
  (`ServerCrashed`: the backend's server died past backend.max_restarts) are faults to ride
  out: the actor is replaced by a fresh one from the driver's current ES state
  (cluster.max_actor_failures per run) and the call reruns elsewhere, same inputs, same result
  (cluster.max_call_retries per call). A call pinned to one actor (its replica) ends with it.
- anything else raised inside an actor (a config, data or adapter error, a plain BackendError,
  a bug) would repeat on every rerun: it stops the run at once, as the error it is.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Optional

import ray
from ray.exceptions import RayActorError, RayTaskError

from eslora.backends.base import ServerCrashed
from eslora.cluster import ClusterError
from eslora.cluster.actors import Actors, Slot, brief
from eslora.errors import EsloraError


@dataclass(eq=False)
class Call:
    """One item of the queue: `EvalActor.<method>(*args)` on any actor (or only on `actor`)."""

    method: str
    args: tuple
    what: str  # names the work in errors: "members [0, 1]", "eval shard 2/3", ...
    actor: Optional[Slot] = None  # pinned to this actor (its replica): dropped if it is lost
    attempts: int = 0  # faults so far
    dispatches: int = 0  # times sent to an actor


def fault(err: BaseException) -> Optional[str]:
    """What kind of fault `err` is, if the queue rides it out; None for an error that would repeat."""
    if isinstance(err, RayActorError):
        return "lost actor"
    if isinstance(err, RayTaskError) and isinstance(err.cause, ServerCrashed):
        return "crashed server"
    return None


def raise_as_itself(err: BaseException) -> NoReturn:
    """An error that would repeat: an EsloraError as itself (its message names the key or file),
    anything else with the actor's traceback."""
    if isinstance(err, RayTaskError):
        if isinstance(err.cause, EsloraError):
            raise err.cause from None
        raise err.as_instanceof_cause() from None
    raise err


OnResult = Callable[[Call, Slot, Any], None]
Prepare = Callable[[Slot], None]


class WorkQueue:
    def __init__(self, actors: Actors) -> None:
        self.actors = actors
        self.cluster = actors.cfg.cluster  # read at each use: bench/bench_scaling.py switches modes

    def run(self, calls: list[Call], on_result: OnResult, prepare: Optional[Prepare] = None) -> int:
        """Run every call to its result (`on_result(call, actor, result)`, in arrival order);
        `prepare(actor)` runs before an actor gets work (e.g. bring its replica up to date).
        Returns how many calls were put back in the queue after a fault."""
        actors = self.actors
        queue = deque(calls)
        inflight: dict[Any, tuple[Slot, Call]] = {}
        requeued = 0
        while queue or inflight:
            actors.poll()
            self._dispatch(queue, inflight, prepare)
            # A pinned call whose actor is gone has no one left to run it.
            queue = deque(c for c in queue if c.actor is None or c.actor in actors.slots)
            if not inflight:
                if not queue:
                    break
                if not actors.slots and not actors.starting:
                    raise ClusterError("no evaluation actor left and none could be started")
                actors.wait(all_of_them=False)
                continue
            done, _ = ray.wait(list(inflight) + list(actors.starting), num_returns=1)
            for ref in done:
                if ref in actors.starting:
                    actors.join(ref)
                    continue
                slot, call = inflight.pop(ref)
                slot.inflight -= 1
                try:
                    result = ray.get(ref)
                except (RayActorError, RayTaskError) as err:
                    if self._fault(slot, call, err):
                        queue.appendleft(call)
                        requeued += 1
                    continue
                on_result(call, slot, result)
        return requeued

    def _dispatch(self, queue: deque, inflight: dict, prepare: Optional[Prepare]) -> None:
        """Breadth first: every actor holds one call before any holds a second."""
        for level in range(self.cluster.calls_in_flight):
            for slot in list(self.actors.slots):
                if slot.inflight > level or slot not in self.actors.slots:
                    continue
                call = next((c for c in queue if c.actor is None or c.actor is slot), None)
                if call is None:
                    continue
                if prepare is not None:
                    try:
                        prepare(slot)
                    except (RayActorError, RayTaskError) as err:
                        self._fault(slot, None, err)
                        continue
                queue.remove(call)
                call.dispatches += 1
                inflight[getattr(slot.handle, call.method).remote(*call.args)] = (slot, call)
                slot.inflight += 1

    def _fault(self, slot: Slot, call: Optional[Call], err: BaseException) -> bool:
        """The fault policy. True: rerun `call` elsewhere; False: nothing to rerun; raises otherwise."""
        if fault(err) is None:
            raise_as_itself(err)
        if slot in self.actors.slots:
            self.actors.lost(slot, err)  # its other calls fail too and just go back to the queue
        if call is None or call.actor is not None:
            return False
        call.attempts += 1
        if call.attempts > self.cluster.max_call_retries:
            raise ClusterError(
                f"{call.what} failed {call.attempts} times, more than cluster.max_call_retries="
                f"{self.cluster.max_call_retries}; last: {brief(err)}"
            ) from None
        return True
