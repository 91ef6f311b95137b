import os

import torch
from hypothesis import settings

# One thread per worker keeps timings stable on the 2-core CI machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True)
settings.load_profile("ci")
