//! What kind of PaliGemma checkpoint a model is (PaliGemma or PaliGemma 2, its size, `pt` /
//! `mix` / `ft`, its resolution), read from its config and, where the config does not say, its
//! name; and the warnings for requests that do not suit it.

use std::path::Path;

use super::config::PaliGemmaConfig;

/// How a checkpoint was trained, as its published name says (`paligemma-3b-mix-224`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Pretrained only: answers the task prefixes it was pretrained on (`caption en`,
    /// `answer en ...`, `detect ...`, `ocr`, ...), meant to be fine-tuned.
    Pt,
    /// Fine-tuned on a mixture of tasks: the general-purpose checkpoint.
    Mix,
    /// Fine-tuned on one task (named in [`CheckpointKind::task`]).
    Ft,
}

impl Variant {
    /// `pt`, `mix` or `ft`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Pt => "pt",
            Variant::Mix => "mix",
            Variant::Ft => "ft",
        }
    }
}

/// What kind of checkpoint a model is. The generation, size and resolution come from
/// `config.json`; the variant and task only from the name (a directory name or a Hugging
/// Face repository id such as `google/paligemma2-3b-pt-448`), so they are `None` for a
/// checkpoint saved under another name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckpointKind {
    /// 1 (PaliGemma: Gemma decoder) or 2 (PaliGemma 2: Gemma 2 decoder).
    pub generation: u8,
    /// The published size (`3b`, `10b`, `28b`) the decoder's width implies, if it is one of
    /// them.
    pub size: Option<&'static str>,
    /// `pt`, `mix` or `ft`, if the name says.
    pub variant: Option<Variant>,
    /// The task of an `ft` checkpoint, as its name says (`refcoco-seg`, `docvqa`, ...).
    pub task: Option<String>,
    /// The image size the vision tower takes (224, 448 or 896 px).
    pub resolution: usize,
}

/// The task prefixes PaliGemma checkpoints are trained on (big_vision's PaliGemma README).
const TASK_PREFIXES: [&str; 8] = [
    "caption", "describe", "answer", "question", "ocr", "detect", "segment", "cap ",
];

/// Images whose longer side exceeds the shorter by more than this are reported as squashed.
const SQUASH_RATIO: f64 = 1.25;

impl CheckpointKind {
    /// The kind of the checkpoint with `config` whose name is in `name` (a path, e.g. the
    /// checkpoint directory or a Hugging Face cache snapshot under
    /// `models--google--paligemma-3b-mix-224/`, or a repository id): the last path component
    /// containing `paligemma` is read as a published name.
    pub fn detect(config: &PaliGemmaConfig, name: &Path) -> Self {
        let generation = if config.text.is_gemma2() { 2 } else { 1 };
        let size = match config.text.hidden_size {
            2048 => Some("3b"),
            3584 => Some("10b"),
            4608 => Some("28b"),
            _ => None,
        };
        let published = name
            .components()
            .rev()
            .filter_map(|c| c.as_os_str().to_str())
            .map(str::to_ascii_lowercase)
            .find(|c| c.contains("paligemma"));
        let (mut variant, mut task) = (None, None);
        if let Some(published) = published {
            let start = published.find("paligemma").unwrap_or(0);
            let words: Vec<&str> = published[start..].split(['-', '_']).collect();
            for (i, w) in words.iter().enumerate() {
                variant = match *w {
                    "pt" => Some(Variant::Pt),
                    "mix" => Some(Variant::Mix),
                    "ft" => Some(Variant::Ft),
                    _ => continue,
                };
                if variant == Some(Variant::Ft) {
                    // The words up to the resolution: `ft-refcoco-seg-896`.
                    let rest: Vec<&str> = words[i + 1..]
                        .iter()
                        .take_while(|w| w.parse::<usize>().is_err())
                        .copied()
                        .collect();
                    task = (!rest.is_empty()).then(|| rest.join("-"));
                }
                break;
            }
        }
        CheckpointKind {
            generation,
            size,
            variant,
            task,
            resolution: config.vision.image_size,
        }
    }

    /// Warnings for `prompt` on this checkpoint: a free-form prompt (no task prefix) to a `pt`
    /// checkpoint, which was only pretrained on the prefixes; a `segment` prompt when
    /// `masks` is false (no mask decoder to turn its `<segNNN>` codes into a mask).
    pub fn prompt_warnings(&self, prompt: &str, masks: bool) -> Vec<String> {
        let p = prompt.trim_start().to_ascii_lowercase();
        let mut out = Vec::new();
        let prefixed = TASK_PREFIXES.iter().any(|t| p.starts_with(t));
        if self.variant == Some(Variant::Pt) && !prefixed {
            out.push(format!(
                "{prompt:?} has no task prefix (caption, answer, question, ocr, detect, \
                 segment, ...): a pt checkpoint is only pretrained on those; free-form \
                 prompts need a mix or fine-tuned one"
            ));
        }
        if p.starts_with("segment") && !masks {
            out.push(format!(
                "{prompt:?} answers with <segNNN> mask codes, but no mask decoder is loaded \
                 (big_vision's vae-oid.npz decodes them into masks)"
            ));
        }
        out
    }

