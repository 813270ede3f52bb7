"""Where images come from: scikit-learn's digits, CIFAR python batches, image folders.

Every loader returns decoded ``uint8 [N, 3, H, W]`` tensors; :func:`load_dataset`
picks the loader from the source and caches its result (see :mod:`divco.data.cache`).

Layouts understood (a folder, or a ``.tar``/``.tar.gz``/``.tgz``/``.tar.xz``/``.tar.bz2``
archive of one, read without extracting):

* ``digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 grey images),
  resized to 32x32 RGB so that the CIFAR networks run on them; a fixed split of 1,437
  training and 360 test images.
* CIFAR-10 / CIFAR-100 in the official python layout (``cifar-10-batches-py/`` with
  ``data_batch_1..5``, ``test_batch``, ``batches.meta``; ``cifar-100-python/`` with
  ``train``, ``test``, ``meta``).  These files are pickles: they are read with an
  unpickler that only builds plain containers and numpy arrays, never arbitrary objects.
* An image folder: ``train/<class>/<image>`` and ``test/<class>/<image>`` (JPEG, PNG,
  GIF, WebP); classes are the sorted folder names, as torchvision's ImageFolder.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import re
import sys
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from .cache import (
    CacheDir,
    file_fingerprint,
    fingerprint,
    load_tensors,
    resolve_cache_dir,
    save_tensors,
    tree_fingerprint,
)
from .dataset import ImageDataset, channel_statistics

CACHE_FORMAT = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")
DIGITS_TEST_SIZE = 360
DIGITS_IMAGE_SIZE = 32
#: The largest ``image_size`` divco resizes to (the paper's largest is ImageNet's 224 / 320): beyond it
#: decoding asks for terabytes (100,000 x 100,000 pixels) and fails inside the allocator.
MAX_IMAGE_SIZE = 2048


def check_image_size(image_size: object) -> None:
    """``image_size`` is None or an int in [8, MAX_IMAGE_SIZE], else a ValueError saying so."""
    if image_size is None:
        return
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 8 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size (--image-size) must be an int in [8, {MAX_IMAGE_SIZE}], got {image_size!r}")


@dataclass
class DecodedSplits:
    """What a loader returns before statistics and caching."""

    name: str
    classes: tuple[str, ...]
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


# -- scikit-learn digits -------------------------------------------------------------------


def load_digits_splits(image_size: Optional[int] = None) -> DecodedSplits:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the 'digits' data set comes with scikit-learn: pip install scikit-learn (or divco[data])"
        ) from error
    bunch = load_digits()
    size = image_size or DIGITS_IMAGE_SIZE
    grey = torch.from_numpy(bunch.images).to(torch.float32).div_(16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    if grey.shape[2:] != (size, size):  # the native 8x8 needs no resize (and so no torchvision)
        from torchvision.transforms.v2 import functional as TF

        grey = TF.resize(grey, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    images = grey.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    # A fixed split that depends on nothing but the data's size.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test_index = order[:DIGITS_TEST_SIZE].sort().values
    train_index = order[DIGITS_TEST_SIZE:].sort().values
    return DecodedSplits("digits", tuple(str(c) for c in bunch.target_names), images[train_index],
                         labels[train_index], images[test_index], labels[test_index])


# -- CIFAR python batches ------------------------------------------------------------------


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other object."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes into protocol-2 pickles
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a plain array")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = module.replace("numpy.core", "numpy._core", 1)  # numpy 2 moved the module
        return getattr(importlib.import_module(module), name)


def read_cifar_pickle(data: bytes, where: str) -> dict:
    try:
        content = _ArrayOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as error:
        raise ValueError(f"{where} is not a readable CIFAR python batch ({type(error).__name__}: {error})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{where} is not a CIFAR python batch: expected a dict, got {type(content).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def _cifar_arrays(batch: dict, label_key: str, where: str) -> tuple[Tensor, Tensor]:
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except KeyError as error:
        raise ValueError(f"{where} lacks the entry {error.args[0]!r} of a CIFAR batch") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{where}: expected data [N, 3072] with N labels, got data {data.shape} and {labels.shape[0]} labels"
        )
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.copy())


CIFAR_LAYOUTS = {
    # name: (train files, test files, meta file, label key, class-name key)
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "labels", "label_names"),
    "cifar100": (["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


def load_cifar_splits(name: str, read: Callable[[str], bytes], where: str) -> DecodedSplits:
    """CIFAR-10/100 from the official batches; ``read(file name) -> bytes``."""
    train_files, test_files, meta_file, label_key, names_key = CIFAR_LAYOUTS[name]

    def load_split(files: list[str]) -> tuple[Tensor, Tensor]:
        parts = [_cifar_arrays(read_cifar_pickle(read(f), f"{where}/{f}"), label_key, f"{where}/{f}") for f in files]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    meta = read_cifar_pickle(read(meta_file), f"{where}/{meta_file}")
    if names_key not in meta:
        raise ValueError(f"{where}/{meta_file} lacks the entry {names_key!r} of CIFAR metadata")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])
    train_images, train_labels = load_split(train_files)
    test_images, test_labels = load_split(test_files)
    return DecodedSplits(name, classes, train_images, train_labels, test_images, test_labels)


def _read_from_folder(folder: Path) -> Callable[[str], bytes]:
    def read(name: str) -> bytes:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR file {path} is missing")
        return path.read_bytes()

    return read


# -- image folders -------------------------------------------------------------------------

_SPLIT_MEMBER = re.compile(r"^(?:.*/)?(train|test)/([^/]+)/([^/]+)$")


def _decode_image(data: bytes, where: str) -> Tensor:
    """RGB ``uint8 [3, H, W]`` of an encoded image (Pillow decodes; grey and palette become RGB)."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("decoding image folders needs Pillow: pip install pillow (or divco[data])") from error
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image.convert("RGB"))
    except Exception as error:
        raise ValueError(f"cannot decode image {where}: {error}") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _checked_size(cls: str, location: str, image: Tensor, image_size: Optional[int],
                  expected: Optional[tuple[int, int]]) -> tuple[str, str, Tensor]:
    """Resize to ``image_size``, or insist that every image has the first image's size."""
    if image_size is not None:
        if image.shape[1:] != (image_size, image_size):  # torchvision only where an image is resized
            from torchvision.transforms.v2 import functional as TF

            image = TF.resize(image, [image_size, image_size], antialias=True)
    elif expected is not None and tuple(image.shape[1:]) != expected:
        raise ValueError(
            f"image {location} is {image.shape[2]}x{image.shape[1]} but earlier images are "
            f"{expected[1]}x{expected[0]}; pass image_size (--image-size) to resize every image"
        )
    return cls, location, image


