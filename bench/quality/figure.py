"""The demo's comparison figure: one labelled PNG, a band of digits per sampler, one column per prompted digit."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE = 64  # a 16x16 sample drawn 4x (nearest neighbour)
GAP = 4
LABEL_W = 230
HEADER_H = 28
BAND_GAP = 12
BACKGROUND, TEXT, DIM = (40, 40, 48), (235, 235, 235), (160, 160, 170)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tile(pixels: np.ndarray) -> Image.Image:
    grey = np.clip(np.round((np.asarray(pixels, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((TILE, TILE), Image.Resampling.NEAREST).convert("RGB")


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of `text` to lines no wider than `width` pixels in `font`."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            trial = word
        line = trial
    return lines + ([line] if line else [])


def comparison(bands: list[tuple[str, dict | None, np.ndarray]], path: str, note: str = "") -> str:
    """bands: (label, metrics or None, images [10 * k, 16, 16] in [-1, 1], image i prompted with digit i mod 10).

    Each band is k lines of 10 tiles (line j: start noise j), labelled on the left with its name and, when given,
    FD and accuracy. Columns are headed "0".."9": the digit in the prompt "a drawing of <digit>". `note` is printed
    below the bands, wrapped to the figure's width.
    """
    heights = [len(imgs) // 10 * (TILE + GAP) - GAP for _, _, imgs in bands]
    width = LABEL_W + 10 * (TILE + GAP) - GAP + 2 * GAP
    big, small = _font(17), _font(14)
    lines = _wrap(note, small, width - 2 * GAP)
    height = HEADER_H + sum(heights) + BAND_GAP * len(bands) + GAP + 20 * len(lines)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 6), "prompt: a drawing of ...", font=small, fill=DIM)
    for d in range(10):
        draw.text((LABEL_W + d * (TILE + GAP) + TILE // 2 - 5, 4), str(d), font=big, fill=TEXT)
    y = HEADER_H
    for (label, metrics, imgs), h in zip(bands, heights):
        draw.text((GAP, y + 4), label, font=big, fill=TEXT)
        if metrics is not None:
            draw.text((GAP, y + 28), f"FD {metrics['fd']:.1f}, accuracy {100 * metrics['accuracy']:.0f}%",
                      font=small, fill=DIM)
        for i, img in enumerate(imgs):
            line, d = divmod(i, 10)
            canvas.paste(_tile(img), (LABEL_W + d * (TILE + GAP), y + line * (TILE + GAP)))
        y += h + BAND_GAP
    for line in lines:
        draw.text((GAP, y), line, font=small, fill=DIM)
        y += 20
    canvas.save(path, optimize=True)
    return path
