//! Segment objects with PaliGemma: decode the answer's mask tokens with the VQ-VAE on the
//! GPU, paste the masks into the boxes, draw them and save one PNG per mask.
//!
//! ```text
//! cargo run --release --example segment -- --model DIR --vae vae-oid.npz --image photo.jpg --prompt "segment cat"
//! ```
//!
//! `--model` defaults to the tiny random-weight fixture `tests/fixtures/models/tiny-mqa-f32`
//! and `--vae` to the random-weight decoder `tests/fixtures/vae/vae-random.npz`. With random
//! weights the answer is gibberish (usually no well-formed `<loc>`×4 `<seg>`×16 object at
//! all) and any mask is noise; with a real checkpoint (e.g. `google/paligemma-3b-mix-224`)
//! and big_vision's `vae-oid.npz` the masks are real. To see the decoder at work without a
//! real model, pass an answer with `--text`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use paligemma::generate::GenerateOptions;
use paligemma::model::{resolve_model_dir, ModelBuilder};
use paligemma::processor::image::decode_image;
use paligemma::tasks::{annotate, parse_answer, paste_mask, MaskDecoder};

#[derive(Parser)]
struct Args {
    /// Checkpoint directory or org/name.
    #[arg(long, default_value = "tests/fixtures/models/tiny-mqa-f32")]
    model: String,
    /// Mask decoder weights (big_vision's vae-oid.npz).
    #[arg(long, default_value = "tests/fixtures/vae/vae-random.npz")]
    vae: PathBuf,
    /// The image.
    #[arg(long, default_value = "tests/fixtures/images/chelsea.jpg")]
    image: PathBuf,
    /// The prompt: "segment" and an object name.
    #[arg(long, default_value = "segment cat")]
    prompt: String,
    /// Use this answer instead of generating one (skips the model).
    #[arg(long)]
    text: Option<String>,
    /// Stop after this many tokens (an object takes 4 + 16 tokens and its label).
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// Output directory for the annotated image and the masks; default: the temp directory.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let text = match &args.text {
        Some(t) => t.clone(),
        None => {
            let model = ModelBuilder::new(resolve_model_dir(&args.model)?).build()?;
            let pixels = model.images.load(&args.image)?;
            let options = GenerateOptions {
                max_new_tokens: args.max_new_tokens,
                ..Default::default()
            };
            model
                .generate(&pixels, &args.prompt, &options, &mut |_| true)?
                .text
        }
    };
    println!("answer: {text}");

    let image = decode_image(&args.image)?;
    let (w, h) = (image.width(), image.height());
    let objects = parse_answer(&text, w, h);
    let with_mask: Vec<usize> = (0..objects.len())
        .filter(|&i| objects[i].valid && objects[i].seg_codes.is_some())
        .collect();
    let mut masks = vec![None; objects.len()];
    if with_mask.is_empty() {
        println!(
            "no well-formed segmentation in the answer ({} object(s))",
            objects.len()
        );
    } else {
        let decoder = MaskDecoder::load(paligemma::gpu::Gpu::new(Default::default())?, &args.vae)?;
        let codes: Vec<[u32; 16]> = with_mask
            .iter()
            .filter_map(|&i| objects[i].seg_codes)
            .collect();
        for (&i, logits) in with_mask.iter().zip(decoder.decode(&codes)?) {
            masks[i] = Some(paste_mask(&logits, &objects[i].bbox, w, h));
        }
    }
    let dir = args.out_dir.unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&dir)?;
    for (i, mask) in masks.iter().enumerate() {
        if let Some(mask) = mask {
            let path = dir.join(format!("paligemma-mask-{i:02}.png"));
            mask.save(&path)?;
            let area = mask.pixels().filter(|p| p.0[0] > 0).count();
            println!(
                "{:?}: {area} pixels, wrote {}",
                objects[i].label,
                path.display()
            );
        }
    }
    let out = dir.join("paligemma-segment.png");
    annotate(&image, &objects, &masks).save(&out)?;
    println!("wrote {}", out.display());
    Ok(())
}