def load_image_folder_splits(name: str, files: Iterable[tuple[str, str, str, Callable[[], bytes]]],
                             where: str, image_size: Optional[int]) -> DecodedSplits:
    """Decode ``(split, class, location, read)`` entries of an image-folder layout."""
    entries = list(files)
    # Pillow releases the GIL while decoding: threads decode in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = pool.map(lambda entry: _decode_image(entry[3](), entry[2]), entries)
        decoded: dict[str, list[tuple[str, str, Tensor]]] = {"train": [], "test": []}
        expected: Optional[tuple[int, int]] = None
        for (split, cls, location, _), image in zip(entries, images):
            decoded[split].append(_checked_size(cls, location, image, image_size, expected))
            expected = expected or tuple(image.shape[1:])
    for split in ("train", "test"):
        if not decoded[split]:
            raise ValueError(f"{where} has no images under {split}/<class>/ (expected {', '.join(IMAGE_EXTENSIONS)})")
    classes = tuple(sorted({cls for cls, _, _ in decoded["train"]}))
    if len(classes) < 2:
        raise ValueError(f"{where} has {len(classes)} class under train/ ({list(classes)}): classification needs "
                         f"at least 2 class folders")
    unknown = sorted({cls for cls, _, _ in decoded["test"]} - set(classes))
    if unknown:
        raise ValueError(f"{where}: test classes {unknown} have no training images (train classes: {list(classes)})")
    index = {cls: i for i, cls in enumerate(classes)}

    def stack(split: str) -> tuple[Tensor, Tensor]:
        entries = sorted(decoded[split], key=lambda e: (e[0], e[1]))  # class, then file: a stable order
        images = torch.stack([e[2] for e in entries])
        labels = torch.tensor([index[e[0]] for e in entries], dtype=torch.int64)
        return images, labels

    train_images, train_labels = stack("train")
    test_images, test_labels = stack("test")
    return DecodedSplits(name, classes, train_images, train_labels, test_images, test_labels)


