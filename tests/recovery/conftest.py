"""Every recovery test trains: one torch thread (the CPU is shared; one thread is ~20x
faster than oversubscribed threads here)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
