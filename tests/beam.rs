//! Beam search against HF transformers' `generate(num_beams=N, do_sample=False)`: the ids and
//! `sequences_scores` of `tests/fixtures/beam.json` (made by `scripts/make_beam_fixture.py`)
//! for three random-weight fixture models (one PaliGemma 2) and the trained
//! `assets/tiny-shapes`, at 3 and 4 beams with several length penalties and early-stopping
//! rules.

mod common;

use std::path::PathBuf;

use common::{fixtures, gpu, load, root};
use paligemma::generate::{EarlyStopping, FinishReason, GenerateOptions, SamplingParams};
use paligemma::npy;
use paligemma::processor::image::PixelValues;
use serde_json::Value;

/// Largest difference allowed between the engine's score and HF's.
const SCORE_TOL: f64 = 1e-3;

/// Weights forced into 64 KiB bindings, so the split path runs (as in `tests/parity.rs`).
const SPLIT_LIMIT: u64 = 64 * 1024;

fn cases() -> Vec<Value> {
    let path = fixtures().join("beam.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn options(case: &Value) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 20,
        num_beams: case["num_beams"].as_u64().unwrap() as usize,
        length_penalty: case["length_penalty"].as_f64().unwrap() as f32,
        early_stopping: match &case["early_stopping"] {
            Value::Bool(true) => EarlyStopping::Done,
            Value::Bool(false) => EarlyStopping::Heuristic,
            Value::String(s) if s == "never" => EarlyStopping::Never,
            other => panic!("early_stopping {other}"),
        },
        ..Default::default()
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Run every case of the model at `dir` (relative to the repository root) and compare,
/// optionally with weights in bindings of at most `limit` bytes; every step also records
/// its 3 best alternatives.
fn check_model(dir: &str, limit: Option<u64>) {
    let gpu = gpu(limit);
    let pg = load(&gpu, &root().join(dir));
    let mut checked = 0;
    let mut worst: f64 = 0.0;
    for case in cases().iter().filter(|c| c["model"] == dir) {
        let (pixels, prompt) = match case.get("pixels") {
            // The random-weight fixtures: HF's own pixel values and prompt ids.
            Some(px) => {
                let a = npy::read_f32(&root().join(dir).join(px.as_str().unwrap())).unwrap();
                let px = PixelValues {
                    height: a.shape[1],
                    width: a.shape[2],
                    data: a.data,
                };
                let file = root().join(dir).join(case["input_ids"].as_str().unwrap());
                (px, common::read_ids(&file))
            }
            None => {
                let image: PathBuf = root().join(case["image"].as_str().unwrap());
                let px = pg.images.load(&image).unwrap();
                let prompt = case["prompt"].as_str().unwrap();
                (px, pg.prompts().unwrap().encode(prompt).unwrap())
            }
        };
        let opts = GenerateOptions {
            top_logprobs: 3,
            ..options(case)
        };
        let mut pieces = Vec::new();
        let out = pg
            .generate_ids(&pixels, &prompt, &opts, &mut |t| {
                pieces.push(t.to_string());
                true
            })
            .unwrap();
        let want = ids(&case["ids"]);
        let label = format!(
            "{dir} {} beams {} lp {} early {}",
            case.get("pixels").or(case.get("image")).unwrap(),
            opts.num_beams,
            opts.length_penalty,
            case["early_stopping"]
        );
        assert_eq!(out.token_ids, want, "{label}: ids");
        let score = out.beam_score.expect("beam search reports its score") as f64;
        let hf = case["score"].as_f64().unwrap();
        assert!(
            (score - hf).abs() < SCORE_TOL,
            "{label}: score {score} vs HF {hf}"
        );
        worst = worst.max((score - hf).abs());
        // The score is the summed step log-probabilities over length^penalty.
        let sum: f64 = out.steps.iter().map(|s| s.logprob as f64).sum();
        let norm = (out.token_ids.len() as f64).powf(opts.length_penalty as f64);
        assert!((sum / norm - score).abs() < 1e-4, "{label}: steps vs score");
        let eos = pg.config.eos_token_ids.contains(want.last().unwrap());
        let reason = match eos {
            true => FinishReason::Eos,
            false => FinishReason::Length,
        };
        assert_eq!(out.finish_reason, reason, "{label}");
        for s in &out.steps {
            assert_eq!(s.top.len(), 3, "{label}");
            assert!(
                s.top[0].1 >= s.logprob && s.top[0].1 >= s.top[2].1,
                "{label}"
            );
        }
        // The answer comes to the callback once, whole.
        assert_eq!(pieces.concat(), out.text, "{label}");
        checked += 1;
    }
    assert_eq!(checked, 8.max(12 * dir.contains("shapes") as usize));
    eprintln!("{dir} ({limit:?}): {checked} cases, largest score difference from HF {worst:.2e}");
}

#[test]
fn mqa_f32_matches_hf_beam_search() {
    check_model("tests/fixtures/models/tiny-mqa-f32", None);
    check_model("tests/fixtures/models/tiny-mqa-f32", Some(SPLIT_LIMIT));
}

#[test]
fn gqa_bf16_matches_hf_beam_search() {
    check_model("tests/fixtures/models/tiny-gqa-bf16", None);
    check_model("tests/fixtures/models/tiny-gqa-bf16", Some(SPLIT_LIMIT));
}

#[test]
fn paligemma2_matches_hf_beam_search() {
    check_model("tests/fixtures/models/tiny-pg2-f32", None);
}

#[test]
fn trained_shapes_model_matches_hf_beam_search() {
    check_model("assets/tiny-shapes", None);
}

#[test]
fn one_beam_is_plain_greedy_decoding_and_bad_settings_are_refused() {
    let gpu = gpu(None);
    let dir = root().join("tests/fixtures/models/tiny-mqa-f32");
    let pg = load(&gpu, &dir);
    let px = pg
        .images
        .load(&fixtures().join("images/astronaut.png"))
        .unwrap();
    let greedy = GenerateOptions {
        max_new_tokens: 5,
        ..Default::default()
    };
    let out = pg
        .generate(&px, "caption en", &greedy, &mut |_| true)
        .unwrap();
    assert_eq!(out.beam_score, None);
    let err = |opts: GenerateOptions| {
        pg.generate(&px, "caption en", &opts, &mut |_| true)
            .unwrap_err()
            .to_string()
    };
    let e = err(GenerateOptions {
        num_beams: 0,
        ..greedy.clone()
    });
    assert!(e.contains("number of beams must be at least 1"), "{e}");
    let e = err(GenerateOptions {
        num_beams: 3,
        sampling: SamplingParams {
            temperature: 0.7,
            ..Default::default()
        },
        ..greedy.clone()
    });
    assert!(
        e.contains("3 beams") && e.contains("temperature 0, not 0.7"),
        "{e}"
    );
    let e = err(GenerateOptions {
        num_beams: 2,
        stop: vec!["x".into()],
        ..greedy.clone()
    });
    assert!(e.contains("stop strings"), "{e}");
    // The scheduler runs single-beam requests only.
    let mut s = paligemma::generate::Scheduler::new(&pg, Default::default()).unwrap();
    let e = s
        .submit(paligemma::generate::Request {
            image: px.into(),
            prompt: paligemma::generate::Prompt::Text("caption en".into()),
            options: GenerateOptions {
                num_beams: 2,
                ..greedy
            },
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("run_one"), "{e}");
}