def _folder_images(root: Path) -> Iterator[tuple[str, str, str, Callable[[], bytes]]]:
    for split in ("train", "test"):
        split_dir = root / split
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in sorted(class_dir.iterdir()):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                    yield split, class_dir.name, str(path), path.read_bytes


# -- archives ------------------------------------------------------------------------------


def is_archive(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(s) for s in ARCHIVE_SUFFIXES)


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _open_archive(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:*")
    except tarfile.ReadError:  # tarfile lists every compression it tried, one line each: say it in one
        raise ValueError(f"cannot read archive {path}: {_unreadable_archive(path)}") from None
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"cannot read archive {path}: {_one_line(error)}") from None


_COMPRESSIONS = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))


def _unreadable_archive(path: Path) -> str:
    """What a file tarfile cannot open is not, from its first bytes."""
    with open(path, "rb") as file:
        head = file.read(8)
    if not head:
        return "the file is empty, not a tar archive"
    compression = next((name for magic, name in _COMPRESSIONS if head.startswith(magic)), None)
    if compression is not None:
        return f"a {compression} file that is truncated or does not hold a tar archive"
    return "the file is not a tar archive (neither plain nor gzip, bzip2 or xz compressed)"


def _one_line(error: BaseException) -> str:
    """An error's message on one line (a CLI user's error is one line)."""
    return " ".join(str(error).split()) or type(error).__name__


def load_archive_splits(path: Path, image_size: Optional[int]) -> DecodedSplits:
    """Read a data set straight from a tar archive, member by member (no extraction)."""
    files: dict[str, bytes] = {}
    images: list[tuple[str, str, str, bytes]] = []
    try:
        with _open_archive(path) as archive:
            for member in archive:  # sequential: compressed archives do not seek cheaply
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                match = _SPLIT_MEMBER.match(member.name)
                wanted_image = (match is not None and base.lower().endswith(IMAGE_EXTENSIONS)
                                and not base.startswith("."))
                wanted_cifar = any(base in layout[0] + layout[1] + [layout[2]] for layout in CIFAR_LAYOUTS.values())
                if not (wanted_image or wanted_cifar):
                    continue
                handle = archive.extractfile(member)
                data = handle.read() if handle is not None else b""
                if wanted_image:
                    images.append((match.group(1), match.group(2), f"{path}:{member.name}", data))
                else:
                    files[member.name] = data
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"archive {path} is truncated or corrupt: {_one_line(error)}") from None

    def cifar_reader(layout: str) -> Optional[Callable[[str], bytes]]:
        train_files, test_files, meta_file, _, _ = CIFAR_LAYOUTS[layout]
        for name in files:
            if name.rsplit("/", 1)[-1] == meta_file:
                prefix = name[: -len(meta_file)]
                if all(prefix + f in files for f in train_files + test_files):
                    return lambda f: files[prefix + f]
        return None

    for layout in ("cifar10", "cifar100"):
        reader = cifar_reader(layout)
        if reader is not None:
            splits = load_cifar_splits(layout, reader, str(path))
            return _resized(splits, image_size)
    if images:
        entries = [(s, c, where, (lambda d=data: d)) for s, c, where, data in images]
        return load_image_folder_splits(_archive_stem(path), entries, str(path), image_size)
    raise ValueError(
        f"archive {path} holds neither the CIFAR python batches nor an image folder "
        f"(train/<class>/<image> and test/<class>/<image>)"
    )


