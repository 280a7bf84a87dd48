//! Detect objects with PaliGemma, print their boxes and draw them.
//!
//! ```text
//! cargo run --release --example detect -- --model DIR --image photo.jpg --prompt "detect cat ; dog"
//! ```
//!
//! `--model` is a checkpoint directory (or `org/name` in the Hugging Face cache), by default
//! `assets/tiny-shapes`, a toy PaliGemma trained on synthetic shape scenes (boxes roughly
//! right, shape names often wrong — see its model card) on `assets/scenes/scene_000.png`. Use
//! a real checkpoint such as `google/paligemma-3b-mix-224` for real detections.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use paligemma::generate::GenerateOptions;
use paligemma::model::{resolve_model_dir, ModelBuilder};
use paligemma::processor::image::decode_image;
use paligemma::tasks::{annotate, parse_answer};

#[derive(Parser)]
struct Args {
    /// Checkpoint directory or org/name.
    #[arg(long, default_value = "assets/tiny-shapes")]
    model: String,
    /// The image.
    #[arg(long, default_value = "assets/scenes/scene_000.png")]
    image: PathBuf,
    /// The prompt: "detect" and object names separated by " ; ".
    #[arg(long, default_value = "detect square")]
    prompt: String,
    /// Stop after this many tokens (each object takes 4 location tokens and its label).
    #[arg(long, default_value_t = 40)]
    max_new_tokens: usize,
    /// Where to write the annotated image (PNG); default: a file in the temp directory.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let model = ModelBuilder::new(resolve_model_dir(&args.model)?).build()?;
    let pixels = model.images.load(&args.image)?;
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        ..Default::default()
    };
    let answer = model.generate(&pixels, &args.prompt, &options, &mut |_| true)?;
    println!("answer: {}", answer.text);

    let image = decode_image(&args.image)?;
    let objects = parse_answer(&answer.text, image.width(), image.height());
    if objects.is_empty() {
        println!("no objects in the answer");
    }
    for o in &objects {
        let b = &o.bbox;
        match &o.reason {
            None => println!(
                "{:?}: x {:.1}..{:.1}, y {:.1}..{:.1}",
                o.label, b.x_min, b.x_max, b.y_min, b.y_max
            ),
            Some(why) => println!("{:?}: invalid ({why})", o.label),
        }
    }
    let out = args
        .out
        .unwrap_or_else(|| std::env::temp_dir().join("paligemma-detect.png"));
    annotate(&image, &objects, &[]).save(&out)?;
    println!("wrote {}", out.display());
    Ok(())
}
