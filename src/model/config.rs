//! `config.json` of a PaliGemma checkpoint. Published files are sparse: a missing field takes
//! the default transformers uses (the sub-config class defaults when `text_config` /
//! `vision_config` is present, PaliGemma's own when it is absent).

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// SigLIP vision tower configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Width of the residual stream (1152 for So400m).
    pub hidden_size: usize,
    /// MLP width (4304 for So400m).
    pub intermediate_size: usize,
    /// Number of encoder layers (27).
    pub num_hidden_layers: usize,
    /// Attention heads (16).
    pub num_attention_heads: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// Input resolution (224, 448 or 896).
    pub image_size: usize,
    /// Patch size (14).
    pub patch_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f32,
}

/// Gemma decoder configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// `gemma` (PaliGemma) or `gemma2` (PaliGemma 2).
    pub model_type: String,
    /// Rows of the embedding table / logits.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// GeGLU width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (1 for PaliGemma-3B).
    pub num_key_value_heads: usize,
    /// Per-head width (256), independent of hidden/heads.
    pub head_dim: usize,
    /// Longest sequence the rotary embedding is meant for.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5` (Gemma 2; `head_dim`
    /// for Gemma 1).
    pub query_pre_attn_scalar: f32,
    /// Gemma 2's local-attention window, used by the layers marked sliding.
    pub sliding_window: Option<usize>,
    /// Per layer: whether it uses the sliding window.
    pub sliding_layers: Vec<bool>,
    /// Gemma 2's attention-score soft-cap.
    pub attn_logit_softcapping: Option<f32>,
    /// Gemma 2's final-logit soft-cap.
    pub final_logit_softcapping: Option<f32>,
}

impl TextConfig {
    /// Whether this is a Gemma 2 decoder (PaliGemma 2): extra norms, soft-caps, sliding
    /// windows.
    pub fn is_gemma2(&self) -> bool {
        self.model_type == "gemma2"
    }
}

/// The whole PaliGemma configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PaliGemmaConfig {
    /// The vision tower.
    pub vision: VisionConfig,
    /// The language model.
    pub text: TextConfig,
    /// Id of the `<image>` placeholder token.
    pub image_token_index: u32,
    /// Output width of the projector (= text hidden size).
    pub projection_dim: usize,
    /// `<bos>` id.
    pub bos_token_id: u32,
    /// End-of-sequence ids (generation stops at any of them).
    pub eos_token_ids: Vec<u32>,
    /// `<pad>` id.
    pub pad_token_id: u32,
}

struct Fields<'a> {
    obj: Option<&'a serde_json::Map<String, Value>>,
    section: &'static str,
}

impl Fields<'_> {
    fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.obj.and_then(|o| o.get(key)) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                Error::Model(format!(
                    "config.json: {}{key} = {v} is not a non-negative integer",
                    self.section
                ))
            }),
        }
    }

    fn f32(&self, key: &str, default: f32) -> Result<f32> {
        match self.obj.and_then(|o| o.get(key)) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().map(|x| x as f32).ok_or_else(|| {
                Error::Model(format!(
                    "config.json: {}{key} = {v} is not a number",
                    self.section
                ))
            }),
        }
    }

    /// An optional float: absent means `default`, JSON null means none.
    fn opt_f32(&self, key: &str, default: Option<f32>) -> Result<Option<f32>> {
        match self.obj.and_then(|o| o.get(key)) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| {
                Error::Model(format!(
                    "config.json: {}{key} = {v} is not a number",
                    self.section
                ))
            }),
        }
    }

    fn str(&self, key: &str, default: &str) -> String {
        self.obj
            .and_then(|o| o.get(key))
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    }
}

fn check_act(section: &str, act: &str) -> Result<()> {
    match act {
        "gelu_pytorch_tanh" | "gelu" | "gelu_new" | "gelu_fast" | "gelu_tanh" => Ok(()),
        other => Err(Error::Model(format!(
            "config.json: {section}activation {other:?} is not supported (PaliGemma uses tanh-GELU)"
        ))),
    }
}

