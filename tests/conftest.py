import os

import torch
from hypothesis import settings

# The Triton backward's output buffers are left uninitialised (every element is a kernel's to write): here they
# start as NaN, so an element some kernel leaves unwritten fails the gradient comparisons instead of reading as 0
os.environ.setdefault("OLSSM_TRITON_POISON", "1")

# One thread per test process: with pytest -n 2 on the 2-core CI machine, more threads only
# spin-wait against each other (tiny training steps became 50-100x slower that way).
torch.set_num_threads(1)
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True)
settings.load_profile("ci")
