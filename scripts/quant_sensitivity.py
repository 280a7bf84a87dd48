#!/usr/bin/env python3
"""How sensitive a PaliGemma checkpoint's logits are to small weight errors (issue #6).

Weight quantisation is a small relative error on every weight matrix. Whether it changes the
greedy tokens depends less on the quantiser than on how much the model amplifies such errors.
This script measures that amplification with HF transformers (float32, CPU):

  1. greedy-generate 20 tokens for each (image, prompt) pair;
  2. run the model teacher-forced on that sequence, once as is and once with every weight
     matrix (2-D linear / embedding weights and the 4-D patch convolution) perturbed by
     Gaussian noise of `--rel` (default 1 %) of that matrix's own standard deviation;
  3. report, per pair, rel = std(logit change) / std(logits) and the largest logit change.

A trained model moves its logits by about as much as its weights (rel ~ 0.01 for 1 % noise);
the random parity fixtures (scripts/make_fixtures.py, whose o_proj / down_proj init gains are
32x, chosen for clear margins in parity tests) move them more than ten times as much, which
is why tests/quant.rs measures int8 / int4 agreement on both.

Run:  /opt/pgvenv/bin/python scripts/quant_sensitivity.py            (fixtures + tiny-shapes)
      python scripts/quant_sensitivity.py --model DIR --image PNG --prompt "caption en"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def teacher_forced_logits(model, enc, full):
    import torch

    n_prompt = enc["input_ids"].shape[1]
    types = torch.cat([torch.zeros_like(enc["input_ids"]),
                       torch.ones(1, full.shape[1] - n_prompt, dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = model(input_ids=full, pixel_values=enc["pixel_values"], attention_mask=torch.ones_like(full),
                    token_type_ids=types)
    return out.logits[0, n_prompt - 1:-1]


def sensitivity(model, processor, image, prompt: str, rel: float, seed: int, steps: int = 20) -> dict:
    import torch

    enc = processor(text=prompt, images=image, return_tensors="pt")
    with torch.no_grad():
        full = model.generate(**enc, do_sample=False, max_new_tokens=steps)
    base = teacher_forced_logits(model, enc, full)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() in (2, 4):
                p.add_(torch.randn(p.shape, generator=g) * p.std() * rel)
    pert = teacher_forced_logits(model, enc, full)
    model.load_state_dict(saved)
    d = pert - base
    return {"prompt": prompt, "steps": int(base.shape[0]), "rel": round(float(d.std() / base.std()), 4),
            "max_abs": round(float(d.abs().max()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="checkpoint directory (repeatable; default: the fixtures "
                                                     "and assets/tiny-shapes)")
    ap.add_argument("--image", default=None, help="image for --model (default: per model, see below)")
    ap.add_argument("--prompt", default="caption en")
    ap.add_argument("--rel", type=float, default=0.01, help="noise std relative to each matrix's std")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    import transformers
    from PIL import Image
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    fixtures = ROOT / "tests/fixtures"
    if args.model:
        runs = [(Path(m), [(Image.open(args.image).convert("RGB"), args.prompt)]) for m in args.model]
    else:
        import make_scenes

        photos = [(Image.open(fixtures / "images/astronaut.png").convert("RGB"), "caption en"),
                  (Image.open(fixtures / "images/chelsea.jpg").convert("RGB"), "answer en what is in the image?")]
        scenes = [(make_scenes.make_scene(make_scenes.scene_seed(2, i))[0], p)
                  for i in range(2) for p in ("caption en", "detect circle")]
        runs = [(fixtures / "models" / m, photos) for m in ("tiny-mqa-f32", "tiny-gqa-bf16", "tiny-mha-f32-v5")]
        runs.append((ROOT / "assets/tiny-shapes", scenes))
    for path, pairs in runs:
        model = PaliGemmaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
        processor = PaliGemmaProcessor.from_pretrained(str(path))
        rows = [sensitivity(model, processor, im, p, args.rel, args.seed) for im, p in pairs]
        print(json.dumps({"model": path.name, "noise": args.rel, "pairs": rows}), flush=True)


if __name__ == "__main__":
    main()
