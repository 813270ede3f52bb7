"""Batched per-branch views: crops, flips, erasing, mixup shared by branches, reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from optional_deps import needs_torchvision

from divco.data import AUGMENT_PRESETS, AugmentConfig, BatchAugmenter, random_crop, random_erase, random_flip


def images(n: int, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)  # no zeros: padding is visible


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 6), h=st.integers(2, 9), w=st.integers(2, 9), padding=st.integers(0, 4),
       seed=st.integers(0, 99))
def test_random_crop_is_a_window_of_the_padded_image(n, h, w, padding, seed):
    x = images(n, h, w, seed)
    out = random_crop(x, padding, torch.Generator().manual_seed(seed))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (padding,) * 4)
    for i in range(n):
        windows = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                   if torch.equal(padded[i, :, dy:dy + h, dx:dx + w], out[i])]
        assert windows, f"image {i} is not a crop of its padded original"


def test_random_crop_offsets_cover_the_range():
    x = images(2000, 4, 4)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    # the images have no zeros, so all-zero rows/columns are padding: 0, 1 or 2 of them, each count seen
    zero_rows = (out == 0).all(dim=3).all(dim=1).sum(1)
    zero_cols = (out == 0).all(dim=2).all(dim=1).sum(1)
    assert set(zero_rows.tolist()) == {0, 1, 2} and set(zero_cols.tolist()) == {0, 1, 2}


def test_random_flip_flips_about_half():
    x = images(400, 4, 6)
    out = random_flip(x, torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped | kept).all())
    assert 150 < int(flipped.sum()) < 250


def test_random_erase_zeroes_one_rectangle_of_the_right_area():
    x = torch.ones(500, 3, 32, 32)
    out = random_erase(x, p=0.5, scale=(0.0625, 0.1), ratio=(0.99, 1.0), generator=torch.Generator().manual_seed(2))
    erased = out[:, 0] == 0
    counts = erased.flatten(1).sum(1)
    assert 180 < int((counts > 0).sum()) < 320  # p = 0.5
    for mask in erased[counts > 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert int(mask.sum()) == int(h * w)  # a full rectangle
        assert 0.0625 * 1024 * 0.8 <= h * w <= 0.1 * 1024 * 1.2  # rounding of the sides
    assert torch.equal(out[:, 0] == 0, out[:, 2] == 0)  # all channels


def augmenter(**overrides) -> BatchAugmenter:
    config = AugmentConfig(**overrides).with_defaults(**AUGMENT_PRESETS["quick"])
    return BatchAugmenter(config, (0.5, 0.4, 0.3), (0.25, 0.2, 0.2), "cpu", seed=0)


def test_views_are_independent_per_branch_and_normalised():
    x = images(16)
    views = augmenter(erase_p=0.0).views(x, 4)
    assert views.shape == (16, 4, 3, 8, 8) and views.dtype == torch.float32
    for s in range(1, 4):
        assert not torch.equal(views[:, 0], views[:, s])
    # without randomness a view is the normalised image
    plain = augmenter(crop_padding=0, flip=False, erase_p=0.0).views(x, 2)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.25, 0.2, 0.2]).view(3, 1, 1)
    expected = (x.float() / 255 - mean) / std
    torch.testing.assert_close(plain[:, 1], expected)
    torch.testing.assert_close(plain[:, 0], expected)


def test_same_view_gives_every_branch_the_same_view():
    views = augmenter(same_view=True).views(images(8), 3)
    assert torch.equal(views[:, 0], views[:, 1]) and torch.equal(views[:, 0], views[:, 2])


def test_mixup_one_lambda_one_pairing_for_all_branches():
    aug = augmenter(mixup_alpha=0.4)
    views = torch.randn(12, 3, 3, 4, 4, dtype=torch.float32)
    labels = torch.arange(12) % 5
    state = aug.state_dict()
    mixed, targets = aug.mixup(views, labels, 5)
    assert targets.shape == (12, 5) and torch.allclose(targets.sum(1), torch.ones(12))
    # recover lambda and the pairing from the generators and check every branch used them
    aug.load_state_dict(state)
    lam = float(aug.numpy_generator.beta(0.4, 0.4))
    pairing = torch.randperm(12, generator=aug.generator)
    torch.testing.assert_close(mixed, lam * views + (1 - lam) * views[pairing])
    one_hot = F.one_hot(labels, 5).float()
    torch.testing.assert_close(targets, lam * one_hot + (1 - lam) * one_hot[pairing])
    unchanged, hard = augmenter(mixup_alpha=0.0).mixup(views, labels, 5)
    assert unchanged is views and hard is labels


@needs_torchvision
def test_state_dict_reproduces_the_stream():
    aug = augmenter(policy="randaugment")
    x, y = images(8), torch.arange(8) % 3
    aug.training_batch(x, y, 2, 3)
    state = aug.state_dict()
    first = aug.training_batch(x, y, 2, 3)
    other = augmenter(policy="randaugment")
    other.load_state_dict(state)
    second = other.training_batch(x, y, 2, 3)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(aug.training_batch(x, y, 2, 3)[0], first[0])


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="policy"):
        AugmentConfig(policy="trivial")
    with pytest.raises(ValueError, match="erase_p"):
        AugmentConfig(erase_p=1.5)
    with pytest.raises(ValueError, match="mixup_alpha"):
        AugmentConfig(mixup_alpha=-1.0)
    with pytest.raises(ValueError, match="mixup_alpha"):
        AugmentConfig(mixup_alpha=math.nan)
    with pytest.raises(ValueError, match="crop_padding"):
        AugmentConfig(crop_padding=-2)
    with pytest.raises(ValueError, match="uint8"):
        augmenter().views(torch.rand(2, 3, 8, 8), 2)


def test_beta_lambda_matches_the_official_distribution():
    aug = augmenter(mixup_alpha=0.2)
    lams = np.array([aug.numpy_generator.beta(0.2, 0.2) for _ in range(4000)])
    # Beta(0.2, 0.2): mean 1/2, variance 1/(4 * 1.4) ~ 0.179, mass near the ends
    assert abs(lams.mean() - 0.5) < 0.03 and abs(lams.var() - 1 / 5.6) < 0.02


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["none", "randaugment"])
def test_cuda_views_and_mixup_never_synchronise(policy):
    device = torch.device("cuda")
    aug = BatchAugmenter(AugmentConfig(policy=policy).with_defaults(**AUGMENT_PRESETS["quick"]), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), device, seed=0)
    x = images(64, 32, 32).to(device)
    labels = torch.randint(0, 10, (64,), device=device)
    aug.training_batch(x, labels, 4, 10)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views, targets = aug.training_batch(x, labels, 4, 10)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert views.shape == (64, 4, 3, 32, 32) and targets.shape == (64, 10)
    assert views.is_cuda and torch.isfinite(views).all()


# -- the official ImageNet crop and label smoothing ---------------------------------------

from divco.data.augment import random_resized_crop  # noqa: E402


def test_random_resized_crop_keeps_size_and_crops_windows():
    g = torch.Generator().manual_seed(0)
    ramp = torch.arange(32, dtype=torch.float32).repeat(32, 1)  # column index as the value
    x = (ramp * 8).clamp(0, 255).to(torch.uint8).expand(64, 3, 32, 32).contiguous()
    out = random_resized_crop(x, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    span = out[:, 0].float().amax((1, 2)) - out[:, 0].float().amin((1, 2))
    # windows of 10-100 % of the area: every crop sees a narrower range of columns than the image
    assert (span < 248 - 1).float().mean() > 0.8 and span.min() > 0
    assert not torch.equal(out[0], out[1])


@needs_torchvision
def test_imagenet_preset_uses_resized_crop_and_the_imagenet_policy():
    config = AugmentConfig().with_defaults(**AUGMENT_PRESETS["imagenet"])
    aug = BatchAugmenter(config, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cpu", seed=0)
    assert aug.policy is not None and aug.policy.kind == "autoaugment_imagenet"
    views = aug.views(images(4, 32, 32), 2)
    assert views.shape == (4, 2, 3, 32, 32) and torch.isfinite(views).all()


def test_unresolved_config_is_rejected():
    with pytest.raises(ValueError, match=r"needs a resolved AugmentConfig; \['crop', 'policy'"):
        BatchAugmenter(AugmentConfig(), (0.5,) * 3, (0.25,) * 3, "cpu", seed=0)
    assert AugmentConfig(policy="none").with_defaults(**AUGMENT_PRESETS["cifar10"]).policy == "none"


@pytest.mark.parametrize("mixup_alpha", [0.0, 0.2])
def test_label_smoothing_matches_the_official_loss(mixup_alpha):
    """(1 - e) target + e / K; with mixup, lam * CE(smooth(a)) + (1 - lam) * CE(smooth(b)) as the official code."""
    K, e = 10, 0.1
    config = AugmentConfig(mixup_alpha=mixup_alpha).with_defaults(**AUGMENT_PRESETS["quick"])
    aug = BatchAugmenter(config, (0.5,) * 3, (0.25,) * 3, "cpu", seed=0, label_smoothing=e)
    labels = torch.randint(0, K, (8,))
    plain = BatchAugmenter(config, (0.5,) * 3, (0.25,) * 3, "cpu", seed=0)
    _, smoothed = aug.training_batch(images(8), labels, 2, K)
    _, raw = plain.training_batch(images(8), labels, 2, K)
    raw = F.one_hot(raw, K).float() if raw.dim() == 1 else raw
    torch.testing.assert_close(smoothed, raw * (1 - e) + e / K)
    torch.testing.assert_close(smoothed.sum(1), torch.ones(8))
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        BatchAugmenter(config, (0.5,) * 3, (0.25,) * 3, "cpu", seed=0, label_smoothing=1.0)
