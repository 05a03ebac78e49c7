"""A first SIGINT/SIGTERM asks the job to stop feeding work; a second one stops at once."""

from __future__ import annotations

import os
import signal

import pytest

from flows.services import stop_on_signals
from pipelines.runtime import clear_stop, stop_requested


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_asks_to_stop_and_the_second_stops_at_once(signum, capsys):
    clear_stop()
    before = signal.getsignal(signum)
    try:
        with stop_on_signals("edit"):
            os.kill(os.getpid(), signum)
            assert stop_requested()
            assert "finishing what is in flight" in capsys.readouterr().err
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signum)
        assert signal.getsignal(signum) is before, "the previous handler is back after the block"
    finally:
        clear_stop()
