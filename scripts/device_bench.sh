#!/usr/bin/env bash
# The GPU benchmark of issue #15, for a GPU machine without network or Rust toolchain (an
# NVIDIA H200 server, say), inside 8 minutes, written as one JSON file.
#
#   scripts/device_bench.sh [--dry-run] [--bin PATH] [--debs DIR] [--out FILE]
#
# Before: build the release binary on an x86-64 Linux machine (`cargo build --release`) and,
# if the GPU machine has no Vulkan loader (`ldconfig -p | grep libvulkan` prints nothing),
# download the loader packages there as .deb files into DIR (default .gl/):
#   mkdir -p .gl /tmp/amd64/partial; o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64
#   -oDir::State::Lists=/tmp/amd64'; apt-get $o update; (cd .gl && apt-get $o download libvulkan1)
# On the GPU machine the script unpacks them, finds the NVIDIA Vulkan driver, checks that the
# adapter is a real GPU (not llvmpipe) and runs, each step under its own time limit:
#   1. the device probes: f32 FMA and a read-bandwidth probe over 1 GiB (beyond any L2);
#   2. the full PaliGemma-3B-224 synthetic model (27 vision + 18 text layers, the 257,216-row
#      LM head) in f16, int8 and int4, decode at batch 1 and 8;
#   3. per-kernel times of one f16 request (each dispatch its own submission, wall-clock).
# --dry-run runs every step at small shapes (the shipped tiny-shapes model, a 64 MiB read
# probe) and accepts a CPU adapter, to check the script on lavapipe.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
bin=target/release/paligemma
debs=.gl
out=${OUT:+$OUT/}device_bench.json
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --bin) bin=$2; shift ;;
        --debs) debs=$2; shift ;;
        --out) out=$2; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "device_bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -x "$bin" ] || { echo "device_bench.sh: no binary at $bin (cargo build --release, or --bin PATH)" >&2; exit 2; }

start=$(date +%s)
budget=470 # seconds for all steps; the script ends inside 8 minutes
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

# The Vulkan loader and the NVIDIA driver's manifest.
if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then
    if ls "$debs"/*.deb >/dev/null 2>&1; then
        for f in "$debs"/*.deb; do dpkg -x "$f" /; done
        ldconfig
    else
        echo "device_bench.sh: no Vulkan loader, and no .deb files in $debs to unpack" >&2
    fi
fi
if [ -z "${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-}" ]; then
    for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json \
        /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json; do
        if [ -f "$icd" ]; then export VK_DRIVER_FILES=$icd; break; fi
    done
fi

# A JSON string of a file's last lines (for errors).
json_tail() {
    tail -c 1500 "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/ /g' | awk 'BEGIN { ORS = "\\n" } { print }' |
        sed -e 's/^/"/' -e 's/$/"/'
}

errors=()
# step NAME LIMIT ARGS...: run the binary, keep its JSON line in $log/NAME.json (or null).
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - ($(date +%s) - start)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -le 5 ]; then
        errors+=("{\"step\":\"$name\",\"error\":\"no time left\"}")
        echo null >"$log/$name.json"
        return
    fi
    echo "== $name (at most ${limit} s): $bin $*" >&2
    local t0=$(date +%s)
    if timeout "$limit" "$bin" "$@" >"$log/$name.out" 2>"$log/$name.err" && [ -s "$log/$name.out" ]; then
        tail -n 1 "$log/$name.out" >"$log/$name.json"
        echo "   done in $(($(date +%s) - t0)) s" >&2
    else
        local rc=$?
        errors+=("{\"step\":\"$name\",\"exit\":$rc,\"stderr\":$(json_tail "$log/$name.err")}")
        echo null >"$log/$name.json"
        echo "   failed (exit $rc): $(tail -n 3 "$log/$name.err")" >&2
    fi
}

if [ $dry_run = 1 ]; then
    read_bytes=64MiB
    model=(--model assets/tiny-shapes --text-tokens 4 --decode-steps 8)
else
    read_bytes=1GiB
    model=(--layers 27 --text-layers 18 --image-size 224)
fi

step probes 60 bench --probes-only --read-bytes "$read_bytes" --json
if [ $dry_run = 0 ] && ! grep -q '"device_type":"\(DiscreteGpu\|IntegratedGpu\|VirtualGpu\)"' "$log/probes.json"; then
    echo "device_bench.sh: no real GPU adapter: $(grep -o '"adapter":"[^"]*"' "$log/probes.json" || echo none)" >&2
    echo "   (check VK_DRIVER_FILES, the loader, vulkaninfo --summary; --dry-run accepts a CPU adapter)" >&2
    exit 1
fi
step models 300 bench "${model[@]}" --formats f16,int8,int4 --batch 1,8 --no-probes --json
step profile 100 bench "${model[@]}" --formats f16 --no-probes --profile --json

gpu_info=null
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv,noheader >"$log/smi" 2>&1 && gpu_info=$(json_tail "$log/smi")
fi

mkdir -p "$(dirname "$out")"
{
    printf '{"script":"scripts/device_bench.sh","dry_run":%s,' "$([ $dry_run = 1 ] && echo true || echo false)"
    printf '"date":"%s","commit":"%s","nvidia_smi":%s,' "$(date -u +%FT%TZ)" \
        "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$gpu_info"
    printf '"probes":%s,"models":%s,"profile":%s,' "$(cat "$log/probes.json")" \
        "$(cat "$log/models.json")" "$(cat "$log/profile.json")"
    printf '"errors":[%s],"elapsed_s":%s}\n' "$(IFS=,; echo "${errors[*]:-}")" "$(($(date +%s) - start))"
} >"$out"
echo "wrote $out ($(($(date +%s) - start)) s)" >&2
[ ${#errors[@]} -eq 0 ]