# -- dispatch ------------------------------------------------------------------------------


def _resized(splits: DecodedSplits, image_size: Optional[int]) -> DecodedSplits:
    if image_size is None or splits.train_images.shape[2:] == (image_size, image_size):
        return splits
    from torchvision.transforms.v2 import functional as TF

    def resize(images: Tensor) -> Tensor:
        return torch.cat([TF.resize(chunk, [image_size, image_size], antialias=True) for chunk in images.split(4096)])

    splits.train_images = resize(splits.train_images)
    splits.test_images = resize(splits.test_images)
    return splits


def detect_folder_layout(folder: Path) -> tuple[str, Path]:
    """``("cifar10" | "cifar100" | "image_folder", root)`` for a data folder."""
    for layout, sub in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")):
        if (folder / sub).is_dir():
            return layout, folder / sub
    if (folder / "data_batch_1").is_file() and (folder / "batches.meta").is_file():
        return "cifar10", folder
    if (folder / "train").is_file() and (folder / "meta").is_file():
        return "cifar100", folder
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return "image_folder", folder
    raise ValueError(
        f"data folder {folder} has no known layout: expected cifar-10-batches-py/, cifar-100-python/, "
        f"the CIFAR batch files themselves, or train/ and test/ class folders"
    )


def describe_sources() -> str:
    return ("'digits', a CIFAR-10/100 python folder (cifar-10-batches-py, cifar-100-python), an image folder "
            "with train/ and test/ class folders, or a .tar/.tar.gz/.tar.xz archive of one of those")


