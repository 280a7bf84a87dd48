#!/usr/bin/env bash
# Side-by-side performance on this machine, same shapes everywhere (PaliGemma-3B-224 with
# LAYERS layers per tower, full 257216 vocabulary, 266-token prompt, 16 greedy decode steps):
#
#   1. this engine:    `paligemma bench` on a synthetic model (random f16 weights)
#   2. llama.cpp:      its Vulkan backend (node-llama-cpp's prebuilt binaries) on a random
#                      Gemma-2B-shaped GGUF of LAYERS layers (the decoder only: llama.cpp has
#                      no SigLIP here), prefill of the same 266 tokens and decode
#   3. transformers:   HF PaliGemma on the CPU (torch), random init, same shapes
#
# then prints the ratios. Everything it installs stays under scripts/ (gitignored):
# scripts/.venv (gguf), scripts/.llama (node-llama-cpp), scripts/.bench (GGUF, JSON results).
#
# usage: scripts/compare.sh            (env: LAYERS=2, STEPS=16, HF_PYTHON=python with torch)
#        LAYERS=27 TEXT_LAYERS=18 SKIP_LLAMA=1 scripts/compare.sh    (full PaliGemma-3B-224 vs HF)
# On a machine without a GPU, Mesa's lavapipe serves both Vulkan engines;
# GGML_VK_VISIBLE_DEVICES=0 makes llama.cpp use it.
set -euo pipefail
cd "$(dirname "$0")/.."

LAYERS=${LAYERS:-2}
TEXT_LAYERS=${TEXT_LAYERS:-$LAYERS}
SKIP_LLAMA=${SKIP_LLAMA:-}
STEPS=${STEPS:-16}
TEXT_TOKENS=9 # 256 image tokens + <bos> + 9 = 266
PROMPT=$((256 + 1 + TEXT_TOKENS))
OUT=scripts/.bench
NODE_LLAMA_CPP_VERSION=3.21.1
GGUF_VERSION=0.19.0
mkdir -p "$OUT"
export GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0}
# Cold starts are measured with an empty Mesa shader cache (lavapipe compiles every pipeline
# with LLVM, and would otherwise reuse what an earlier run compiled), one per engine.
CACHE=$(mktemp -d)
trap 'rm -rf "$CACHE"' EXIT

# HF needs torch + transformers: the first of $HF_PYTHON, /opt/pgvenv, scripts/.venv that has
# them; else they are installed into scripts/.venv from scripts/requirements.txt.
if [ ! -x scripts/.venv/bin/python ]; then
    python3 -m venv scripts/.venv
fi
if ! scripts/.venv/bin/python -c "import gguf" 2>/dev/null; then
    scripts/.venv/bin/pip install -q "gguf==$GGUF_VERSION"
fi
HF_PYTHON=${HF_PYTHON:-}
for p in "$HF_PYTHON" /opt/pgvenv/bin/python scripts/.venv/bin/python; do
    if [ -n "$p" ] && [ -x "$p" ] && "$p" -c "import torch, transformers" 2>/dev/null; then
        HF_PYTHON=$p
        break
    fi
    HF_PYTHON=
done
if [ -z "$HF_PYTHON" ]; then
    scripts/.venv/bin/pip install -q -r scripts/requirements.txt
    HF_PYTHON=scripts/.venv/bin/python
fi
if [ -z "$SKIP_LLAMA" ] && [ ! -f scripts/.llama/node_modules/node-llama-cpp/package.json ]; then
    mkdir -p scripts/.llama
    echo '{"private": true, "type": "module"}' >scripts/.llama/package.json
    (cd scripts/.llama && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true \
        npm install --no-audit --no-fund "node-llama-cpp@$NODE_LLAMA_CPP_VERSION")
fi

