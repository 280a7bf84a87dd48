#!/usr/bin/env python3
"""Generate the mask-decoder fixtures of paligemma-wgpu (tests/fixtures/vae/).

The real decoder weights (big_vision's `vae-oid.npz`) cannot be downloaded here, so this
script writes a decoder with RANDOM weights in the real file layout and records what a
PyTorch reference implementation of the same decoder (and of big_vision's paste-into-box
step) produces for it.

How to run (CPU only, no network):

    python -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt
    .venv/bin/python scripts/make_vae_fixture.py --out tests/fixtures/vae

The output is byte-for-byte reproducible with the pinned versions (torch runs single-threaded,
the zip entries carry a fixed timestamp).

The decoder (PyTorch layout, as big_vision's `evaluators/proj/paligemma/transfers/
segmentation.py` reads it; `.weight` of a Conv2d is [out, in, kh, kw], of a ConvTranspose2d
[in, out, kh, kw]):

    _vq_vae._embedding      [128, D]         codebook; 16 codes -> a 4x4xD grid, row-major
    decoder.0               Conv2d 1x1 D->128, then ReLU
    decoder.2.net.{0,2,4}   residual block: conv3x3 p1, ReLU, conv3x3 p1, ReLU, conv1x1, + input
    decoder.3.net.{0,2,4}   a second residual block
    decoder.4/6/8/10        ConvTranspose2d k4 s2 p1, each then ReLU: 128->128->64->32->16 ch,
                            4 -> 8 -> 16 -> 32 -> 64 px
    decoder.12              Conv2d 1x1 16->1: the 64x64 mask logits

(big_vision runs it in Flax as `ConvTranspose(padding=2, transpose_kernel=True)` on the kernel
transposed to (2, 3, 1, 0), which is the same operator as torch's ConvTranspose2d(k=4, s=2,
p=1).)  D is 512 in the real file; the fixture keeps D = 512 and every real channel count.

Weights: uniform random values QUANTISED to 33 levels per tensor (k/16 * 2^e, k in -16..16),
so that the deflated .npz stays small (~1 MB) while the arrays stay float32 with the real
shapes.  The last bias is chosen so about half of the mask pixels are positive.

What it writes:
  vae-random.npz      the random decoder, float32 arrays, one `<key>.npy` per key (zip64
                      entries, deflated, as numpy's savez_compressed writes them)
  ref_codes.npy       int64 [N, 16]      code sequences
  ref_masks.npy       float32 [N, 64, 64] decoder output for them (computed in float64)
  ref_answer.txt      a model answer with <loc>/<seg> tokens for a 451x300 (WxH) image
  ref_boxes.npy       float32 [M, 4]     its boxes (x_min, y_min, x_max, y_max) in pixels
                      = loc / 1024 * size
  ref_full_masks.npy  uint8 [M, 300, 57] full-image masks by big_vision's evaluator rule (box
                      corners int(y*H), int(x*W); the 64x64 logits resized to the box with
                      PIL.Image.fromarray(float32).resize(BILINEAR); > 0), bits packed along
                      x by np.packbits (most significant bit first)
  README.md
"""

from __future__ import annotations

import argparse
import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from torch import nn

torch.set_num_threads(1)

SEED = 4242
NUM_EMBEDDINGS = 128
EMBED_DIM = 512
HIDDEN = 128
UP_CHANNELS = (128, 64, 32, 16)
LEVELS = 16  # weights are k / LEVELS * 2^e, k in -LEVELS..LEVELS
IMAGE_W, IMAGE_H = 451, 300  # tests/fixtures/images/chelsea.jpg

# (y_min, x_min, y_max, x_max) loc bins, codes, label. The last one is a small box (downscaled
# mask, exercises PIL's antialiased bilinear), the third has no mask.
OBJECTS = [
    ((100, 80, 700, 500), "walk", "cat"),
    ((300, 600, 900, 1000), "rand", "big dog"),
    ((40, 300, 500, 700), None, "box only"),
    ((10, 20, 50, 60), "rev", "tiny thing"),
]


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, c, 1),
        )

    def forward(self, x):
        return x + self.net(x)