def existing_data_path(source: str) -> Path:
    """``source`` as a path that exists and is a folder or a tar archive, else a clear error."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist; expected {describe_sources()}")
    if path.is_file() and not is_archive(path):
        raise ValueError(f"data file {path} is not a tar archive; expected {describe_sources()}")
    return path


def load_dataset(source: str, *, image_size: Optional[int] = None, cache_dir: CacheDir = None) -> ImageDataset:
    """Decode (or read from the cache) the data set named by ``source``.

    ``source`` is ``"digits"`` or a path (see the module docstring for layouts).
    ``image_size`` resizes every image to ``image_size x image_size`` (digits default
    to 32; other sources keep their size).  ``cache_dir``: see :mod:`divco.data.cache`.
    """
    check_image_size(image_size)
    if source == "digits":
        import sklearn

        key = fingerprint("digits", sklearn.__version__, image_size, CACHE_FORMAT)
        return _cached("digits", key, cache_dir, lambda: load_digits_splits(image_size), "scikit-learn digits")
    path = existing_data_path(source)
    if path.is_file():
        key = fingerprint("archive", file_fingerprint(path), image_size, CACHE_FORMAT)
        return _cached(_archive_stem(path), key, cache_dir, lambda: load_archive_splits(path, image_size), str(path))
    layout, root = detect_folder_layout(path)
    key = fingerprint(layout, str(root.resolve()), tree_fingerprint(root), image_size, CACHE_FORMAT)
    if layout == "image_folder":
        def decode() -> DecodedSplits:
            return load_image_folder_splits(root.resolve().name, _folder_images(root), str(root), image_size)
    else:
        def decode() -> DecodedSplits:
            return _resized(load_cifar_splits(layout, _read_from_folder(root), str(root)), image_size)
    name = layout if layout != "image_folder" else root.resolve().name
    return _cached(name, key, cache_dir, decode, str(path))


_TENSOR_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _cached(name: str, key: str, cache_dir: CacheDir, decode: Callable[[], DecodedSplits],
            source: str) -> ImageDataset:
    folder = resolve_cache_dir(cache_dir)
    cache_file = folder / f"{name}-{key}.safetensors" if folder is not None else None
    if cache_file is not None:
        hit = load_tensors(cache_file)
        if hit is not None:
            tensors, meta = hit
            try:
                return ImageDataset(
                    name=meta["name"], source=source, classes=tuple(json.loads(meta["classes"])),
                    mean=tuple(json.loads(meta["mean"])), std=tuple(json.loads(meta["std"])),
                    **{k: tensors[k] for k in _TENSOR_KEYS},
                )
            except (KeyError, ValueError):
                pass  # an incomplete cache entry: decode again and overwrite it
    # decoding takes seconds to minutes (60,000 JPEGs): one line before it, not silence
    after = f"later runs read the decoded cache in {folder}" if folder is not None else "--no-cache: decoded every time"
    print(f"divco: decoding {source} ({after})", file=sys.stderr, flush=True)
    splits = decode()
    mean, std = channel_statistics(splits.train_images)
    dataset = ImageDataset(name=splits.name, source=source, classes=splits.classes, mean=mean, std=std,
                           **{k: getattr(splits, k) for k in _TENSOR_KEYS})
    if cache_file is not None:
        try:
            save_tensors(cache_file, {k: getattr(dataset, k) for k in _TENSOR_KEYS},
                         {"name": dataset.name, "classes": json.dumps(list(dataset.classes)),
                          "mean": json.dumps(list(mean)), "std": json.dumps(list(std)),
                          "format": str(CACHE_FORMAT)})
        except OSError as error:  # a read-only home is no reason to fail: the data is decoded
            warnings.warn(f"could not write the data cache {cache_file}: {error}", stacklevel=2)
    return dataset


# -- which data set is this (for the dataset's training recipe) ----------------------------------

_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_WORDNET_ID = re.compile(r"^n\d{8}$")


def identify_classes(classes: Iterable[str]) -> Optional[str]:
    """"cifar10", "cifar100" or "imagenet" when the class names are that data set's, else None.

    CIFAR-10: its ten names; CIFAR-100: 100 classes with its characteristic names; ImageNet:
    1000 WordNet ids (``n01440764``...), as in the official train/ folders.
    """
    names = tuple(sorted(classes))
    if names == _CIFAR10_CLASSES:
        return "cifar10"
    if len(names) == 100 and {"aquarium_fish", "sweet_pepper", "maple_tree", "willow_tree"} <= set(names):
        return "cifar100"
    if len(names) == 1000 and all(_WORDNET_ID.match(n) for n in names):
        return "imagenet"
    return None


def _archive_classes(path: Path) -> tuple[Optional[str], tuple[str, ...]]:
    """(CIFAR layout or None, the train/ class names) of an archive, from its member names only."""
    classes: set[str] = set()
    try:
        with _open_archive(path) as archive:
            for name in archive.getnames():
                base = name.rsplit("/", 1)[-1]
                for layout, (_, _, meta_file, _, _) in CIFAR_LAYOUTS.items():
                    if base == meta_file:
                        return layout, ()
                match = _SPLIT_MEMBER.match(name)
                if match is not None and match.group(1) == "train":
                    classes.add(match.group(2))
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"archive {path} is truncated or corrupt: {_one_line(error)}") from None
    return None, tuple(classes)


def identify_dataset(source: str) -> Optional[str]:
    """Which known data set ``source`` holds ("cifar10", "cifar100", "imagenet", "digits"), or None.

    Reads names only, never images: the CIFAR python layouts by their files, image folders
    and archives by the class folders of train/ (:func:`identify_classes`).
    """
    if source == "digits":
        return "digits"
    path = existing_data_path(source)
    if path.is_file():
        layout, classes = _archive_classes(path)
        return layout if layout is not None else identify_classes(classes)
    layout, root = detect_folder_layout(path)
    if layout != "image_folder":
        return layout
    classes = [p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return identify_classes(classes)


def identify_loaded_dataset(source: str, data: ImageDataset) -> Optional[str]:
    """:func:`identify_dataset` for data already decoded: by its layout name, else its class names."""
    if source == "digits":
        return "digits"
    if data.name in ("cifar10", "cifar100"):
        return data.name
    return identify_classes(data.classes)


def data_on_disk(source: str) -> bool:
    """Whether ``source`` names data that can be read here (the bundled digits, or a path that exists)."""
    return source == "digits" or Path(source).expanduser().exists()
