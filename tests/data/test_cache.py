"""divco.data.cache: a cache file is used only when its content and key are the ones it was written with."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from optional_deps import needs_torchvision
from safetensors import safe_open
from safetensors.torch import save_file

from divco.data import load_dataset
from divco.data.cache import HASH_KEY, load_tensors


def _cache_file(folder):
    files = list(folder.glob("digits-*.safetensors"))
    assert len(files) == 1
    return files[0]


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _tamper(path, tensors=None, metadata=None, *, keep_hash=True):
    """Rewrite a cache file with some tensors or metadata changed (the stored hash kept as it was)."""
    old_tensors, old_metadata = _read(path)
    new_metadata = {**old_metadata, **(metadata or {})}
    if not keep_hash:
        new_metadata.pop(HASH_KEY)
    save_file({**old_tensors, **(tensors or {})}, str(path), metadata=new_metadata)


def _load_quietly(folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_dataset("digits", image_size=8, cache_dir=folder)
    return data, [str(w.message) for w in caught]


TAMPERINGS = {
    "zero std": lambda t, m: (None, {"std": json.dumps([0.0, 0.0, 0.0])}),
    "NaN mean": lambda t, m: (None, {"mean": "[NaN, 0.5, 0.5]"}),
    "short statistics": lambda t, m: (None, {"std": json.dumps([0.3])}),
    "images of another size": lambda t, m: ({"train_images": t["train_images"][:, :, :4, :4].contiguous(),
                                             "test_images": t["test_images"][:, :, :4, :4].contiguous()}, None),
    "shuffled labels": lambda t, m: ({"train_labels": t["train_labels"].roll(1)}, None),
    "no hash (older divco)": None,
}


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_a_modified_cache_is_decoded_again(tmp_path, case):
    fresh = load_dataset("digits", image_size=8, cache_dir=False)
    load_dataset("digits", image_size=8, cache_dir=tmp_path)
    path = _cache_file(tmp_path)
    if TAMPERINGS[case] is None:
        _tamper(path, keep_hash=False)
    else:
        tensors, metadata = _read(path)
        _tamper(path, *TAMPERINGS[case](tensors, metadata))
    data, messages = _load_quietly(tmp_path)
    assert any("does not match its hash or its key" in m for m in messages), messages
    assert torch.equal(data.train_labels, fresh.train_labels) and torch.equal(data.train_images, fresh.train_images)
    assert data.mean == fresh.mean and data.std == fresh.std
    # ... and the rebuilt cache is valid again: read silently
    again, messages = _load_quietly(tmp_path)
    assert not messages and torch.equal(again.train_labels, fresh.train_labels)


@needs_torchvision
def test_a_cache_file_under_another_key_is_not_used(tmp_path):
    load_dataset("digits", image_size=8, cache_dir=tmp_path / "a")
    load_dataset("digits", image_size=16, cache_dir=tmp_path / "b")
    small, large = _cache_file(tmp_path / "a"), _cache_file(tmp_path / "b")
    large.write_bytes(small.read_bytes())  # 8x8 images where 16x16 ones are expected
    assert load_tensors(small) is not None
    with pytest.warns(UserWarning, match="does not match its hash or its key"):
        assert load_tensors(large) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_dataset("digits", image_size=16, cache_dir=tmp_path / "b").image_size == (16, 16)


def test_cache_files_respect_the_umask(tmp_path):
    import os

    previous = os.umask(0o022)
    try:
        load_dataset("digits", image_size=8, cache_dir=tmp_path)
    finally:
        os.umask(previous)
    assert _cache_file(tmp_path).stat().st_mode & 0o777 == 0o644
