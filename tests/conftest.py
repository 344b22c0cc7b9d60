"""Suite-wide settings. Under pytest-xdist (the default: tool.pytest.ini_options in pyproject.toml)
every worker is one process among as many as there are cores, so each gets one compute thread,
and so do the processes a test starts (torchrun ranks, launch/ scripts): a rank that spins two
threads on a core another worker needs makes both many times slower."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
