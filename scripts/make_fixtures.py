#!/usr/bin/env python3
"""Generate the test fixtures of paligemma-wgpu (images, pixel values, a tokenizer,
three tiny random PaliGemma checkpoints and their HF reference outputs).

How to run (CPU only, no network; everything is built locally):

    python -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt
    .venv/bin/python scripts/make_fixtures.py --out tests/fixtures

Options:
    --out DIR         output directory (default: tests/fixtures)
    --search-seeds    re-run the model seed search instead of using the pinned SEEDS
                      below (prints the seeds it finds; paste them into SEEDS)

The script is deterministic: rerunning it with the pinned versions of
scripts/requirements.txt (torch 2.9.1, transformers 5.24.0, Pillow 13.0.0 with its
bundled zlib/libjpeg-turbo, ...) rewrites every file byte-for-byte identically.
Torch runs single-threaded for that reason.  Different library versions may change
the last bits of floats (or JPEG/PNG bytes) but not the semantics.

What it writes (see tests/fixtures/README.md, which this script also writes):
  images/            source images + broken files for error tests
  pixels/            SiglipImageProcessor pixel_values (.npy, float32, [3,H,W])
  models/<name>/     tiny random PaliGemma checkpoints (HF layout) + tokenizer
  models/<name>/ref/ reference activations / logits / greedy generations (.npy)

scripts/make_fixtures_v2.py (run after this script) imports the helpers below and adds a
PaliGemma 2 model, a 448-px model and a LoRA adapter; this script leaves those files alone.

Weight init: the default HF init (std 0.02) yields near-uniform logits, so every
parameter is re-initialised with larger scales (see `reinit`) and then ROUNDED to
float16-representable values (float32 checkpoints) or to bfloat16 (bf16 checkpoint),
so an engine that stores weights in f16 loses nothing and parity measures arithmetic
only.  References are always computed in float32 from the rounded weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import string
import struct
import tempfile
import zlib
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import safetensors  # noqa: E402
import skimage  # noqa: E402
import skimage.data  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
)

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# ----------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------

SP = "\u2581"  # sentencepiece space "▁"

# Pinned model seeds (found with --search-seeds; see search criteria in `search_seed`).
SEEDS = {
    "tiny-mqa-f32": 1073,
    "tiny-gqa-bf16": 2097,
    "tiny-mha-f32-v5": 3060,
}
SEED_SEARCH_START = {"tiny-mqa-f32": 1000, "tiny-gqa-bf16": 2000, "tiny-mha-f32-v5": 3000}
SEED_SEARCH_TRIES = 100
MIN_MARGIN_REQUIRED = 0.05  # hard requirement (asserted)
MIN_DISTINCT = 6  # seed search: each 20-token generation must contain >= 6 distinct ids

NUM_NEW_TOKENS = 20
TOP_K = 5
IMAGE_SIZE = 224
PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 256

# (image name, prompt) pairs run through every model
PAIRS = [("astronaut", "caption en"), ("chelsea", "answer en what is in the image?")]

MODEL_SPECS = {
    "tiny-mqa-f32": dict(
        vision=dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96),
        text=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                  num_hidden_layers=2, intermediate_size=128),
        dtype="float32", layout="published", shards=1, config_style="published-sparse",
    ),
    "tiny-gqa-bf16": dict(
        vision=dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=3, intermediate_size=64),
        text=dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                  num_hidden_layers=3, intermediate_size=192),
        dtype="bfloat16", layout="published", shards=3, config_style="published-explicit",
    ),
    "tiny-mha-f32-v5": dict(
        vision=dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64),
        text=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                  num_hidden_layers=2, intermediate_size=128),
        dtype="float32", layout="transformers5", shards=1, config_style="transformers5",
    ),
}

# ----------------------------------------------------------------------------------------
# Tokenizer training corpus (captions / questions / answers about photos)
# ----------------------------------------------------------------------------------------

CORPUS = """\
a photo of an astronaut in a white space suit
an astronaut holding a helmet in front of a flag
a woman in a space suit smiling at the camera
the astronaut is standing next to the american flag
a portrait of a smiling astronaut with a patch on her arm
a close up photo of a cat lying on a red blanket
a small tabby cat with green eyes looking to the left
the cat is resting on a soft brown sofa
an orange and brown cat with long white whiskers
a cat sitting by the window in the afternoon sun
a black and white photo of a man with a camera
a photographer standing on a lawn with a tripod
a man in a dark coat looking through a camera
an old film camera on a tripod in a park
a cup of coffee on a white saucer
a cup of black coffee on a wooden table
a mug of hot coffee next to a spoon
a latte with a heart drawn in the foam
two people walking on the beach at sunset
a dog running across a green field
a brown dog playing with a red ball in the grass
a child riding a bicycle down the street
a red car parked in front of a house
a bus driving on a busy city street
a train crossing a bridge over a river
a plane flying over the mountains
a boat sailing on a calm blue lake
a group of people sitting around a table
a plate of pasta with tomato sauce and basil
a bowl of fresh fruit on the kitchen counter
a slice of pizza with cheese and mushrooms
a stack of books on a wooden shelf
a laptop computer on a desk next to a lamp
a bird perched on a branch of a tree
a flock of birds flying over the water
a horse standing in a field of tall grass
a cow grazing on a hill under a cloudy sky
a bowl of soup with bread on the side
a city skyline at night with bright lights
a snowy mountain under a clear blue sky
a tall building with many windows
a wooden bench in a quiet park
a street sign at the corner of two roads
a woman reading a book on a train
a man riding a horse on a dirt road
a young girl holding a yellow umbrella in the rain
a bunch of bananas hanging from a hook
a pair of shoes on the floor
a clock on the wall above the door
a vase of flowers on a dining table
a sandwich cut in half on a plate
a kitchen with white cabinets and a gas stove
a bathroom with a sink and a large mirror
a bedroom with a bed and two pillows
a living room with a couch and a television
a tennis player swinging a racket on the court
a skateboarder doing a trick on a ramp
a surfer riding a big wave in the ocean
a baseball player throwing a ball
a soccer ball on the grass near the goal
an elephant walking through the dry grass
a giraffe eating leaves from a tall tree
a zebra standing next to a pond
a bear sitting on a rock near the river
a sheep and a lamb in a green meadow
a fire hydrant on the side of the road
a traffic light turning red at an intersection
a stop sign covered with snow
a motorcycle parked on the sidewalk
a truck carrying wood on the highway
a pizza in a box on the table
a cake with candles on a birthday party table
a donut with pink frosting and sprinkles
a teddy bear sitting on a chair
a kite flying high in the sky over the beach
a pair of scissors on a sheet of paper
a toothbrush in a cup by the sink
a refrigerator with pictures on the door
a microwave on the kitchen counter
a potted plant on the window sill
what is in the image?
what is the cat doing?
what color is the cup?
what is the man holding?
what is the woman wearing?
where is the dog?
how many people are in the picture?
how many birds are on the branch?
is there a car in the image?
is the sky clear or cloudy?
what time of day is it?
what animal is this?
what is on the table?
what is the weather like?
who is standing next to the flag?
why is the man holding a camera?
what is the color of the suit?
is the cat awake or asleep?
what kind of coffee is this?
which direction is the cat looking?
does the astronaut have a helmet?
are there any trees in the background?
what is written on the sign?
what is the name of the street?
how old is the child?
caption en
caption es
caption fr
caption de
answer en what is in the image?
answer en what color is the car?
answer en how many cats are there?
answer en where is the person standing?
answer en is this a photo of a cat?
question en a cat lying on a blanket
describe en
ocr
detect cat
detect dog ; person
detect astronaut ; flag
segment cat
segment the person on the left
yes
no
two
three
four
red
blue
green
white
black
brown
yellow
the cat
a cat
the dog
a person
an astronaut
a cup of coffee
in the kitchen
on the table
on the sofa
in the park
at the beach
the image shows a cat lying on a blanket
the image shows an astronaut in a space suit
the picture shows a man with a camera
the photo was taken outdoors on a sunny day
the photo was taken indoors under warm light
there are two people in the picture
there is a cat on the sofa
there is a cup of coffee on the table
the background is dark and blurry
the colors in this image are bright and warm
this is a black and white photograph
this is a photograph of a domestic cat
this is a portrait of a woman
the man is wearing a long coat and a hat
the woman is wearing a white suit with patches
the cat has stripes on its back and its head
the coffee is served in a white cup with a saucer
the flag has red and white stripes and white stars on blue
the sky is blue with a few white clouds
the grass is green and freshly cut
the water is calm and clear
the room is clean and quiet
the street is crowded with people and cars
the train is leaving the station
the food looks fresh and delicious
the animal is looking at the camera
the person is smiling at the camera
the scene is peaceful and calm
the light comes from the window on the right
a close up view of the face
a wide view of the landscape
a blurry photo taken at night
a sharp photo with a lot of detail
a simple drawing of a house and a tree
a painting of a ship on a stormy sea
a map of the city with many streets
a screenshot of a web page with text
a chart showing numbers over time
a table with rows and columns of numbers
a menu with prices and pictures of food
a receipt from a small coffee shop
a page from a book with small print
a poster for a music festival in the summer
a sign that says open on the door of a shop
the quick brown fox jumps over the lazy dog
one two three four five six seven eight nine ten
monday tuesday wednesday thursday friday saturday sunday
january february march april may june july august
north south east west left right up down
small medium large very big tiny huge
first second third last next previous
morning afternoon evening night today tomorrow
Photo taken in 2019 by NASA.
The Cat, the Dog and the Bird.
Coffee: 2 cups, 1 spoon, 3 cookies.
A man (left) and a woman (right).
Q: What is this? A: A cat.
"""

_SUBJECTS = ["a cat", "a dog", "an astronaut", "a man", "a woman", "a child", "a bird", "a horse",
             "a photographer", "a cup of coffee", "two cats", "a red car"]
_PLACES = ["on a sofa", "in a park", "next to a window", "on a table", "in the snow", "at the beach",
           "on a street", "under a tree", "in a kitchen", "near a river"]


def corpus_lines() -> list[str]:
    lines = [ln for ln in CORPUS.splitlines() if ln]
    lines += [f"{s} {p}" for s in _SUBJECTS for p in _PLACES]
    lines += [f"answer en where is {s}?" for s in _SUBJECTS]
    lines += [f"detect {s.split()[-1]}" for s in _SUBJECTS]
    return lines


# ----------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------


def save_npy(path: Path, arr: np.ndarray) -> None:
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        arr = arr.astype("<f4")
    elif arr.dtype.kind in "iu":
        arr = arr.astype("<i8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


# ----------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------


def make_images(out: Path) -> None:
    d = out / "images"
    d.mkdir(parents=True, exist_ok=True)
    skdata = Path(skimage.data.__file__).parent

    # astronaut.png / camera.png: scikit-image's bundled files, copied verbatim (they keep
    # their ancillary chunks: iCCP/pHYs/tEXt for astronaut, pHYs for camera).
    shutil.copyfile(skdata / "astronaut.png", d / "astronaut.png")
    shutil.copyfile(skdata / "camera.png", d / "camera.png")
    with Image.open(d / "astronaut.png") as im:
        assert im.mode == "RGB" and im.size == (512, 512)
        assert np.array_equal(np.asarray(im), skimage.data.astronaut())
    with Image.open(d / "camera.png") as im:
        assert im.mode == "L" and im.size == (512, 512)
        assert np.array_equal(np.asarray(im), skimage.data.camera())

    # chelsea.jpg: re-encoded as baseline JPEG, quality 95 (Pillow defaults otherwise: 4:2:0)
    Image.fromarray(skimage.data.chelsea()).save(d / "chelsea.jpg", format="JPEG", quality=95)
    with Image.open(d / "chelsea.jpg") as im:
        assert im.mode == "RGB" and im.size == (451, 300)

    # rgba.png: 200x120 crop of coffee with a varying alpha channel
    coffee = skimage.data.coffee()  # (400, 600, 3)
    crop = coffee[140:260, 200:400]  # (120, 200, 3)
    yy, xx = np.mgrid[0:120, 0:200].astype(np.float64)
    alpha = 255.0 * (xx / 199.0) * (0.5 + 0.5 * np.cos(yy / 119.0 * np.pi))  # 0 .. 255
    alpha[:, :20] = 0.0  # fully transparent strip on the left
    alpha[:10, 180:] = 255.0  # fully opaque block top-right
    alpha = np.clip(np.rint(alpha), 0, 255).astype(np.uint8)
    rgba = np.concatenate([crop, alpha[..., None]], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(d / "rgba.png", format="PNG")
    with Image.open(d / "rgba.png") as im:
        assert im.mode == "RGBA" and im.size == (200, 120)

    # broken / hostile files
    (d / "not_an_image.png").write_bytes(b"hello")
    (d / "truncated.png").write_bytes((d / "astronaut.png").read_bytes()[:1000])
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)  # 30000x30000 RGB 8-bit
    idat = zlib.compress(b"\x00" * 16, 9)
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    (d / "huge_header.png").write_bytes(bomb)


# ----------------------------------------------------------------------------------------
# Image processor / pixel values
# ----------------------------------------------------------------------------------------


def make_image_processor(size: int = IMAGE_SIZE) -> SiglipImageProcessorPil:
    # transformers 5: `SiglipImageProcessor` is the torchvision backend and silently falls back to
    # `SiglipImageProcessorPil` when torchvision is missing.  We use the PIL backend explicitly so the
    # result does not depend on whether torchvision happens to be installed.  The PIL backend is the
    # classic (transformers 4 "slow") pipeline: convert_rgb (alpha composited over WHITE) -> PIL
    # bicubic resize of the uint8 image -> float64 *1/255 -> float32 -> (x-0.5)/0.5, CHW.
    return SiglipImageProcessorPil(
        do_resize=True,
        size={"height": size, "width": size},
        resample=3,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        image_seq_length=(size // PATCH_SIZE) ** 2,
    )


def load_image(out: Path, name: str) -> Image.Image:
    ext = {"chelsea": "jpg"}.get(name, "png")
    return Image.open(out / "images" / f"{name}.{ext}")


def make_pixels(out: Path) -> dict[str, np.ndarray]:
    res = {}
    for size in (224, 448):
        ip = make_image_processor(size)
        names = ["astronaut", "chelsea", "camera", "rgba"] if size == 224 else ["astronaut"]
        for name in names:
            with load_image(out, name) as im:
                pv = ip(images=im, return_tensors="np")["pixel_values"]
            assert pv.shape == (1, 3, size, size) and pv.dtype == np.float32, (pv.shape, pv.dtype)
            save_npy(out / "pixels" / f"{name}_{size}.npy", pv[0])
            res[f"{name}_{size}"] = pv[0]
    return res


# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------

BASE_VOCAB = 1024  # ids [0, 1024) = specials + byte tokens + "\n" + trained BPE tokens
HEAD_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]


def build_tokenizer() -> tuple[Tokenizer, dict]:
    head = HEAD_TOKENS + [f"<0x{i:02X}>" for i in range(256)] + ["\n"]
    n_train = BASE_VOCAB - len(head)

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", SP)
    # training only: split before every "▁" so merges never cross words (like sentencepiece)
    trainer_tok.pre_tokenizer = pre_tokenizers.Split(SP, behavior="merged_with_next")
    alphabet = [c for c in string.printable if c.isprintable() and c != " "]
    trainer = trainers.BpeTrainer(vocab_size=n_train, min_frequency=1, show_progress=False,
                                  initial_alphabet=alphabet, limit_alphabet=1000)
    trainer_tok.train_from_iterator(corpus_lines(), trainer=trainer)
    tj = json.loads(trainer_tok.to_str())
    trained_vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    assert len(trained_vocab) == n_train, (len(trained_vocab), n_train)

    vocab: dict[str, int] = {}
    for t in head:
        vocab[t] = len(vocab)
    for t, _ in sorted(trained_vocab.items(), key=lambda kv: kv[1]):
        assert t not in vocab, t
        vocab[t] = len(vocab)
    assert len(vocab) == BASE_VOCAB
    for t in LOC_TOKENS + SEG_TOKENS + ["<image>"]:
        vocab[t] = len(vocab)
    n_unused = (-len(vocab)) % 64
    unused = [f"<unused{i}>" for i in range(n_unused)]
    for t in unused:
        vocab[t] = len(vocab)
    assert len(vocab) % 64 == 0

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SP)
    tok.decoder = decoders.Sequence([decoders.Replace(SP, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])])
    added = [AddedToken(t, special=True, normalized=False) for t in HEAD_TOKENS]
    added += [AddedToken(t, special=False, normalized=False) for t in LOC_TOKENS + SEG_TOKENS]
    added += [AddedToken("<image>", special=True, normalized=False)]
    added += [AddedToken(t, special=True, normalized=False) for t in unused]
    tok.add_tokens(added)
    assert tok.get_vocab_size() == len(vocab)

    info = {
        "vocab_size": len(vocab),
        "pad": vocab["<pad>"], "eos": vocab["<eos>"], "bos": vocab["<bos>"], "unk": vocab["<unk>"],
        "mask": vocab["<mask>"], "byte_0x00": vocab["<0x00>"], "newline": vocab["\n"],
        "first_trained": len(head), "loc0000": vocab["<loc0000>"], "loc1023": vocab["<loc1023>"],
        "seg000": vocab["<seg000>"], "seg127": vocab["<seg127>"], "image": vocab["<image>"],
        "first_unused": vocab[unused[0]] if unused else None, "num_unused": n_unused,
        "num_merges": len(merges),
    }
    return tok, info


def tokenizer_config(info: dict) -> dict:
    """tokenizer_config.json in the style of the published PaliGemma repos (transformers 4.x)."""
    tok_json = json.loads(_TOKENIZER.to_str())
    added_dec = {}
    for a in tok_json["added_tokens"]:
        added_dec[str(a["id"])] = {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added_dec,
        "additional_special_tokens": ["<image>"],
        "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "mask_token": "<mask>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "processor_class": "PaliGemmaProcessor",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def special_tokens_map() -> dict:
    def tok(t):
        return {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        "additional_special_tokens": [tok("<image>")],
        "bos_token": tok("<bos>"),
        "eos_token": tok("<eos>"),
        "mask_token": tok("<mask>"),
        "pad_token": tok("<pad>"),
        "unk_token": tok("<unk>"),
    }


def preprocessor_config() -> dict:
    """preprocessor_config.json as published PaliGemma repos have it (flat, transformers 4.x style)."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_seq_length": NUM_IMAGE_TOKENS,
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "PaliGemmaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    }