echo "== this engine (paligemma bench, synthetic, $LAYERS vision + $TEXT_LAYERS text layers)" >&2
cargo build --release --locked --bin paligemma >&2
MESA_SHADER_CACHE_DIR="$CACHE/engine" target/release/paligemma bench --layers "$LAYERS" \
    --text-layers "$TEXT_LAYERS" --text-tokens "$TEXT_TOKENS" --decode-steps "$STEPS" --runs 2 \
    --json >"$OUT/engine.json"

rm -f "$OUT/llama.json"
if [ -z "$SKIP_LLAMA" ]; then
    echo "== llama.cpp Vulkan (random Gemma-2B-shaped GGUF, $TEXT_LAYERS layers)" >&2
    GGUF="$OUT/gemma2b-${TEXT_LAYERS}l.gguf"
    [ -f "$GGUF" ] || scripts/.venv/bin/python scripts/make_gguf.py "$GGUF" --layers "$TEXT_LAYERS"
    MESA_SHADER_CACHE_DIR="$CACHE/llama" node scripts/llama_bench.mjs "$GGUF" "$PROMPT" "$STEPS" \
        >"$OUT/llama.json"
fi

echo "== HF transformers on the CPU ($HF_PYTHON)" >&2
"$HF_PYTHON" scripts/hf_bench.py --layers "$LAYERS" --text-layers "$TEXT_LAYERS" \
    --text-tokens "$TEXT_TOKENS" --decode-steps "$STEPS" >"$OUT/hf.json"

python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
e = json.load(open(f"{out}/engine.json"))
m, p = e["models"][0], e.get("probes") or {}
try:
    l = json.load(open(f"{out}/llama.json"))
except FileNotFoundError:
    l = {"engine": "not run", "devices": ["-"], "prefill_tok_s": None, "decode_tok_s": None, "cold_prefill_s": None}
h = json.load(open(f"{out}/hf.json"))
print(f"adapter: {e['adapter']}")
print(f"model: {m['model']}, {m['vision_layers']} vision + {m['text_layers']} text layers; "
      f"engine peak host RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB for {m['gpu_weight_bytes'] / 2**20:.0f} MiB "
      f"of GPU weights; HF peak RSS {h.get('peak_rss_mib', 0):.0f} MiB")
print(f"probes: FMA {p.get('fma_gflops', 0):.1f} GFLOP/s, storage read {p.get('read_gbs', 0):.2f} GB/s")
print(f"llama.cpp: {l['engine']} on {', '.join(l['devices'])}; HF: {h['engine']}")
rows = [
    ("prefill tok/s (%d tokens)" % m["prefill_tokens"], m["prefill_tok_s"], l["prefill_tok_s"], h["prefill_tok_s"], True),
    ("decode tok/s", m["decode_tok_s"], l["decode_tok_s"], h["decode_tok_s"], True),
    ("cold first prefill / TTFT s", m["cold_ttft_s"], l["cold_prefill_s"], h["cold_ttft_s"], False),
    ("warm time to first token s", m["ttft_s"], None, h["ttft_s"], False),
    ("vision encoder s", m["vision_s"], None, h["vision_s"], False),
]
def fmt(v):
    return "-" if v is None else f"{v:.2f}"
def ratio(ours, theirs, higher_better):
    if theirs is None or not ours or not theirs:
        return "-"
    return f"{ours / theirs:.2f}x" if higher_better else f"{theirs / ours:.2f}x"
print(f"{'':32}{'engine':>10}{'llama.cpp':>11}{'HF CPU':>10}{'vs llama':>10}{'vs HF':>8}")
for name, ours, lc, hf, hb in rows:
    print(f"{name:32}{fmt(ours):>10}{fmt(lc):>11}{fmt(hf):>10}{ratio(ours, lc, hb):>10}{ratio(ours, hf, hb):>8}")
print("(ratios > 1 mean this engine is faster; llama.cpp runs the decoder only, so its cold")
print(" prefill is compared with this engine's cold vision + prefill)")
EOF
