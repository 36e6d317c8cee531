"""One outcome for all ranks: who failed, and whether the checkpoint was committed.

After writing its data, every rank publishes a small status (ok, or its
error) in a key-value store shared by the job (the ``TCPStore`` of the
barrier, or the default process group's store). The coordinator (rank 0)
gathers them under a deadline, commits only if every rank succeeded, and
publishes the outcome; every rank waits for that outcome under a deadline
and raises the same :class:`~torchckpt.errors.DistributedCheckpointError`,
carrying ``{rank: cause}``, when anything failed. A rank that never reports
(killed, stopped) is named as such once the deadline passes.

Keys live under ``torchckpt/<path digest>/<save number>/``; status keys are
deleted once gathered, so the store does not grow with the number of saves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from .errors import DistributedCheckpointError

__all__ = ["Agreement", "describe_error"]

logger = logging.getLogger(__name__)

#: How many timeouts the coordinator may take to answer: a rank whose barrier failed
#: early waits for ranks still in theirs (up to one timeout) and then for their
#: status (up to another).
OUTCOME_WAIT_FACTOR = 2


def describe_error(e: BaseException) -> str:
    """One line naming an error's type and message."""
    return f"{type(e).__name__}: {e}"


class Agreement:
    """The status exchange of one save.

    Args:
        store: A ``torch.distributed.Store`` every rank reaches.
        rank: This rank.
        world_size: Number of ranks.
        path: The checkpoint path (names the keys and the errors).
        save_number: How many saves this job made before this one (same on every rank).
        timeout_s: Longest wait for the other ranks, and for the outcome.
    """

    def __init__(
        self, store: Any, *, rank: int, world_size: int, path: str, save_number: int, timeout_s: float
    ) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.path = path
        self.timeout_s = timeout_s
        digest = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        self.prefix = f"torchckpt/{digest}/{save_number}"
        #: False once :meth:`await_outcome` gave up waiting for the coordinator.
        self.outcome_known = True

    def _status_key(self, rank: int) -> str:
        return f"{self.prefix}/status/{rank}"

    def publish(self, error: BaseException | None) -> None:
        """Report this rank's result."""
        status = {"ok": True} if error is None else {"ok": False, "error": describe_error(error)}
        self.store.set(self._status_key(self.rank), json.dumps(status))

    def gather_failures(
        self, already: dict[int, str] | None = None, *, deadline: float | None = None
    ) -> dict[int, str]:
        """Coordinator: wait for every rank's status; return ``{rank: cause}`` of those that failed.

        Args:
            already: Failures known beforehand (those ranks are not waited for).
            deadline: ``time.monotonic()`` value to wait until (default: ``timeout_s`` from now).
        """
        failures = dict(already or {})
        keys = [self._status_key(r) for r in range(self.world_size)]
        started = time.monotonic()
        deadline = started + self.timeout_s if deadline is None else max(deadline, started)
        waited = deadline - started
        for r, key in enumerate(keys):
            if r in failures:
                continue
            remaining = max(0.001, deadline - time.monotonic())
            try:
                self.store.wait([key], timedelta(seconds=remaining))
                status = json.loads(self.store.get(key))
            except Exception:  # noqa: BLE001 - a store timeout: that rank never reported
                failures[r] = f"did not report within {waited:.3g}s (dead, stopped or hung)"
                continue
            if not status.get("ok"):
                failures[r] = str(status.get("error", "unknown error"))
        for key in keys:
            try:
                self.store.delete_key(key)
            except Exception:  # noqa: BLE001 - cleanup only
                pass
        return failures

    def announce(self, failures: dict[int, str]) -> None:
        """Coordinator: publish the outcome (committed when ``failures`` is empty)."""
        outcome = {"committed": not failures, "failures": {str(r): c for r, c in failures.items()}}
        self.store.set(f"{self.prefix}/outcome", json.dumps(outcome))

    def await_outcome(self) -> dict[int, str]:
        """Non-coordinators: wait for the outcome; return the failures it names.

        Sets :attr:`outcome_known` to False when the coordinator announced
        nothing in time (the failures then name the coordinator).
        """
        key = f"{self.prefix}/outcome"
        wait_s = OUTCOME_WAIT_FACTOR * self.timeout_s
        try:
            self.store.wait([key], timedelta(seconds=wait_s))
            outcome = json.loads(self.store.get(key))
        except Exception as e:  # noqa: BLE001 - the coordinator never answered
            self.outcome_known = False
            return {
                0: f"the coordinator did not announce the outcome within {wait_s:g}s "
                f"({describe_error(e)}); the checkpoint may or may not be committed"
            }
        self.outcome_known = True
        return {int(r): c for r, c in outcome.get("failures", {}).items()}

    def error(self, failures: dict[int, str], operation: str = "save") -> DistributedCheckpointError:
        """The error every rank raises for ``failures``."""
        listing = "; ".join(f"rank {r}: {c}" for r, c in sorted(failures.items()))
        outcome = "nothing was committed" if self.outcome_known else "whether it was committed is unknown"
        return DistributedCheckpointError(
            f"{operation} of {self.path} failed on {len(failures)} of {self.world_size} ranks, {outcome}: {listing}",
            path=self.path,
            failures=failures,
        )


