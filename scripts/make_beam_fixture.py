#!/usr/bin/env python3
"""Beam-search reference outputs of HF transformers for `tests/beam.rs`.

For the fixture checkpoints `tests/fixtures/models/tiny-mqa-f32`, `tiny-gqa-bf16` and
`tiny-pg2-f32` (PaliGemma 2) (random weights; inputs: the `ref/<img>_input_ids.npy` and
`ref/<img>_pixel_values.npy` the parity fixtures already hold) and the trained `assets/tiny-shapes` (inputs: its own processor on
`assets/scenes/scene_00N.png`), run

    model.generate(..., do_sample=False, num_beams=N, max_new_tokens=20, length_penalty=L,
                   early_stopping=E, output_scores=True, return_dict_in_generate=True)

for several (N, L, E) and write the generated ids (after the prompt, padding cropped) and
`sequences_scores[0]` to `tests/fixtures/beam.json`. Versions: `scripts/requirements.txt`.

    scripts/.venv/bin/python scripts/make_beam_fixture.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 20
# (num_beams, length_penalty, early_stopping)
SETTINGS = [(3, 1.0, False), (4, 1.0, False), (3, 0.5, True), (4, 2.0, "never")]
FIXTURE_MODELS = ["tiny-mqa-f32", "tiny-gqa-bf16", "tiny-pg2-f32"]
FIXTURE_IMAGES = ["astronaut", "chelsea"]
SHAPES_CASES = [(0, "caption en"), (3, "detect circle"), (5, "answer en how many shapes?")]


def load(d: Path):
    return PaliGemmaForConditionalGeneration.from_pretrained(
        str(d), dtype=torch.float32, attn_implementation="eager").eval()


def beam(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, n, lp, es) -> dict:
    with torch.no_grad():
        g = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            token_type_ids=torch.zeros_like(input_ids),
            pixel_values=pixel_values,
            do_sample=False, num_beams=n, max_new_tokens=MAX_NEW, length_penalty=lp,
            early_stopping=es, output_scores=True, return_dict_in_generate=True)
    t = input_ids.shape[1]
    ids = [int(x) for x in g.sequences[0, t:]]
    return {"num_beams": n, "length_penalty": lp, "early_stopping": es,
            "ids": ids, "score": float(g.sequences_scores[0])}


def main() -> None:
    torch.manual_seed(0)
    cases = []
    for name in FIXTURE_MODELS:
        d = ROOT / "tests/fixtures/models" / name
        model = load(d)
        for img in FIXTURE_IMAGES:
            ids = torch.from_numpy(np.load(d / f"ref/{img}_input_ids.npy")).reshape(1, -1)
            px = torch.from_numpy(np.load(d / f"ref/{img}_pixel_values.npy"))
            px = px.reshape(1, *px.shape[-3:])
            for n, lp, es in SETTINGS:
                c = beam(model, ids, px, n, lp, es)
                cases.append({"model": f"tests/fixtures/models/{name}",
                              "pixels": f"ref/{img}_pixel_values.npy",
                              "input_ids": f"ref/{img}_input_ids.npy", **c})
    d = ROOT / "assets/tiny-shapes"
    model = load(d)
    processor = PaliGemmaProcessor.from_pretrained(str(d))
    for scene, prompt in SHAPES_CASES:
        path = f"assets/scenes/scene_{scene:03}.png"
        with Image.open(ROOT / path) as im:
            inputs = processor(text=prompt, images=im.convert("RGB"), return_tensors="pt")
        for n, lp, es in SETTINGS:
            c = beam(model, inputs["input_ids"], inputs["pixel_values"], n, lp, es)
            cases.append({"model": "assets/tiny-shapes", "image": path, "prompt": prompt, **c})
    out = {
        "generated_by": "scripts/make_beam_fixture.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "max_new_tokens": MAX_NEW,
        "cases": cases,
    }
    path = ROOT / "tests/fixtures/beam.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
