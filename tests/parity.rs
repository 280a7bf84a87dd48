//! Parity with HF transformers on the fixture checkpoints made by `scripts/make_fixtures.py`
//! (random-init PaliGemma at small widths, real architecture): image features, prompt ids,
//! and 20 greedy steps with their top-5 log-probabilities. Every model runs twice: with the
//! device's binding limit and with weights forced into 64 KiB bindings (the split path).

mod common;

use std::path::PathBuf;

use common::{fixtures, gpu};
use paligemma::generate::GenerateOptions;
use paligemma::gpu::Recorder;
use paligemma::model::siglip::VisionTower;
use paligemma::model::{Checkpoint, ModelBuilder, PaliGemmaConfig};
use paligemma::npy;
use paligemma::processor::image::PixelValues;

const SPLIT_LIMIT: u64 = 64 * 1024;

/// (reference name, image file, prompt)
const PAIRS: &[(&str, &str, &str)] = &[
    ("astronaut", "astronaut.png", "caption en"),
    ("chelsea", "chelsea.jpg", "answer en what is in the image?"),
];

fn read_f32(path: PathBuf) -> npy::NpyArray<f32> {
    npy::read_f32(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn ref_pixels(model: &str, img: &str) -> PixelValues {
    let a = read_f32(fixtures().join(format!("models/{model}/ref/{img}_pixel_values.npy")));
    PixelValues {
        height: a.shape[1],
        width: a.shape[2],
        data: a.data,
    }
}

/// Vision tower stage by stage against the reference: embeddings, each layer, final features.
fn check_vision(model: &str, limit: Option<u64>, tol: f32) {
    let dir = fixtures().join("models").join(model);
    let gpu = gpu(limit);
    let config = PaliGemmaConfig::from_file(&dir.join("config.json")).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let tower = VisionTower::load(&ck, &gpu, &config).unwrap();
    for (img, _, _) in PAIRS {
        let r = |s: &str| read_f32(dir.join(format!("ref/{img}_{s}.npy")));
        let acts = tower.activations(&gpu).unwrap();
        tower.upload(&gpu, &acts, &ref_pixels(model, img)).unwrap();
        for layers in 0..=config.vision.num_hidden_layers {
            let mut rec = Recorder::new(&gpu);
            tower.record(&mut rec, &acts, layers, false).unwrap();
            rec.run().unwrap();
            let got = acts.x.read(&gpu).unwrap();
            let want = if layers == 0 {
                r("vision_embeddings")
            } else {
                r(&format!("vision_layer{}", layers - 1))
            };
            let err = max_abs_diff(&got, &want.data);
            let scale = want.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(
                err <= tol * scale.max(1.0),
                "{model} {img} after {layers} layers: max abs diff {err} (values up to {scale})"
            );
        }
        let got = tower.encode(&gpu, &ref_pixels(model, img)).unwrap();
        let want = r("image_features");
        let err = max_abs_diff(&got, &want.data);
        eprintln!("{model} {img} limit {limit:?}: image features max abs diff {err:.2e}");
        assert!(
            err <= tol,
            "{model} {img}: image features max abs diff {err} > {tol}"
        );
    }
}

/// Full pipeline from the prompt: ids, 20 greedy tokens, top-5 logprobs. Each image goes
/// through the engine's own decoding (JPEGs with libjpeg-turbo's decoder, Pillow-exact) and
/// preprocessing.
fn check_generation(model: &str, limit: Option<u64>) {
    check_generation_with(model, None, limit);
}

/// As [`check_generation`], optionally with a LoRA adapter from `tests/fixtures/adapters`
/// (whose own `ref/` then holds the expected outputs of the merged model).
fn check_generation_with(model: &str, adapter: Option<&str>, limit: Option<u64>) {
    let dir = fixtures().join("models").join(model);
    let adapter = adapter.map(|a| fixtures().join("adapters").join(a));
    let mut builder = ModelBuilder::new(&dir).gpu(gpu(limit));
    if let Some(a) = &adapter {
        builder = builder.adapter(a);
    }
    let pg = builder.build().unwrap();
    let ref_dir = adapter.clone().unwrap_or_else(|| dir.clone());
    // HF's adapter outputs use the merged f32 weights, which the engine stores in f16; the
    // fixture also has the log-probabilities of HF with the merged weights rounded to f16
    // (`*_f16merged`), compared at the base models' tolerance.
    let top = if adapter.is_some() { "_f16merged" } else { "" };
    let tol = 0.02;
    for (img, file, prompt) in PAIRS {
        let r = |s: &str| ref_dir.join(format!("ref/{img}_{s}.npy"));
        let want_ids: Vec<u32> = npy::read_i64(&r("input_ids"))
            .unwrap()
            .data
            .iter()
            .map(|&x| x as u32)
            .collect();
        let ids = pg.prompts().unwrap().encode(prompt).unwrap();
        assert_eq!(ids, want_ids, "{model}: prompt ids for {prompt:?}");
        let pixels = pg
            .images
            .load(&fixtures().join("images").join(file))
            .unwrap();
        let pixel_err = max_abs_diff(&pixels.data, &ref_pixels(model, img).data);
        assert!(
            pixel_err <= 1.0 / 127.5 + 1e-6,
            "{model} {file}: pixel values differ from HF's by {pixel_err}"
        );
        let options = GenerateOptions {
            max_new_tokens: 20,
            top_logprobs: 5,
            stop_at_eos: false,
            ..Default::default()
        };
        let out = pg
            .generate_ids(&pixels, &ids, &options, &mut |_| true)
            .unwrap();
        let gen: Vec<u32> = npy::read_i64(&r("gen_ids"))
            .unwrap()
            .data
            .iter()
            .map(|&x| x as u32)
            .collect();
        let top_ids = npy::read_i64(&r(&format!("gen_top_ids{top}")))
            .unwrap()
            .data;
        let top_lp = read_f32(r(&format!("gen_top_logprobs{top}"))).data;
        assert_eq!(out.token_ids, gen, "{model} {img}: greedy ids");
        let mut worst = 0.0f32;
        for (s, step) in out.steps.iter().enumerate() {
            // The k-th best log-probabilities agree, and the two top-5 sets agree up to
            // near-ties at the boundary: an id in one set but not the other must be within
            // the tolerance of the other set's 5th value.
            let want_ids = &top_ids[s * 5..s * 5 + 5];
            let want_lp = &top_lp[s * 5..s * 5 + 5];
            for (j, (id, lp)) in step.top.iter().enumerate() {
                worst = worst.max((lp - want_lp[j]).abs());
                match want_ids.iter().position(|&w| w == *id as i64) {
                    Some(k) => worst = worst.max((lp - want_lp[k]).abs()),
                    None => assert!(
                        *lp <= want_lp[4] + tol,
                        "{model} {img}: step {s}: id {id} ({lp}) not in HF's top-5 {want_ids:?} {want_lp:?}"
                    ),
                }
            }
            for (w, wlp) in want_ids.iter().zip(want_lp) {
                if !step.top.iter().any(|(id, _)| *id as i64 == *w) {
                    assert!(
                        *wlp <= step.top[4].1 + tol,
                        "{model} {img}: step {s}: HF's id {w} ({wlp}) missing from ours {:?}",
                        step.top
                    );
                }
            }
        }
        eprintln!(
            "{model} {img} limit {limit:?}: 20 ids equal, top-5 logprob max diff {worst:.2e}"
        );
        assert!(
            worst <= tol,
            "{model} {img}: top-5 logprob diff {worst} > {tol}"
        );
        let text =
            std::fs::read_to_string(ref_dir.join(format!("ref/{img}_gen_text.txt"))).unwrap();
        assert_eq!(out.text, text, "{model} {img}: decoded text");
        // Without top-k the greedy token is picked on the GPU and only it is read back.
        let fast = GenerateOptions {
            top_logprobs: 0,
            ..options
        };
        let out = pg
            .generate_ids(&pixels, &ids, &fast, &mut |_| true)
            .unwrap();
        assert_eq!(
            out.token_ids, gen,
            "{model} {img}: greedy ids picked on the GPU"
        );
        for (s, step) in out.steps.iter().enumerate() {
            let d = (step.logprob - top_lp[s * 5]).abs();
            assert!(
                d <= tol,
                "{model} {img}: step {s} logprob {} vs {}",
                step.logprob,
                top_lp[s * 5]
            );
        }
    }
}

#[test]
fn mqa_f32_vision() {
    check_vision("tiny-mqa-f32", None, 2e-3);
    check_vision("tiny-mqa-f32", Some(SPLIT_LIMIT), 2e-3);
}

#[test]
fn gqa_bf16_vision() {
    check_vision("tiny-gqa-bf16", None, 2e-2);
    check_vision("tiny-gqa-bf16", Some(SPLIT_LIMIT), 2e-2);
}

#[test]
fn mha_f32_v5_names_vision() {
    check_vision("tiny-mha-f32-v5", None, 2e-3);
}

#[test]
fn mqa_f32_generation() {
    check_generation("tiny-mqa-f32", None);
    check_generation("tiny-mqa-f32", Some(SPLIT_LIMIT));
}

#[test]
fn gqa_bf16_sharded_generation() {
    check_generation("tiny-gqa-bf16", None);
    check_generation("tiny-gqa-bf16", Some(SPLIT_LIMIT));
}

#[test]
fn mha_f32_v5_names_generation() {
    check_generation("tiny-mha-f32-v5", None);
}

#[test]
fn paligemma2_vision() {
    check_vision("tiny-pg2-f32", None, 2e-3);
}

/// PaliGemma 2: Gemma 2 decoder with soft-caps, query_pre_attn_scalar, extra norms and a
/// sliding window of 8 on alternate layers (so generated tokens see only the last 8).
#[test]
fn paligemma2_generation() {
    check_generation("tiny-pg2-f32", None);
    check_generation("tiny-pg2-f32", Some(SPLIT_LIMIT));
}

/// 448 px: 1024 image tokens.
#[test]
fn res448_vision() {
    check_vision("tiny-448-f32", None, 2e-3);
}

#[test]
fn res448_generation() {
    check_generation("tiny-448-f32", None);
}

/// A PEFT LoRA adapter (r 4, alpha 8, on q/k/v/o/gate/up/down) merged at load, against HF's
/// `merge_and_unload()`; also through the 64 KiB split path.
#[test]
fn lora_adapter_generation() {
    check_generation_with("tiny-mqa-f32", Some("tiny-mqa-lora"), None);
    check_generation_with("tiny-mqa-f32", Some("tiny-mqa-lora"), Some(SPLIT_LIMIT));
}

/// Several requests of different prompt lengths decoded together give what each gives alone,
/// with the sampler on the host (top-5) and with the greedy pick on the GPU.
fn check_batch(model: &str) {
    let dir = fixtures().join("models").join(model);
    let pg = common::load(&gpu(None), &dir);
    let astronaut = ref_pixels(model, "astronaut");
    let chelsea = ref_pixels(model, "chelsea");
    let requests = vec![
        (astronaut.clone(), "caption en".to_string()),
        (
            chelsea.clone(),
            "answer en what is in the image?".to_string(),
        ),
        (chelsea, "caption en".to_string()),
        (
            astronaut,
            "answer en how many people are there?".to_string(),
        ),
    ];
    for top_logprobs in [5, 0] {
        let options = GenerateOptions {
            max_new_tokens: 12,
            top_logprobs,
            stop_at_eos: false,
            ..Default::default()
        };
        let batch = pg
            .generate_batch(&requests, &options, &mut |_, _| true)
            .unwrap();
        for ((pixels, prompt), got) in requests.iter().zip(&batch) {
            let alone = pg
                .generate(pixels, prompt, &options, &mut |_| true)
                .unwrap();
            assert_eq!(
                got.token_ids, alone.token_ids,
                "{model} {prompt:?} top {top_logprobs}"
            );
            assert_eq!(got.text, alone.text);
            for (a, b) in got.steps.iter().zip(&alone.steps) {
                assert!(
                    (a.logprob - b.logprob).abs() < 1e-4,
                    "{model} {prompt:?}: {} vs {}",
                    a.logprob,
                    b.logprob
                );
            }
        }
    }
}

#[test]
fn batch_matches_single_requests() {
    check_batch("tiny-mqa-f32");
}

/// PaliGemma 2 in a batch: sliding windows at different positions per sequence.
#[test]
fn batch_matches_single_requests_paligemma2() {
    check_batch("tiny-pg2-f32");
}

/// Two images in one prompt (`scripts/make_multi_image_fixture.py`): HF's processor gives each
/// its own block of image tokens before `<bos>`; the engine's prompt ids, 20 greedy ids and
/// their log-probabilities against HF's, with both images as pixels and with the first one's
/// features computed before.
#[test]
fn two_images_in_one_prompt() {
    use paligemma::generate::{ImageInput, Prompt, Request};
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("multi_image.json")).unwrap(),
    )
    .unwrap();
    let u32s = |k: &str| -> Vec<u32> {
        fixture[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let pg = common::load(
        &gpu(None),
        &common::root().join(fixture["model"].as_str().unwrap()),
    );
    let prompt = fixture["prompt"].as_str().unwrap();
    let ids = pg.prompts().unwrap().encode_images(prompt, 2).unwrap();
    assert_eq!(ids, u32s("input_ids"), "prompt ids");
    assert_eq!(ids.len(), 2 * 256 + 10);
    let text_ids = &ids[2 * 256 + 1..];
    assert_eq!(pg.placeholder_prompt_images(2, text_ids), ids);
    let pixels: Vec<PixelValues> = fixture["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            pg.images
                .load(&common::root().join(p.as_str().unwrap()))
                .unwrap()
        })
        .collect();
    let first = pg.image_features(&pixels[0]).unwrap();
    let options = GenerateOptions {
        max_new_tokens: 20,
        top_logprobs: 5,
        ..Default::default()
    };
    let (want, want_lp) = (u32s("gen_ids"), &fixture["gen_logprobs"]);
    for (how, image) in [
        (
            "pixels",
            ImageInput::Many(pixels.iter().cloned().map(ImageInput::Pixels).collect()),
        ),
        (
            "features + pixels",
            ImageInput::Many(vec![
                ImageInput::Features(first.clone()),
                ImageInput::Pixels(pixels[1].clone()),
            ]),
        ),
    ] {
        assert_eq!(image.count(), 2);
        let request = Request {
            image,
            prompt: Prompt::Text(prompt.into()),
            options: options.clone(),
        };
        let out = pg.run_one(request, &mut |_| true).unwrap();
        assert_eq!(out.prompt_tokens, 522);
        assert_eq!(out.token_ids, want, "{how}: greedy ids");
        let worst = out
            .steps
            .iter()
            .enumerate()
            .flat_map(|(s, step)| {
                // The chosen token's, then the k-th best log-probabilities rank by rank.
                let top = fixture["gen_top_logprobs"][s].as_array().unwrap();
                let chosen = (step.logprob - want_lp[s].as_f64().unwrap() as f32).abs();
                let ranks = step
                    .top
                    .iter()
                    .zip(top)
                    .map(|((_, lp), w)| (lp - w.as_f64().unwrap() as f32).abs());
                std::iter::once(chosen).chain(ranks).collect::<Vec<_>>()
            })
            .fold(0.0f32, f32::max);
        assert_eq!(out.steps[0].top.len(), 5);
        eprintln!("two images ({how}): 522 prompt ids, 20 ids equal, logprob (top-5) max diff {worst:.2e}");
        assert!(worst <= 0.02, "{how}: logprob diff {worst}");
        assert_eq!(out.text, fixture["gen_text"].as_str().unwrap());
    }
    // In a batch with a one-image request, each gives what it gives alone.
    let requests = vec![
        Request {
            image: ImageInput::Many(pixels.iter().cloned().map(ImageInput::Pixels).collect()),
            prompt: Prompt::Text(prompt.into()),
            options: options.clone(),
        },
        Request {
            image: ImageInput::Pixels(pixels[0].clone()),
            prompt: Prompt::Text("caption en".into()),
            options: options.clone(),
        },
    ];
    let alone = pg
        .generate(&pixels[0], "caption en", &options, &mut |_| true)
        .unwrap();
    let batch = pg
        .run_all(
            paligemma::generate::SchedulerOptions::default(),
            requests,
            &mut |_, _| true,
        )
        .unwrap();
    assert_eq!(
        batch[0].as_ref().unwrap().token_ids,
        want,
        "two images in a batch"
    );
    assert_eq!(
        batch[1].as_ref().unwrap().token_ids,
        alone.token_ids,
        "one image in a batch"
    );
    assert_eq!(batch[1].as_ref().unwrap().prompt_tokens, 256 + 1 + 3);
    // The images' order matters: swapped, the answer is another one.
    let swapped = Request {
        image: ImageInput::Many(
            pixels
                .iter()
                .rev()
                .cloned()
                .map(ImageInput::Pixels)
                .collect(),
        ),
        prompt: Prompt::Text(prompt.into()),
        options,
    };
    let out = pg.run_one(swapped, &mut |_| true).unwrap();
    assert_ne!(out.token_ids, want, "the images swapped");
}

/// A request whose prompt ids do not have one block of image tokens per image, or with an
/// empty list of images, or an image of the wrong size among several, is refused with the
/// reason.
#[test]
fn several_images_bad_requests_are_explained() {
    use paligemma::generate::{ImageInput, Prompt, Request};
    let pg = common::load(&gpu(None), &common::fixture_model("tiny-mqa-f32"));
    let px = ref_pixels("tiny-mqa-f32", "astronaut");
    let two = || ImageInput::Many(vec![ImageInput::Pixels(px.clone()), px.clone().into()]);
    let fail = |image: ImageInput, prompt: Prompt| {
        let request = Request {
            image,
            prompt,
            options: GenerateOptions::default(),
        };
        pg.run_one(request, &mut |_| true).unwrap_err().to_string()
    };
    let one_block = Prompt::Ids(pg.placeholder_prompt(&[300, 301]));
    let e = fail(two(), one_block);
    assert!(
        e.contains("2 blocks of 256 image tokens (one per image)") && e.contains("starts with 256"),
        "{e}"
    );
    let two_blocks = Prompt::Ids(pg.placeholder_prompt_images(2, &[300, 301]));
    let e = fail(ImageInput::Pixels(px.clone()), two_blocks);
    assert!(
        e.contains("start with 256 image tokens") && e.contains("starts with 512"),
        "{e}"
    );
    let e = fail(
        ImageInput::Many(Vec::new()),
        Prompt::Text("caption en".into()),
    );
    assert!(e.contains("no image"), "{e}");
    let small = PixelValues {
        height: 14,
        width: 14,
        data: vec![0.0; 3 * 14 * 14],
    };
    let e = fail(
        ImageInput::Many(vec![px.clone().into(), small.into()]),
        Prompt::Text("caption en".into()),
    );
    assert!(e.contains("image 2 of 2: pixel values are 14×14"), "{e}");
    let e = pg
        .prompts()
        .unwrap()
        .encode_images("caption en", 0)
        .unwrap_err();
    assert!(e.to_string().contains("at least one image"), "{e}");
}