def run_collective(
    agreement: Agreement,
    *,
    local_error: BaseException | None,
    barrier: Callable[[], None] | None,
    commit: Callable[[], None],
) -> None:
    """Barrier, status exchange, commit on the coordinator, one outcome for all.

    Every rank calls it once per save, after writing its data (``local_error``:
    what went wrong doing that, or None). The steps, in order: the barrier
    (:func:`_pass_barrier`); this rank's status (:meth:`Agreement.publish`);
    then on the coordinator :func:`_coordinate` (gather, ``commit`` only if
    every rank succeeded, announce), on the others :func:`_hear_outcome`.

    Raises:
        DistributedCheckpointError: On every rank when any rank failed (the
            local error, if any, is its cause).
    """
    started = time.monotonic()
    failures, barrier_error = _pass_barrier(agreement, barrier)
    cause = local_error or barrier_error
    _publish(agreement, local_error, failures, cause)
    if agreement.rank == 0:
        # When the barrier failed early here (a peer's connection closed), the others may
        # still be inside theirs until it times out: give them that long to report too.
        deadline = started + OUTCOME_WAIT_FACTOR * agreement.timeout_s if barrier_error is not None else None
        cause = _coordinate(agreement, failures, commit=commit, cause=cause, deadline=deadline)
    else:
        failures = _hear_outcome(agreement, failures)
    if failures:
        raise agreement.error(failures) from cause


def _pass_barrier(
    agreement: Agreement, barrier: Callable[[], None] | None
) -> tuple[dict[int, str], BaseException | None]:
    """Wait at ``barrier``; return the failures it names (``{rank: cause}``) and its error, if any."""
    failures: dict[int, str] = {}
    if barrier is None:
        return failures, None
    try:
        barrier()
    except Exception as e:  # noqa: BLE001 - reported as this rank's view of the failure
        # A barrier names who did not arrive; this rank did arrive, whatever a parsed message says.
        missing = [r for r in getattr(e, "missing_ranks", None) or [] if r != agreement.rank]
        for r in missing:
            failures[r] = f"did not reach the barrier ({describe_error(e)})"
        if not missing:
            # E.g. gloo's "Connection closed by peer", which names no rank. This rank's
            # own part is fine: the status exchange after it (itself bounded) names whoever
            # did not report, and commits only if every rank did, successfully.
            logger.warning(
                "rank %d: the barrier before the commit of %s failed (%s); waiting for the other ranks' status",
                agreement.rank, agreement.path, describe_error(e),
            )  # fmt: skip
        return failures, e
    return failures, None


def _publish(
    agreement: Agreement, local_error: BaseException | None, failures: dict[int, str], cause: BaseException | None
) -> None:
    """Publish this rank's status; when the store does not answer, raise the error every rank will see."""
    try:
        agreement.publish(local_error)
    except Exception as e:  # noqa: BLE001 - the store is gone or hung (its host died or stopped)
        # Not this rank's failure, and no outcome can be heard through that store either.
        agreement.outcome_known = False
        failures[0] = (
            "the store the ranks agree through (hosted by the coordinator or the launcher) did not answer "
            f"({describe_error(e)}); the checkpoint may or may not be committed"
        )
        raise agreement.error(failures) from (cause or e)


def _coordinate(
    agreement: Agreement,
    failures: dict[int, str],
    *,
    commit: Callable[[], None],
    cause: BaseException | None,
    deadline: float | None,
) -> BaseException | None:
    """Coordinator: gather every status into ``failures``, commit if there is none, announce the outcome.

    Returns:
        The cause to raise the shared error from (the commit's error when it
        was the only failure).
    """
    failures.update(agreement.gather_failures(failures, deadline=deadline))
    if not failures:
        try:
            commit()
        except Exception as e:  # noqa: BLE001 - every rank must hear of it
            failures[0] = f"commit failed: {describe_error(e)}"
            cause = cause or e
    try:
        agreement.announce(failures)
    except Exception as e:  # noqa: BLE001 - the others then time out naming the coordinator
        logger.warning("could not announce the outcome of the save of %s: %s", agreement.path, describe_error(e))
    return cause


def _hear_outcome(agreement: Agreement, failures: dict[int, str]) -> dict[int, str]:
    """Non-coordinators: the failures of the save, as the coordinator announced them."""
    announced = agreement.await_outcome()
    if agreement.outcome_known:
        # The coordinator's outcome merges every rank's report: the same error on every rank.
        return announced
    failures.update(announced)
    return failures
