//! The continuous-batching scheduler on the trained tiny model (`assets/tiny-shapes`):
//! requests that join and leave a running batch give exactly what they give alone, cancelled
//! requests free their slots, image features are reused without rerunning the vision tower,
//! no submission carries more than the configured number of layers, and the stop conditions
//! report why an answer ended.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use paligemma::generate::{
    FinishReason, GenerateOptions, Generation, ImageInput, Prompt, Request, Scheduler,
    SchedulerEvent, SchedulerOptions,
};
use paligemma::gpu::{Gpu, Recorder};
use paligemma::model::gemma::Gemma;
use paligemma::model::siglip::VisionTower;
use paligemma::model::{Checkpoint, ModelBuilder, PaliGemma, PaliGemmaConfig, WeightFormat};
use paligemma::processor::image::PixelValues;

fn load(format: WeightFormat) -> PaliGemma {
    ModelBuilder::new(common::shapes_model())
        .gpu(common::gpu(None))
        .weights(format)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn scene(model: &PaliGemma, i: usize) -> PixelValues {
    model.images.load(&common::scene(i)).unwrap()
}

const PROMPTS: [&str; 5] = [
    "caption en",
    "detect square",
    "answer en how many shapes?",
    "detect circle",
    "detect triangle",
];

fn request(model: &PaliGemma, i: usize, options: &GenerateOptions) -> Request {
    Request {
        image: ImageInput::Pixels(scene(model, i % 6)),
        prompt: Prompt::Text(PROMPTS[i % PROMPTS.len()].to_string()),
        options: options.clone(),
    }
}

fn alone(model: &PaliGemma, request: Request) -> Generation {
    model.run_one(request, &mut |_| true).unwrap()
}

/// Eleven requests through a scheduler of six slots, submitted five at the start and then
/// one per step: the batch grows past the matrix-vector kernels' row limit, finished
/// sequences hand their slots to queued ones, and every answer is the one its request gives
/// alone.
fn check_continuous(format: WeightFormat) {
    let model = load(format);
    let options = GenerateOptions {
        max_new_tokens: 12,
        ..Default::default()
    };
    let n = 11;
    let want: Vec<Generation> = (0..n)
        .map(|i| alone(&model, request(&model, i, &options)))
        .collect();
    let opts = SchedulerOptions {
        max_sequences: 6,
        ..Default::default()
    };
    let mut scheduler = Scheduler::new(&model, opts).unwrap();
    let mut index = HashMap::new();
    let mut got: Vec<Option<Generation>> = vec![None; n];
    let mut texts = vec![String::new(); n];
    let (mut submitted, mut steps, mut most_live) = (0, 0, 0);
    let mut submitted_after_a_finish = false;
    let mut finished = 0;
    while submitted < n || !scheduler.is_idle() {
        let admit = if steps == 0 { 5 } else { 1 };
        for _ in 0..admit {
            if submitted < n {
                let id = scheduler
                    .submit(request(&model, submitted, &options))
                    .unwrap();
                index.insert(id, submitted);
                submitted_after_a_finish |= finished > 0;
                submitted += 1;
            }
        }
        for event in scheduler.step().unwrap() {
            match event {
                SchedulerEvent::Text { id, text } => texts[index[&id]].push_str(&text),
                SchedulerEvent::Finished { id, result } => {
                    got[index[&id]] = Some(result.unwrap());
                    finished += 1;
                }
            }
        }
        most_live = most_live.max(scheduler.live());
        steps += 1;
        assert!(steps < 200, "the scheduler does not finish");
    }
    assert!(most_live > 4, "the batch reached {most_live} sequences");
    assert!(
        submitted_after_a_finish,
        "no request joined a running batch"
    );
    for (i, (g, w)) in got.into_iter().zip(&want).enumerate() {
        let g = g.expect("every request finished");
        assert_eq!(g.token_ids, w.token_ids, "{format} request {i}");
        assert_eq!(g.text, w.text);
        assert_eq!(texts[i], w.text, "streamed pieces add up to the answer");
        assert_eq!(g.finish_reason, w.finish_reason);
        for (a, b) in g.steps.iter().zip(&w.steps) {
            assert!((a.logprob - b.logprob).abs() < 1e-4, "{a:?} vs {b:?}");
        }
    }
}

#[test]
fn continuous_batching_matches_requests_alone_f16() {
    check_continuous(WeightFormat::F16);
}

#[test]
fn continuous_batching_matches_requests_alone_int8() {
    check_continuous(WeightFormat::Int8);
}

/// A cancelled request leaves the batch at once and the queued one takes its slot.
#[test]
fn cancelling_frees_the_slot() {
    let model = load(WeightFormat::F16);
    let options = GenerateOptions {
        max_new_tokens: 20,
        stop_at_eos: false,
        ..Default::default()
    };
    let opts = SchedulerOptions {
        max_sequences: 2,
        ..Default::default()
    };
    let mut scheduler = Scheduler::new(&model, opts).unwrap();
    let a = scheduler.submit(request(&model, 0, &options)).unwrap();
    let _b = scheduler.submit(request(&model, 1, &options)).unwrap();
    let c = scheduler.submit(request(&model, 2, &options)).unwrap();
    scheduler.step().unwrap();
    assert_eq!((scheduler.live(), scheduler.queued()), (2, 1));
    assert!(scheduler.cancel(a));
    assert!(!scheduler.cancel(a), "a request is cancelled once");
    assert!(!scheduler.cancel(999));
    assert_eq!(scheduler.live(), 1, "the slot is freed at once");
    let events = scheduler.step().unwrap();
    assert_eq!((scheduler.live(), scheduler.queued()), (2, 0));
    let cancelled = events
        .iter()
        .find_map(|e| match e {
            SchedulerEvent::Finished { id, result } if *id == a => Some(result.as_ref().unwrap()),
            _ => None,
        })
        .expect("the cancelled request is reported");
    assert_eq!(cancelled.finish_reason, FinishReason::Cancelled);
    assert_eq!(
        cancelled.token_ids.len(),
        2,
        "one step and the prefill's token"
    );
    let mut answer_c = None;
    while !scheduler.is_idle() {
        for e in scheduler.step().unwrap() {
            if let SchedulerEvent::Finished { id, result } = e {
                if id == c {
                    answer_c = Some(result.unwrap());
                }
            }
        }
    }
    let answer_c = answer_c.unwrap();
    assert_eq!(answer_c.finish_reason, FinishReason::Length);
    assert_eq!(
        answer_c.token_ids,
        alone(&model, request(&model, 2, &options)).token_ids
    );
}

/// Greedy decoding is pipelined: each decode step is one submission queued behind the step
/// before it, whose picks are read back while it runs; only the last step is waited for with
/// nothing queued behind it. The answer is the same.
#[test]
fn greedy_steps_are_queued_behind_the_previous_one() {
    let model = load(WeightFormat::F16);
    let gpu = model.gpu().clone();
    let options = GenerateOptions {
        max_new_tokens: 12,
        stop_at_eos: false,
        ..Default::default()
    };
    let want = alone(&model, request(&model, 0, &options));
    let opts = SchedulerOptions {
        max_sequences: 2,
        ..Default::default()
    };
    let mut scheduler = Scheduler::new(&model, opts).unwrap();
    scheduler.submit(request(&model, 0, &options)).unwrap();
    // Vision tower, prefill and the first token; the first decode step is left queued.
    let events = scheduler.step().unwrap();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, SchedulerEvent::Finished { .. })),
        "{events:?}"
    );
    gpu.reset_submission_stats();
    let (mut got, mut calls) = (None, 0);
    while !scheduler.is_idle() {
        for e in scheduler.step().unwrap() {
            if let SchedulerEvent::Finished { result, .. } = e {
                got = Some(result.unwrap());
            }
        }
        calls += 1;
    }
    let s = gpu.submission_stats();
    let got = got.expect("the request finished");
    assert_eq!(got.token_ids, want.token_ids);
    assert_eq!(got.finish_reason, FinishReason::Length);
    // 12 tokens: the prefill's, then 11 decode steps, the first queued by the first call.
    assert_eq!(calls, 11);
    assert_eq!(
        (s.submissions, s.overlapped_waits, s.waits),
        (10, 10, 1),
        "{s:?}"
    );
}

