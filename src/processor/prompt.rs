//! Prompts: `tokenizer.json` through the `tokenizers` crate, laid out exactly as HF
//! `PaliGemmaProcessor` does: `<image>`×N, `<bos>`, the prompt text, `"\n"`.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::model::PaliGemmaConfig;
use crate::{Error, Result};

/// Tokenizes prompts and detokenizes answers.
pub struct PromptProcessor {
    tokenizer: Tokenizer,
    image_token: u32,
    bos: u32,
    num_image_tokens: usize,
}

impl PromptProcessor {
    /// Load `dir/tokenizer.json` for a model with `config`.
    pub fn from_dir(dir: &Path, config: &PaliGemmaConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Model(format!(
                "{} is missing: the tokenizer ships with every PaliGemma checkpoint on the Hub",
                path.display()
            )));
        }
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        Ok(PromptProcessor {
            tokenizer,
            image_token: config.image_token_index,
            bos: config.bos_token_id,
            num_image_tokens: config.num_image_tokens(),
        })
    }

    /// The model input ids for `prompt`: image placeholders, `<bos>`, the prompt and `"\n"`.
    /// A prompt that itself contains `<image>` is rejected: the engine adds the image tokens.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        self.encode_images(prompt, 1)
    }

    /// As [`PromptProcessor::encode`] for a prompt about `images` images: one block of image
    /// placeholders per image, one after another, then `<bos>`, the prompt and `"\n"` (HF's
    /// `PaliGemmaProcessor` with a list of images for one text).
    pub fn encode_images(&self, prompt: &str, images: usize) -> Result<Vec<u32>> {
        if images == 0 {
            return Err(Error::Request(
                "a PaliGemma prompt is about at least one image; got none".into(),
            ));
        }
        let text = self.tokenize(&format!("{prompt}\n"))?;
        if text.contains(&self.image_token) {
            return Err(Error::Request(
                "the prompt contains the <image> token; pass the image separately, the engine \
                 inserts the image tokens itself"
                    .into(),
            ));
        }
        let mut ids = vec![self.image_token; images * self.num_image_tokens];
        ids.push(self.bos);
        ids.extend(text);
        Ok(ids)
    }

    /// Token ids of `text` without any special tokens added.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Request(format!("cannot tokenize the prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` with special tokens (`<bos>`, `<eos>`, `<pad>`) dropped; `<locNNNN>`
    /// and `<segNNN>` are ordinary tokens and are kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Request(format!("cannot detokenize: {e}")))
    }

    /// The token string of `id`, if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The number of image placeholder tokens of one image (a prompt starts with one such
    /// block per image).
    pub fn num_image_tokens(&self) -> usize {
        self.num_image_tokens
    }
}

/// Turns a growing list of token ids into text deltas for streaming, holding back an
/// incomplete UTF-8 sequence (byte-fallback tokens) until it is complete. Each token decodes
/// only a short window (the ids since the previous delta's first token), so a long answer
/// costs linear, not quadratic, time; the window starts one token early so that tokenizers
/// which drop a leading space at the start of a decode give the same text as decoding all ids.
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix: usize,
    /// End of the text already emitted (ids `prefix..read` decode to what was emitted last).
    read: usize,
}

impl TextStream {
    /// Add a token; returns the new text, if any.
    pub fn push(&mut self, processor: &PromptProcessor, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = processor.decode(&self.ids[self.prefix..self.read])?;
        let text = processor.decode(&self.ids[self.prefix..])?;
        if text.ends_with('\u{FFFD}') || text.len() <= before.len() || !text.starts_with(&before) {
            return Ok(None);
        }
        let delta = text[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(Some(delta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn processor() -> PromptProcessor {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-mqa-f32");
        let config = PaliGemmaConfig::from_file(&dir.join("config.json")).unwrap();
        PromptProcessor::from_dir(&dir, &config).unwrap()
    }

    #[test]
    fn streamed_pieces_add_up_to_the_whole_decode() {
        let p = processor();
        // Spaces, punctuation, byte-fallback characters (é, 猫, an emoji), a special token.
        let text = "a cat, é and 猫 on the mat 🐈 in the sun";
        let mut ids = p.tokenize(text).unwrap();
        ids.push(1); // <eos>: no text
        let mut stream = TextStream::default();
        let mut pieces = Vec::new();
        for &id in &ids {
            if let Some(piece) = stream.push(&p, id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
                pieces.push(piece);
            }
        }
        assert!(pieces.len() > 5, "{pieces:?}");
        assert_eq!(pieces.concat(), p.decode(&ids).unwrap());
        assert_eq!(pieces.concat(), text);
    }
}
