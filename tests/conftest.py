"""Shared test setup."""
import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Tests compile the same small forwards many times: each starts from an empty Dynamo cache
    (else the recompile limit makes Dynamo fall back to eager and the backend is never called)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