_TOKENIZER: Tokenizer | None = None
_TOKINFO: dict | None = None


def write_tokenizer_files(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    write_text(d / "tokenizer.json", _TOKENIZER.to_str(pretty=True) + "\n")
    write_json(d / "tokenizer_config.json", tokenizer_config(_TOKINFO))
    write_json(d / "special_tokens_map.json", special_tokens_map())


def check_tokenizer_dir(d: Path) -> None:
    """The HF side must see exactly the tokenizer the raw `tokenizers` file describes."""
    hf = AutoTokenizer.from_pretrained(str(d))
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert len(hf) == _TOKINFO["vocab_size"], (len(hf), _TOKINFO["vocab_size"])
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id) == (0, 1, 2)
    samples = ["caption en", "answer en what is in the image?", "Café, 42 cats! <loc0012><seg003> done\n",
               "<image><image><bos>detect cat ; dog\n", "  two  spaces\tand tab", "emoji \U0001F600 ok"]
    for s in samples:
        a = hf(s, add_special_tokens=False)["input_ids"]
        b = raw.encode(s, add_special_tokens=False).ids
        assert a == b, (s, a, b)
        assert hf.decode(a, skip_special_tokens=True) == raw.decode(b, skip_special_tokens=True)
        assert hf(s)["input_ids"] == [2] + a  # add_bos_token=True like the published tokenizer
    # loc/seg survive skip_special_tokens, <image>/<bos> do not
    ids = raw.encode("<image><bos>a cat<loc0001><seg127>\n", add_special_tokens=False).ids
    txt = hf.decode(ids, skip_special_tokens=True)
    assert txt == "a cat<loc0001><seg127>\n", repr(txt)