class VqVae(nn.Module):
    """Holds the parameters under the real key names; `decode` is the reference."""

    def __init__(self):
        super().__init__()
        self._vq_vae = nn.Module()
        self._vq_vae._embedding = nn.Parameter(torch.zeros(NUM_EMBEDDINGS, EMBED_DIM))
        layers = [nn.Conv2d(EMBED_DIM, HIDDEN, 1), nn.ReLU(), ResBlock(HIDDEN), ResBlock(HIDDEN)]
        cin = HIDDEN
        for cout in UP_CHANNELS:
            layers += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 1))
        self.decoder = nn.Sequential(*layers)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int64 [B, 16] -> mask logits [B, 64, 64]."""
        b = codes.shape[0]
        x = self._vq_vae._embedding[codes.reshape(-1)].reshape(b, 4, 4, -1)
        x = x.permute(0, 3, 1, 2)  # NHWC (big_vision) -> NCHW
        return self.decoder(x)[:, 0]


def quantised(gen: torch.Generator, shape, scale: float) -> torch.Tensor:
    step = 2.0 ** round(math.log2(scale))
    u = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    return torch.round(u * LEVELS) / LEVELS * step


def fan_in(name: str, p: torch.Tensor) -> int:
    if p.dim() == 4 and name.startswith("decoder.") and p.shape[2] == 4:  # ConvTranspose2d
        return p.shape[0] * 4  # each output sees 2x2 taps of every input channel
    return int(np.prod(p.shape[1:])) if p.dim() > 1 else 1


def init(model: VqVae, codes: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(SEED)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if name == "_vq_vae._embedding":
                p.copy_(quantised(gen, p.shape, 1.0))
            elif name.endswith(".weight"):
                gain = 0.5 if ".net.4." in name else math.sqrt(6.0)  # uniform: sqrt(3*2/fan_in)
                p.copy_(quantised(gen, p.shape, gain / math.sqrt(fan_in(name, p))))
            else:
                p.copy_(quantised(gen, p.shape, 0.1))
        # Centre the output: about half of the pixels positive.
        last = model.decoder[12]
        last.bias.zero_()
        out = model.decode(codes)
        spread = float(out.std())
        last.weight.mul_(2.0 ** -round(math.log2(spread)))
        out = model.decode(codes)
        last.bias.fill_(-round(float(out.median()) * 64) / 64)


def write_npz(path: Path, arrays: dict) -> None:
    """Like numpy.savez_compressed, with a fixed timestamp (reproducible bytes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            with zf.open(info, "w", force_zip64=True) as f:
                f.write(buf.getvalue())


def make_codes() -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return np.stack(
        [
            np.arange(16),  # walk
            rng.integers(0, NUM_EMBEDDINGS, 16),  # rand
            127 - np.arange(16) * 3,  # rev
            np.full(16, 7),  # constant
            rng.integers(0, NUM_EMBEDDINGS, 16),
        ]
    ).astype(np.int64)


CODE_NAMES = {"walk": 0, "rand": 1, "rev": 2}


def paste(mask64: np.ndarray, loc) -> np.ndarray:
    """big_vision's evaluator: box in pixels, PIL bilinear resize of the float logits, > 0."""
    full = np.zeros((IMAGE_H, IMAGE_W), np.uint8)
    y1, x1, y2, x2 = (v / 1024 for v in loc)
    y1, x1, y2, x2 = map(int, (y1 * IMAGE_H, x1 * IMAGE_W, y2 * IMAGE_H, x2 * IMAGE_W))
    if y2 > y1 and x2 > x1:
        mi = np.asarray(
            Image.fromarray(mask64.astype(np.float32)).resize([x2 - x1, y2 - y1], resample=Image.BILINEAR)
        )
        full[y1:y2, x1:x2] = mi > 0.0
    return full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/vae"))
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)

    codes = make_codes()
    model = VqVae().double()
    init(model, torch.from_numpy(codes))
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    for k, v in state.items():  # the quantised values are exact in float32
        assert np.array_equal(v.astype(np.float64), model.state_dict()[k].numpy()), k
    write_npz(out / "vae-random.npz", state)

    with torch.no_grad():
        masks = model.decode(torch.from_numpy(codes)).numpy().astype(np.float32)
    np.save(out / "ref_codes.npy", codes)
    np.save(out / "ref_masks.npy", masks)

    pieces, boxes, full = [], [], []
    for loc, code_name, label in OBJECTS:
        text = "".join(f"<loc{v:04d}>" for v in loc)
        y1, x1, y2, x2 = loc
        boxes.append([x1 / 1024 * IMAGE_W, y1 / 1024 * IMAGE_H, x2 / 1024 * IMAGE_W, y2 / 1024 * IMAGE_H])
        if code_name is None:
            full.append(np.zeros((IMAGE_H, IMAGE_W), np.uint8))
        else:
            i = CODE_NAMES[code_name]
            text += "".join(f"<seg{c:03d}>" for c in codes[i])
            full.append(paste(masks[i], loc))
        pieces.append(f"{text} {label}")
    answer = " ; ".join(pieces)
    (out / "ref_answer.txt").write_text(answer + "\n")
    np.save(out / "ref_boxes.npy", np.array(boxes, np.float32))
    np.save(out / "ref_full_masks.npy", np.packbits(np.stack(full), axis=-1))

    positive = [float((m > 0).mean()) for m in masks]
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name != "README.md"}
    versions = {"torch": torch.__version__.split("+")[0], "numpy": np.__version__, "pillow": PIL.__version__}
    readme = f"""# Mask-decoder fixtures

Generated by `scripts/make_vae_fixture.py` (do not edit by hand; rerun
`python scripts/make_vae_fixture.py --out tests/fixtures/vae` with the versions pinned in
`scripts/requirements.txt`; the output is byte-for-byte reproducible).

Versions used: `{json.dumps(versions)}`.

`vae-random.npz` has the key layout and shapes of big_vision's `vae-oid.npz` decoder
(`_vq_vae._embedding` [128, {EMBED_DIM}], `decoder.0`, `decoder.{{2,3}}.net.{{0,2,4}}`,
`decoder.{{4,6,8,10}}` (ConvTranspose2d, weight [in, out, 4, 4]), `decoder.12`; every real
channel count) with seeded random weights quantised to 33 levels per tensor (so the deflated
zip stays small). It has no encoder weights (the real file does; the engine ignores them).

| file | content |
|---|---|
| `vae-random.npz` | float32 weights, zip64 deflated entries `<key>.npy` |
| `ref_codes.npy` | int64 {list(codes.shape)}: code sequences |
| `ref_masks.npy` | float32 {list(masks.shape)}: decoder output (PyTorch, float64, cast to float32); min {masks.min():.3f}, max {masks.max():.3f}, fraction > 0 per mask {[round(p, 3) for p in positive]} |
| `ref_answer.txt` | `{answer}` |
| `ref_boxes.npy` | float32 [{len(boxes)}, 4]: (x_min, y_min, x_max, y_max) = loc / 1024 * (W or H) for a {IMAGE_W}x{IMAGE_H} (WxH) image |
| `ref_full_masks.npy` | uint8 [{len(boxes)}, {IMAGE_H}, {(IMAGE_W + 7) // 8}]: full-image masks, `np.packbits(mask, axis=-1)` (bit 7 of byte 0 is x = 0); box corners `int(y*H)`, `int(x*W)`; the 64x64 logits resized to the box by `PIL.Image.fromarray(float32).resize((w, h), BILINEAR)` (antialiased when shrinking), then `> 0`; all zero for the object without `<seg>` tokens |

## File sizes

| file | bytes |
|---|---|
""" + "".join(f"| `{k}` | {v} |\n" for k, v in sizes.items())
    (out / "README.md").write_text(readme)
    print(json.dumps({"sizes": sizes, "mask_range": [float(masks.min()), float(masks.max())], "positive": positive}))


if __name__ == "__main__":
    main()
