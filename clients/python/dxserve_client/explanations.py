"""Explanation overlays for people: the server's overlay with a legend under it."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont, ImageOps

#: The server's colour scale for heatmaps (dxserve.images.heatmap_pngs): blue (0) - yellow - red (1).
SCALE = {"black": "blue", "mid": "yellow", "white": "red"}


def with_legend(overlay_png: bytes, caption: str) -> bytes:
    """The overlay PNG with a strip below it: `caption` (which label it explains, and how) and
    the colour scale from "less" (blue) to "drove the score most" (red)."""
    with Image.open(io.BytesIO(overlay_png)) as image:
        overlay = image.convert("RGB")
    font = ImageFont.load_default()
    width = max(overlay.width, 320)
    line = 14
    strip = Image.new("RGB", (width, 4 * line + 8), "white")
    draw = ImageDraw.Draw(strip)
    draw.text((4, 2), caption, fill="black", font=font)
    ramp = Image.linear_gradient("L").rotate(90, expand=True).resize((width - 8, line))
    strip.paste(ImageOps.colorize(ramp, **SCALE), (4, line + 4))
    draw.text((4, 2 * line + 6), "less", fill="black", font=font)
    right = "drove the score most"
    draw.text((width - 4 - draw.textlength(right, font=font), 2 * line + 6), right, fill="black", font=font)
    out = Image.new("RGB", (width, overlay.height + strip.height), "white")
    out.paste(overlay, (0, 0))
    out.paste(strip, (0, overlay.height))
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()
