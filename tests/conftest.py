"""Test-wide settings: no network, a non-interactive plot backend, one torch thread per xdist worker, and
Python's SIGINT handler."""

from __future__ import annotations

import os
import signal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A shell starts background jobs (`cmd &`, `nohup`) with SIGINT ignored, and vitprobe rightly leaves an
# ignored SIGINT alone; the Ctrl-C tests need Python's own handler, as in a terminal or CI's foreground run.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one intra-op thread each avoids oversubscription.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
