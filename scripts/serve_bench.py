#!/usr/bin/env python3
"""Load bench of `paligemma serve` (Python standard library only).

Starts the server on a free port, then for each concurrency level runs that many clients, each
sending streamed OpenAI chat requests (the shipped scenes, four prompts) one after another, and
prints requests/s, generated tokens/s and time to first token; then sends --rss-requests more
and prints the server's resident memory after 100 requests and after all of them.

    cargo build --release
    python3 scripts/serve_bench.py --model assets/tiny-shapes --requests 64 --levels 1,4,16,64
"""

import argparse
import base64
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time

PROMPTS = ["detect square", "caption en", "detect circle ; triangle", "how many shapes"]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def one_request(port, image_b64, prompt):
    """Send one streamed chat request; return (time to first token, total time, tokens)."""
    body = json.dumps({
        "stream": True,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64}},
            {"type": "text", "text": prompt},
        ]}],
    })
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:200]!r}")
    first, tokens = None, 0
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"][0]["delta"].get("content") and first is None:
            first = time.perf_counter() - start
        if "usage" in chunk:
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return first or 0.0, time.perf_counter() - start, tokens


def run_level(port, images, clients, requests):
    """`requests` requests spread over `clients` concurrent clients."""
    results, lock = [], threading.Lock()
    counter = iter(range(requests))

    def client():
        while True:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            r = one_request(port, images[k % len(images)], PROMPTS[k % len(PROMPTS)])
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default="target/release/paligemma")
    p.add_argument("--model", default="assets/tiny-shapes")
    p.add_argument("--scenes", default="assets/scenes")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--levels", default="1,4,16,64")
    p.add_argument("--rss-requests", type=int, default=2000,
                   help="requests for the memory check (0: skip it)")
    args = p.parse_args()

    images = [base64.b64encode(open(os.path.join(args.scenes, f), "rb").read()).decode()
              for f in sorted(os.listdir(args.scenes)) if f.endswith(".png")]
    levels = [int(x) for x in args.levels.split(",")]
    server = subprocess.Popen(
        [args.bin, "serve", "--model", args.model, "--port", "0",
         "--max-batch", str(args.max_batch), "--max-queue", str(max(levels) + 16)],
        stderr=subprocess.PIPE, text=True)
    port = None
    for line in server.stderr:
        if line.startswith("listening on http://"):
            port = int(line.strip().rsplit(":", 1)[1])
        if "ready" in line:
            break
    if port is None:
        sys.exit("the server did not start")
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    try:
        run_level(port, images, 4, 8)  # warm-up: pipelines compiled, buffers made
        served = 8
        if args.rss_requests:
            run_level(port, images, args.max_batch, 92)
            served = 100
            after_100 = rss_kib(server.pid)
        print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>7} "
              f"{'TTFT p50':>9} {'TTFT p90':>9}")
        rows = []
        for c in levels:
            r = run_level(port, images, c, args.requests)
            served += r["requests"]
            rows.append(r)
            print(f"{c:>7} {r['requests']:>8} {r['requests_per_s']:>7.2f} "
                  f"{r['tokens_per_s']:>7.1f} {r['ttft_p50_s']:>8.3f}s {r['ttft_p90_s']:>8.3f}s",
                  flush=True)
        if len(rows) > 1:
            gain = rows[-1]["requests_per_s"] / rows[0]["requests_per_s"]
            print(f"{rows[-1]['clients']} clients: {gain:.2f}x the requests/s of "
                  f"{rows[0]['clients']}")
        if args.rss_requests:
            run_level(port, images, args.max_batch, max(args.rss_requests - served, 0))
            after_all = rss_kib(server.pid)
            print(f"server RSS after 100 requests {after_100} KiB, after "
                  f"{max(args.rss_requests, served)} {after_all} KiB "
                  f"({after_all / after_100:.2f}x)")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
