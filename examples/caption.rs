//! Caption an image, streaming the words as they are generated.
//!
//! ```text
//! cargo run --release --example caption -- [--model DIR|ORG/NAME] [--image PATH] [--lang en]
//! ```
//! Without `--model` it runs `assets/tiny-shapes`, a toy PaliGemma trained on synthetic shape
//! scenes (it captions those, with limited accuracy); point it at a real checkpoint such as
//! `google/paligemma-3b-mix-224` for real photos.

use std::io::Write;

use anyhow::Result;
use clap::Parser;
use paligemma::generate::GenerateOptions;
use paligemma::model::{resolve_model_dir, ModelBuilder};

#[derive(Parser)]
struct Args {
    /// Checkpoint directory or org/name in the local Hugging Face cache.
    #[arg(long, default_value = "assets/tiny-shapes")]
    model: String,
    /// Image to caption.
    #[arg(long, default_value = "assets/scenes/scene_000.png")]
    image: std::path::PathBuf,
    /// Caption language code.
    #[arg(long, default_value = "en")]
    lang: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = resolve_model_dir(&args.model)?;
    let model = ModelBuilder::new(dir)
        .on_progress(|p| {
            eprint!(
                "\rloading weights {:3}%",
                100 * p.bytes_done / p.bytes_total
            )
        })
        .build()?;
    eprintln!();
    eprintln!("adapter: {}", model.gpu().describe());
    let pixels = model.images.load(&args.image)?;
    let options = GenerateOptions {
        max_new_tokens: 32,
        ..Default::default()
    };
    let mut stdout = std::io::stdout();
    let result = model.generate(
        &pixels,
        &format!("caption {}", args.lang),
        &options,
        &mut |t| {
            print!("{t}");
            stdout.flush().is_ok()
        },
    )?;
    println!();
    eprintln!(
        "{} tokens, vision {:.2} s, prefill {:.2} s, decode {:.1} tok/s",
        result.token_ids.len(),
        result.timings.vision_s,
        result.timings.prefill_s,
        result.timings.decode_tok_s
    );
    Ok(())
}
