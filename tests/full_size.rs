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

/// The tensors of a PaliGemma checkpoint of `c`'s shapes under their published names.
fn tensor_shapes(c: &PaliGemmaConfig) -> Vec<(String, Vec<usize>)> {
    let (v, t) = (&c.vision, &c.text);
    let d = v.hidden_size;
    let mut out = Vec::new();
    let mut push = |name: String, shape: &[usize]| out.push((name, shape.to_vec()));
    let e = "vision_tower.vision_model.embeddings";
    push(
        format!("{e}.patch_embedding.weight"),
        &[d, v.num_channels, v.patch_size, v.patch_size],
    );
    push(format!("{e}.patch_embedding.bias"), &[d]);
    push(
        format!("{e}.position_embedding.weight"),
        &[c.num_image_tokens(), d],
    );
    for l in 0..v.num_hidden_layers {
        let p = format!("vision_tower.vision_model.encoder.layers.{l}");
        for ln in ["layer_norm1", "layer_norm2"] {
            push(format!("{p}.{ln}.weight"), &[d]);
            push(format!("{p}.{ln}.bias"), &[d]);
        }
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            push(format!("{p}.self_attn.{proj}.weight"), &[d, d]);
            push(format!("{p}.self_attn.{proj}.bias"), &[d]);
        }
        push(format!("{p}.mlp.fc1.weight"), &[v.intermediate_size, d]);
        push(format!("{p}.mlp.fc1.bias"), &[v.intermediate_size]);
        push(format!("{p}.mlp.fc2.weight"), &[d, v.intermediate_size]);
        push(format!("{p}.mlp.fc2.bias"), &[d]);
    }
    push(
        "vision_tower.vision_model.post_layernorm.weight".into(),
        &[d],
    );
    push("vision_tower.vision_model.post_layernorm.bias".into(), &[d]);
    push(
        "multi_modal_projector.linear.weight".into(),
        &[c.projection_dim, d],
    );
    push(
        "multi_modal_projector.linear.bias".into(),
        &[c.projection_dim],
    );
    let (h, i) = (t.hidden_size, t.intermediate_size);
    let (qd, kvd) = (
        t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim,
    );
    push(
        "language_model.model.embed_tokens.weight".into(),
        &[t.vocab_size, h],
    );
    for l in 0..t.num_hidden_layers {
        let p = format!("language_model.model.layers.{l}");
        push(format!("{p}.input_layernorm.weight"), &[h]);
        push(format!("{p}.post_attention_layernorm.weight"), &[h]);
        push(format!("{p}.self_attn.q_proj.weight"), &[qd, h]);
        push(format!("{p}.self_attn.k_proj.weight"), &[kvd, h]);
        push(format!("{p}.self_attn.v_proj.weight"), &[kvd, h]);
        push(format!("{p}.self_attn.o_proj.weight"), &[h, qd]);
        push(format!("{p}.mlp.gate_proj.weight"), &[i, h]);
        push(format!("{p}.mlp.up_proj.weight"), &[i, h]);
        push(format!("{p}.mlp.down_proj.weight"), &[h, i]);
    }
    push("language_model.model.norm.weight".into(), &[h]);
    out
}

/// Write `dir/model.safetensors` with every tensor of `c`'s shapes as random f16 values
/// (matrices uniform in ±1/√cols, vectors in ±0.1), streamed: never more than a row in
/// memory.
fn write_random_checkpoint(dir: &std::path::Path, c: &PaliGemmaConfig, seed: u64) {
    use std::io::Write;
    let tensors = tensor_shapes(c);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let bytes = 2 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_vec(&header).unwrap();
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let file = std::fs::File::create(dir.join("model.safetensors")).unwrap();
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    w.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    w.write_all(&text).unwrap();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut row = Vec::new();
    for (_, shape) in &tensors {
        let cols: usize = shape[1..].iter().product::<usize>().max(1);
        let rows = shape.iter().product::<usize>() / cols;
        let scale = if shape.len() > 1 {
            (cols as f32).powf(-0.5)
        } else {
            0.1
        };
        for _ in 0..rows {
            row.clear();
            for _ in 0..cols {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                row.extend_from_slice(&half::f16::from_f32(u * scale).to_le_bytes());
            }
            w.write_all(&row).unwrap();
        }
    }
    w.flush().unwrap();
}

/// Not a test: writes a full PaliGemma-3B-224-shaped f16 checkpoint (27 + 18 layers, random
/// weights, 5.9 GB) with tiny-shapes' tokenizer to `$PALIGEMMA_FULL_SIZE_DIR`, for
/// `scripts/quant_load_bench.sh` to time loading it quantised both ways.
#[test]
#[ignore = "writes 5.9 GB; run by scripts/quant_load_bench.sh"]
fn write_full_size_checkpoint() {
    let dir = std::path::PathBuf::from(
        std::env::var("PALIGEMMA_FULL_SIZE_DIR").expect("set PALIGEMMA_FULL_SIZE_DIR"),
    );
    std::fs::create_dir_all(&dir).unwrap();
    let json = CONFIG
        .replace(
            "\"num_hidden_layers\": 1, \"vocab_size\"",
            "\"num_hidden_layers\": 18, \"vocab_size\"",
        )
        .replace(
            "\"num_hidden_layers\": 1, \"patch_size\"",
            "\"num_hidden_layers\": 27, \"patch_size\"",
        );
    let config = PaliGemmaConfig::from_json(&json).unwrap();
    assert_eq!(
        (
            config.vision.num_hidden_layers,
            config.text.num_hidden_layers
        ),
        (27, 18)
    );
    std::fs::write(dir.join("config.json"), &json).unwrap();
    std::fs::copy(
        common::shapes_model().join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    write_random_checkpoint(&dir, &config, 11);
}
