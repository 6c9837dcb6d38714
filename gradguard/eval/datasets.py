"""MedMNIST v2 data from local npz files (checked by md5), resized, as tensors in [0, 1]."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# md5 of the official 28x28 files (medmnist.INFO); a file that does not match is refused.
KNOWN_MD5: dict[str, str] = {
    "pneumoniamnist": "28209eda62fecd6e6a2d98b1501bb15f",
    "retinamnist": "bd4c0672f1bba3e3a89f0e4e876791e4",
}
SPLITS = ("train", "val", "test")
REPO_ROOT = Path(__file__).resolve().parents[2]


class DatasetError(RuntimeError):
    """A data file is missing, corrupt or not what its name says."""


def shared_dir() -> Path:
    """The read-only shared assets: $GRADGUARD_SHARED, else ../shared beside the repository."""
    return Path(os.environ.get("GRADGUARD_SHARED", REPO_ROOT.parent / "shared"))


def data_dir() -> Path:
    """Where MedMNIST npz files are read: $GRADGUARD_DATA, else <shared>/data."""
    return Path(os.environ.get("GRADGUARD_DATA", shared_dir() / "data"))


@dataclass
class ImageSet:
    """Images as float tensors [N, C, H, W] in [0, 1] with integer labels [N]."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(name: str, root: Path) -> Path:
    try:
        import medmnist  # optional: only for online users
    except ImportError as err:
        raise DatasetError(f"{name}.npz is not in {root} and the 'medmnist' package is not installed "
                           "to download it; pass root= or set GRADGUARD_DATA") from err
    info = medmnist.INFO[name]
    getattr(medmnist, info["python_class"])(split="train", root=str(root), download=True, size=28)
    return root / f"{name}.npz"


@lru_cache(maxsize=8)
def _load_arrays(path: str, check: bool) -> dict[str, np.ndarray]:
    file = Path(path)
    name = file.stem
    if check and name in KNOWN_MD5 and _md5(file) != KNOWN_MD5[name]:
        raise DatasetError(f"{file} is corrupt or not the official {name}.npz (md5 mismatch)")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as err:  # a truncated zip raises several kinds of error
        raise DatasetError(f"{file} cannot be read as a MedMNIST npz: {err}") from err
    missing = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")
               if f"{split}_{kind}" not in arrays]
    if missing:
        raise DatasetError(f"{file} is not a MedMNIST npz: it lacks the arrays {missing}")
    return arrays


def load_medmnist(name: str, split: str = "train", *, root: str | Path | None = None, size: int = 32,
                  download: bool = False, check_md5: bool = True) -> ImageSet:
    """Load one split of a MedMNIST v2 dataset (28x28 file), bilinearly resized to ``size``.

    ``root`` defaults to :func:`data_dir`. With ``download=True`` a missing file is fetched
    through the ``medmnist`` package; otherwise a missing file is a :class:`DatasetError`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(root) if root is not None else data_dir()
    path = folder / f"{name}.npz"
    if not path.is_file():
        if not download:
            raise DatasetError(f"{path} not found: put the MedMNIST file there, set GRADGUARD_DATA, "
                               "or pass download=True (needs the 'medmnist' package and internet)")
        path = _download(name, folder)
    arrays = _load_arrays(str(path), check_md5)
    images = torch.from_numpy(arrays[f"{split}_images"]).float().div_(255.0)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    labels = torch.from_numpy(arrays[f"{split}_labels"].reshape(-1).astype(np.int64))
    num_classes = int(max(int(arrays[f"{s}_labels"].max()) for s in SPLITS)) + 1
    return ImageSet(name=name, split=split, images=images.contiguous(), labels=labels, num_classes=num_classes)
