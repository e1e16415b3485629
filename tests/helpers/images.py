"""Digit images as a client sends them to the image preprocessor.

The tests keep their own encoder rather than import ``maas_ray.cli.quickstart.digit_png``
(which the quickstart needs for its demo requests): what the tests send must not change when
the CLI's demo does, and a test helper does not belong in the shipped CLI.
"""

from __future__ import annotations

import base64
import io

import numpy as np


def digit_png_bytes(pixels_0_16, size: int = 32) -> bytes:
    """A scikit-learn digit (8x8, 0..16) as PNG bytes: dark ink on white paper, size x size
    (the served digits models invert encoded images back to ink-is-high)."""
    from PIL import Image

    grey = (255 - np.asarray(pixels_0_16).reshape(8, 8) * 255 / 16).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey, "L").resize((size, size), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def digit_png(pixels_0_16, size: int = 32) -> str:
    """:func:`digit_png_bytes` as base64 text, as JSON bodies carry it."""
    return base64.b64encode(digit_png_bytes(pixels_0_16, size)).decode()