fn ids(v: Option<&Value>, default: &[u32]) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => default.to_vec(),
    }
}

impl PaliGemmaConfig {
    /// Read and validate `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Model(msg) => Error::Model(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parse and validate the JSON text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(text)
            .map_err(|e| Error::Model(format!("config.json is not valid JSON: {e}")))?;
        let root = root
            .as_object()
            .ok_or_else(|| Error::Model("config.json is not a JSON object".into()))?;
        let top = Fields {
            obj: Some(root),
            section: "",
        };
        let model_type = top.str("model_type", "paligemma");
        if model_type != "paligemma" {
            return Err(Error::Model(format!(
                "config.json: model_type {model_type:?} is not a PaliGemma model"
            )));
        }

        // Sub-config defaults: the class defaults when the section is present, PaliGemma's
        // own (the 3B model) when it is absent — as transformers does.
        let vision_obj = root.get("vision_config").and_then(Value::as_object);
        let vf = Fields {
            obj: vision_obj,
            section: "vision_config.",
        };
        let vd = match vision_obj {
            Some(_) => (768, 3072, 12, 12, 16),
            None => (1152, 4096, 27, 16, 14),
        };
        check_act("vision_config.", &vf.str("hidden_act", "gelu_pytorch_tanh"))?;
        let vision = VisionConfig {
            hidden_size: vf.usize("hidden_size", vd.0)?,
            intermediate_size: vf.usize("intermediate_size", vd.1)?,
            num_hidden_layers: vf.usize("num_hidden_layers", vd.2)?,
            num_attention_heads: vf.usize("num_attention_heads", vd.3)?,
            num_channels: vf.usize("num_channels", 3)?,
            image_size: vf.usize("image_size", 224)?,
            patch_size: vf.usize("patch_size", vd.4)?,
            layer_norm_eps: vf.f32("layer_norm_eps", 1e-6)?,
        };

