#!/usr/bin/env python3
"""Synthetic "shapes" scenes for the tiny trained PaliGemma (issue #7).

Each scene is a 224x224 RGB image on a plain light background with 1-3 non-overlapping
flat-coloured shapes (circle / square / triangle; red / green / blue / yellow; sizes 30-90 px)
and its ground truth: per-shape class, colour and box, the canonical caption (shapes listed
left to right), the count and the PaliGemma-style detection strings.

Everything is deterministic given the seed (`random.Random(seed)` per scene, scene i of a set
uses seed `base_seed * 10**9 + i`, so sets never overlap); drawing uses Pillow `ImageDraw` without anti-aliasing, so
PNGs are flat and compress well.

Usage:
    python scripts/make_scenes.py --out assets/scenes --seed 7 --count 6      # sample PNGs + scenes.json
    python -c "import make_scenes; print(make_scenes.make_scene(1234)[1])"   # as a library

Conventions (as PaliGemma):
  * box = (y_min, x_min, y_max, x_max) in pixels, max edges exclusive (x_max = last column + 1);
  * loc value = min(1023, round(coord / 224 * 1024)); a detection is
    `<locY0><locX0><locY1><locX1> <name>`, several joined by ` ; ` (left to right);
  * caption = "a <colour> <shape>" items, left to right (by box centre x), joined by " and ";
  * count answer = the digit ("1", "2", "3").
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 224
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
BACKGROUNDS = ((245, 245, 240), (240, 240, 245), (250, 248, 235), (236, 240, 236), (248, 242, 242))
MIN_SIDE, MAX_SIDE = 30, 90
GAP = 6  # minimum gap between boxes (px)
MAX_OBJECTS = 3  # shapes per scene: 1 .. MAX_OBJECTS
MIN_DX = 16  # minimum distance between box centres along x (keeps "left to right" unambiguous)


def loc(v: float) -> int:
    return min(1023, max(0, int(round(v / SIZE * 1024))))


def loc_str(box) -> str:
    y0, x0, y1, x1 = box
    return "".join(f"<loc{loc(c):04d}>" for c in (y0, x0, y1, x1))


def _overlaps(a, b) -> bool:
    return not (a[3] + GAP <= b[1] or b[3] + GAP <= a[1] or a[2] + GAP <= b[0] or b[2] + GAP <= a[0])


def scene_seed(base_seed: int, i: int) -> int:
    return base_seed * 1_000_000_000 + i


def sample_objects(rng: random.Random) -> list[dict]:
    while True:
        n = rng.choice(tuple(range(1, MAX_OBJECTS + 1)))
        objs: list[dict] = []
        tries = 0
        while len(objs) < n and tries < 200:
            tries += 1
            side = rng.randint(MIN_SIDE, MAX_SIDE)
            x0 = rng.randint(2, SIZE - 2 - side)
            y0 = rng.randint(2, SIZE - 2 - side)
            box = (y0, x0, y0 + side, x0 + side)
            cx = x0 + side / 2
            if any(_overlaps(box, o["box"]) or abs(cx - o["cx"]) < MIN_DX for o in objs):
                continue
            objs.append({"shape": rng.choice(SHAPES), "colour": rng.choice(tuple(COLOURS)), "box": box, "cx": cx})
        if len(objs) == n:
            objs.sort(key=lambda o: o["cx"])
            return objs


def draw_shape(d: ImageDraw.ImageDraw, o: dict, fill) -> None:
    """Draw object `o` (shape + box) filled with `fill` (an RGB colour, or a label for mode "L")."""
    y0, x0, y1, x1 = o["box"]
    # ImageDraw's right/bottom coordinates are inclusive
    if o["shape"] == "circle":
        d.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif o["shape"] == "square":
        d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:  # upward isosceles triangle filling the box
        d.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)


def draw_scene(objs: list[dict], bg) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(im)
    for o in objs:
        draw_shape(d, o, COLOURS[o["colour"]])
    return im


def patch_labels(gt: dict, patch: int = 14, min_cover: float = 0.15) -> dict[str, list[int]]:
    """Dense per-patch labels of a scene (row-major over the (SIZE / patch)^2 patches), for
    pretraining a vision tower: `shape` (0 = background, 1 + index in SHAPES), `colour`
    (0 = background, 1 + index in COLOURS) and `rank` (0 = background, 1 + the object's index
    left to right). A patch belongs to the object covering most of it, and to the background
    when objects cover less than `min_cover` of it."""
    import numpy as np

    g = SIZE // patch
    out = {}
    for key in ("shape", "colour", "rank"):
        im = Image.new("L", (SIZE, SIZE), 0)
        d = ImageDraw.Draw(im)
        for k, o in enumerate(gt["objects"]):
            v = {"shape": SHAPES.index(o["shape"]), "colour": tuple(COLOURS).index(o["colour"]), "rank": k}[key]
            draw_shape(d, o, v + 1)
        # [patches, pixels of the patch] -> per patch the pixel count of each label
        a = np.asarray(im).reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
        counts = np.stack([(a == v).sum(1) for v in range(1 + max(len(SHAPES), len(COLOURS), MAX_OBJECTS))], 1)
        labels = 1 + counts[:, 1:].argmax(1)
        labels[counts[:, 1:].sum(1) < min_cover * patch * patch] = 0
        out[key] = labels.tolist()
    return out


def caption(objs) -> str:
    return " and ".join(f"a {o['colour']} {o['shape']}" for o in objs)


def detection(objs, shape: str) -> str:
    return " ; ".join(f"{loc_str(o['box'])} {shape}" for o in objs if o["shape"] == shape)


def make_scene(seed: int) -> tuple[Image.Image, dict]:
    """One scene: (image, ground truth dict)."""
    rng = random.Random(seed)
    bg = rng.choice(BACKGROUNDS)
    objs = sample_objects(rng)
    im = draw_scene(objs, bg)
    gt = {
        "seed": seed,
        "width": SIZE,
        "height": SIZE,
        "background": list(bg),
        "objects": [{"shape": o["shape"], "colour": o["colour"], "box": list(o["box"]),
                     "loc": [loc(c) for c in o["box"]]} for o in objs],
        "caption": caption(objs),
        "count": len(objs),
        "detect": {s: detection(objs, s) for s in SHAPES if any(o["shape"] == s for o in objs)},
    }
    return im, gt


def training_examples(gt: dict) -> list[tuple[str, str]]:
    """All (prompt, target) pairs of a scene."""
    ex = [("caption en", gt["caption"]), ("answer en how many shapes?", str(gt["count"]))]
    ex += [(f"detect {s}", t) for s, t in gt["detect"].items()]
    return ex


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/scenes")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--prefix", default="scene")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = []
    for i in range(args.count):
        im, gt = make_scene(scene_seed(args.seed, i))
        name = f"{args.prefix}_{i:03d}.png"
        im.save(out / name, optimize=True)
        meta.append({"file": name, **gt})
    with open(out / "scenes.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {args.count} scenes to {out}")


if __name__ == "__main__":
    main()
