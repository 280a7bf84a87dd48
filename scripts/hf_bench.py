#!/usr/bin/env python3
"""Time HF transformers on CPU for a randomly initialised PaliGemma of PaliGemma-3B-224 shapes
with `--layers` layers in each tower, or `--text-layers` in the decoder (the shapes of
`paligemma bench`): vision tower, time to
first token, prefill and greedy decode. Prints one JSON object. Used by scripts/compare.sh.

Needs torch and transformers (scripts/requirements.txt).
"""

import argparse
import json
import resource
import sys
import time

import torch
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration


class Clock:
    """A generate() streamer that records when the prompt and each new token arrive."""

    def __init__(self):
        self.times = []

    def put(self, _value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--text-layers", type=int, default=None, help="decoder layers (default: --layers)")
    ap.add_argument("--text-tokens", type=int, default=9)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.manual_seed(0)
    vocab, image_token = 257216, 257152
    cfg = PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
            num_hidden_layers=args.layers, num_attention_heads=16, patch_size=14, image_size=224,
            vision_use_head=False, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        text_config=dict(
            model_type="gemma", vocab_size=vocab, hidden_size=2048, intermediate_size=16384,
            num_hidden_layers=args.text_layers or args.layers, num_attention_heads=8, num_key_value_heads=1,
            head_dim=256, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6,
            max_position_embeddings=8192, tie_word_embeddings=True, pad_token_id=0,
            bos_token_id=2, eos_token_id=1),
        image_token_index=image_token, vocab_size=vocab, projection_dim=2048, hidden_size=2048,
        pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True,
    )
    dtype = getattr(torch, args.dtype)
    t = time.perf_counter()
    model = PaliGemmaForConditionalGeneration(cfg).to(dtype).eval()
    load_s = time.perf_counter() - t

    n_img = 256
    ids = [image_token] * n_img + [2] + [1000 + 37 * i for i in range(args.text_tokens)]
    input_ids = torch.tensor([ids])
    inputs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        token_type_ids=torch.zeros_like(input_ids),
        pixel_values=torch.rand(1, 3, 224, 224, dtype=dtype) * 2 - 1,
    )
    new = args.decode_steps + 1

    def run():
        clock = Clock()
        model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       streamer=clock)
        return clock.times

    def vision():
        t0 = time.perf_counter()
        model.get_image_features(inputs["pixel_values"])
        return time.perf_counter() - t0

    with torch.inference_mode():
        t0 = time.perf_counter()
        cold = run()
        cold_ttft = cold[1] - t0
        vision()
        vision_s = vision()
        t0 = time.perf_counter()
        warm = run()
        ttft = warm[1] - t0
    decode_tok_s = args.decode_steps / (warm[-1] - warm[1])
    prefill_s = ttft - vision_s
    print(json.dumps({
        "engine": f"HF transformers {__import__('transformers').__version__} "
                  f"(torch {torch.__version__}, CPU, {args.dtype}, {torch.get_num_threads()} threads)",
        "prompt_tokens": len(ids),
        "load_s": load_s,
        "cold_ttft_s": cold_ttft,
        "ttft_s": ttft,
        "vision_s": vision_s,
        "prefill_s": prefill_s,
        "prefill_tok_s": len(ids) / prefill_s,
        "decode_steps": args.decode_steps,
        "decode_tok_s": decode_tok_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
