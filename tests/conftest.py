"""Suite-wide settings. Subfolders keep their own fixtures in their own conftest.py."""

import os

# DeepSpeed picks its accelerator at import; the suite runs on CPU everywhere (CI has no GPU).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Two cores here: keep each test process to one intra-op thread so multi-rank tests don't oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
