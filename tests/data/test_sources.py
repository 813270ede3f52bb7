"""divco.data.load_dataset: digits, CIFAR python batches, image folders, archives, the cache, errors."""

from __future__ import annotations

import os
import pickle
import re
import tarfile
from pathlib import Path

import pytest
import torch
from optional_deps import needs_torchvision

from divco.data import load_dataset
from divco.data.sources import identify_dataset
from divco.data.cache import default_cache_dir

#: The shared CIFAR-10 JPEG archive (../shared/data beside the repository, or $DIVCO_CIFAR10_ARCHIVE).
SHARED_CIFAR = Path(os.environ.get("DIVCO_CIFAR10_ARCHIVE",
                                   Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpg.tar.xz"))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", cache_dir=False)


@needs_torchvision
def test_digits_split_and_format(digits):
    assert digits.name == "digits" and digits.num_classes == 10 and digits.classes == tuple("0123456789")
    assert digits.train_images.shape == (1437, 3, 32, 32) and digits.test_images.shape == (360, 3, 32, 32)
    assert digits.train_images.dtype == torch.uint8 and digits.train_labels.dtype == torch.int64
    # grey: the three channels are equal; real content: both ink and background present
    assert torch.equal(digits.train_images[:, 0], digits.train_images[:, 2])
    assert digits.train_images.max() == 255 and digits.train_images.min() == 0
    # every class in both splits, and the fixed split does not depend on the run
    assert set(digits.test_labels.tolist()) == set(range(10))
    again = load_dataset("digits", cache_dir=False)
    assert torch.equal(again.test_labels, digits.test_labels) and torch.equal(again.train_images, digits.train_images)
    # the statistics are those of the training images
    x = digits.train_images.double() / 255
    assert digits.mean[0] == pytest.approx(x[:, 0].mean().item(), rel=1e-9)
    assert digits.std[1] == pytest.approx(x[:, 1].std(unbiased=False).item(), rel=1e-9)


@needs_torchvision
def test_digits_image_size_and_subset(digits):
    from sklearn.datasets import load_digits

    small = load_dataset("digits", image_size=8, cache_dir=False)
    assert small.image_size == (8, 8)
    # 8x8 is the digits' native size: the images are the originals, scaled from 0..16 to 0..255
    raw = (torch.from_numpy(load_digits().images) / 16 * 255).round().to(torch.uint8)
    ours = torch.cat([small.train_images[:, 0], small.test_images[:, 0]])
    assert sorted(bytes(i) for i in ours.numpy()) == sorted(bytes(i) for i in raw.numpy())
    sub = digits.subset(train=100, test=50)
    assert len(sub.train_labels) == 100 and len(sub.test_labels) == 50 and sub.mean == digits.mean
    assert torch.equal(sub.train_images, digits.subset(train=100, test=50).train_images)
    assert len(set(sub.train_labels.tolist())) == 10  # a random choice, not the first class
    with pytest.raises(ValueError, match="at least 1"):
        digits.subset(train=0)


def test_cache_roundtrip_location_and_damage(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVCO_CACHE_DIR", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / "data"
    first = load_dataset("digits", image_size=8)
    files = list((tmp_path / "home" / "data").glob("digits-*.safetensors"))
    assert len(files) == 1
    second = load_dataset("digits", image_size=8)
    assert torch.equal(first.train_images, second.train_images) and second.classes == first.classes
    assert second.mean == first.mean
    # an explicit folder wins over the environment
    load_dataset("digits", image_size=8, cache_dir=tmp_path / "other")
    assert list((tmp_path / "other").glob("digits-*.safetensors"))
    # a damaged cache file is ignored (with a warning) and rewritten
    files[0].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable data cache"):
        third = load_dataset("digits", image_size=8)
    assert torch.equal(third.test_images, first.test_images)
    assert load_dataset("digits", image_size=8).train_labels.equal(first.train_labels)


# -- CIFAR python layout ----------------------------------------------------------------------


def _cifar_batch(images: torch.Tensor, labels: torch.Tensor, label_key: bytes) -> bytes:
    content = {b"data": images.reshape(len(images), -1).numpy(), label_key: labels.tolist(), b"batch_label": b"x"}
    return pickle.dumps(content, protocol=2)


def write_cifar10(root: Path, digits) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, (images, labels) in enumerate(zip(digits.train_images.chunk(5), digits.train_labels.chunk(5)), start=1):
        (folder / f"data_batch_{i}").write_bytes(_cifar_batch(images, labels, b"labels"))
    (folder / "test_batch").write_bytes(_cifar_batch(digits.test_images, digits.test_labels, b"labels"))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in digits.classes]}))
    return folder


