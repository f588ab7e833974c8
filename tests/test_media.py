"""Media values to pixels (dataset/images.py, dataset/media.py): the forms a record or the Python API may give, and
what happens to media that cannot be used."""
import base64
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from bad_media import image_bytes, png_header
from conftest import FIXTURE
from configs.schema import config_from_dict
from dataset.images import MAX_IMAGE_PIXELS, open_image
from dataset.media import MediaOptions, image_transform, load_pixels, media_kind
from dataset.video import load_video_frames, sample_frame_indices
from errors import RecordError


def test_base64_images_plain_and_as_data_uri():
    """The original's base64 image form; a data: URI is accepted too, as for video frames."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    for spec in (encoded, "data:image/png;base64," + encoded):
        image = open_image(spec, index=1)
        assert image.size == (4, 3) and image.getpixel((0, 0)) == (200, 10, 10)
    with pytest.raises(RecordError, match="neither an existing file nor valid base64"):
        open_image("not*base64", index=1)


# ---------------------------------------------------------------- images that cannot be used are their record's error


def refused(value, *words, index=5, **kwargs) -> RecordError:
    with pytest.raises(RecordError) as excinfo:
        open_image(value, index=index, **kwargs)
    err = excinfo.value
    assert err.index == index
    for word in words:
        assert word in err.reason, err.reason
    return err


def test_pixel_limit_is_pils_own_bomb_threshold():
    assert MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS == 89_478_485


@pytest.mark.parametrize("width, height", [(20_000, 10_000), (10_000, 10_000)])
def test_image_over_the_pixel_limit_is_refused_without_a_warning(tmp_path, width, height):
    """200 MP: PIL itself refuses (DecompressionBombError); 100 MP: PIL only warns, and would decode 300 MB."""
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(width, height))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail the test
        err = refused(str(path), "cannot read the image (", f"{width * height} pixels" if width == 20_000 else
                      f"{width} x {height} pixels", "more than the limit of 89478485")
    assert err.path == str(path)
    encoded = base64.b64encode(png_header(width, height)).decode()
    refused(encoded, "cannot read the base64 image (", "more than the limit of 89478485")


def test_the_limit_counts_pixels_exactly():
    at_limit, over = Image.new("RGB", (10, 10)), Image.new("RGB", (11, 10))
    assert open_image(at_limit, max_pixels=100).size == (10, 10)
    refused(over, "11 x 10 pixels, more than the limit of 100", max_pixels=100)
    refused(base64.b64encode(image_bytes(over, "PNG")).decode(), "11 x 10 pixels", max_pixels=100)


def test_empty_and_truncated_image_files(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert refused(str(empty), "image file is empty (0 bytes)").path == str(empty)
    whole = (FIXTURE / "images" / "img_c.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    refused(str(truncated), "cannot read the image (", "truncated")
    refused(base64.b64encode(whole[: len(whole) // 2]).decode(), "cannot read the base64 image (", "truncated")


def test_valid_base64_that_is_not_an_image():
    refused(base64.b64encode(b"hello, not a picture").decode(), "cannot read the base64 image (cannot identify")


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF")])
def test_images_of_more_than_8_bits_are_refused(tmp_path, mode, fmt):
    """PIL's convert('RGB') clips such values at 255: the model would see a white picture."""
    values = np.full((6, 8), 40_000 if mode != "F" else 0.5, dtype={"I;16": np.uint16, "I": np.int32,
                                                                     "F": np.float32}[mode])
    image = Image.fromarray(values)
    path = tmp_path / f"wide.{fmt.lower()}"
    path.write_bytes(image_bytes(image, fmt))
    with Image.open(path) as opened:
        assert opened.mode == mode
    refused(str(path), "cannot read the image (", f"mode {mode} has more than 8 bits per channel")
    refused(image, f"mode {mode}")