/// Three prompts about one image encoded once give the answers of three separate runs, and
/// the vision tower runs once instead of three times.
#[test]
fn image_features_are_reused() {
    let model = load(WeightFormat::F16);
    let pixels = scene(&model, 3);
    let options = GenerateOptions::default();
    let prompts = ["caption en", "detect square", "answer en how many shapes?"];
    let before = model.vision_runs();
    let separate: Vec<Generation> = prompts
        .iter()
        .map(|p| model.generate(&pixels, p, &options, &mut |_| true).unwrap())
        .collect();
    assert_eq!(model.vision_runs() - before, 3);
    let before = model.vision_runs();
    let features = model.image_features(&pixels).unwrap();
    for (p, want) in prompts.iter().zip(&separate) {
        let request = Request {
            image: ImageInput::Features(features.clone()),
            prompt: Prompt::Text(p.to_string()),
            options: options.clone(),
        };
        let got = alone(&model, request);
        assert_eq!(got.token_ids, want.token_ids, "{p}");
        assert_eq!(got.text, want.text);
    }
    assert_eq!(model.vision_runs() - before, 1, "the tower ran once");
    assert!(!separate[0].text.is_empty());
}

/// Dispatches of one encoder layer and of one decoder layer of a prefill, counted by
/// recording them with the public model API.
fn layer_dispatches(gpu: &Arc<Gpu>) -> (usize, usize) {
    let dir = common::shapes_model();
    let config = PaliGemmaConfig::from_file(&dir.join("config.json")).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let vision = VisionTower::load(&ck, gpu, &config).unwrap();
    let acts = vision.activations(gpu).unwrap();
    let count = |layers| {
        let mut rec = Recorder::new(gpu);
        vision.record(&mut rec, &acts, layers, false).unwrap();
        rec.len()
    };
    let vision_layer = count(1) - count(0);
    let text = Gemma::load(&ck, gpu, &config.text).unwrap();
    let mut ids = vec![config.image_token_index; config.num_image_tokens()];
    ids.extend([config.bos_token_id, 100, 101]);
    let mut seq = text.sequence(gpu, ids.len(), 1).unwrap();
    let mut prefill = text.prefill(gpu, &seq, &ids).unwrap();
    let mut rec = Recorder::new(gpu);
    text.record_prefill(&mut rec, &mut seq, &mut prefill, None, 1)
        .unwrap();
    let mut rec = Recorder::new(gpu);
    assert!(!text
        .record_prefill(&mut rec, &mut seq, &mut prefill, None, 1)
        .unwrap());
    (vision_layer, rec.len())
}

