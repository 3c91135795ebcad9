"""SIGTERM/SIGHUP raise KeyboardInterrupt inside broker.signals.interrupts_as_keyboard."""

from __future__ import annotations

import os
import signal

import pytest

from broker.signals import SignalInterrupt, exit_code, interrupts_as_keyboard


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_becomes_keyboard_interrupt_and_handlers_are_restored(sig: signal.Signals) -> None:
    before = signal.getsignal(sig)
    cleaned = []

    def work() -> None:
        with interrupts_as_keyboard():
            try:
                os.kill(os.getpid(), sig)
                for _ in range(1000):  # the handler runs between bytecodes
                    pass
            finally:
                cleaned.append(True)

    with pytest.raises(KeyboardInterrupt) as info:
        work()
    assert isinstance(info.value, SignalInterrupt)
    assert exit_code(info.value) == 128 + sig
    assert cleaned == [True]
    assert signal.getsignal(sig) == before


def test_ctrl_c_exit_code() -> None:
    assert exit_code(KeyboardInterrupt()) == 130
