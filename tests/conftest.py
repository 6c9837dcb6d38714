"""Suite-wide settings."""
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """The models under test are tiny: a second intra-op thread only adds overhead (on a busy
    2-core machine each step became many times slower), and one thread keeps float results
    identical between in-process and subprocess runs (the Flower example runs with OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def chest_images():
    """64 real PneumoniaMNIST training images at 32 px with their labels, both classes."""
    from gradguard.eval.datasets import DatasetError, load_medmnist

    try:
        data = load_medmnist("pneumoniamnist", "train", size=32)
    except DatasetError as err:
        pytest.fail(f"the shared MedMNIST data is required (set GRADGUARD_SHARED): {err}")
    return data.images[:64].clone(), data.labels[:64].clone()
