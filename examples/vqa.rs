//! Ask several questions about one image with a model loaded once, using the streaming
//! API a desktop app would use: each answer arrives as [`Event`]s from a worker thread.
//!
//! ```text
//! cargo run --release --example vqa -- [--model DIR|ORG/NAME] [--image PATH] [QUESTION ...]
//! ```
//! Without `--model` it runs `assets/tiny-shapes`, a toy PaliGemma trained on synthetic shape
//! scenes, which answers "how many shapes?"; use e.g. `google/paligemma-3b-mix-224` for real
//! questions about real photos.

use std::io::Write;
use std::sync::Arc;

use anyhow::Result;
use clap::Parser;
use paligemma::generate::{Event, GenerateOptions};
use paligemma::model::{resolve_model_dir, ModelBuilder};

#[derive(Parser)]
struct Args {
    /// Checkpoint directory or org/name in the local Hugging Face cache.
    #[arg(long, default_value = "assets/tiny-shapes")]
    model: String,
    /// Image to ask about.
    #[arg(long, default_value = "assets/scenes/scene_000.png")]
    image: std::path::PathBuf,
    /// Questions (default: a few generic ones).
    questions: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = resolve_model_dir(&args.model)?;
    let model = Arc::new(ModelBuilder::new(dir).build()?);
    eprintln!("adapter: {}", model.gpu().describe());
    let pixels = model.images.load(&args.image)?;
    let questions = if args.questions.is_empty() {
        vec!["how many shapes?".to_string()]
    } else {
        args.questions
    };
    for q in questions {
        print!("Q: {q}\nA: ");
        let options = GenerateOptions {
            max_new_tokens: 16,
            ..Default::default()
        };
        for event in model.generate_stream(pixels.clone(), format!("answer en {q}"), options) {
            match event {
                Event::Text(t) => {
                    print!("{t}");
                    std::io::stdout().flush()?;
                }
                Event::Done(result) => {
                    let g = (*result)?;
                    println!(
                        "  [{} tokens, {:.1} tok/s]",
                        g.token_ids.len(),
                        g.timings.decode_tok_s
                    );
                }
            }
        }
    }
    Ok(())
}
