"""Image classification data: the generated ``images/synthetic`` task, local image folders
(``images/folder``) and their DataModule.

Synthetic: each image shows its class's pattern (horizontal, vertical or diagonal stripes, or a
checkerboard) with a random period, phase and per-channel amplitude, plus Gaussian noise; classes are
balanced and the split is fixed by ``data.image.seed``. Rows carry ``pixel_values`` (``channels x size x
size`` floats), ``label`` and ``idx``, so the rest of the run (evaluation, predictions, metrics) treats them
like text rows.

Folders: ``data.data_dir`` holds ``train/<class>/<image>`` and ``val/<class>/<image>`` (or ``validation/``),
the ImageFolder layout; the class names are the sorted folder names and both splits must have the same
ones. Every file is checked with PIL when the data is set up (a missing folder, an empty class, a file
that is not a readable image stops the run naming the path); images are then read lazily, converted to
the model's channels, resized to its image size (bilinear) and normalised with ``data.image.mean/std``
(null: the model's ``preprocessor_config.json``, else 0.5).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lightmods.config.schema import DataConfig
from lightmods.data.datamodule import TextClassificationDataModule
from lightmods.data.tasks import TaskSpec
from lightmods.errors import DataError, config_error

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FOLDER_SPLITS = {"train": ("train",), "validation": ("val", "validation")}


def pattern(kind: int, size: int, period: float, phase: float) -> torch.Tensor:
    """One ``size x size`` pattern in [-1, 1]: 0 horizontal stripes, 1 vertical, 2 diagonal, 3 checkerboard."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    w = 2 * math.pi / period
    if kind == 0:
        return torch.sin(w * y + phase)
    if kind == 1:
        return torch.sin(w * x + phase)
    if kind == 2:
        return torch.sin(w * (x + y) / math.sqrt(2) + phase)
    return torch.sign(torch.sin(w * x + phase)) * torch.sign(torch.sin(w * y + phase))


def synthetic_images(n: int, num_classes: int, size: int, channels: int, noise: float, seed: int) -> tuple[torch.Tensor, list[int]]:
    """``n`` images (``n x channels x size x size``) and their labels, classes balanced and shuffled."""
    g = torch.Generator().manual_seed(seed)
    labels = [i % num_classes for i in range(n)]
    order = torch.randperm(n, generator=g).tolist()
    labels = [labels[i] for i in order]
    images = torch.empty(n, channels, size, size)
    for i, label in enumerate(labels):
        period = 4 + 4 * float(torch.rand((), generator=g))
        phase = 2 * math.pi * float(torch.rand((), generator=g))
        amplitude = 0.5 + torch.rand(channels, 1, 1, generator=g)
        base = pattern(label % 4, size, period, phase)
        images[i] = amplitude * base + noise * torch.randn(channels, size, size, generator=g)
    return images, labels


def generate_image_rows(cfg: DataConfig, num_classes: int, size: int, channels: int) -> dict[str, list[dict]]:
    """The ``train`` and ``validation`` rows of the synthetic task (different seeds, so no image repeats)."""
    c = cfg.image
    out = {}
    for split, n, offset in (("train", c.num_train, 0), ("validation", c.num_val, 1)):
        images, labels = synthetic_images(n, num_classes, size, channels, c.noise, c.seed * 2 + offset)
        out[split] = [{"pixel_values": images[i], "label": labels[i], "idx": i} for i in range(n)]
    return out


class ImageDataset(Dataset):
    """Rows as ``{"pixel_values", "labels", "idx"}``; ``features`` holds the columns (as the text datasets)."""

    def __init__(self, features: dict[str, list]):
        self.features = features
        self.length = len(features["labels"])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.features.items()}


def _split_dir(root: Path, split: str) -> Path:
    for name in FOLDER_SPLITS[split]:
        if (root / name).is_dir():
            return root / name
    expected = " or ".join(str(root / n) for n in FOLDER_SPLITS[split])
    raise DataError(f"images/folder: {expected} is missing; expected {root}/train/<class>/*.png|jpg and {root}/val/<class>/*")


def _class_dirs(split_dir: Path) -> list[Path]:
    dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"images/folder: {split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    return dirs


def folder_classes(data_dir: str | Path) -> list[str]:
    """The class names of an image folder: its ``train/`` sub-folder names, sorted; ``val/`` must match."""
    root = Path(data_dir)
    train = [p.name for p in _class_dirs(_split_dir(root, "train"))]
    val_dir = _split_dir(root, "validation")
    val = [p.name for p in _class_dirs(val_dir)]
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise DataError(
            f"images/folder: the classes of {_split_dir(root, 'train')} and {val_dir} differ "
            f"(only in train: {only_train or 'none'}; only in val: {only_val or 'none'})"
        )
    return train


