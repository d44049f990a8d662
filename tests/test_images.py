"""Image decoding and validation, in process."""

import io

import numpy as np
import pytest
from PIL import Image

from conftest import png_bytes
from dxserve.errors import ServingError
from dxserve.images import decode, mask_png
from dxserve.v1 import diagnostics_pb2 as pb


def encoded(data: bytes) -> pb.Image:
    return pb.Image(encoded=data)


def test_rgb_png_round_trips():
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), np.uint8)
    np.testing.assert_array_equal(decode(encoded(png_bytes(rgb)), 10_000), rgb)


def test_grey_is_replicated_to_rgb():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = decode(encoded(png_bytes(grey)), 10_000)
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[..., 0], grey)
    np.testing.assert_array_equal(out[..., 2], grey)


def test_16_bit_keeps_its_range():
    deep = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    buffer = io.BytesIO()
    Image.fromarray(deep).save(buffer, format="PNG")
    out = decode(encoded(buffer.getvalue()), 10_000)
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[3, 3, 0] == 255
    assert len(np.unique(out[..., 0])) == 16  # not clipped to a few values


def test_alpha_is_composited_on_black():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:2, :, 3] = 255  # top half opaque, bottom half transparent
    out = decode(encoded(png_bytes(rgba)), 10_000)
    assert (out[:2] == 200).all() and (out[2:] == 0).all()


def test_raw_grey_and_rgba():
    grey = pb.Image(raw=pb.RawImage(pixels=bytes(range(16)), width=4, height=4, channels=1))
    assert decode(grey, 100).shape == (4, 4, 3)
    rgba = pb.Image(raw=pb.RawImage(pixels=b"\xff" * 64, width=4, height=4, channels=4))
    assert (decode(rgba, 100) == 255).all()


@pytest.mark.parametrize("image, reason", [
    (pb.Image(), "IMAGE_MISSING"),
    (encoded(b""), "IMAGE_EMPTY"),
    (encoded(b"GIF89a nonsense"), "IMAGE_UNREADABLE"),
    (pb.Image(raw=pb.RawImage(pixels=b"\0" * 8, width=2, height=2, channels=2)), "IMAGE_CHANNELS"),
    (pb.Image(raw=pb.RawImage(pixels=b"\0" * 300, width=10, height=10, channels=3)), "IMAGE_TOO_LARGE"),
])
def test_errors_name_their_reason(image, reason):
    with pytest.raises(ServingError) as caught:
        decode(image, max_pixels=50)
    status = caught.value.to_status()
    assert status.code == 3  # INVALID_ARGUMENT
    assert any(reason.encode() in d.value for d in status.details)


def test_size_is_checked_before_decoding():
    # 6000 x 6000 of zeros compresses to a few KB; the limit must trip on the header alone.
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 200_000
    with pytest.raises(ServingError, match="exceeds the limit"):
        decode(encoded(buffer.getvalue()), max_pixels=1_000_000)


def test_pillow_bomb_limit_follows_the_servers_pixel_limit(monkeypatch):
    """After limit_pixels, Pillow itself refuses a larger image as it opens it, on any code
    path that opens images in the server process (decode turns its warning into an error)."""
    from dxserve.images import limit_pixels

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    limit_pixels(1_000)
    assert Image.MAX_IMAGE_PIXELS == 1_000
    with pytest.raises(ServingError) as caught:
        decode(encoded(png_bytes(np.zeros((40, 40, 3), np.uint8))), max_pixels=10_000)  # the header check alone allows it
    assert "IMAGE_TOO_LARGE" in str(caught.value.to_status())
    assert caught.value.message.endswith("1600 px exceeds the limit of 1000 pixels (max_image_pixels)")  # the server's words, not Pillow's


def test_a_plugin_refuses_what_it_cannot_use_from_the_header_before_decoding():
    """Issue 32: a white 25 Mpx image cost lymphoblast's gate 1.1 GB before it was refused. A plugin
    declares the largest image it takes (InputSpec.max_pixels); a larger one is refused from its
    header, in the plugin's words, and ListPlugins says the limit."""
    import io

    from PIL import Image

    from dxserve.testing import serving
    from dxserve_client.client import DxServeError

    white = io.BytesIO()
    Image.new("RGB", (2500, 2000), "white").save(white, format="PNG")  # 5 Mpx: within the server's 25
    with serving("lymphoblast") as client:
        (info,) = [p for p in client.list_plugins() if p.name == "lymphoblast"]
        assert info.input.max_pixels == 4_000_000
        with pytest.raises(DxServeError) as caught:
            client.classify(white.getvalue())
        assert caught.value.reason == "IMAGE_TOO_LARGE"
        assert "2500x2000 px exceeds the limit of 4000000 pixels (plugin 'lymphoblast''s max_pixels)" in str(caught.value)
        assert client.classify(np.full((450, 450, 3), 0, np.uint8)).ok  # what it takes, it still takes


@pytest.mark.parametrize("dtype", [bool, np.uint8])
def test_a_found_objects_mask_is_an_8_bit_grey_png_of_0_and_255(dtype):
    mask = np.zeros((37, 29), dtype)
    mask[5:30, 3:20] = 1
    decoded = Image.open(io.BytesIO(mask_png(mask)))
    assert decoded.mode == "L" and np.array_equal(np.asarray(decoded), np.where(mask != 0, 255, 0))
