"""Repository-wide pytest set-up.

Tests use small tensors, where OpenMP threading costs more than it gains, and CI shares 2 cores:
one intra-op thread makes the suite ~10x faster under load and keeps timings predictable.
"""

import torch

torch.set_num_threads(1)