def test_cmyk_and_animated_images_read_as_the_original_reads_them(tmp_path):
    """The original's Image.open(path).convert('RGB'): PIL's CMYK conversion; an animated image's first frame."""
    cmyk = tmp_path / "cmyk.jpg"
    cmyk.write_bytes(image_bytes(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG", quality=100))
    with Image.open(cmyk) as original:
        expected = original.convert("RGB")
    assert np.array_equal(np.asarray(open_image(str(cmyk))), np.asarray(expected))
    assert open_image(str(cmyk)).getpixel((0, 0))[0] > 200  # red stays red
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    animated = tmp_path / "anim.gif"
    frames[0].save(animated, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(animated) as gif:
        assert gif.n_frames == 2
    assert open_image(str(animated)).getpixel((0, 0))[0] > 200


def test_a_decoder_that_raises_something_else_is_still_the_record_error(tmp_path, monkeypatch):
    """PIL's plugins raise more than OSError (SyntaxError, struct.error, IndexError...): none escapes."""
    path = tmp_path / "img.png"
    path.write_bytes(image_bytes(Image.new("RGB", (4, 4)), "PNG"))

    def broken_load(self):
        raise IndexError("tile out of range")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken_load)
    refused(str(path), "cannot read the image (tile out of range)")


def test_frames_obey_the_same_rules():
    wide = base64.b64encode(image_bytes(Image.fromarray(np.zeros((6, 8), np.uint16)), "PNG")).decode()
    good = base64.b64encode(image_bytes(Image.new("RGB", (8, 6)), "PNG")).decode()
    with pytest.raises(RecordError, match="frame 1 is not a readable image: mode I;16"):
        load_video_frames([good, wide], 2, index=3)
    huge = base64.b64encode(png_header(20_000, 10_000)).decode()
    with pytest.raises(RecordError, match="frame 0 is not a readable image: 200000000 pixels, more than the limit"):
        load_video_frames([huge], 2, index=3)
    with pytest.raises(RecordError, match="frame 1 is not a readable image: 11 x 10 pixels"):
        load_video_frames([Image.new("RGB", (10, 10)), Image.new("RGB", (11, 10))], 2, index=3, max_pixels=100)


# ---------------------------------------------------------------- options made once from the config


def test_random_frames_are_keyed_on_the_seed_and_the_record():
    random_options = MediaOptions(transform=None, num_frames=5, frame_sampling="random")
    assert MediaOptions(transform=None, frame_sampling="uniform").frame_rng(0, 1, "a.mp4") is None

    def draws(seed, index, value):
        return sample_frame_indices(40, 5, "random", random_options.frame_rng(seed, index, value))

    first = draws(42, 1, "videos/a.mp4")
    assert draws(42, 1, "videos/a.mp4") == first
    assert all(draws(*key) != first for key in [(43, 1, "videos/a.mp4"), (42, 2, "videos/a.mp4"),
                                                (42, 1, "videos/b.mp4"), (42, "1", "videos/a.mp4")])


def test_options_from_the_config():
    cfg = config_from_dict({"image_res": 28, "vit": {"patch_size": 14, "embed_dim": 8, "depth": 1, "num_heads": 1},
                            "data": {"num_frames": 3, "frame_sampling": "random"}})
    options = MediaOptions.from_config(cfg)
    assert (options.num_frames, options.frame_sampling, options.max_pixels) == (3, "random", MAX_IMAGE_PIXELS)
    assert options.transform(Image.new("RGB", (50, 40))).shape == (3, 28, 28)


def test_kind_inferred_from_the_value():
    from pathlib import Path

    encoded = base64.b64encode(image_bytes(Image.new("RGB", (4, 4)), "PNG")).decode()
    videos = ["clip.mp4", "CLIP.MOV", Path("a/clip.webm"), "frames.json", Path("frames.json"), ["x"], ("x", "y")]
    images = ["cat.jpg", Path("cat.JPEG"), Path("scan.tif"), encoded, "data:image/png;base64," + encoded,
              Image.new("RGB", (4, 4))]
    assert [media_kind(value) for value in videos] == ["video"] * len(videos)
    assert [media_kind(value) for value in images] == ["image"] * len(images)


def test_one_image_as_a_video_and_an_unknown_kind():
    options = MediaOptions(transform=image_transform(28, [0.5] * 3, [0.5] * 3), num_frames=3)
    pixels = load_pixels(Image.new("RGB", (40, 30), (255, 0, 0)), "video", options)
    assert pixels.shape == (3, 3, 28, 28) and torch.equal(pixels[0], pixels[2])
    assert load_pixels(Image.new("RGB", (40, 30)), None, options).shape == (3, 28, 28)
    with pytest.raises(ValueError, match="media kind must be 'image' or 'video', got 'audio'"):
        load_pixels("a.wav", "audio", options)
