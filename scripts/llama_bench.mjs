// Time llama.cpp (through node-llama-cpp's prebuilt Vulkan binaries) on a GGUF written by
// make_gguf.py: cold first prefill (shader compilation included), warm prefill (time to first
// token) and greedy decode, with the same token counts as `paligemma bench`. Prints one JSON
// object.
//
// usage: node scripts/llama_bench.mjs MODEL.gguf [prompt_tokens=266] [decode_steps=16]
// Set GGML_VK_VISIBLE_DEVICES=0 to use the first Vulkan device (lavapipe on a CPU machine).

import {join, dirname} from "node:path";
import {fileURLToPath, pathToFileURL} from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const entry = process.env.NODE_LLAMA_CPP ??
    join(here, ".llama/node_modules/node-llama-cpp/dist/index.js");
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(entry).href);

const [modelPath, promptArg, stepsArg] = process.argv.slice(2);
if (!modelPath) {
    console.error("usage: node llama_bench.mjs MODEL.gguf [prompt_tokens] [decode_steps]");
    process.exit(2);
}
const promptTokens = Number(promptArg ?? 266);
const steps = Number(stepsArg ?? 16);
const now = () => Number(process.hrtime.bigint()) / 1e9;

const llama = await getLlama({gpu: "vulkan", build: "never", logLevel: LlamaLogLevel.warn});
const gpuDevices = await llama.getGpuDeviceNames();
let t = now();
const model = await llama.loadModel({modelPath, gpuLayers: "max"});
const loadS = now() - t;
const context = await model.createContext({contextSize: 1024, batchSize: 512, sequences: 1});
const seq = context.getSequence();
// <bos> then ordinary pieces; the image positions of PaliGemma are plain tokens here.
const prompt = [2, ...Array.from({length: promptTokens - 1}, (_, i) => 1000 + 37 * i)];

// One request: the prompt, then `n` greedy tokens. Time to first token covers the prefill, the
// LM head of the last position and the first pick (as `paligemma bench` counts its prefill);
// decode runs from the first token to the n-th.
async function request(n) {
    await seq.clearHistory();
    const times = [];
    const t0 = now();
    for await (const _token of seq.evaluate(prompt, {temperature: 0})) {
        times.push(now());
        if (times.length >= n) break;
    }
    return {ttftS: times[0] - t0, tokS: n > 1 ? (n - 1) / (times[n - 1] - times[0]) : 0};
}

// The first request compiles the prefill pipelines, the second the one-token (decode) ones;
// the third is timed.
const cold = await request(1);
await request(steps + 1);
const warm = await request(steps + 1);

console.log(JSON.stringify({
    engine: "llama.cpp (node-llama-cpp, Vulkan)",
    devices: gpuDevices,
    prompt_tokens: promptTokens,
    load_s: loadS,
    cold_prefill_s: cold.ttftS,
    prefill_s: warm.ttftS,
    prefill_tok_s: promptTokens / warm.ttftS,
    decode_steps: steps,
    decode_tok_s: warm.tokS,
}));
await context.dispose();
await model.dispose();
await llama.dispose();