TOKENIZER_CASES = [
    "caption en",
    "answer en what is in the image?",
    "<image><image><bos>caption en\n",
    "detect cat ; dog",
    "segment the person on the left",
    "<loc0000><loc0512><loc1023><loc0999> cat ; <seg000><seg127> dog",
    "The Quick Brown Fox, 2019!",
    "Café crème brûlée",
    "emoji \U0001F600 and \u4e2d\u6587",
    " leading space",
    "two  spaces and trailing space ",
    "tab\tand\nnewline\n\n",
    "",
    "\n",
    "<bos>literal specials<eos><pad><unk><mask><unused7>",
    "not a token: <loc10000> <seg128> <image",
]


def make_tokenizer_cases(out: Path, hf_tok) -> None:
    """Encode/decode cases for the engine's tokenizer tests (checked against the HF tokenizer)."""
    cases = []
    for text in TOKENIZER_CASES:
        enc = _TOKENIZER.encode(text, add_special_tokens=False)
        ids = enc.ids
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, text
        with_bos = _TOKENIZER.encode(text, add_special_tokens=True).ids
        assert with_bos == [_TOKINFO["bos"]] + ids
        dec = _TOKENIZER.decode(ids, skip_special_tokens=True)
        dec_all = _TOKENIZER.decode(ids, skip_special_tokens=False)
        assert hf_tok.decode(ids, skip_special_tokens=True) == dec
        cases.append({"text": text, "ids": ids, "tokens": enc.tokens,
                      "decode_skip_special": dec, "decode_keep_special": dec_all})
    # decode-only cases: byte-fallback tokens that do / do not form valid UTF-8
    b = _TOKINFO["byte_0x00"]
    decode_only = [
        [b + 0xC3, b + 0xA9],  # "é"
        [b + 0xC3],  # lone lead byte -> U+FFFD
        [b + 0xA9, b + 0xC3],  # bytes in the wrong order
        [b + 0xF0, b + 0x9F, b + 0x98, b + 0x80],  # U+1F600
        [_TOKINFO["bos"], _TOKINFO["image"], _TOKINFO["loc0000"], _TOKINFO["newline"], _TOKINFO["eos"],
         _TOKINFO["first_unused"]],
    ]
    dcases = []
    for ids in decode_only:
        dec = _TOKENIZER.decode(ids, skip_special_tokens=True)
        assert hf_tok.decode(ids, skip_special_tokens=True) == dec
        dcases.append({"ids": ids, "decode_skip_special": dec,
                       "decode_keep_special": _TOKENIZER.decode(ids, skip_special_tokens=False)})
    write_json(out / "tokenizer_cases.json", {
        "note": "ids = tokenizer.json encode(text, add_special_tokens=False); with add_special_tokens=True "
                "the post-processor prepends <bos> (id 2). decode uses the tokenizer.json decoder.",
        "encode": cases, "decode": dcases})


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------


def make_config(spec: dict) -> PaliGemmaConfig:
    v, t = spec["vision"], spec["text"]
    vocab = _TOKINFO["vocab_size"]
    return PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model", image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
            num_channels=3, vision_use_head=False, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, **v),
        text_config=dict(
            model_type="gemma", vocab_size=vocab, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6,
            max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1, **t),
        image_token_index=_TOKINFO["image"], vocab_size=vocab, projection_dim=t["hidden_size"],
        hidden_size=t["hidden_size"], pad_token_id=0, bos_token_id=2, eos_token_id=1,
        tie_word_embeddings=True, attn_implementation="eager",
    )


# init gains (see module docstring); chosen so that the residual stream, which starts at
# rms ~sqrt(hidden) because Gemma scales embeddings by sqrt(hidden), is actually changed by the
# layers (otherwise the tied lm_head just predicts the current token again and again).
GAIN_QK = 2.0  # sharper attention
GAIN_RESID_OUT = 32.0  # o_proj / down_proj (text)


