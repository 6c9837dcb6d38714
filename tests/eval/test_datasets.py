"""MedMNIST loader: the shared files load as documented; missing and corrupt files give clear errors."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from gradguard.eval.datasets import DatasetError, data_dir, load_medmnist


@pytest.fixture(scope="module")
def shared_data():
    folder = data_dir()
    assert (folder / "pneumoniamnist.npz").is_file(), \
        f"{folder} lacks pneumoniamnist.npz: set GRADGUARD_SHARED (or GRADGUARD_DATA) to the shared assets"
    return folder


def test_pneumoniamnist_loads_with_the_documented_counts(shared_data):
    train = load_medmnist("pneumoniamnist", "train", size=32)
    assert train.images.shape == (4708, 1, 32, 32)
    assert train.num_classes == 2
    assert torch.bincount(train.labels).tolist() == [1214, 3494]  # data/README.md
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0


def test_native_size_is_the_raw_bytes_over_255(shared_data):
    test = load_medmnist("retinamnist", "test", size=28)
    with np.load(shared_data / "retinamnist.npz") as raw:
        expected = torch.from_numpy(raw["test_images"]).permute(0, 3, 1, 2).float() / 255
    assert test.images.shape == (400, 3, 28, 28) and test.num_classes == 5
    torch.testing.assert_close(test.images, expected)


def test_missing_file_names_the_path_and_the_fixes(tmp_path):
    with pytest.raises(DatasetError, match=r"pneumoniamnist\.npz not found.*GRADGUARD_DATA.*download=True"):
        load_medmnist("pneumoniamnist", root=tmp_path)


def test_download_without_the_medmnist_package_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "medmnist", None)  # makes `import medmnist` fail
    with pytest.raises(DatasetError, match="'medmnist' package is not installed"):
        load_medmnist("pneumoniamnist", root=tmp_path, download=True)


def test_corrupt_file_fails_the_md5_check(tmp_path):
    (tmp_path / "pneumoniamnist.npz").write_bytes(b"not an npz at all")
    with pytest.raises(DatasetError, match="corrupt.*md5 mismatch"):
        load_medmnist("pneumoniamnist", root=tmp_path)


def test_truncated_file_without_md5_check_cannot_be_read(tmp_path, shared_data):
    data = (shared_data / "pneumoniamnist.npz").read_bytes()
    (tmp_path / "pneumoniamnist.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cannot be read as a MedMNIST npz"):
        load_medmnist("pneumoniamnist", root=tmp_path, check_md5=False)


def test_npz_without_the_medmnist_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "othermnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DatasetError, match="lacks the arrays.*train_labels"):
        load_medmnist("othermnist", root=tmp_path)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split must be one of"):
        load_medmnist("pneumoniamnist", "validation")
