//! The trained tiny model `assets/tiny-shapes` (scripts/train_tiny.py) on the 50 held-out
//! scenes of `tests/fixtures/shapes` (scripts/make_scenes.py, seed 2): task accuracy of the
//! engine's greedy answers (caption exact match, count, detection IoU) and token-for-token
//! agreement with HF transformers' greedy outputs on the same checkpoint.

mod common;

use common::root;
use paligemma::generate::GenerateOptions;
use paligemma::tasks::parse_answer;
use serde_json::Value;

/// Acceptance targets of issue #7, asserted on the engine's answers. The shipped model reaches
/// caption 82 %, count 98 %, IoU 0.607 (HF and this engine agree exactly).
const CAPTION_TARGET: f64 = 0.80;
const COUNT_TARGET: f64 = 0.90;
const IOU_TARGET: f64 = 0.50;
/// Engine and HF may only disagree where HF's top-2 log-probabilities are an exact tie
/// (f32 rounding decides); a gap above this is a real mismatch.
const TIE_MARGIN: f64 = 1e-3;
const MAX_TIES: usize = 2;

fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    // boxes as (y_min, x_min, y_max, x_max)
    let (y0, x0) = (a[0].max(b[0]), a[1].max(b[1]));
    let (y1, x1) = (a[2].min(b[2]), a[3].min(b[3]));
    let inter = (y1 - y0).max(0.0) * (x1 - x0).max(0.0);
    let area = |r: [f64; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tiny_shapes_heldout() {
    let model_dir = root().join("assets/tiny-shapes");
    let data_dir = root().join("tests/fixtures/shapes");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir.join("shapes.json")).unwrap())
            .unwrap();
    let max_new_tokens = meta["max_new_tokens"].as_u64().unwrap() as usize;
    let model = common::load(&common::gpu(None), &model_dir);
    let prompts = model.prompts().unwrap();
    let options = GenerateOptions {
        max_new_tokens,
        ..Default::default()
    };

    let start = std::time::Instant::now();
    let (mut n, mut cap_ok, mut cnt_ok) = (0usize, 0usize, 0usize);
    let mut ious = Vec::new();
    let (mut runs, mut equal, mut ties) = (0usize, 0usize, Vec::new());
    let mut tokens = 0usize;
    for scene in meta["scenes"].as_array().unwrap() {
        n += 1;
        let file = scene["file"].as_str().unwrap();
        let (w, h) = (
            scene["width"].as_u64().unwrap() as u32,
            scene["height"].as_u64().unwrap() as u32,
        );
        let pixels = model.images.load(&data_dir.join(file)).unwrap();
        for hf in scene["hf"].as_array().unwrap() {
            let prompt = hf["prompt"].as_str().unwrap();
            let ids = prompts.encode(prompt).unwrap();
            let n_img = ids.len() - ids_of(&hf["prompt_ids"]).len();
            assert_eq!(n_img, 256, "{file}: {prompt:?}: image tokens");
            assert_eq!(
                ids[n_img..],
                ids_of(&hf["prompt_ids"])[..],
                "{file}: prompt ids of {prompt:?}"
            );
            let out = model
                .generate_ids(&pixels, &ids, &options, &mut |_| true)
                .unwrap();
            tokens += out.token_ids.len();
            let want = ids_of(&hf["ids"]);
            runs += 1;
            if out.token_ids == want {
                equal += 1;
                assert_eq!(
                    out.text,
                    hf["text"].as_str().unwrap(),
                    "{file}: {prompt:?}: text"
                );
            } else {
                // first divergence must be an exact tie in HF's logits
                let s = out
                    .token_ids
                    .iter()
                    .zip(&want)
                    .position(|(a, b)| a != b)
                    .unwrap_or(out.token_ids.len().min(want.len()));
                let margin = hf["margins"]
                    .as_array()
                    .and_then(|m| m.get(s))
                    .and_then(Value::as_f64)
                    .unwrap_or(f64::INFINITY);
                eprintln!(
                    "{file} {prompt:?}: engine {:?} vs HF {:?} (differ at step {s}, HF top-2 margin {margin})",
                    out.text,
                    hf["text"].as_str().unwrap()
                );
                assert!(
                    margin <= TIE_MARGIN,
                    "{file} {prompt:?}: engine differs from HF at step {s} where HF's top-2 margin is {margin} (not a tie)\n engine {:?}\n HF     {want:?}",
                    out.token_ids
                );
                ties.push(format!("{file} {prompt:?} step {s}"));
            }
            // task accuracy, from the engine's own answers
            if prompt == "caption en" {
                cap_ok += (out.text == scene["caption"].as_str().unwrap()) as usize;
            } else if prompt.starts_with("answer en how many") {
                cnt_ok += (out.text == scene["count"].as_u64().unwrap().to_string()) as usize;
            } else if let Some(shape) = prompt.strip_prefix("detect ") {
                let obj = &scene["objects"][0];
                assert_eq!(obj["shape"].as_str().unwrap(), shape);
                let gt: Vec<f64> = obj["box"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                let found = parse_answer(&out.text, w, h);
                let v = found
                    .iter()
                    .find(|o| o.valid)
                    .map(|o| {
                        let b = o.bbox;
                        iou(
                            [
                                b.y_min as f64,
                                b.x_min as f64,
                                b.y_max as f64,
                                b.x_max as f64,
                            ],
                            [gt[0], gt[1], gt[2], gt[3]],
                        )
                    })
                    .unwrap_or(0.0);
                ious.push(v);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let caption = cap_ok as f64 / n as f64;
    let count = cnt_ok as f64 / n as f64;
    let miou = ious.iter().sum::<f64>() / ious.len().max(1) as f64;
    let hf = &meta["metrics"];
    eprintln!(
        "tiny-shapes on {n} held-out scenes ({runs} generations, {tokens} tokens, {secs:.1}s):\n  \
         caption exact match {:.1}% (target >= {:.0}%, HF {:.1}%)\n  \
         count accuracy {:.1}% (target >= {:.0}%, HF {:.1}%)\n  \
         detect mean IoU {miou:.3} over {} single-shape scenes (target >= {IOU_TARGET}, HF {:.3})\n  \
         greedy ids equal to HF: {equal}/{runs} ({} exact ties: {ties:?})",
        caption * 100.0,
        CAPTION_TARGET * 100.0,
        hf["caption_exact"].as_f64().unwrap_or(f64::NAN) * 100.0,
        count * 100.0,
        COUNT_TARGET * 100.0,
        hf["count_acc"].as_f64().unwrap_or(f64::NAN) * 100.0,
        ious.len(),
        hf["detect_mean_iou"].as_f64().unwrap_or(f64::NAN),
        ties.len(),
    );
    assert!(
        ties.len() <= MAX_TIES,
        "too many tie-broken mismatches: {ties:?}"
    );
    for (name, got, target) in [
        ("caption exact match", caption, CAPTION_TARGET),
        ("count accuracy", count, COUNT_TARGET),
        ("detect mean IoU", miou, IOU_TARGET),
    ] {
        assert!(got >= target, "{name} {got:.3} < issue #7 target {target}");
    }
}