/// A decode step of one sequence records five launches a decoder layer (the norms fused into
/// the matrix-vector kernels, gate/up/GeGLU in one, RoPE and the cache write in attention),
/// plus the embedding, the final norm and the LM head (one chunk each in tiny-shapes).
#[test]
fn a_decode_step_is_five_launches_a_layer() {
    let gpu = common::gpu(None);
    let dir = common::shapes_model();
    let config = PaliGemmaConfig::from_file(&dir.join("config.json")).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let text = Gemma::load(&ck, &gpu, &config.text).unwrap();
    assert_eq!(text.embed.chunks().len(), 1);
    let ids = [config.bos_token_id, 100, 101];
    let mut seq = text.sequence(&gpu, ids.len(), 2).unwrap();
    let mut prefill = text.prefill(&gpu, &seq, &ids).unwrap();
    let mut rec = Recorder::new(&gpu);
    let layers = text.num_layers();
    text.record_prefill(&mut rec, &mut seq, &mut prefill, None, layers)
        .unwrap();
    rec.run().unwrap();
    let batch = text.batch(&gpu, 1).unwrap();
    let mut rec = Recorder::new(&gpu);
    text.record_step(&mut rec, &batch, &mut [&mut seq], &[102])
        .unwrap();
    assert_eq!(rec.len(), 5 * layers + 3);
    rec.run().unwrap();
    let logits = batch.logits().read(&gpu).unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
}

