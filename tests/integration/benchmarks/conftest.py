import pytest


@pytest.fixture(autouse=True)
def restore_process_state():
    """The benchmarks set torch threads and seed the global RNGs; give the next tests theirs back."""
    import random

    import torch

    threads, python_rng = torch.get_num_threads(), random.getstate()
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)
    random.setstate(python_rng)
