#!/usr/bin/env python3
"""Write a GGUF of a Gemma-2B-shaped decoder (PaliGemma-3B's language model) with random f16
weights, for timing llama.cpp on the same shapes as `paligemma bench` (scripts/compare.sh).

Shapes: hidden 2048, MLP 16384, 8 query heads, 1 KV head, head_dim 256, vocabulary 257216 (the
tied embedding is also the LM head), `--layers` decoder layers. The vocabulary is placeholder
pieces (plus the 256 byte tokens llama.cpp's SentencePiece loader expects); the benchmark feeds
token ids directly, so no text is ever tokenized.

Needs the `gguf` package (scripts/.venv, see compare.sh).
"""

import argparse
import sys

import numpy as np

import gguf

HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2048, 16384, 8, 1, 256, 257216


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output .gguf path")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    w = gguf.GGUFWriter(args.out, "gemma")
    w.add_name(f"random-gemma-2b-{args.layers}l")
    w.add_context_length(8192)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(args.layers)
    w.add_feed_forward_length(MLP)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    # SentencePiece-style vocabulary: <pad> <eos> <bos> <unk>, the 256 byte tokens, then pieces.
    tokens = [b"<pad>", b"<eos>", b"<bos>", b"<unk>"]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN]
    tokens += [f"<0x{b:02X}>".encode() for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    n_rest = VOCAB - len(tokens)
    tokens += [f"\u2581p{i}".encode() for i in range(n_rest)]
    types += [gguf.TokenType.NORMAL] * n_rest
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(VOCAB)])
    w.add_token_types(types)
    w.add_pad_token_id(0)
    w.add_eos_token_id(1)
    w.add_bos_token_id(2)
    w.add_unk_token_id(3)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)

    def matrix(name: str, rows: int, cols: int) -> None:
        # [rows, cols] row-major = GGUF ne = (cols, rows): PyTorch Linear layout [out, in].
        scale = 1.0 / np.sqrt(cols)
        data = np.empty((rows, cols), dtype=np.float16)
        step = max(1, (64 << 20) // (cols * 4))
        for r in range(0, rows, step):
            n = min(step, rows - r)
            data[r : r + n] = rng.uniform(-scale, scale, size=(n, cols)).astype(np.float16)
        w.add_tensor(name, data)

    def vector(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + rng.uniform(-0.1, 0.1, size=n)).astype(np.float32))

    matrix("token_embd.weight", VOCAB, HIDDEN)
    for layer in range(args.layers):
        b = f"blk.{layer}."
        vector(b + "attn_norm.weight", HIDDEN)
        matrix(b + "attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
        matrix(b + "attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        matrix(b + "attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        matrix(b + "attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        vector(b + "ffn_norm.weight", HIDDEN)
        matrix(b + "ffn_gate.weight", MLP, HIDDEN)
        matrix(b + "ffn_up.weight", MLP, HIDDEN)
        matrix(b + "ffn_down.weight", HIDDEN, MLP)
    vector("output_norm.weight", HIDDEN)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
