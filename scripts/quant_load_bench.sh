#!/usr/bin/env bash
# Load time of full PaliGemma-3B-224 shapes (27 + 18 layers, 257,216-token vocabulary, random
# f16 weights) quantised two ways: at load (`--weights FORMAT` on the f16 checkpoint) and from
# a checkpoint written once by `paligemma quantize`. Also times `quantize` itself, the plain f16
# load, and checks that both ways give the same greedy tokens.
#
# Each load is `generate --batch` of an empty file: open the GPU, load, exit. "warm" loads read
# the checkpoint from the page cache (the best of two runs); "cold" ones after dropping the
# file's cached pages (posix_fadvise DONTNEED), so from the disk.
#
# usage: scripts/quant_load_bench.sh     (env: DIR=/tmp/paligemma-full-size, FORMATS="int8 int4")
# Needs ~6 GB of disk for the f16 checkpoint and ~3 GB / 1.7 GB per quantised copy.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${DIR:-/tmp/paligemma-full-size}
FORMATS=${FORMATS:-int8 int4}
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release/paligemma
cargo build --release --locked
if [ ! -f "$DIR/f16/model.safetensors" ]; then
    PALIGEMMA_FULL_SIZE_DIR=$DIR/f16 cargo test --release --locked --test full_size -- \
        --ignored write_full_size_checkpoint
fi
EMPTY=$DIR/empty.jsonl
: >"$EMPTY"

drop_cache() {
    python3 -c 'import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' "$@"
}

# "seconds peak-RSS-KiB" of running the arguments (their output discarded).
timed() {
    /usr/bin/time -f '%e %M' -o "$DIR/time.txt" "$@" >/dev/null 2>&1
    cat "$DIR/time.txt"
}

# One line: a load after clearing the file's cached pages (cold) and the best of two loads from
# the page cache (warm), with the warm one's peak RSS. report LABEL DIR [GLOBAL FLAGS...]
report() {
    local label=$1 dir=$2
    shift 2
    drop_cache "$dir/model.safetensors"
    local cs cm s1 m1 s2 m2
    read -r cs cm < <(timed "$BIN" "$@" generate --model "$dir" --batch "$EMPTY")
    read -r s1 m1 < <(timed "$BIN" "$@" generate --model "$dir" --batch "$EMPTY")
    read -r s2 m2 < <(timed "$BIN" "$@" generate --model "$dir" --batch "$EMPTY")
    if awk "BEGIN {exit !($s2 < $s1)}"; then s1=$s2 m1=$m2; fi
    printf '%-30s cold %7.2f s   warm %7.2f s   peak RSS %6d MiB\n' "$label" "$cs" "$s1" $((m1 / 1024))
}

tokens() {
    "$BIN" "$@" --image assets/scenes/scene_000.png --prompt "caption en" -n 2 --json 2>/dev/null \
        | python3 -c 'import json, sys; j = json.load(sys.stdin); print(j["token_ids"], "load_s %.2f" % j["timings"]["load_s"])'
}

echo "checkpoint: $DIR/f16 ($(stat -c %s "$DIR/f16/model.safetensors") bytes), $("$BIN" --version)"
report "f16" "$DIR/f16"
for F in $FORMATS; do
    rm -rf "${DIR:?}/$F"
    read -r qs qm < <(timed "$BIN" --weights "$F" quantize --model "$DIR/f16" --out "$DIR/$F")
    printf '%-30s %7.2f s, peak RSS %d MiB, %s bytes\n' "quantize to $F" "$qs" $((qm / 1024)) \
        "$(stat -c %s "$DIR/$F/model.safetensors")"
    report "$F quantised at load" "$DIR/f16" --weights "$F"
    report "$F from paligemma quantize" "$DIR/$F"
    a=$(tokens --weights "$F" generate --model "$DIR/f16")
    b=$(tokens generate --model "$DIR/$F")
    echo "greedy tokens, $F at load:       $a"
    echo "greedy tokens, $F from the file: $b"
    [ "${a% load_s*}" = "${b% load_s*}" ] || { echo "token ids differ"; exit 1; }
done