@torch.no_grad()
def reinit(model: PaliGemmaForConditionalGeneration, seed: int, round_to: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std + mean

    # deterministic order: sorted parameter names
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name == "lm_head.weight":
            continue  # tied to the embedding
        shape = p.shape
        if name.endswith("embed_tokens.weight"):
            new = normal(shape, 1.0)
        elif name.endswith("position_embedding.weight"):
            new = normal(shape, 0.5)
        elif "patch_embedding.weight" in name:
            fan_in = shape[1] * shape[2] * shape[3]
            new = normal(shape, 1.0 / math.sqrt(fan_in))
        elif "language_model" in name and ("layernorm" in name or name.endswith("norm.weight")):
            new = normal(shape, 0.1)  # Gemma RMSNorm computes x * (1 + w): identity is w = 0
        elif "layer_norm" in name or "layernorm" in name:
            new = normal(shape, 0.1, 1.0) if name.endswith("weight") else normal(shape, 0.05)
        elif name.endswith("bias"):
            new = normal(shape, 0.05)
        elif name.endswith("weight") and p.dim() == 2:
            fan_in = shape[1]
            gain = 1.0
            if "language_model" in name:
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    gain = GAIN_QK
                elif name.endswith(("o_proj.weight", "down_proj.weight")):
                    gain = GAIN_RESID_OUT
            elif "vision_tower" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                gain = GAIN_QK
            new = normal(shape, gain / math.sqrt(fan_in))
        else:
            raise AssertionError(f"no init rule for {name} {tuple(shape)}")
        p.copy_(new.to(round_to).to(torch.float32))
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def build_model(name: str, seed: int) -> PaliGemmaForConditionalGeneration:
    spec = MODEL_SPECS[name]
    cfg = make_config(spec)
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(cfg).to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    round_to = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float16
    reinit(model, seed, round_to)
    return model


def published_name(k: str) -> str | None:
    """transformers-5 in-memory parameter name -> published (transformers 4.x / Hub) name."""
    if k == "lm_head.weight":
        return None  # tied
    if k.startswith("model.vision_tower."):
        return "vision_tower.vision_model." + k[len("model.vision_tower."):]
    if k.startswith("model.language_model."):
        return "language_model.model." + k[len("model.language_model."):]
    if k.startswith("model.multi_modal_projector."):
        return "multi_modal_projector." + k[len("model.multi_modal_projector."):]
    raise AssertionError(k)


def published_config(model, spec: dict) -> dict:
    """A sparse config.json like google/paligemma-3b-pt-224's (only non-default fields)."""
    cfg = model.config
    v, t = spec["vision"], spec["text"]
    dt = spec["dtype"]
    text = {
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": t["hidden_size"],
        "intermediate_size": t["intermediate_size"],
        "model_type": "gemma",
        "num_attention_heads": t["num_attention_heads"],
        "num_hidden_layers": t["num_hidden_layers"],
        "num_image_tokens": NUM_IMAGE_TOKENS,
        "num_key_value_heads": t["num_key_value_heads"],
        "head_dim": t["head_dim"],
        "torch_dtype": dt,
        "vocab_size": cfg.text_config.vocab_size,
    }
    if spec["config_style"] == "published-explicit":
        text.update({"max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                     "hidden_act": "gelu_pytorch_tanh"})
    text = dict(sorted(text.items()))
    vision = {
        "hidden_size": v["hidden_size"],
        "image_size": IMAGE_SIZE,
        "intermediate_size": v["intermediate_size"],
        "model_type": "siglip_vision_model",
        "num_attention_heads": v["num_attention_heads"],
        "num_hidden_layers": v["num_hidden_layers"],
        "num_image_tokens": NUM_IMAGE_TOKENS,
        "patch_size": PATCH_SIZE,
        "projection_dim": t["hidden_size"],
        "projector_hidden_act": "gelu_fast",
        "vision_use_head": False,
    }
    if spec["config_style"] == "published-explicit":
        vision.update({"layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"})
    vision = dict(sorted(vision.items()))
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "bos_token_id": 2,
        "eos_token_id": 1,
        "hidden_size": t["hidden_size"],
        "ignore_index": -100,
        "image_token_index": cfg.image_token_index,
        "model_type": "paligemma",
        "pad_token_id": 0,
        "projection_dim": t["hidden_size"],
        "text_config": text,
        "torch_dtype": dt,
        "vision_config": vision,
        "vocab_size": cfg.text_config.vocab_size,
    }


def save_published(model, d: Path, spec: dict) -> list[str]:
    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    tensors = {}
    for k, p in model.state_dict().items():
        pk = published_name(k)
        if pk is None:
            continue
        t = p.detach().to(dtype).contiguous().clone()
        # the reference uses exactly these values (already rounded in `reinit`)
        assert torch.equal(t.to(torch.float32), p.detach())
        tensors[pk] = t
    names = sorted(tensors)
    n_shards = spec["shards"]
    if n_shards == 1:
        save_file({k: tensors[k] for k in names}, str(d / "model.safetensors"), metadata={"format": "pt"})
        files = ["model.safetensors"]
    else:
        # hub layout: contiguous runs of the sorted names, split into ~equal byte sizes
        sizes = [tensors[k].numel() * tensors[k].element_size() for k in names]
        total = sum(sizes)
        shards: list[list[str]] = [[] for _ in range(n_shards)]
        acc = 0
        for k, s in zip(names, sizes):
            idx = min(n_shards - 1, int(acc * n_shards // total))
            shards[idx].append(k)
            acc += s
        assert all(shards), "empty shard"
        weight_map = {}
        files = []
        for i, ks in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            save_file({k: tensors[k] for k in ks}, str(d / fn), metadata={"format": "pt"})
            files.append(fn)
            for k in ks:
                weight_map[k] = fn
        write_json(d / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        files.append("model.safetensors.index.json")
    write_json(d / "config.json", published_config(model, spec))
    return files


def write_model_dir(name: str, model, d: Path) -> None:
    spec = MODEL_SPECS[name]
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if spec["layout"] == "published":
        save_published(model, d, spec)
        model.generation_config.save_pretrained(str(d))
    else:
        # whatever transformers 5 itself writes (tensor names + config.json + generation_config.json)
        model.save_pretrained(str(d))
        # plus what transformers 5 `PaliGemmaProcessor.save_pretrained` writes for the image processor:
        # processor_config.json with a nested "image_processor" (it no longer writes preprocessor_config.json)
        with tempfile.TemporaryDirectory() as tmp:
            make_processor_from_dir(None).save_pretrained(tmp)
            shutil.copyfile(Path(tmp) / "processor_config.json", d / "processor_config.json")
    write_json(d / "preprocessor_config.json", preprocessor_config())
    write_tokenizer_files(d)


def make_processor_from_dir(d: Path | None) -> PaliGemmaProcessor:
    if d is not None:
        return PaliGemmaProcessor.from_pretrained(str(d))
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        tok = AutoTokenizer.from_pretrained(tmp)
    return PaliGemmaProcessor(image_processor=make_image_processor(IMAGE_SIZE), tokenizer=tok)


# ----------------------------------------------------------------------------------------
# Reference computation
# ----------------------------------------------------------------------------------------


class Capture:
    """Forward hooks that record the intermediate activations of one forward pass."""

    def __init__(self, model):
        self.model = model
        self.acts: dict[str, torch.Tensor] = {}
        self.handles = []
        vt = model.model.vision_tower
        lm = model.model.language_model
        self._hook(vt.embeddings, "vision_embeddings")
        for i, layer in enumerate(vt.encoder.layers):
            self._hook(layer, f"vision_layer{i}")
        self._hook(vt.post_layernorm, "vision_post_ln")
        self._hook(model.model.multi_modal_projector, "image_features")
        self.handles.append(lm.layers[0].register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for i, layer in enumerate(lm.layers):
            self._hook(layer, f"prefill_hidden{i + 1}")
        self._hook(lm.norm, "prefill_final_norm")

    def _hook(self, module, key):
        def fn(_m, _inp, out):
            o = out[0] if isinstance(out, (tuple, list)) else out
            self.acts[key] = o.detach().clone()
        self.handles.append(module.register_forward_hook(fn))

    def _pre_hook(self, _m, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        self.acts["prefill_hidden0"] = hs.detach().clone()

    def remove(self):
        for h in self.handles:
            h.remove()


def processor_inputs(processor, out: Path, img: str, prompt: str):
    with load_image(out, img) as im:
        inputs = processor(text=prompt, images=im, return_tensors="pt")
    return inputs


def generate(model, inputs):
    gin = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        g = model.generate(**gin, do_sample=False, max_new_tokens=NUM_NEW_TOKENS, output_logits=True,
                           return_dict_in_generate=True)
    T = inputs["input_ids"].shape[1]
    ids = g.sequences[0, T:]
    logits = torch.stack([lg[0] for lg in g.logits]).to(torch.float32)  # [n, vocab]
    return ids, logits


def top_stats(logits: torch.Tensor):
    lp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    top = torch.topk(lp, TOP_K, dim=-1)
    margins = (top.values[:, 0] - top.values[:, 1])
    return top.indices, top.values, margins


# --- an independent, hand-written PaliGemma forward (plain torch ops on the raw weights) ---


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def manual_image_features(sd: dict, cfg, pixel_values: torch.Tensor) -> torch.Tensor:
    vc = cfg.vision_config
    P = "model.vision_tower."
    x = torch.nn.functional.conv2d(pixel_values[None], sd[P + "embeddings.patch_embedding.weight"],
                                   sd[P + "embeddings.patch_embedding.bias"], stride=vc.patch_size)
    x = x.flatten(2).transpose(1, 2)[0]  # [256, Hv], patches in row-major order
    x = x + sd[P + "embeddings.position_embedding.weight"]
    nh = vc.num_attention_heads
    hd = vc.hidden_size // nh
    for i in range(vc.num_hidden_layers):
        L = f"{P}encoder.layers.{i}."
        h = _ln(x, sd[L + "layer_norm1.weight"], sd[L + "layer_norm1.bias"], vc.layer_norm_eps)
        q = (h @ sd[L + "self_attn.q_proj.weight"].T + sd[L + "self_attn.q_proj.bias"]).view(-1, nh, hd).transpose(0, 1)
        k = (h @ sd[L + "self_attn.k_proj.weight"].T + sd[L + "self_attn.k_proj.bias"]).view(-1, nh, hd).transpose(0, 1)
        v = (h @ sd[L + "self_attn.v_proj.weight"].T + sd[L + "self_attn.v_proj.bias"]).view(-1, nh, hd).transpose(0, 1)
        a = torch.softmax(q @ k.transpose(1, 2) * hd ** -0.5, dim=-1) @ v
        a = a.transpose(0, 1).reshape(-1, nh * hd)
        x = x + a @ sd[L + "self_attn.out_proj.weight"].T + sd[L + "self_attn.out_proj.bias"]
        h = _ln(x, sd[L + "layer_norm2.weight"], sd[L + "layer_norm2.bias"], vc.layer_norm_eps)
        h = _gelu_tanh(h @ sd[L + "mlp.fc1.weight"].T + sd[L + "mlp.fc1.bias"])
        x = x + h @ sd[L + "mlp.fc2.weight"].T + sd[L + "mlp.fc2.bias"]
    x = _ln(x, sd[P + "post_layernorm.weight"], sd[P + "post_layernorm.bias"], vc.layer_norm_eps)
    P2 = "model.multi_modal_projector.linear."
    return x @ sd[P2 + "weight"].T + sd[P2 + "bias"]  # raw projector output, NOT rescaled


def manual_decoder_logits(sd: dict, cfg, ids: torch.Tensor, image_features: torch.Tensor, prefix_len: int):
    """Full (cache-less) forward over `ids`; returns (hidden_states list, final_norm, logits)."""
    tc = cfg.text_config
    H, nh, nkv, hd = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim
    P = "model.language_model."
    E = sd[P + "embed_tokens.weight"]
    x = E[ids] * torch.tensor(H ** 0.5, dtype=torch.float32)
    img = ids == cfg.image_token_index
    x[img] = image_features
    T = ids.shape[0]
    pos = torch.arange(T, dtype=torch.float32) + 1.0  # PaliGemma positions are 1-based
    inv = 1.0 / (tc.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    fr = pos[:, None] * inv[None]
    emb = torch.cat([fr, fr], dim=-1)
    cos, sin = emb.cos(), emb.sin()

    def rope(t):  # t [heads, T, hd]
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    # prefix-LM mask: the prefix (image + bos + prompt + "\n") is fully bidirectional,
    # everything after it is causal (and the prefix never sees the suffix).
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = (j <= i) | ((i < prefix_len) & (j < prefix_len))
    bias = torch.zeros(T, T).masked_fill(~allowed, float("-inf"))
    hs = [x.clone()]
    for li in range(tc.num_hidden_layers):
        L = f"{P}layers.{li}."
        h = _rms(x, sd[L + "input_layernorm.weight"], tc.rms_norm_eps)
        q = (h @ sd[L + "self_attn.q_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
        k = (h @ sd[L + "self_attn.k_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        v = (h @ sd[L + "self_attn.v_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        q, k = rope(q), rope(k)
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=0)
        v = v.repeat_interleave(rep, dim=0)
        a = torch.softmax(q @ k.transpose(1, 2) * hd ** -0.5 + bias, dim=-1) @ v
        a = a.transpose(0, 1).reshape(T, nh * hd)
        x = x + a @ sd[L + "self_attn.o_proj.weight"].T
        h = _rms(x, sd[L + "post_attention_layernorm.weight"], tc.rms_norm_eps)
        h = _gelu_tanh(h @ sd[L + "mlp.gate_proj.weight"].T) * (h @ sd[L + "mlp.up_proj.weight"].T)
        x = x + h @ sd[L + "mlp.down_proj.weight"].T
        hs.append(x.clone())
    fn = _rms(x, sd[P + "norm.weight"], tc.rms_norm_eps)
    return hs, fn, fn @ E.T


def manual_greedy(model, inputs, n_new: int) -> tuple[list[int], torch.Tensor]:
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    cfg = model.config
    with torch.no_grad():
        feats = manual_image_features(sd, cfg, inputs["pixel_values"][0])
        ids = inputs["input_ids"][0].clone()
        prefix_len = ids.shape[0]
        out = []
        first = None
        for step in range(n_new):
            hs, fn, logits = manual_decoder_logits(sd, cfg, ids, feats, prefix_len)
            if step == 0:
                first = (feats, hs, fn, logits[-1])
            nxt = int(torch.argmax(logits[-1]))
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([nxt])])
    return out, first


def run_pair(model, processor, out: Path, img: str, prompt: str, check_manual: bool = True) -> dict:
    inputs = processor_inputs(processor, out, img, prompt)
    cap = Capture(model)
    with torch.no_grad():
        fwd = model(**{k: v for k, v in inputs.items() if k != "labels"})
    cap.remove()
    acts = {k: v[0] for k, v in cap.acts.items()}
    logits_last = fwd.logits[0, -1].to(torch.float32)
    gen_ids, gen_logits = generate(model, inputs)
    res = dict(inputs=inputs, acts=acts, logits_last=logits_last, gen_ids=gen_ids, gen_logits=gen_logits)
    if len(gen_ids) != NUM_NEW_TOKENS:
        res["ok"] = False
        res["why"] = f"stopped after {len(gen_ids)} tokens"
        return res
    top_ids, top_lp, margins = top_stats(gen_logits)
    res.update(top_ids=top_ids, top_lp=top_lp, margins=margins, min_margin=float(margins.min()))
    eos_hit = bool((top_ids[:, 0] == _TOKINFO["eos"]).any())
    res["ok"] = not eos_hit
    res["why"] = "eos is argmax" if eos_hit else ""
    assert torch.equal(top_ids[:, 0], gen_ids), "generate() did not pick the argmax of its own logits"
    if check_manual:
        man_ids, first = manual_greedy(model, inputs, NUM_NEW_TOKENS)
        res["manual_ids"] = man_ids
        res["manual_first"] = first
    return res


# ----------------------------------------------------------------------------------------
# Seed search + per-model generation
# ----------------------------------------------------------------------------------------


def evaluate_seed(name: str, seed: int, processor, out: Path):
    """min over pairs of (top1-top2 margin, #distinct generated ids); None if a run stops early or hits <eos>."""
    model = build_model(name, seed)
    margin, distinct = float("inf"), NUM_NEW_TOKENS
    for img, prompt in PAIRS:
        r = run_pair(model, processor, out, img, prompt, check_manual=False)
        if not r["ok"]:
            return None
        margin = min(margin, r["min_margin"])
        distinct = min(distinct, len(set(r["gen_ids"].tolist())))
    return margin, distinct


def search_seed(name: str, processor, out: Path) -> int:
    """Among seeds SEED_SEARCH_START[name] + [0, SEED_SEARCH_TRIES): keep those where, for every pair,
    20 tokens are generated, <eos> is never the argmax, and the generation has >= MIN_DISTINCT distinct
    ids (so KV-cache bugs cannot hide behind a repeated token); return the one with the largest minimum
    top-1/top-2 log-prob margin (ties -> smallest seed)."""
    start = SEED_SEARCH_START[name]
    best = None
    for seed in range(start, start + SEED_SEARCH_TRIES):
        ev = evaluate_seed(name, seed, processor, out)
        if ev is None or ev[1] < MIN_DISTINCT:
            continue
        if best is None or ev[0] > best[1]:
            best = (seed, ev[0])
    if best is None or best[1] < MIN_MARGIN_REQUIRED:
        raise SystemExit(f"no seed found for {name}")
    print(f"  {name}: best seed {best[0]} min margin {best[1]:.4f}", flush=True)
    return best[0]


def check_against_manual(name: str, r: dict, cfg) -> dict:
    man_ids = r["manual_ids"]
    gen = [int(x) for x in r["gen_ids"]]
    assert man_ids == gen, f"{name}: manual prefix-LM greedy loop {man_ids} != generate() {gen}"
    feats, hs, fn, logit_last = r["manual_first"]
    acts = r["acts"]
    errs = {"image_features": float((feats - acts["image_features"]).abs().max())}
    for n, h in enumerate(hs):
        errs[f"prefill_hidden{n}"] = float((h - acts[f"prefill_hidden{n}"]).abs().max())
    errs["prefill_final_norm"] = float((fn - acts["prefill_final_norm"]).abs().max())
    errs["prefill_logits_last"] = float((logit_last - r["logits_last"]).abs().max())
    for k, e in errs.items():
        ref = acts[k] if k in acts else r["logits_last"]
        scale = 1.0 + float(ref.abs().max())
        assert e <= 1e-4 * scale, f"{name}: manual vs HF mismatch in {k}: {e} (scale {scale})"
    # prefill logits == first generation step logits
    d = float((r["gen_logits"][0] - r["logits_last"]).abs().max())
    assert d <= 1e-4 * (1.0 + float(r["logits_last"].abs().max())), d
    errs["gen_step0_vs_prefill_logits"] = d
    return errs


def write_refs(name: str, model, r: dict, img: str, refdir: Path, processor) -> dict:
    inputs, acts = r["inputs"], r["acts"]
    pv = inputs["pixel_values"][0]
    save_npy(refdir / f"{img}_pixel_values.npy", pv.numpy())
    save_npy(refdir / f"{img}_vision_embeddings.npy", acts["vision_embeddings"].numpy())
    for i in range(model.config.vision_config.num_hidden_layers):
        save_npy(refdir / f"{img}_vision_layer{i}.npy", acts[f"vision_layer{i}"].numpy())
    save_npy(refdir / f"{img}_vision_post_ln.npy", acts["vision_post_ln"].numpy())
    save_npy(refdir / f"{img}_image_features.npy", acts["image_features"].numpy())
    save_npy(refdir / f"{img}_input_ids.npy", inputs["input_ids"][0].numpy())
    for i in range(model.config.text_config.num_hidden_layers + 1):
        save_npy(refdir / f"{img}_prefill_hidden{i}.npy", acts[f"prefill_hidden{i}"].numpy())
    save_npy(refdir / f"{img}_prefill_final_norm.npy", acts["prefill_final_norm"].numpy())
    save_npy(refdir / f"{img}_prefill_logits_last.npy", r["logits_last"].numpy())
    save_npy(refdir / f"{img}_gen_ids.npy", r["gen_ids"].numpy())
    save_npy(refdir / f"{img}_gen_top_ids.npy", r["top_ids"].numpy())
    save_npy(refdir / f"{img}_gen_top_logprobs.npy", r["top_lp"].numpy())
    text = processor.decode(r["gen_ids"].tolist(), skip_special_tokens=True)
    write_text(refdir / f"{img}_gen_text.txt", text)
    return {"gen_text": text}


def verify_reload(name: str, d: Path, model, processor, out: Path) -> str:
    """Reload the written directory with from_pretrained; outputs must be bit-identical."""
    reloaded = PaliGemmaForConditionalGeneration.from_pretrained(
        str(d), dtype=torch.float32, attn_implementation="eager").eval()
    sd0 = model.state_dict()
    sd1 = reloaded.state_dict()
    assert set(sd0) == set(sd1), set(sd0) ^ set(sd1)
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), f"{name}: reloaded tensor differs: {k}"
    proc2 = PaliGemmaProcessor.from_pretrained(str(d))
    for img, prompt in PAIRS:
        a = processor_inputs(processor, out, img, prompt)
        b = processor_inputs(proc2, out, img, prompt)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: processor from dir differs in {k}"
        with torch.no_grad():
            l0 = model(**{k: v for k, v in a.items() if k != "labels"}).logits
            l1 = reloaded(**{k: v for k, v in b.items() if k != "labels"}).logits
        assert torch.equal(l0, l1), f"{name}: reloaded model logits differ"
        g0, _ = generate(model, a)
        g1, _ = generate(reloaded, b)
        assert torch.equal(g0, g1)
    return "from_pretrained(dir) reloads every tensor bit-exactly; logits and generations identical"


def make_models(out: Path, seeds: dict, pixels: dict) -> dict:
    summary = {}
    processor = make_processor_from_dir(None)
    for name in MODEL_SPECS:
        seed = seeds[name]
        model = build_model(name, seed)
        d = out / "models" / name
        write_model_dir(name, model, d)
        check_tokenizer_dir(d)
        processor = PaliGemmaProcessor.from_pretrained(str(d))
        refdir = d / "ref"
        refdir.mkdir(parents=True, exist_ok=True)
        meta_pairs = []
        min_margin = float("inf")
        for img, prompt in PAIRS:
            r = run_pair(model, processor, out, img, prompt, check_manual=True)
            assert r["ok"], f"{name}/{img}: {r['why']}"
            assert r["min_margin"] >= MIN_MARGIN_REQUIRED, (name, img, r["min_margin"])
            errs = check_against_manual(name, r, model.config)
            pv = r["inputs"]["pixel_values"][0].numpy()
            assert np.array_equal(pv, pixels[f"{img}_224"]), "processor pixel_values != pixels/*.npy"
            extra = write_refs(name, model, r, img, refdir, processor)
            ids = r["inputs"]["input_ids"][0].tolist()
            tti = r["inputs"]["token_type_ids"][0].tolist()
            assert all(x == 0 for x in tti)
            meta_pairs.append({
                "image": img,
                "image_file": f"images/{img}.{'jpg' if img == 'chelsea' else 'png'}",
                "prompt": prompt,
                "tokenized_string": f"'<image>' * {NUM_IMAGE_TOKENS} + " + json.dumps("<bos>" + prompt + "\n"),
                "num_input_tokens": len(ids),
                "prompt_token_ids": ids[NUM_IMAGE_TOKENS:],
                "gen_ids": [int(x) for x in r["gen_ids"]],
                "gen_text": extra["gen_text"],
                "min_margin": round(r["min_margin"], 6),
                "margins": [round(float(m), 6) for m in r["margins"]],
                "max_abs_err_manual_vs_hf": {k: float(f"{v:.3g}") for k, v in errs.items()},
            })
            min_margin = min(min_margin, r["min_margin"])
        reload_note = verify_reload(name, d, model, processor, out)
        spec = MODEL_SPECS[name]
        cfg = model.config
        meta = {
            "model": name,
            "seed": seed,
            "seed_search": {"seeds_tried": [SEED_SEARCH_START[name], SEED_SEARCH_START[name] + SEED_SEARCH_TRIES - 1],
                            "criteria": {"new_tokens": NUM_NEW_TOKENS, "eos_never_argmax": True,
                                         "min_distinct_generated_ids": MIN_DISTINCT,
                                         "pick": "largest minimum top1-top2 log-prob margin"}},
            "min_margin": round(min_margin, 6),
            "weights_dtype_on_disk": spec["dtype"],
            "weights_rounded_to": "bfloat16" if spec["dtype"] == "bfloat16" else "float16",
            "reference_compute_dtype": "float32",
            "attn_implementation": "eager",
            "tensor_name_layout": spec["layout"],
            "config_style": spec["config_style"],
            "pairs": meta_pairs,
            "num_image_tokens": NUM_IMAGE_TOKENS,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "position_ids": "1-based: prefix token t (0-based index) has rotary position t+1; "
                            "the k-th generated token (0-based) has position prefix_len+k+1",
            "attention_mask": "prefix-LM: all prefix tokens (image + <bos> + prompt + \\n) attend to each "
                              "other bidirectionally; generated tokens attend causally to the prefix and "
                              "earlier generated tokens",
            "image_features_scaling": "none: the raw multi_modal_projector output replaces the <image> "
                                      "embeddings; text embeddings are multiplied by sqrt(text hidden_size)",
            "token_ids": {k: _TOKINFO[k] for k in ("pad", "eos", "bos", "unk", "mask", "newline", "loc0000",
                                                   "seg000", "image", "vocab_size")},
            "config": {
                "vision": dict(spec["vision"], image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, layer_norm_eps=1e-6,
                               hidden_act="gelu_pytorch_tanh"),
                "text": dict(spec["text"], vocab_size=cfg.text_config.vocab_size, rms_norm_eps=1e-6,
                             rope_theta=10000.0, max_position_embeddings=8192, hidden_act="gelu_pytorch_tanh"),
                "image_token_index": cfg.image_token_index,
                "projection_dim": spec["text"]["hidden_size"],
            },
            "reload_check": reload_note,
            "versions": versions(),
        }
        write_json(refdir / "meta.json", meta)
        summary[name] = meta
        print(f"[{name}] seed={seed} min_margin={min_margin:.4f} "
              f"texts={[p['gen_text'] for p in meta_pairs]}", flush=True)
    return summary


def versions() -> dict:
    # local version suffixes (torch "+cpu"/"+cu128") are dropped so CPU and CUDA wheels give identical files
    return {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "scikit-image": skimage.__version__,
        "safetensors": safetensors.__version__,
    }


# ----------------------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------------------


def shape_of(path: Path) -> str:
    a = np.load(path)
    dt = {"<f4": "f32", "<i8": "i64"}[a.dtype.str]
    return f"{dt} {list(a.shape)}"


# Top-level entries of the output directory written by this script.  The README's file list
# covers only these (plus the `extra_roots` of `write_readme`), so files written by other
# generators (tests/fixtures/vae/, scripts/make_fixtures_v2.py's outputs) neither appear in nor
# change the README this script writes on its own.
OWNED_ROOTS = ("images", "pixels", "tokenizer_cases.json") + tuple(f"models/{n}" for n in MODEL_SPECS)


def owned_files(out: Path, roots=OWNED_ROOTS) -> list[Path]:
    """Files under `out` (sorted like `sorted(out.rglob("*"))`) below one of `roots`, README.md excluded."""
    res = []
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.name == "README.md":
            continue
        rel = p.relative_to(out).as_posix()
        if any(rel == r or rel.startswith(r + "/") for r in roots):
            res.append(p)
    return res


def write_readme(out: Path, summary: dict, extra_intro: tuple[str, ...] = (),
                 extra_sections: tuple[str, ...] = (), extra_roots: tuple[str, ...] = ()) -> None:
    """Write out/README.md.  `extra_intro` lines go after the header paragraph, `extra_sections`
    (markdown lines) before the file list, whose files are those of OWNED_ROOTS + `extra_roots`
    (hooks for scripts/make_fixtures_v2.py; with the defaults the output is unchanged)."""
    ti = _TOKINFO
    L = []
    w = L.append
    w("# Test fixtures\n")
    w("Generated by `scripts/make_fixtures.py` (do not edit by hand; rerun "
      "`python scripts/make_fixtures.py --out tests/fixtures` with the versions pinned in "
      "`scripts/requirements.txt`; the output is byte-for-byte reproducible).\n")
    for line in extra_intro:
        w(line)
    w("All `.npy` files are little-endian, C-order; floats are `float32` (`<f4`), ids are `int64` (`<i8`).\n")
    w(f"Versions used: `{json.dumps(versions())}`.\n")

    w("## images/\n")
    w("| file | content |\n|---|---|")
    w("| `astronaut.png` | scikit-image `astronaut`, 512x512 RGB 8-bit PNG (bundled file copied verbatim; has iCCP/tEXt chunks) |")
    w("| `chelsea.jpg` | scikit-image `chelsea` re-encoded by Pillow as baseline JPEG quality 95 (4:2:0), 451x300 (WxH) RGB |")
    w("| `camera.png` | scikit-image `camera`, 512x512 grayscale (`L`) PNG (bundled file copied verbatim) |")
    w("| `rgba.png` | 200x120 (WxH) RGBA PNG: `coffee[140:260, 200:400]` + alpha = round(255*x/199*(0.5+0.5cos(pi*y/119))), "
      "alpha 0 for x<20, 255 for y<10 and x>=180 |")
    w("| `not_an_image.png` | the 5 bytes `hello` (not a PNG) |")
    w("| `truncated.png` | first 1000 bytes of `astronaut.png` |")
    w("| `huge_header.png` | PNG signature + valid IHDR (30000x30000, RGB, 8-bit, CRC correct) + tiny IDAT (zlib of 16 zero bytes) + IEND: a decompression-bomb header; decoders must refuse it by its dimensions, not run out of memory |")
    w("")

    w("## pixels/\n")
    w("`pixel_values` from transformers' `SiglipImageProcessor` configured like PaliGemma's `preprocessor_config.json` "
      "(size HxW, resample=3 bicubic, rescale 1/255, mean=std=[0.5,0.5,0.5], do_convert_rgb=True), image loaded "
      "with `PIL.Image.open(path)`. Layout `[3, H, W]` (CHW, RGB), float32, range [-1, 1].\n")
    w("Exact pipeline (transformers 5 PIL backend `SiglipImageProcessorPil`; `SiglipImageProcessor` falls back to it "
      "when torchvision is absent, and the script uses it explicitly): (1) convert to RGB — images with an alpha "
      "channel are alpha-composited over an opaque WHITE background (`Image.alpha_composite`), `L` is replicated; "
      "(2) `PIL.Image.resize((W,H), BICUBIC)` on the uint8 image (Pillow's separable, antialiased bicubic, a=-0.5, "
      "output rounded/clamped to uint8); (3) `x.astype(float64) * (1/255)` then cast to float32; "
      "(4) `(x - 0.5) / 0.5` in float32.\n")
    w("| file | content |\n|---|---|")
    for n in ["astronaut", "chelsea", "camera", "rgba"]:
        w(f"| `{n}_224.npy` | {shape_of(out / 'pixels' / f'{n}_224.npy')} — `{n}` at 224x224 |")
    w(f"| `astronaut_448.npy` | {shape_of(out / 'pixels' / 'astronaut_448.npy')} — `astronaut` at 448x448 |")
    w("\nNote: `chelsea` pixels depend on the JPEG decoder (Pillow 13 uses libjpeg-turbo 3 with fancy upsampling); "
      "other decoders may differ by a few LSBs in some pixels.\n")

    w("## Tokenizer (identical `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` in every model dir)\n")
    w("A small Gemma-style tokenizer trained with the `tokenizers` library on a built-in English corpus "
      "(the real Gemma tokenizer cannot be downloaded here). Same structure as Gemma's `tokenizer.json`: "
      "model BPE with `byte_fallback: true`, `fuse_unk: true`, `unk_token: <unk>`; normalizer "
      "`Replace(\" \", \"▁\")`; **no** pre-tokenizer (no prefix space is prepended); decoder "
      "`Sequence[Replace(\"▁\",\" \"), ByteFallback, Fuse]`; post-processor `TemplateProcessing(\"<bos> $A\")` "
      "(so `encode(text, add_special_tokens=True)` prepends `<bos>`, like Gemma's). Merges were learned "
      "within words only (training split before each `▁`).\n")
    w("| id(s) | token(s) | kind |\n|---|---|---|")
    w(f"| {ti['pad']} | `<pad>` | special added token |")
    w(f"| {ti['eos']} | `<eos>` | special added token |")
    w(f"| {ti['bos']} | `<bos>` | special added token |")
    w(f"| {ti['unk']} | `<unk>` | special added token |")
    w(f"| {ti['mask']} | `<mask>` | special added token (as in Gemma, id 4) |")
    w(f"| {ti['byte_0x00']}..{ti['byte_0x00'] + 255} | `<0x00>`..`<0xFF>` | byte-fallback tokens (normal vocab) |")
    w(f"| {ti['newline']} | `\\n` | normal vocab token (no merges use it) |")
    w(f"| {ti['first_trained']}..{ti['loc0000'] - 1} | trained BPE tokens (alphabet = printable ASCII + `▁`, then {ti['num_merges']} merges) | normal vocab |")
    w(f"| {ti['loc0000']}..{ti['loc1023']} | `<loc0000>`..`<loc1023>` | added tokens, **not** special (survive `skip_special_tokens`) |")
    w(f"| {ti['seg000']}..{ti['seg127']} | `<seg000>`..`<seg127>` | added tokens, **not** special |")
    w(f"| {ti['image']} | `<image>` | special added token (`image_token_index`) |")
    w(f"| {ti['first_unused']}..{ti['vocab_size'] - 1} | `<unused0>`..`<unused{ti['num_unused'] - 1}>` | special added tokens (padding) |")
    w(f"\nVocab size = config `vocab_size` = **{ti['vocab_size']}** (multiple of 64; `<image>` = vocab_size - 64 as in the real PaliGemma). "
      f"All added tokens have `normalized: false`.\n")
    w("**Prompt rule used by `PaliGemmaProcessor` (transformers 5.24)**: for `text=prompt, images=image` (no `<image>` "
      "in the text) it builds the string `\"<image>\" * 256 + \"<bos>\" + prompt + \"\\n\"` and tokenizes it with the "
      "tokenizer's `add_bos_token` forced to False (the processor sets `add_bos_token = add_eos_token = False`), "
      "i.e. `encode(string, add_special_tokens=False)` against `tokenizer.json`: `<image>`/`<bos>` match as added "
      "tokens and `prompt + \"\\n\"` goes through normalizer + BPE as one piece (no prefix space). "
      "`token_type_ids` are all 0 (no suffix) and `attention_mask` all 1.\n")

    w("## models/\n")
    w("Three tiny, randomly initialised but *real-architecture* PaliGemma checkpoints "
      "(`PaliGemmaForConditionalGeneration`, SigLIP vision tower without head, Gemma-1 decoder, tied lm_head):\n")
    w("| name | vision (hidden/heads/layers/mlp) | text (hidden/heads/kv heads/head_dim/layers/intermediate) | on disk |\n|---|---|---|---|")
    for name, spec in MODEL_SPECS.items():
        v, t = spec["vision"], spec["text"]
        layout = {
            "tiny-mqa-f32": "`model.safetensors` f32, published (transformers 4.x / Hub) tensor names, sparse published-style config (no rope_theta/eps/max_pos: engine defaults apply)",
            "tiny-gqa-bf16": "bf16, 3 shards `model-0000N-of-00003.safetensors` + `model.safetensors.index.json`, published tensor names, config also spells out rope_theta/rms_norm_eps/max_position_embeddings",
            "tiny-mha-f32-v5": "`model.safetensors` f32 written by transformers 5 `save_pretrained` (its tensor names and config.json incl. `rope_parameters`, `dtype`)",
        }[name]
        w(f"| `{name}` | {v['hidden_size']}/{v['num_attention_heads']}/{v['num_hidden_layers']}/{v['intermediate_size']} | "
          f"{t['hidden_size']}/{t['num_attention_heads']}/{t['num_key_value_heads']}/{t['head_dim']}/{t['num_hidden_layers']}/{t['intermediate_size']} | {layout} |")
    w("\nCommon: image 224, patch 14 (256 image tokens), `vision_use_head=False`, gelu_pytorch_tanh everywhere, "
      "LayerNorm eps 1e-6, RMSNorm eps 1e-6 (Gemma `x * (1 + w)`), rope_theta 10000 (rotate-half / NeoX style), "
      f"max_position_embeddings 8192, projection_dim = text hidden, `image_token_index` = {ti['image']}, "
      "bos 2, eos 1, pad 0, `head_dim` explicit (≠ hidden/heads for mqa and gqa).\n")
    w("**Tensor names.** Published layout (`tiny-mqa-f32`, `tiny-gqa-bf16`): "
      "`vision_tower.vision_model.embeddings.patch_embedding.{weight,bias}`, "
      "`vision_tower.vision_model.embeddings.position_embedding.weight`, "
      "`vision_tower.vision_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj,layer_norm1,layer_norm2,mlp.fc1,mlp.fc2}.{weight,bias}`, "
      "`vision_tower.vision_model.post_layernorm.{weight,bias}`, `multi_modal_projector.linear.{weight,bias}`, "
      "`language_model.model.embed_tokens.weight`, `language_model.model.layers.N.{input_layernorm,post_attention_layernorm}.weight`, "
      "`language_model.model.layers.N.self_attn.{q,k,v,o}_proj.weight`, `language_model.model.layers.N.mlp.{gate,up,down}_proj.weight`, "
      "`language_model.model.norm.weight`; no `lm_head` (tied). "
      "transformers-5 layout (`tiny-mha-f32-v5`): identical except the vision tower has **no** `vision_model.` "
      "component: `vision_tower.embeddings.*`, `vision_tower.encoder.layers.N.*`, `vision_tower.post_layernorm.*` "
      "(`save_pretrained` reverts the llava-style renames it applies on load, but not SigLIP's removed "
      "`vision_model` prefix). Both layouts load with `from_pretrained` (checked bit-exactly).\n")
    w("Shapes (PyTorch `nn.Linear` convention `[out, in]`): patch_embedding.weight `[Hv, 3, 14, 14]`, "
      "position_embedding `[256, Hv]`, q_proj `[heads*head_dim, H]`, k/v_proj `[kv_heads*head_dim, H]`, "
      "o_proj `[H, heads*head_dim]`, gate/up `[I, H]`, down `[H, I]`, embed_tokens `[vocab, H]`, "
      "projector `[H, Hv]`.\n")
    w("**Weights.** Random, re-initialised (seeded, `torch.Generator().manual_seed(seed)`, parameters in sorted-name "
      "order) with larger-than-HF scales so that normalised activations are O(1) and next-token logits have clear "
      "margins: linears N(0, (g/sqrt(fan_in))^2) with g = "
      f"{GAIN_QK} for q/k projections (vision and text), g = {GAIN_RESID_OUT} for the text o_proj/down_proj, "
      "g = 1 otherwise; patch embedding N(0, 1/588); token embeddings N(0, 1); position embeddings N(0, 0.5²); "
      "LayerNorm weight N(1, 0.1²), LayerNorm bias N(0, 0.05²); Gemma RMSNorm weights N(0, 0.1²) (identity is 0 since "
      "it computes `x*(1+w)`); all biases N(0, 0.05²). The large o_proj/down_proj gain is needed because Gemma scales "
      "token embeddings by sqrt(H) and ties lm_head to them: with small layer outputs the residual stream stays "
      "≈ sqrt(H)·e(current token) and greedy decoding just repeats the current token. Consequently the text residual "
      "stream is large (see the table below; use f32 accumulation for norms/residuals). Then every parameter is "
      "**rounded to float16-representable values** (f32 checkpoints) or to **bfloat16** (`tiny-gqa-bf16`, stored as "
      "bf16). So storing the f32 checkpoints as f16 is lossless, and parity measures arithmetic, not storage. All "
      "references are computed in float32 from the rounded weights.\n")
    w("| model | max abs(prefill hidden) | max row-rms(prefill hidden) | max abs(vision activations) | max abs(logits_last) |\n|---|---|---|---|---|")
    for name in MODEL_SPECS:
        rd = out / "models" / name / "ref"
        hid = [np.load(p) for p in sorted(rd.glob("*_prefill_hidden*.npy"))]
        vis = [np.load(p) for p in sorted(rd.glob("*_vision_*.npy"))] + [np.load(p) for p in sorted(rd.glob("*_image_features.npy"))]
        lg = [np.load(p) for p in sorted(rd.glob("*_prefill_logits_last.npy"))]
        w(f"| `{name}` | {max(float(np.abs(h).max()) for h in hid):.1f} | "
          f"{max(float(np.sqrt((h.astype(np.float64) ** 2).mean(-1)).max()) for h in hid):.1f} | "
          f"{max(float(np.abs(v).max()) for v in vis):.1f} | {max(float(np.abs(v).max()) for v in lg):.1f} |")
    w("")
    w("Other files per model dir: `config.json`, `generation_config.json` (as `GenerationConfig.save_pretrained` "
      "writes it), `preprocessor_config.json` (flat, published style; `image_processor_type: SiglipImageProcessor`), "
      "tokenizer files; `tiny-mha-f32-v5` also has the transformers-5 `processor_config.json` (nested `image_processor`).\n")

    w("## models/&lt;name&gt;/ref/\n")
    w("Reference outputs of transformers 5 (eager attention, float32, CPU) for the (image, prompt) pairs "
      + ", ".join(f"(`{i}`, `{p!r}`)" for i, p in PAIRS)
      + ", files prefixed with the image name. T = prompt length = 256 + 1 + len(prompt tokens) + 1.\n")
    w("| file | dtype/shape | content |\n|---|---|---|")
    w("| `<img>_pixel_values.npy` | f32 [3,224,224] | processor pixel_values (equal to `pixels/<img>_224.npy`) |")
    w("| `<img>_vision_embeddings.npy` | f32 [256,Hv] | patch embedding (conv 14x14 stride 14, patches row-major) + position embedding, input of encoder layer 0 |")
    w("| `<img>_vision_layer{N}.npy` | f32 [256,Hv] | output of vision encoder layer N (pre-LN residual blocks) |")
    w("| `<img>_vision_post_ln.npy` | f32 [256,Hv] | after `post_layernorm` (= vision tower last_hidden_state) |")
    w("| `<img>_image_features.npy` | f32 [256,H] | `multi_modal_projector.linear` output, **raw** (no 1/sqrt(H) or sqrt(H) scaling) |")
    w("| `<img>_input_ids.npy` | i64 [T] | full prompt ids from `PaliGemmaProcessor(text=prompt, images=image)` |")
    w("| `<img>_prefill_hidden0.npy` | f32 [T,H] | decoder input: `embed_tokens[id] * sqrt(H)` for text tokens, raw image features at `<image>` positions |")
    w("| `<img>_prefill_hidden{N}.npy` | f32 [T,H] | residual stream after decoder layer N (N = 1..layers) |")
    w("| `<img>_prefill_final_norm.npy` | f32 [T,H] | final RMSNorm output |")
    w("| `<img>_prefill_logits_last.npy` | f32 [vocab] | logits at the last prompt position (tied lm_head, no softcapping) |")
    w(f"| `<img>_gen_ids.npy` | i64 [{NUM_NEW_TOKENS}] | greedy `generate(do_sample=False, max_new_tokens={NUM_NEW_TOKENS})` new tokens |")
    w(f"| `<img>_gen_top_ids.npy` | i64 [{NUM_NEW_TOKENS},{TOP_K}] | top-{TOP_K} token ids per step, best first (column 0 = gen_ids) |")
    w(f"| `<img>_gen_top_logprobs.npy` | f32 [{NUM_NEW_TOKENS},{TOP_K}] | log_softmax of the raw f32 logits per step for those ids |")
    w("| `<img>_gen_text.txt` | UTF-8 | `decode(gen_ids, skip_special_tokens=True)` (no trailing newline added) |")
    w("| `meta.json` | JSON | seed, min margin, pairs, prompt ids, token ids, conventions, versions |")
    w("")
    w("Semantics checked by the script against an independent hand-written implementation (`manual_*` functions; "
      "asserted to match HF to 1e-4 relative, and greedy ids exactly):\n")
    w("- **Prefix-LM mask**: the whole prefix (256 image tokens + `<bos>` + prompt + `\\n`) attends bidirectionally "
      "(image tokens also see the text prompt); generated tokens attend causally to the prefix and to earlier "
      "generated tokens; the prefix never sees generated tokens. HF builds it from `token_type_ids` (0 = prefix): "
      "`block_sequence_ids = where(token_type_ids == 0, 0, -1)` OR-ed onto the causal mask; `generate()` appends "
      "token_type 1 for each new token. Greedy ids of `generate()` (KV cache) equal a cache-less manual loop.")
    w("- **Positions are 1-based** in transformers' PaliGemma (`position_ids = arange(T) + 1`; generated token k gets "
      "prefix_len + k + 1). Since RoPE attention scores depend only on position differences, 0-based positions give "
      "the same result up to float rounding.")
    w("- **Image features are not rescaled**: transformers 5 scatters the raw projector output into `inputs_embeds` "
      "and scales only text embeddings by sqrt(H) (inside `GemmaTextScaledWordEmbedding`, sqrt(H) computed in f32). "
      "transformers 4.x divided image features by sqrt(H) and then multiplied *all* embeddings by sqrt(H) — "
      "the same thing up to rounding.")
    w("- No final-logit softcapping (Gemma 1), tied lm_head = `embed_tokens.weight` (unscaled).")
    w("- transformers 5 writes `\"use_bidirectional_attention\": true` into `text_config` (PaliGemmaConfig forces it). "
      "It does **not** mean full bidirectional text attention: the mask is still the prefix-LM mask above.")
    w("- Generated texts contain `<locNNNN>`/`<segNNN>` (kept by `skip_special_tokens`) and `�` where byte-fallback "
      "tokens do not form valid UTF-8 (the `ByteFallback` decoder emits U+FFFD per invalid byte).\n")
    w("| model | seed | min top1-top2 log-prob margin | astronaut text | chelsea text |\n|---|---|---|---|---|")
    for name, m in summary.items():
        texts = {p["image"]: p["gen_text"] for p in m["pairs"]}
        w(f"| `{name}` | {m['seed']} | {m['min_margin']:.4f} | `{json.dumps(texts['astronaut'], ensure_ascii=False)}` | "
          f"`{json.dumps(texts['chelsea'], ensure_ascii=False)}` |")
    w("")
    w("## tokenizer_cases.json\n")
    w("Encode/decode cases for the tokenizer (`encode`: text, ids with `add_special_tokens=False`, tokens, decoded "
      "with/without special tokens; `decode`: byte-fallback id sequences incl. invalid UTF-8), all cross-checked "
      "against transformers' `GemmaTokenizer` loaded from the model dirs.\n")
    for line in extra_sections:
        w(line)
    w("## File list\n")
    w("| file | bytes |\n|---|---|")
    total = 0
    for p in owned_files(out, OWNED_ROOTS + tuple(extra_roots)):
        sz = p.stat().st_size
        total += sz
        w(f"| `{p.relative_to(out).as_posix()}` | {sz} |")
    w(f"\nTotal (excluding this README): {total} bytes.\n")
    write_text(out / "README.md", "\n".join(L))


# ----------------------------------------------------------------------------------------


def main() -> None:
    global _TOKENIZER, _TOKINFO
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--search-seeds", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # start from scratch in the sub-directories this script owns (no stale files survive);
    # other model dirs (scripts/make_fixtures_v2.py) are left alone
    for sub in ("images", "pixels") + tuple(f"models/{n}" for n in MODEL_SPECS):
        if (out / sub).exists():
            shutil.rmtree(out / sub)

    make_images(out)
    pixels = make_pixels(out)
    _TOKENIZER, _TOKINFO = build_tokenizer()

    seeds = dict(SEEDS)
    if args.search_seeds or any(v is None for v in seeds.values()):
        processor = make_processor_from_dir(None)
        for name in MODEL_SPECS:
            if args.search_seeds or seeds[name] is None:
                seeds[name] = search_seed(name, processor, out)
                print(f"seed for {name}: {seeds[name]}", flush=True)
        print("SEEDS =", json.dumps(seeds, indent=4), flush=True)

    summary = make_models(out, seeds, pixels)
    make_tokenizer_cases(out, AutoTokenizer.from_pretrained(str(out / "models" / next(iter(MODEL_SPECS)))))
    write_readme(out, summary)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
