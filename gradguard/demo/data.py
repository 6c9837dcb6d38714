"""Where the demo's images come from: MedMNIST when it can be found or fetched, else real
medical images that ship inside PyPI wheels (the offline fallback, which only runs the attack).

Lookup order for ``<dataset>.npz``: :func:`gradguard.eval.datasets.data_dir` ($GRADGUARD_DATA,
else <shared>/data), then the user cache (``$XDG_CACHE_HOME/gradguard/medmnist``), then a download
through the ``medmnist`` package into $GRADGUARD_DATA or the cache.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gradguard.eval.datasets import ImageSet, data_dir, load_medmnist

FUNDUS, RADIOLOGY = 0, 1  # the fallback's two classes, so it keeps the 2-class model of PneumoniaMNIST


@dataclass
class DemoData:
    """The demo's images.

    train: the federation's training split; in the fallback, the shipped images.
    test: the test split for the global models' utility; None in the fallback (no federation).
    public: the attacker's own images of the modality (the validation split, which no client holds
        and utility is not measured on): its mean image is the guess the attacker makes without any
        update, and the adaptive attacker calibrates to it. None in the fallback.
    source: where the images came from, for the report.
    captions: one name per image of ``train`` in the fallback, else None.
    fallback_reason: why MedMNIST was not used ("" when it was).
    """

    train: ImageSet
    test: ImageSet | None
    source: str
    public: ImageSet | None = None
    captions: tuple[str, ...] | None = None
    fallback_reason: str = ""

    @property
    def federated(self) -> bool:
        return self.test is not None


def cache_dir() -> Path:
    """Where downloaded MedMNIST files go when $GRADGUARD_DATA is not set."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gradguard" / "medmnist"


def _medmnist(dataset: str, size: int, root: Path, source: str, *, download: bool = False) -> DemoData:
    train = load_medmnist(dataset, "train", root=root, size=size, download=download)
    return DemoData(train=train, test=load_medmnist(dataset, "test", root=root, size=size), source=source,
                    public=load_medmnist(dataset, "val", root=root, size=size))


def find_data(*, dataset: str, size: int, download: bool) -> DemoData:
    """MedMNIST ``dataset`` from the first place that has it, else the shipped images.

    A file that is present but corrupt raises :class:`~gradguard.eval.datasets.DatasetError`
    (a broken file must be fixed, not silently replaced); only a missing one falls back.
    """
    folders = list(dict.fromkeys([data_dir(), cache_dir()]))
    for folder in folders:
        if (folder / f"{dataset}.npz").is_file():
            return _medmnist(dataset, size, folder, f"MedMNIST {dataset} from {folder / f'{dataset}.npz'}")
    reason = f"{dataset}.npz is in none of {', '.join(map(str, folders))}"
    if not download:
        return shipped_data(size, reason=f"{reason}; downloading is off")
    root = Path(os.environ["GRADGUARD_DATA"]) if os.environ.get("GRADGUARD_DATA") else cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        return _medmnist(dataset, size, root, f"MedMNIST {dataset} downloaded into {root}", download=True)
    except Exception as err:  # no medmnist package, no network, a read-only folder: each means "fall back"
        return shipped_data(size, reason=f"{reason}, and downloading it failed: {err}")


def _to_unit(picture: np.ndarray, size: int) -> torch.Tensor:
    """A 2-D picture as [1, size, size] in [0, 1]: 1st-99th percentile window, centre square, resized."""
    low, high = np.percentile(picture, [1, 99])
    unit = np.clip((picture.astype(np.float64) - low) / max(high - low, 1e-12), 0, 1)
    h, w = unit.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = torch.from_numpy(unit[top:top + side, left:left + side]).float()[None, None]
    resized = F.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].clamp(0, 1)


def _shipped_pictures() -> list[tuple[str, int, np.ndarray]]:
    """(caption, class, 2-D array) of the medical images inside the scikit-image and pydicom wheels."""
    import skimage.color
    import skimage.data

    pictures: list[tuple[str, int, np.ndarray]] = []
    try:
        from pydicom import dcmread
        from pydicom.data import get_testdata_file

        for name in ("CT_small.dcm", "MR_small.dcm"):
            path = get_testdata_file(name, download=False)
            if path is not None:
                pictures.append((f"{name} ({name[:2]}, pydicom)", RADIOLOGY, dcmread(path).pixel_array))
    except ImportError:  # pydicom is in the eval extra; without it the fallback keeps the fundus images
        pass
    pictures.append(("retina (fundus, scikit-image)", FUNDUS, skimage.color.rgb2gray(skimage.data.retina())))
    pictures.append(("microaneurysms (fundus, scikit-image)", FUNDUS, skimage.data.microaneurysms()))
    return pictures


def shipped_data(size: int, *, reason: str) -> DemoData:
    """The offline fallback: real medical images that ship inside the scikit-image and pydicom wheels."""
    pictures = _shipped_pictures()
    images = torch.stack([_to_unit(array, size) for _, _, array in pictures])
    labels = torch.tensor([label for _, label, _ in pictures], dtype=torch.long)
    train = ImageSet(name="shipped", split="train", images=images, labels=labels, num_classes=2)
    return DemoData(train=train, test=None, captions=tuple(caption for caption, _, _ in pictures),
                    source="images shipped inside the scikit-image and pydicom wheels (no MedMNIST)",
                    fallback_reason=reason)
