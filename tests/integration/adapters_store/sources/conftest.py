import pytest

from tests.support.leaks import no_new_threads


@pytest.fixture(autouse=True, scope="module")
def no_threads_left_behind():
    """A module's servers (moto, the local Hub), download pools and clients are gone when it ends."""
    with no_new_threads():
        yield