        let text_obj = root.get("text_config").and_then(Value::as_object);
        let tf = Fields {
            obj: text_obj,
            section: "text_config.",
        };
        let model_type = tf.str("model_type", "gemma");
        let gemma2 = model_type == "gemma2";
        // (vocab, hidden, intermediate, layers, heads, kv heads)
        let td = match (text_obj, gemma2) {
            (None, _) => (257152, 2048, 16384, 18, 8, 1),
            (Some(_), false) => (256000, 3072, 24576, 28, 16, 16),
            (Some(_), true) => (256000, 2304, 9216, 26, 8, 4),
        };
        let act = match text_obj.and_then(|o| o.get("hidden_activation")) {
            Some(Value::String(s)) => s.clone(),
            _ => tf.str("hidden_act", "gelu_pytorch_tanh"),
        };
        check_act("text_config.", &act)?;
        let rope_theta = match text_obj
            .and_then(|o| o.get("rope_parameters"))
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
        {
            Some(t) => t as f32,
            None => tf.f32("rope_theta", 10000.0)?,
        };
        let heads = tf.usize("num_attention_heads", td.4)?;
        let layers = tf.usize("num_hidden_layers", td.3)?;
        let head_dim = tf.usize("head_dim", 256)?;
        let sliding_layers = match text_obj.and_then(|o| o.get("layer_types")) {
            Some(Value::Array(types)) => types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(Error::Model(format!(
                        "config.json: text_config.layer_types has unknown entry {t}"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?,
            _ => (0..layers).map(|i| gemma2 && i % 2 == 0).collect(),
        };
        let text = TextConfig {
            vocab_size: tf.usize("vocab_size", td.0)?,
            hidden_size: tf.usize("hidden_size", td.1)?,
            intermediate_size: tf.usize("intermediate_size", td.2)?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: tf.usize("num_key_value_heads", td.5)?,
            head_dim,
            max_position_embeddings: tf.usize("max_position_embeddings", 8192)?,
            rms_norm_eps: tf.f32("rms_norm_eps", 1e-6)?,
            rope_theta,
            query_pre_attn_scalar: if gemma2 {
                tf.f32("query_pre_attn_scalar", 256.0)?
            } else {
                head_dim as f32
            },
            sliding_window: if gemma2 {
                tf.opt_f32("sliding_window", Some(4096.0))?
                    .map(|w| w as usize)
            } else {
                None
            },
            sliding_layers,
            attn_logit_softcapping: if gemma2 {
                tf.opt_f32("attn_logit_softcapping", Some(50.0))?
            } else {
                None
            },
            final_logit_softcapping: if gemma2 {
                tf.opt_f32("final_logit_softcapping", Some(30.0))?
            } else {
                None
            },
            model_type,
        };

        let image_token = root
            .get("image_token_index")
            .or_else(|| root.get("image_token_id"));
        let text_ids = |key: &str| text_obj.and_then(|o| o.get(key)).or_else(|| root.get(key));
        let config = PaliGemmaConfig {
            image_token_index: ids(image_token, &[256000])[0],
            projection_dim: top.usize("projection_dim", 2048)?,
            bos_token_id: ids(text_ids("bos_token_id"), &[2])[0],
            eos_token_ids: ids(text_ids("eos_token_id"), &[1]),
            pad_token_id: ids(text_ids("pad_token_id"), &[0])[0],
            vision,
            text,
        };
        config.validate()?;
        Ok(config)
    }

    /// Number of image tokens: (image_size / patch_size)².
    pub fn num_image_tokens(&self) -> usize {
        let side = self.vision.image_size / self.vision.patch_size;
        side * side
    }

    fn validate(&self) -> Result<()> {
        let v = &self.vision;
        let t = &self.text;
        let err = |msg: String| Err(Error::Model(format!("config.json: {msg}")));
        for (name, value) in [
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.image_size", v.image_size),
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_key_value_heads", t.num_key_value_heads),
            ("text_config.head_dim", t.head_dim),
            ("projection_dim", self.projection_dim),
        ] {
            if value == 0 {
                return err(format!("{name} is 0"));
            }
        }
        if v.num_channels != 3 {
            return err(format!(
                "vision_config.num_channels = {} (only RGB is supported)",
                v.num_channels
            ));
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return err(format!(
                "vision_config.hidden_size {} is not divisible by num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if v.hidden_size / v.num_attention_heads > 256 || t.head_dim > 256 {
            return err("head dimensions above 256 are not supported".into());
        }
        if !v.image_size.is_multiple_of(v.patch_size) {
            return err(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
            return err(format!(
                "text_config.num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        if !t.head_dim.is_multiple_of(2) {
            return err(format!(
                "text_config.head_dim {} is odd (RoPE needs pairs)",
                t.head_dim
            ));
        }
        if self.projection_dim != t.hidden_size {
            return err(format!(
                "projection_dim {} differs from text_config.hidden_size {}",
                self.projection_dim, t.hidden_size
            ));
        }
        if t.model_type != "gemma" && t.model_type != "gemma2" {
            return err(format!(
                "text_config.model_type {:?} is not supported (gemma: PaliGemma, gemma2: PaliGemma 2)",
                t.model_type
            ));
        }
        if t.sliding_layers.len() != t.num_hidden_layers {
            return err(format!(
                "text_config.layer_types has {} entries for {} layers",
                t.sliding_layers.len(),
                t.num_hidden_layers
            ));
        }
        if t.query_pre_attn_scalar <= 0.0 || t.sliding_window == Some(0) {
            return err(
                "text_config.query_pre_attn_scalar and sliding_window must be positive".into(),
            );
        }
        for cap in [t.attn_logit_softcapping, t.final_logit_softcapping]
            .into_iter()
            .flatten()
        {
            if cap <= 0.0 || !cap.is_finite() {
                return err(format!("soft-cap {cap} must be a positive number"));
            }
        }
        if self.image_token_index as usize >= t.vocab_size {
            return err(format!(
                "image_token_index {} is outside the vocabulary of {}",
                self.image_token_index, t.vocab_size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLISHED_224: &str = r#"{"architectures": ["PaliGemmaForConditionalGeneration"],
      "bos_token_id": 2, "eos_token_id": 1, "hidden_size": 2048, "ignore_index": -100,
      "image_token_index": 257152, "model_type": "paligemma", "pad_token_id": 0,
      "projection_dim": 2048, "torch_dtype": "float32",
      "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
        "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
        "num_key_value_heads": 1, "torch_dtype": "float32", "vocab_size": 257216},
      "vision_config": {"hidden_size": 1152, "intermediate_size": 4304,
        "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
        "num_image_tokens": 256, "patch_size": 14, "projection_dim": 2048,
        "projector_hidden_act": "gelu_fast", "vision_use_head": false}}"#;

    #[test]
    fn published_config_fills_defaults() {
        let c = PaliGemmaConfig::from_json(PUBLISHED_224).unwrap();
        assert_eq!(c.vision.image_size, 224);
        assert_eq!(c.vision.intermediate_size, 4304);
        assert_eq!(c.num_image_tokens(), 256);
        assert_eq!(c.text.head_dim, 256);
        assert_eq!(c.text.num_key_value_heads, 1);
        assert_eq!(c.text.vocab_size, 257216);
        assert_eq!(c.text.rope_theta, 10000.0);
        assert_eq!(c.text.max_position_embeddings, 8192);
        assert_eq!(c.image_token_index, 257152);
        assert_eq!(c.eos_token_ids, vec![1]);
    }

    #[test]
    fn gemma2_defaults() {
        let pg2 = PUBLISHED_224
            .replace("\"model_type\": \"gemma\"", "\"model_type\": \"gemma2\"")
            .replace("\"num_hidden_layers\": 18", "\"num_hidden_layers\": 26");
        let c = PaliGemmaConfig::from_json(&pg2).unwrap();
        assert!(c.text.is_gemma2());
        assert_eq!(c.text.query_pre_attn_scalar, 256.0);
        assert_eq!(c.text.sliding_window, Some(4096));
        assert_eq!(c.text.attn_logit_softcapping, Some(50.0));
        assert_eq!(c.text.final_logit_softcapping, Some(30.0));
        assert_eq!(&c.text.sliding_layers[..4], &[true, false, true, false]);
        let g1 = PaliGemmaConfig::from_json(PUBLISHED_224).unwrap();
        assert_eq!(g1.text.query_pre_attn_scalar, 256.0);
        assert_eq!(g1.text.sliding_window, None);
        assert!(g1.text.sliding_layers.iter().all(|s| !s));
    }

    #[test]
    fn missing_sections_take_paligemma_defaults() {
        let c = PaliGemmaConfig::from_json(r#"{"model_type": "paligemma"}"#).unwrap();
        assert_eq!(c.vision.hidden_size, 1152);
        assert_eq!(c.vision.patch_size, 14);
        assert_eq!(c.text.hidden_size, 2048);
        assert_eq!(c.text.num_hidden_layers, 18);
    }

    #[test]
    fn bad_configs_are_named() {
        let zero_heads =
            PUBLISHED_224.replace("\"num_attention_heads\": 8", "\"num_attention_heads\": 0");
        let e = PaliGemmaConfig::from_json(&zero_heads)
            .unwrap_err()
            .to_string();
        assert!(e.contains("text_config.num_attention_heads is 0"), "{e}");
        let gqa = PUBLISHED_224.replace("\"num_key_value_heads\": 1", "\"num_key_value_heads\": 3");
        let e = PaliGemmaConfig::from_json(&gqa).unwrap_err().to_string();
        assert!(e.contains("not a multiple of num_key_value_heads 3"), "{e}");
        let e = PaliGemmaConfig::from_json("[1, 2]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a JSON object"), "{e}");
        let e = PaliGemmaConfig::from_json("{").unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
        let llama =
            PUBLISHED_224.replace("\"model_type\": \"paligemma\"", "\"model_type\": \"llama\"");
        assert!(PaliGemmaConfig::from_json(&llama).is_err());
    }
}
