#!/usr/bin/env python3
"""Reference outputs of HF transformers for several images in one prompt, for
`tests/parity.rs` and `tests/cli.rs` (`two_images_in_one_prompt...`).

`PaliGemmaProcessor(text=[prompt], images=[[astronaut, chelsea]])` expands the prompt to
`"<image>" * 256 * 2 + "<bos>" + prompt + "\\n"` (one block of image tokens per image, in
order) and stacks both images' pixel values; the model encodes each image with SigLIP and puts
the features of image i into block i. On the fixture checkpoint
`tests/fixtures/models/tiny-mqa-f32` (random weights) with `tests/fixtures/images/astronaut.png`
and `chelsea.jpg`, run

    model.generate(..., do_sample=False, max_new_tokens=20, output_logits=True,
                   return_dict_in_generate=True)

and write the prompt ids, the greedy ids and each step's log-probability of the chosen token
and top-5 (ids and log-probabilities) to `tests/fixtures/multi_image.json`. CPU, no network;
versions: `scripts/requirements.txt`.

    scripts/.venv/bin/python scripts/make_multi_image_fixture.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tests/fixtures/models/tiny-mqa-f32"
IMAGES = ["tests/fixtures/images/astronaut.png", "tests/fixtures/images/chelsea.jpg"]
PROMPT = "answer en what differs?"
MAX_NEW = 20
TOP_K = 5


def main() -> None:
    d = ROOT / MODEL
    model = PaliGemmaForConditionalGeneration.from_pretrained(
        str(d), dtype=torch.float32, attn_implementation="eager").eval()
    processor = PaliGemmaProcessor.from_pretrained(str(d))
    images = []
    for path in IMAGES:
        with Image.open(ROOT / path) as im:
            im.load()
            images.append(im.copy())
    inputs = processor(text=[PROMPT], images=[images], return_tensors="pt")
    n_img = processor.image_seq_length
    ids = inputs["input_ids"][0].tolist()
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert ids[: 2 * n_img] == [image_token] * (2 * n_img), "two blocks of image tokens first"
    assert ids[2 * n_img] == processor.tokenizer.bos_token_id, "then <bos>"
    assert inputs["pixel_values"].shape[0] == len(IMAGES), inputs["pixel_values"].shape
    with torch.no_grad():
        g = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW,
                           output_logits=True, return_dict_in_generate=True)
    gen = [int(x) for x in g.sequences[0, len(ids):]]
    lp = torch.log_softmax(torch.stack([x[0] for x in g.logits]).to(torch.float32), dim=-1)
    top = torch.topk(lp, TOP_K, dim=-1)
    out = {
        "generated_by": "scripts/make_multi_image_fixture.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": MODEL,
        "images": IMAGES,
        "prompt": PROMPT,
        "input_ids": ids,
        "gen_ids": gen,
        "gen_logprobs": [float(lp[s, t]) for s, t in enumerate(gen)],
        "gen_top_ids": top.indices.tolist(),
        "gen_top_logprobs": top.values.tolist(),
        "gen_text": processor.tokenizer.decode(gen, skip_special_tokens=True),
    }
    path = ROOT / "tests/fixtures/multi_image.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}: {len(ids)} prompt ids, {len(gen)} generated")


if __name__ == "__main__":
    main()