@needs_torchvision
def test_cifar10_python_layout_folder_and_archive(tmp_path, digits):
    write_cifar10(tmp_path / "data", digits)
    for source in (tmp_path / "data", tmp_path / "data" / "cifar-10-batches-py"):
        data = load_dataset(str(source), cache_dir=False)
        assert data.name == "cifar10" and data.classes == digits.classes
        assert torch.equal(data.train_images, digits.train_images)
        assert torch.equal(data.test_labels, digits.test_labels)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "data" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = load_dataset(str(archive), cache_dir=False)
    assert torch.equal(data.test_images, digits.test_images) and data.name == "cifar10"


@needs_torchvision
def test_cifar100_python_layout(tmp_path, digits):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(_cifar_batch(digits.train_images, digits.train_labels, b"fine_labels"))
    (folder / "test").write_bytes(_cifar_batch(digits.test_images, digits.test_labels, b"fine_labels"))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(10)]}))
    data = load_dataset(str(tmp_path), cache_dir=False)
    assert data.name == "cifar100" and data.classes[3] == "c3"
    assert torch.equal(data.train_images, digits.train_images)


@needs_torchvision
def test_cifar_pickles_never_build_arbitrary_objects(tmp_path, digits):
    folder = write_cifar10(tmp_path, digits)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(ValueError, match=r"test_batch.*refusing to load"):
        load_dataset(str(tmp_path), cache_dir=False)
    assert not (tmp_path / "pwned").exists()
    (folder / "test_batch").write_bytes(b"\x80\x02truncated")
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset(str(tmp_path), cache_dir=False)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset(str(tmp_path), cache_dir=False)


# -- image folders ----------------------------------------------------------------------------


def write_png(image: torch.Tensor, path: str) -> None:
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, format="PNG")


def write_image_folder(root: Path, data, per_class: int = 3) -> None:
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        counts: dict[int, int] = {}
        for image, label in zip(images, labels.tolist()):
            if counts.get(label, 0) >= per_class:
                continue
            counts[label] = counts.get(label, 0) + 1
            folder = root / split / data.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            write_png(image, str(folder / f"{counts[label]:04d}.png"))


@needs_torchvision
def test_image_folder_and_archive(tmp_path, digits):
    small = digits.subset(train=200, test=100)
    write_image_folder(tmp_path / "folder", small)
    (tmp_path / "folder" / "train" / "0" / "notes.txt").write_text("not an image")
    data = load_dataset(str(tmp_path / "folder"), cache_dir=False)
    assert data.name == "folder" and data.classes == digits.classes
    assert len(data.train_labels) == 30 and len(data.test_labels) == 30
    # PNG is lossless: every decoded image is one of the originals, with its label
    originals = {bytes(img.numpy()): int(lab) for img, lab in zip(small.train_images, small.train_labels)}
    for image, label in zip(data.train_images, data.train_labels):
        assert originals[bytes(image.numpy())] == int(label)
    archive = tmp_path / "digits-png.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "folder", arcname="digits-png")
    packed = load_dataset(str(archive), cache_dir=False)
    assert packed.name == "digits-png"
    assert torch.equal(packed.train_images, data.train_images) and torch.equal(packed.test_labels, data.test_labels)
    resized = load_dataset(str(archive), image_size=16, cache_dir=False)
    assert resized.image_size == (16, 16)


@needs_torchvision
def test_image_folder_errors(tmp_path, digits):
    write_image_folder(tmp_path, digits.subset(train=60, test=40), per_class=1)
    bad = tmp_path / "train" / "3" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match=r"cannot decode image .*train/3/0001\.png"):
        load_dataset(str(tmp_path), cache_dir=False)
    bad.unlink()
    write_png(torch.zeros(3, 20, 20, dtype=torch.uint8), str(tmp_path / "train" / "3" / "big.png"))
    with pytest.raises(ValueError, match=r"big\.png is 20x20 .*--image-size"):
        load_dataset(str(tmp_path), cache_dir=False)
    assert load_dataset(str(tmp_path), image_size=20, cache_dir=False).image_size == (20, 20)


