//! PaliGemma-3B-224 dimensions (vision 1152/4304/16 heads, text 2048/16384/8 heads/1 KV head/
//! head_dim 256, 257,216-row tied LM head) with random f16 weights built in memory, one layer
//! per tower: runs the vision tower, a 266-token prefill and decode steps on the real shapes,
//! and checks logits from every chunk of the split LM head against a host dot product.

mod common;

use paligemma::generate::argmax;
use paligemma::gpu::Recorder;
use paligemma::model::gemma::Gemma;
use paligemma::model::siglip::VisionTower;
use paligemma::model::{Checkpoint, PaliGemmaConfig};
use paligemma::processor::image::PixelValues;

const CONFIG: &str = r#"{"model_type": "paligemma", "image_token_index": 257152, "projection_dim": 2048,
  "text_config": {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
    "num_attention_heads": 8, "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 257216},
  "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
    "num_hidden_layers": 1, "patch_size": 14, "image_size": 224}}"#;

#[test]
fn paligemma_3b_shapes_run_prefill_and_decode() {
    let gpu = common::gpu(None);
    let config = PaliGemmaConfig::from_json(CONFIG).unwrap();
    let ck = Checkpoint::synthetic(7);
    let vision = VisionTower::load(&ck, &gpu, &config).unwrap();
    let text = Gemma::load(&ck, &gpu, &config.text).unwrap();
    let table_bytes = 257_216u64 * 2048 * 2;
    let chunks = text.embed.chunks().len();
    assert!(chunks as u64 >= table_bytes.div_ceil(gpu.weight_chunk_bytes()));
    assert!(
        chunks > 1,
        "the 1 GB embedding table must be split (limit {} bytes)",
        gpu.weight_chunk_bytes()
    );

    let s = 224;
    let pixels = PixelValues {
        height: s,
        width: s,
        data: (0..3 * s * s)
            .map(|i| ((i * 37 % 255) as f32 / 127.5) - 1.0)
            .collect(),
    };
    let va = vision.activations(&gpu).unwrap();
    vision.upload(&gpu, &va, &pixels).unwrap();
    let mut rec = Recorder::new(&gpu);
    vision.record(&mut rec, &va, usize::MAX, true).unwrap();
    rec.run().unwrap();
    let features = va.features.read(&gpu).unwrap();
    assert_eq!(features.len(), 256 * 2048);
    assert!(features.iter().all(|v| v.is_finite()));

    let mut ids = vec![257_152u32; 256];
    ids.push(2);
    ids.extend([1000, 25_000, 100_000, 200_000, 256_100, 257_000, 42, 7, 108]);
    assert_eq!(ids.len(), 266);
    let mut seq = text.sequence(&gpu, ids.len(), 3).unwrap();
    let mut prefill = text.prefill(&gpu, &seq, &ids).unwrap();
    let mut rec = Recorder::new(&gpu);
    let layers = text.num_layers();
    text.record_prefill(&mut rec, &mut seq, &mut prefill, Some(&va.features), layers)
        .unwrap();
    rec.run().unwrap();

    let batch = text.batch(&gpu, 1).unwrap();
    for step in 0..3 {
        // Step 0 reads the prefill's outputs, later steps the batch's.
        let (logits, last) = match step {
            0 => (prefill.logits(), prefill.last_hidden()),
            _ => (batch.logits(), batch.last_hidden()),
        };
        let hidden = last.read(&gpu).unwrap();
        let logits = logits.read(&gpu).unwrap();
        assert_eq!(logits.len(), 257_216);
        assert!(
            logits.iter().all(|v| v.is_finite()),
            "step {step}: non-finite logits"
        );
        // One row from each chunk of the LM head (and the last row) against the host.
        let mut rows: Vec<usize> = text
            .embed
            .chunks()
            .iter()
            .map(|c| c.row_start + c.rows / 2)
            .collect();
        rows.push(257_215);
        for row in rows {
            let w = text.embed.read_rows(&gpu, row, 1).unwrap();
            let want: f32 = w.iter().zip(&hidden).map(|(a, b)| a * b).sum();
            let got = logits[row];
            assert!(
                (got - want).abs() <= 1e-3 * (1.0 + want.abs()),
                "step {step}, row {row}: {got} vs {want}"
            );
        }
        if step < 2 {
            let id = argmax(&logits);
            let mut rec = Recorder::new(&gpu);
            text.record_step(&mut rec, &batch, &mut [&mut seq], &[id])
                .unwrap();
            rec.run().unwrap();
        }
    }
    assert_eq!(seq.len(), 268);
}

/// PaliGemma-3B-896's vision tower shape (4096 patches of a 896×896 image, So400m widths), one
/// layer: attention over 4096 tokens runs in key blocks, with no 4096² score matrix anywhere.
#[test]
fn vision_tower_at_896_px() {
    let gpu = common::gpu(None);
    let json = CONFIG.replace("\"image_size\": 224", "\"image_size\": 896");
    let config = PaliGemmaConfig::from_json(&json).unwrap();
    assert_eq!(config.num_image_tokens(), 4096);
    let vision = VisionTower::load(&Checkpoint::synthetic(3), &gpu, &config).unwrap();
    let s = 896;
    let pixels = PixelValues {
        height: s,
        width: s,
        data: (0..3 * s * s)
            .map(|i| ((i * 53 % 255) as f32 / 127.5) - 1.0)
            .collect(),
    };
    let features = vision.encode(&gpu, &pixels).unwrap();
    assert_eq!(features.len(), 4096 * 2048);
    assert!(features.iter().all(|v| v.is_finite()));
    // Patches differ, so their features must too (a broken attention would blur them).
    assert_ne!(features[..2048], features[4095 * 2048..]);
}
