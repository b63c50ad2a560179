"""Shared test set-up: one torch thread (the tests use tiny tensors, where a second thread only
adds synchronisation, and CI has 2 cores)."""

import torch

torch.set_num_threads(1)