/// With one layer per submission no submission of the vision tower or the prefill carries
/// more than one layer's dispatches (plus the few of the embeddings, projector or LM head);
/// with two, half as many submissions go out.
#[test]
fn no_submission_carries_more_than_the_bound() {
    let model = load(WeightFormat::F16);
    let gpu = model.gpu().clone();
    let (vision_layer, decoder_layer) = layer_dispatches(&gpu);
    let (vl, tl) = (
        model.config.vision.num_hidden_layers as u64,
        model.config.text.num_hidden_layers as u64,
    );
    let pixels = scene(&model, 0);
    let ends = 4; // embeddings or projector / LM head and greedy pick, around a layer
    for per in [1u64, 2] {
        let opts = SchedulerOptions {
            max_sequences: 1,
            layers_per_submission: per as usize,
        };
        gpu.reset_submission_stats();
        let mut scheduler = Scheduler::new(&model, opts).unwrap();
        let options = GenerateOptions {
            max_new_tokens: 1,
            ..Default::default()
        };
        let request = Request {
            image: ImageInput::Pixels(pixels.clone()),
            prompt: Prompt::Text("caption en".into()),
            options,
        };
        scheduler.submit(request).unwrap();
        let setup = gpu.submission_stats();
        let events = scheduler.step().unwrap();
        assert!(events
            .iter()
            .any(|e| matches!(e, SchedulerEvent::Finished { .. })));
        let s = gpu.submission_stats();
        let work = s.submissions - setup.submissions;
        // The vision tower and the prefill in ceil(layers / per) submissions each, and one
        // copy of the first token's pick.
        assert_eq!(work, vl.div_ceil(per) + tl.div_ceil(per) + 1, "{s:?}");
        let bound = per as usize * vision_layer.max(decoder_layer) + ends;
        assert!(
            s.max_dispatches as usize <= bound,
            "{per} layer(s) per submission: {} dispatches in one (bound {bound})",
            s.max_dispatches
        );
        let whole = vl as usize * vision_layer + tl as usize * decoder_layer;
        assert!(s.dispatches as usize >= whole, "every layer ran: {s:?}");
        assert!(
            whole > bound,
            "one submission of the whole request would break the bound"
        );
    }
}

/// `eos`, `length` and `stop` finish reasons; stop strings cut the answer before them; each
/// step carries its token's text.
#[test]
fn stop_conditions_and_token_texts() {
    let model = load(WeightFormat::F16);
    let pixels = scene(&model, 0);
    let run = |options: &GenerateOptions| {
        let mut streamed = String::new();
        let g = model
            .generate(&pixels, "detect square", options, &mut |t| {
                streamed.push_str(t);
                true
            })
            .unwrap();
        assert_eq!(streamed, g.text, "the stream adds up to the answer");
        g
    };
    let full = run(&GenerateOptions::default());
    assert_eq!(full.text, "<loc0238><loc0178><loc0544><loc0544> square");
    assert_eq!(full.finish_reason, FinishReason::Eos);
    assert_eq!(full.completion_tokens, full.token_ids.len());
    let n = full.steps.len();
    let pieces: String = full.steps[..n - 1]
        .iter()
        .map(|s| s.text.as_str())
        .collect();
    assert_eq!(pieces, full.text);

    let short = run(&GenerateOptions {
        max_new_tokens: 2,
        ..Default::default()
    });
    assert_eq!(short.finish_reason, FinishReason::Length);
    assert_eq!(short.text, "<loc0238><loc0178>");
    assert_eq!(short.completion_tokens, 2);

    let stopped = run(&GenerateOptions {
        stop: vec!["<loc0544>".into()],
        ..Default::default()
    });
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert_eq!(stopped.text, "<loc0238><loc0178>");
    assert_eq!(stopped.token_ids, full.token_ids[..3]);

    let bad = GenerateOptions {
        repetition_penalty: 0.0,
        ..Default::default()
    };
    let err = model
        .generate(&pixels, "detect square", &bad, &mut |_| true)
        .unwrap_err();
    assert!(err.to_string().contains("repetition penalty"), "{err}");
}

/// The repetition penalty (HF semantics, host side) changes a greedy answer that repeats
/// tokens and leaves unrepeated ones alone; penalty 1 is exactly greedy.
#[test]
fn repetition_penalty_changes_repeats_only() {
    let model = load(WeightFormat::F16);
    let pixels = scene(&model, 0);
    let go = |penalty: f32| {
        let options = GenerateOptions {
            repetition_penalty: penalty,
            ..Default::default()
        };
        model
            .generate(&pixels, "detect square", &options, &mut |_| true)
            .unwrap()
    };
    let greedy = go(1.0);
    let penalised = go(1.0);
    assert_eq!(greedy.token_ids, penalised.token_ids);
    // The greedy box repeats <loc0544>; a strong penalty forbids that repeat.
    let strong = go(100.0);
    assert_eq!(strong.token_ids[..3], greedy.token_ids[..3]);
    assert_ne!(strong.token_ids[3], greedy.token_ids[3]);
}