    /// A warning if an image of `width` × `height` pixels is squashed by the resize to this
    /// checkpoint's square resolution (PaliGemma's preprocessing keeps no aspect ratio):
    /// when one side is more than 1.25 × the other.
    pub fn image_warning(&self, width: u32, height: u32) -> Option<String> {
        let (long, short) = (width.max(height) as f64, width.min(height).max(1) as f64);
        (long / short > SQUASH_RATIO).then(|| {
            format!(
                "the {width}×{height} image is resized to {r}×{r} without keeping its aspect \
                 ratio (as PaliGemma was trained): its {} is squashed {:.2}×",
                if width > height { "width" } else { "height" },
                long / short,
                r = self.resolution
            )
        })
    }
}

impl std::fmt::Display for CheckpointKind {
    /// E.g. `PaliGemma 2 3b pt 448 px`, `PaliGemma 1 3b ft (refcoco-seg) 896 px`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PaliGemma {}", self.generation)?;
        if let Some(size) = self.size {
            write!(f, " {size}")?;
        }
        match (self.variant, &self.task) {
            (Some(v), Some(task)) => write!(f, " {} ({task})", v.name())?,
            (Some(v), None) => write!(f, " {}", v.name())?,
            (None, _) => f.write_str(" (pt/mix/ft unknown: not in the name)")?,
        }
        write!(f, " {} px", self.resolution)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(gemma2: bool, hidden: usize, px: usize) -> PaliGemmaConfig {
        let json = format!(
            r#"{{"model_type": "paligemma", "projection_dim": {hidden}, "image_token_index": 299,
            "text_config": {{"model_type": "{}", "hidden_size": {hidden}, "intermediate_size": 64,
              "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1,
              "vocab_size": 300, "head_dim": 8}},
            "vision_config": {{"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
              "num_hidden_layers": 1, "patch_size": 14, "image_size": {px}}}}}"#,
            if gemma2 { "gemma2" } else { "gemma" }
        );
        PaliGemmaConfig::from_json(&json).unwrap()
    }

    #[test]
    fn kinds_come_from_the_config_and_the_name() {
        let k = CheckpointKind::detect(
            &config(false, 2048, 224),
            Path::new("/hub/models--google--paligemma-3b-mix-224/snapshots/0123abc"),
        );
        assert_eq!(
            (
                k.generation,
                k.size,
                k.variant,
                k.task.as_deref(),
                k.resolution
            ),
            (1, Some("3b"), Some(Variant::Mix), None, 224)
        );
        assert_eq!(k.to_string(), "PaliGemma 1 3b mix 224 px");
        let k =
            CheckpointKind::detect(&config(true, 3584, 448), Path::new("paligemma2-10b-pt-448"));
        assert_eq!(k.to_string(), "PaliGemma 2 10b pt 448 px");
        let k = CheckpointKind::detect(
            &config(false, 2048, 896),
            Path::new("google/paligemma-3b-ft-refcoco-seg-896"),
        );
        assert_eq!(
            (k.variant, k.task.as_deref()),
            (Some(Variant::Ft), Some("refcoco-seg"))
        );
        assert_eq!(k.to_string(), "PaliGemma 1 3b ft (refcoco-seg) 896 px");
        // The config wins over the name: this "224" name holds a 448 px tower.
        let k = CheckpointKind::detect(&config(true, 128, 448), Path::new("./my_paligemma_224"));
        assert_eq!((k.size, k.variant, k.resolution), (None, None, 448));
        assert_eq!(
            k.to_string(),
            "PaliGemma 2 (pt/mix/ft unknown: not in the name) 448 px"
        );
        let json = serde_json::to_value(&k).unwrap();
        assert_eq!(json["generation"], 2);
        assert_eq!(json["variant"], serde_json::Value::Null);
        let pt =
            CheckpointKind::detect(&config(false, 2048, 224), Path::new("paligemma-3b-pt-224"));
        assert_eq!(serde_json::to_value(&pt).unwrap()["variant"], "pt");
    }

    #[test]
    fn prompts_and_images_that_do_not_fit_are_warned_about() {
        let pt =
            CheckpointKind::detect(&config(false, 2048, 224), Path::new("paligemma-3b-pt-224"));
        let mix =
            CheckpointKind::detect(&config(false, 2048, 224), Path::new("paligemma-3b-mix-224"));
        let free = "what is the cat doing?";
        assert_eq!(pt.prompt_warnings(free, false).len(), 1);
        assert!(pt.prompt_warnings(free, false)[0].contains("no task prefix"));
        assert!(mix.prompt_warnings(free, false).is_empty());
        assert!(pt
            .prompt_warnings("answer en what is the cat doing?", false)
            .is_empty());
        assert!(pt.prompt_warnings("Caption EN", false).is_empty());
        let seg = mix.prompt_warnings("segment cat", false);
        assert!(seg.len() == 1 && seg[0].contains("vae-oid.npz"), "{seg:?}");
        assert!(mix.prompt_warnings("segment cat", true).is_empty());
        assert!(mix.prompt_warnings("detect cat", false).is_empty());

        assert_eq!(mix.image_warning(640, 512), None); // 1.25: not squashed enough to say
        let w = mix.image_warning(1280, 480).unwrap();
        assert!(
            w.contains("1280×480")
                && w.contains("224×224")
                && w.contains("width is squashed 2.67×"),
            "{w}"
        );
        let h = mix.image_warning(300, 600).unwrap();
        assert!(h.contains("height is squashed 2.00×"), "{h}");
    }
}
