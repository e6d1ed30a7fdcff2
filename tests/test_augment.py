import torch

from search.augment import batch_crop, batch_erase, batch_flip


def test_flip_mirrors_about_half_the_batch():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5).repeat(200, 1, 1, 1)
    y = batch_flip(x)
    flipped = (y == x.flip(3)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert bool((flipped | kept).all()) and 150 < int(flipped.sum()) < 250


def test_crop_is_a_shifted_window_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    y = batch_crop(x, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(64):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(y[i], w) for w in windows)
    assert not torch.equal(x, y)


def test_erasing_blanks_one_rectangle_within_scale():
    torch.manual_seed(0)
    x = torch.ones(256, 3, 32, 32)
    y = batch_erase(x, p=1.0)
    zeros = (y == 0).all(1)
    frac = zeros.flatten(1).float().mean(1)
    assert bool((frac > 0).all()) and float(frac.max()) <= 0.34
    rows, cols = zeros.any(2), zeros.any(1)
    assert bool(((rows.sum(1) * cols.sum(1)) == zeros.flatten(1).sum(1)).all())  # a filled rectangle
    assert torch.equal(batch_erase(x, p=0.0), x)
