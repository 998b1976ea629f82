"""Calibration and held-out images for a text detector (PP-OCRv4 det), rendered from text on the machine.

    python bench/zoo2/text_images.py OUT_DIR [--height 96] [--width 320] [--train 1024] [--test 256] [--seed 0]

A trained text detector fed anything but text lights up almost nothing, so distilling it on other
images trains its students on a blank map. These images are pages of real English: the stdlib
docstring sentences of `sentences.py` (the same sorted, seeded list), drawn in 1-4 lines per image
with the font Pillow ships (`ImageFont.load_default(size)`, Aileron), at seeded sizes, positions,
grey levels and background tints, with mild seeded noise. The held-out images use sentences that no
training image uses. Pixels are normalised as PP-OCR's detector expects (BGR order, ImageNet
mean/std: its `NormalizeImage` with `img_mode: BGR`).

Writes OUT_DIR/text_train.npz and text_test.npz (one array `x`, float32 N x 3 x H x W, H and W
multiples of 32 as DBNet needs) and text_images.json (source, counts, Pillow version).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sentences import sentences  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # RGB order; the channels are then flipped to BGR
STD = np.array([0.229, 0.224, 0.225], np.float32)


def render(texts: list[str], h: int, w: int, rng: random.Random) -> np.ndarray:
    bg = rng.randint(200, 255)
    img = Image.new("RGB", (w, h), tuple(min(255, bg + rng.randint(-15, 15)) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    y = rng.randint(2, 12)
    for text in texts:
        size = rng.randint(12, 22)
        font = ImageFont.load_default(size=size)
        words = text.split()
        start = rng.randint(0, max(0, len(words) - 3))
        line = " ".join(words[start:start + rng.randint(2, 7)])
        x = rng.randint(2, max(2, w // 3))
        ink = rng.randint(0, 80)
        draw.text((x, y), line, fill=(ink, ink, ink), font=font)
        y += size + rng.randint(4, 14)
        if y > h - 14:
            break
    arr = np.asarray(img, np.float32) / 255.0
    arr = arr + np.float32(0.02) * np.asarray(np.random.default_rng(rng.randint(0, 2**31)).standard_normal(arr.shape),
                                              np.float32)
    arr = (np.clip(arr, 0, 1) - MEAN) / STD
    return arr[:, :, ::-1].transpose(2, 0, 1).copy()  # HWC RGB -> CHW BGR


def make(pool: list[str], n: int, h: int, w: int, rng: random.Random) -> np.ndarray:
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        out[i] = render([pool[rng.randrange(len(pool))] for _ in range(rng.randint(1, 4))], h, w, rng)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--train", type=int, default=1024)
    ap.add_argument("--test", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.height % 32 or a.width % 32:
        ap.error("--height and --width must be multiples of 32 (DBNet downsamples by 32)")
    texts = sentences()
    random.Random(a.seed).shuffle(texts)
    held, train = texts[: len(texts) // 5], texts[len(texts) // 5:]
    a.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    np.savez(a.out / "text_train.npz", x=make(train, a.train, a.height, a.width, rng))
    np.savez(a.out / "text_test.npz", x=make(held, a.test, a.height, a.width, rng))
    info = {"source": "CPython stdlib docstring sentences (bench/zoo2/sentences.py), Pillow's bundled font",
            "pillow": PIL.__version__, "python": sys.version.split()[0], "train": a.train, "test": a.test,
            "height": a.height, "width": a.width, "seed": a.seed,
            "sentences_train": len(train), "sentences_held_out": len(held)}
    (a.out / "text_images.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