def test_bad_sources_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*digits"):
        load_dataset(str(tmp_path / "nowhere"), cache_dir=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty has no known layout"):
        load_dataset(str(tmp_path / "empty"), cache_dir=False)
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 30)
    with pytest.raises(ValueError, match=r"broken\.tar\.gz"):
        load_dataset(str(broken), cache_dir=False)
    text = tmp_path / "data.csv"
    text.write_text("1,2,3")
    with pytest.raises(ValueError, match=r"data\.csv is not a tar archive"):
        load_dataset(str(text), cache_dir=False)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=4, cache_dir=False)


@needs_torchvision
def test_truncated_archive_is_named(tmp_path, digits):
    write_image_folder(tmp_path / "folder", digits.subset(train=100, test=50), per_class=2)
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "folder", arcname="data")
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"data\.tar\.gz is truncated or corrupt"):
        load_dataset(str(archive), cache_dir=False)


@pytest.mark.data
@pytest.mark.slow
def test_shared_cifar10_jpg_archive(tmp_path):
    if not SHARED_CIFAR.is_file():
        pytest.skip(f"{SHARED_CIFAR} is absent")
    data = load_dataset(str(SHARED_CIFAR), cache_dir=tmp_path)
    assert data.name == "cifar10-jpg" and data.num_classes == 10
    assert data.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert data.train_images.shape == (50000, 3, 32, 32) and data.test_images.shape == (10000, 3, 32, 32)
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10
    # the CIFAR-10 channel means (about 0.49, 0.48, 0.45)
    assert data.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=0.01)
    cached = load_dataset(str(SHARED_CIFAR), cache_dir=tmp_path)
    assert torch.equal(cached.train_images[:100], data.train_images[:100])


@needs_torchvision
def test_identify_dataset_reads_names_only(tmp_path, digits):
    """The recipe follows the dataset, identified from the source without decoding."""
    from divco.data.sources import identify_dataset

    assert identify_dataset("digits") == "digits"
    root = write_cifar10(tmp_path / "c10", digits)
    assert identify_dataset(str(root)) == "cifar10"
    archive = tmp_path / "c10.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar-10-batches-py")
    assert identify_dataset(str(archive)) == "cifar10"
    (tmp_path / "c100" / "cifar-100-python").mkdir(parents=True)
    assert identify_dataset(str(tmp_path / "c100")) == "cifar100"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    folder = tmp_path / "jpg"
    for split in ("train", "test"):
        for name in names:
            (folder / split / name).mkdir(parents=True)
            (folder / split / name / "0.png").write_bytes(b"")
    assert identify_dataset(str(folder)) == "cifar10"
    packed = tmp_path / "jpg.tar"
    with tarfile.open(packed, "w") as tar:
        tar.add(folder, arcname="cifar10-jpg")
    assert identify_dataset(str(packed)) == "cifar10"
    (folder / "train" / "extra").mkdir()
    assert identify_dataset(str(folder)) is None


@pytest.mark.parametrize("content, says", [
    (b"", "the file is empty, not a tar archive"),
    (b"hello, not an archive at all" * 30, r"the file is not a tar archive \(neither plain nor gzip, bzip2 or xz"),
    (b"\x1f\x8b\x08\x00" + b"\x00" * 30, "a gzip file that is truncated or does not hold a tar archive"),
], ids=["empty", "text", "broken-gzip"])
def test_an_unreadable_archive_is_one_line_naming_the_file(tmp_path, content, says):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(content)
    for read in (lambda: load_dataset(str(bad), cache_dir=False), lambda: identify_dataset(str(bad))):
        with pytest.raises(ValueError) as caught:
            read()
        message = str(caught.value)
        assert "\n" not in message and re.search(rf"cannot read archive .*bad\.tar\.gz: {says}", message), message


@needs_torchvision
def test_one_class_data_is_refused(tmp_path, digits):
    one_class = digits.subset(train=60, test=40)
    write_image_folder(tmp_path, one_class, per_class=2)
    for split in ("train", "test"):
        for folder in (tmp_path / split).iterdir():
            if folder.name != "0":
                for image in folder.iterdir():
                    image.unlink()
                folder.rmdir()
    with pytest.raises(ValueError, match=r"has 1 class under train/ \(\['0'\]\): classification needs at least 2"):
        load_dataset(str(tmp_path), cache_dir=False)


def test_decoding_is_announced_once(tmp_path, capsys):
    load_dataset("digits", image_size=8, cache_dir=tmp_path)
    assert capsys.readouterr().err == f"divco: decoding scikit-learn digits (later runs read the decoded cache in " \
                                      f"{tmp_path})\n"
    load_dataset("digits", image_size=8, cache_dir=tmp_path)  # a cache hit decodes nothing
    assert capsys.readouterr().err == ""
