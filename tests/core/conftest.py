import pytest
import torch


@pytest.fixture(scope="session")
def chest_batch(chest_images):
    """16 real PneumoniaMNIST training images at 32 px, both classes."""
    images, labels = chest_images
    return images[:16].clone(), labels[:16].clone()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
