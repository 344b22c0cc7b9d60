import numpy as np
import pytest
import torch
from PIL import Image

from data.tokenizer import image_block_length
from data.vision import (
    best_canvas,
    fit_without_distortion,
    frames_to_tiles,
    max_tiles_for_length,
    supported_canvases,
    tile_image,
)


def test_canvases_in_llama4_order():
    # transformers' find_supported_resolutions docstring example (4 chunks of 224); order decides ties
    assert list(supported_canvases(4, 224)) == [
        (224, 896),
        (448, 448),
        (224, 224),
        (896, 224),
        (224, 672),
        (672, 224),
        (224, 448),
        (448, 224),
    ]
    assert set(supported_canvases(6, 336)) == {
        (h * 336, w * 336) for h in range(1, 7) for w in range(1, 7) if h * w <= 6
    }


def test_best_fit_examples():
    canvases = [(224, 672), (672, 224), (224, 448), (448, 224), (224, 224)]
    assert best_canvas((200, 300), canvases) == (224, 448)  # smallest upscale, then smallest area
    assert best_canvas((1000, 1000), canvases) == (224, 224)  # only downscaling: the least of it
    assert fit_without_distortion((200, 300), (450, 200)) == (133, 200)
    assert fit_without_distortion((800, 600), (450, 1300)) == (450, 337)


def _quadrants(h: int, w: int) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    arr[: h // 2, w // 2 :] = (0, 255, 0)
    arr[h // 2 :, : w // 2] = (0, 0, 255)
    arr[h // 2 :, w // 2 :] = (255, 255, 255)
    return Image.fromarray(arr)


def test_tiles_are_row_major_with_global_view_last():
    t = tile_image(_quadrants(672, 672), max_tiles=4)
    assert t.grid == (2, 2) and t.pixels.shape == (5, 3, 336, 336)
    means = t.pixels[:4].mean(dim=(2, 3))
    expect = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1]], dtype=torch.float32)
    assert torch.allclose(means, expect, atol=0.05)
    assert torch.allclose(t.pixels[4].mean(dim=(1, 2)), expect.mean(0), atol=0.05)  # the whole image, squashed


def test_small_image_is_one_tile_padded_black():
    t = tile_image(Image.new("RGB", (100, 50), (255, 255, 255)), max_tiles=16)
    assert t.grid == (1, 1) and t.pixels.shape == (1, 3, 336, 336)
    # upscaled to 336 wide, 168 high (no distortion), the rest padded with black (-1 after normalising)
    assert torch.allclose(t.pixels[0, :, :160, :], torch.ones(3, 160, 336))
    assert torch.allclose(t.pixels[0, :, 170:, :], -torch.ones(3, 166, 336))


def test_wide_image_gets_a_row_of_tiles():
    t = tile_image(Image.new("RGB", (1000, 300)), max_tiles=16)
    assert t.grid[0] == 1 and t.grid[1] >= 2
    assert t.pixels.shape[0] == t.grid[0] * t.grid[1] + 1
    assert t.pixels.dtype == torch.float32 and float(t.pixels.min()) >= -1 and float(t.pixels.max()) <= 1


def test_frames_become_one_tile_each_and_dtype_is_honoured():
    frames = [Image.new("RGB", (64, 48), (i * 40, 0, 0)) for i in range(3)]
    v = frames_to_tiles(frames, dtype=torch.bfloat16)
    assert v.pixels.shape == (3, 3, 336, 336) and v.pixels.dtype == torch.bfloat16


@pytest.mark.parametrize("seq_len", [147, 600, 2000, 8192])
def test_tile_budget_fits_the_row(seq_len):
    m = max_tiles_for_length(16, seq_len, 144)
    worst = max(image_block_length((h // 336, w // 336)) for h, w in supported_canvases(m))
    assert worst <= seq_len or m == 1
    if m < 16:  # one more tile would not fit
        assert max(image_block_length((h // 336, w // 336)) for h, w in supported_canvases(m + 1)) > seq_len
