"""Shared fixtures: tiny deterministic models; the ``slow`` marker is skipped unless ``--runslow``."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> None:
    # Tiny models run far faster on one thread than two on a shared 2-core machine.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def linear_mnist_model() -> torch.nn.Module:
    """A softmax-regression MNIST classifier (784 -> 10) trained for a few seconds on 2000 training images."""
    from manifold_defense.data import load_mnist

    with torch.random.fork_rng():
        torch.manual_seed(0)
        train = load_mnist("train", limit=2000)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        for i in range(0, 2000, 200):
            loss = torch.nn.functional.cross_entropy(
                model(train.images[i : i + 200]), train.labels[i : i + 200]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
