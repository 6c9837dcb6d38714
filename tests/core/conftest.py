import pytest
import torch

from gradguard.eval.datasets import DatasetError, load_medmnist


@pytest.fixture(scope="session")
def chest_batch():
    """16 real PneumoniaMNIST training images at 32 px, both classes."""
    try:
        data = load_medmnist("pneumoniamnist", "train", size=32)
    except DatasetError as err:
        pytest.fail(f"the shared MedMNIST data is required (set GRADGUARD_SHARED): {err}")
    return data.images[:16].clone(), data.labels[:16].clone()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
