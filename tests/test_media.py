"""Media values to pixels (dataset/images.py, dataset/media.py): the forms a record or the Python API may give, and
what happens to media that cannot be used."""
import base64
import io

import pytest
from PIL import Image

from dataset.images import open_image
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