def read_image_folder(data_dir: str | Path, split: str, classes: list[str]) -> list[dict]:
    """``{"path", "label", "idx"}`` rows of one split, classes in order and files sorted; every file is
    opened and verified with PIL here, so a bad one stops the run before training."""
    from PIL import Image

    split_dir = _split_dir(Path(data_dir), split)
    rows: list[dict] = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        other = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if other:
            raise DataError(f"images/folder: {other[0]} is not an image file; accepted extensions: {', '.join(IMAGE_EXTENSIONS)}")
        if not files:
            raise DataError(f"images/folder: {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        for path in files:
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as e:  # PIL raises several types for truncated or foreign files
                raise DataError(f"images/folder: {path} is not a readable image ({type(e).__name__}: {e})") from e
            rows.append({"path": str(path), "label": label, "idx": len(rows)})
    return rows


def resolve_task(task: TaskSpec, cfg: DataConfig) -> TaskSpec:
    """The task with the label names its data defines (``images/folder``: the class folders); others as they are."""
    if task.builder != "image_folder":
        return task
    return dataclasses.replace(task, label_names=tuple(folder_classes(cfg.data_dir)))


def processor_stats(model_path: str | None) -> tuple[list[float], list[float]] | None:
    """``image_mean`` and ``image_std`` of the model's ``preprocessor_config.json`` when its folder has one."""
    if not model_path:
        return None
    from lightmods.models.backbone import resolve_path

    try:
        path = Path(resolve_path(model_path)) / "preprocessor_config.json"
    except Exception:
        return None
    if not path.is_file():
        return None
    conf = json.loads(path.read_text())
    if "image_mean" in conf and "image_std" in conf:
        return list(conf["image_mean"]), list(conf["image_std"])
    return None


class ImageFolderDataset(Dataset):
    """Images read from their files on access: converted to ``channels``, resized, normalised."""

    def __init__(self, rows: list[dict], size: int, channels: int, mean: torch.Tensor, std: torch.Tensor):
        self.features = {"path": [r["path"] for r in rows], "labels": [int(r["label"]) for r in rows], "idx": list(range(len(rows)))}
        self.size, self.mode = size, {1: "L", 3: "RGB"}[channels]
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.features["labels"])

    def load(self, path: str) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert(self.mode).resize((self.size, self.size), Image.Resampling.BILINEAR)
            array = np.asarray(im, dtype=np.float32) / 255.0
        x = torch.from_numpy(array.copy())
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        return (x - self.mean) / self.std

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.load(self.features["path"][i]), "labels": self.features["labels"][i], "idx": i}


class ImageCollator:
    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": torch.stack([r["pixel_values"] for r in rows])}
        for key in ("labels", "idx"):
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
        return batch


class ImageClassificationDataModule(TextClassificationDataModule):
    """The text DataModule's splits, loaders and checks for image rows: no tokenizer, no tokenisation cache.
    ``size`` / ``channels``: the model's input (``data.image.size`` / ``channels`` override them)."""

    def __init__(self, task: TaskSpec, cfg: DataConfig, size: int, channels: int, seed: int = 0, model_path: str | None = None):
        super().__init__(task, cfg, tokenizer=None, seed=seed, tokenizer_id="")
        self.model_path = model_path
        self.size = cfg.image.size or size
        self.channels = cfg.image.channels or channels
        if cfg.image.size and cfg.image.size != size:
            raise config_error("data.image.size", cfg.image.size, f"the model's image_size ({size}) or null")
        if cfg.image.channels and cfg.image.channels != channels:
            raise config_error("data.image.channels", cfg.image.channels, f"the model's num_channels ({channels}) or null")
        self.collator = ImageCollator()
        self._generated: dict[str, list[dict]] | None = None

    def _load_rows(self, split: str) -> list[dict] | None:
        if self.task.builder == "image_folder":
            if split not in FOLDER_SPLITS:
                return None
            if not self.task.label_names:  # built from get_task alone: the classes come from the folders
                self.task = resolve_task(self.task, self.cfg)
            return read_image_folder(self.cfg.data_dir, split, list(self.task.label_names))
        if self.cfg.source != "generated":
            raise config_error("data.source", self.cfg.source, f"one of {', '.join(self.task.sources)} for data.task={self.task.name!r}")
        if self._generated is None:
            self._generated = generate_image_rows(self.cfg, self.task.num_labels, self.size, self.channels)
        return self._generated.get(split)

    def normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std for folder images: ``data.image.mean/std``, else the model's processor's,
        else 0.5 (ViT's image processor default)."""
        c = self.cfg.image
        found = processor_stats(self.model_path)
        out = []
        for key, given, default in (("mean", c.mean, found[0] if found else None), ("std", c.std, found[1] if found else None)):
            values = list(given if given is not None else default if default is not None else [0.5])
            if len(values) == 1:
                values = values * self.channels
            if len(values) != self.channels:
                raise config_error(f"data.image.{key}", values, f"one number or {self.channels} (the model's channels)")
            out.append(torch.tensor(values, dtype=torch.float32))
        return out[0], out[1]

    def _encode(self, split: str, rows: list[dict], content: str | None = None) -> ImageDataset | ImageFolderDataset:
        if self.task.builder == "image_folder":
            return ImageFolderDataset(rows, self.size, self.channels, *self.normalisation())
        return ImageDataset({
            "pixel_values": [r["pixel_values"] for r in rows],
            "labels": [int(r["label"]) for r in rows],
            "idx": list(range(len(rows))),
        })  # fmt: skip
