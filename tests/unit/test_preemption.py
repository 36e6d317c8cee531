"""PreemptionHandler in this process: the order of events, with os._exit replaced (the real exit: test_signal.py)."""

from __future__ import annotations

import os
import signal
from concurrent.futures import Future
from typing import Any

import pytest

from torchckpt import preemption
from torchckpt.preemption import PreemptionHandler
from torchckpt.save_handle import SaveHandle


class Exited(Exception):
    pass


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    log: list[Any] = []

    def fake_exit(code: int) -> None:
        log.append(("exit", code))
        raise Exited

    monkeypatch.setattr(preemption.os, "_exit", fake_exit)
    previous = signal.getsignal(signal.SIGUSR1)
    yield log
    signal.signal(signal.SIGUSR1, previous)


def test_a_signal_during_a_sync_save_exits_when_the_save_ends(events: list[Any]) -> None:
    handler = PreemptionHandler(lambda: None, lambda: events.append("abort"))
    signal.signal(signal.SIGUSR1, lambda sig, frame: events.append(("previous", sig)))
    handler.install(5.0, signal.SIGUSR1)
    with pytest.raises(Exited):
        with handler.deferring():
            os.kill(os.getpid(), signal.SIGUSR1)
            events.append("save committed")
    assert events == ["save committed", ("previous", signal.SIGUSR1), "abort", ("exit", 128 + signal.SIGUSR1)]


def test_past_the_deadline_the_writer_is_aborted_before_the_exit(events: list[Any]) -> None:
    never: Future[None] = Future()
    handle = SaveHandle(7, "/ckpt/step_0000000007", never)

    def abort() -> None:
        events.append("abort")
        if not never.done():
            never.set_exception(RuntimeError("writer killed"))

    handler = PreemptionHandler(lambda: handle, abort)
    handler.install(0.05, signal.SIGUSR1)
    with pytest.raises(Exited):
        os.kill(os.getpid(), signal.SIGUSR1)
    assert events == ["abort", "abort", ("exit", 128 + signal.SIGUSR1)]


def test_a_save_error_is_raised_once() -> None:
    failed: Future[None] = Future()
    failed.set_exception(OSError(28, "No space left on device"))
    handle = SaveHandle(3, "/ckpt/step_0000000003", failed)
    with pytest.raises(OSError, match="No space left"):
        handle.raise_if_unseen()
    handle.raise_if_unseen()  # delivered already: not again
    seen = SaveHandle(3, "/ckpt/step_0000000003", failed)
    assert isinstance(seen.exception(), OSError)
    seen.raise_if_unseen()  # the caller got it through exception()
