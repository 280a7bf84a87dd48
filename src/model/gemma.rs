//! Gemma decoder (the PaliGemma language model), Gemma 1 and Gemma 2 (PaliGemma 2):
//!
//! ```text
//! x = Embed(ids) · √hidden, with the image rows replaced by the (unscaled) image features
//! for each layer:
//!     h = RMSNorm(x)·(1+w);  q,k,v = h·Wq, h·Wk, h·Wv;  RoPE(q, k)      (k, v into the KV cache)
//!     a = Attn(q, K, V)·Wo           prefix-LM mask: the prompt attends bidirectionally,
//!                                    generated tokens causally
//!     Gemma 1:  x += a;              h = RMSNorm(x);  x += MLP(h)
//!     Gemma 2:  x += RMSNorm(a);     h = RMSNorm(x);  x += RMSNorm(MLP(h))
//!     MLP(h) = (gelu_tanh(h·Wgate) ⊙ h·Wup)·Wdown
//! logits = RMSNorm(x_last)·(1+w) · Embedᵀ                       (tied LM head, f32)
//! ```
//! Gemma 2 also scales scores by `query_pre_attn_scalar^-0.5`, soft-caps them
//! (`50·tanh(s/50)`), restricts generated tokens to a sliding window on alternate layers, and
//! soft-caps the logits (`30·tanh(l/30)`).

use super::config::TextConfig;
use super::weights::Checkpoint;
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::ops::attention::{attention, AttnOpts};
use crate::ops::elementwise::{add, copy_rows};
use crate::ops::embed::embed;
use crate::ops::linear::{linear, LinearOpts};
use crate::ops::norm::{rms_norm, NormOpts};
use crate::ops::rope::{rope, RopeTable};
use crate::ops::softcap::softcap;
use crate::ops::{Act, Combine};
use crate::{Error, Result};

const PREFIX: &str = "language_model.model.";

/// Largest number of rows the MLP processes at once; bounds the `[rows, intermediate]`
/// activation so that long prompts (896 px images: 4096+ tokens) fit in one binding.
const MLP_BLOCK_ROWS: usize = 512;

/// One decoder layer's weights.
pub struct DecoderLayer {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    post_norm: Tensor,
    /// Gemma 2 only: the norms around the MLP.
    ff_norms: Option<(Tensor, Tensor)>,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// The Gemma language model with its tied embedding / LM head.
pub struct Gemma {
    cfg: TextConfig,
    /// The embedding table `[vocab, hidden]` (f16, split over bindings); also the LM head.
    pub embed: Tensor,
    layers: Vec<DecoderLayer>,
    final_norm: Tensor,
}

/// Activations for a block of `rows` positions.
struct Acts {
    rows: usize,
    mlp_rows: usize,
    ids: Tensor,
    x: Tensor,
    h: Tensor,
    q: Tensor,
    attn: Tensor,
    gate: Tensor,
    /// Gemma 2: attention / MLP output before its norm `[rows, hidden]`.
    branch: Option<Tensor>,
}

/// The per-sequence state: KV cache, RoPE table and activations for prefill and decode.
pub struct Sequence {
    capacity: usize,
    prefix_len: usize,
    len: usize,
    k_cache: Vec<Tensor>,
    v_cache: Vec<Tensor>,
    rope: RopeTable,
    prefill: Acts,
    step: Acts,
    last: Tensor,
    /// Logits of the last processed position `[1, vocab]`.
    pub logits: Tensor,
}

impl Sequence {
    /// Positions processed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been processed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total positions the KV cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The final-normed hidden state of the last processed position `[1, hidden]` (the
    /// LM head's input).
    pub fn last_hidden(&self) -> &Tensor {
        &self.last
    }
}

impl Gemma {
    /// Load the decoder weights (published names under `language_model.model.`).
    pub fn load(ck: &Checkpoint, gpu: &Gpu, cfg: &TextConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let qd = cfg.num_attention_heads * cfg.head_dim;
        let kvd = cfg.num_key_value_heads * cfg.head_dim;
        let embed = ck.matrix(
            gpu,
            &format!("{PREFIX}embed_tokens.weight"),
            &[cfg.vocab_size, h],
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let n = |s: &str| format!("{PREFIX}layers.{l}.{s}");
            layers.push(DecoderLayer {
                input_norm: ck.vector(gpu, &n("input_layernorm.weight"), h)?,
                q: ck.matrix(gpu, &n("self_attn.q_proj.weight"), &[qd, h])?,
                k: ck.matrix(gpu, &n("self_attn.k_proj.weight"), &[kvd, h])?,
                v: ck.matrix(gpu, &n("self_attn.v_proj.weight"), &[kvd, h])?,
                o: ck.matrix(gpu, &n("self_attn.o_proj.weight"), &[h, qd])?,
                post_norm: ck.vector(gpu, &n("post_attention_layernorm.weight"), h)?,
                ff_norms: match cfg.is_gemma2() {
                    true => Some((
                        ck.vector(gpu, &n("pre_feedforward_layernorm.weight"), h)?,
                        ck.vector(gpu, &n("post_feedforward_layernorm.weight"), h)?,
                    )),
                    false => None,
                },
                gate: ck.matrix(gpu, &n("mlp.gate_proj.weight"), &[i, h])?,
                up: ck.matrix(gpu, &n("mlp.up_proj.weight"), &[i, h])?,
                down: ck.matrix(gpu, &n("mlp.down_proj.weight"), &[h, i])?,
            });
        }
        let final_norm = ck.vector(gpu, &format!("{PREFIX}norm.weight"), h)?;
        Ok(Gemma {
            cfg: cfg.clone(),
            embed,
            layers,
            final_norm,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    fn acts(&self, gpu: &Gpu, rows: usize, tag: &str) -> Result<Acts> {
        let c = &self.cfg;
        let qd = c.num_attention_heads * c.head_dim;
        let mlp_rows = rows.min(MLP_BLOCK_ROWS);
        let t = |s: &str| format!("{tag}.{s}");
        Ok(Acts {
            rows,
            mlp_rows,
            ids: Tensor::from_u32(gpu, &t("ids"), &[rows], &vec![0; rows])?,
            x: Tensor::zeros(gpu, &t("x"), &[rows, c.hidden_size])?,
            h: Tensor::zeros(gpu, &t("h"), &[rows, c.hidden_size])?,
            q: Tensor::zeros(gpu, &t("q"), &[rows, qd])?,
            attn: Tensor::zeros(gpu, &t("attn"), &[rows, qd])?,
            gate: Tensor::zeros(gpu, &t("gate"), &[mlp_rows, c.intermediate_size])?,
            branch: match c.is_gemma2() {
                true => Some(Tensor::zeros(gpu, &t("branch"), &[rows, c.hidden_size])?),
                false => None,
            },
        })
    }

    /// Allocate the state of one sequence: a prompt of `prefix_len` tokens followed by at
    /// most `max_new` generated ones.
    pub fn sequence(&self, gpu: &Gpu, prefix_len: usize, max_new: usize) -> Result<Sequence> {
        let c = &self.cfg;
        let capacity = prefix_len + max_new;
        if prefix_len == 0 {
            return Err(Error::Request("the prompt is empty".into()));
        }
        if capacity > c.max_position_embeddings {
            return Err(Error::Request(format!(
                "prompt of {prefix_len} tokens + {max_new} new tokens exceeds the model's {} positions",
                c.max_position_embeddings
            )));
        }
        let kvd = c.num_key_value_heads * c.head_dim;
        let mut k_cache = Vec::with_capacity(self.layers.len());
        let mut v_cache = Vec::with_capacity(self.layers.len());
        for l in 0..self.layers.len() {
            k_cache.push(Tensor::zeros(
                gpu,
                &format!("k_cache.{l}"),
                &[capacity, kvd],
            )?);
            v_cache.push(Tensor::zeros(
                gpu,
                &format!("v_cache.{l}"),
                &[capacity, kvd],
            )?);
        }
        Ok(Sequence {
            capacity,
            prefix_len,
            len: 0,
            k_cache,
            v_cache,
            rope: RopeTable::new(gpu, capacity, c.head_dim, c.rope_theta)?,
            prefill: self.acts(gpu, prefix_len, "prefill")?,
            step: self.acts(gpu, 1, "step")?,
            last: Tensor::zeros(gpu, "last", &[1, c.hidden_size])?,
            logits: Tensor::zeros(gpu, "logits", &[1, c.vocab_size])?,
        })
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            Some(id) => Err(Error::Request(format!(
                "token id {id} is outside the vocabulary of {}",
                self.cfg.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// Record the prefill of the whole prompt: `ids` (image placeholders included) with the
    /// first `image_features.rows()` rows replaced by `image_features`; leaves the logits of
    /// the last prompt position in `seq.logits`.
    pub fn record_prefill(
        &self,
        rec: &mut Recorder,
        seq: &mut Sequence,
        ids: &[u32],
        image_features: Option<&Tensor>,
    ) -> Result<()> {
        let gpu = rec.gpu();
        if ids.len() != seq.prefix_len || seq.len != 0 {
            return Err(Error::Request(format!(
                "prefill of {} tokens on a sequence prepared for {} (at position {})",
                ids.len(),
                seq.prefix_len,
                seq.len
            )));
        }
        self.check_ids(ids)?;
        gpu.queue
            .write_buffer(seq.prefill.ids.buffer(), 0, bytemuck::cast_slice(ids));
        let scale = (self.cfg.hidden_size as f32).sqrt();
        embed(
            rec,
            &self.embed,
            &seq.prefill.ids,
            &seq.prefill.x,
            0,
            scale,
            Combine::Store,
        )?;
        if let Some(f) = image_features {
            if f.rows() > ids.len() {
                return Err(Error::Request(format!(
                    "{} image features for a prompt of {} tokens",
                    f.rows(),
                    ids.len()
                )));
            }
            copy_rows(rec, f, 0, &seq.prefill.x, 0, f.rows())?;
        }
        self.record_layers(rec, seq, false)?;
        seq.len = ids.len();
        Ok(())
    }

    /// Record one decode step for token `id` at the next position; leaves its logits in
    /// `seq.logits`.
    pub fn record_step(&self, rec: &mut Recorder, seq: &mut Sequence, id: u32) -> Result<()> {
        if seq.len == 0 || seq.len >= seq.capacity {
            return Err(Error::Request(format!(
                "decode step at position {} of a sequence with capacity {}",
                seq.len, seq.capacity
            )));
        }
        self.check_ids(&[id])?;
        rec.gpu()
            .queue
            .write_buffer(seq.step.ids.buffer(), 0, bytemuck::bytes_of(&id));
        let scale = (self.cfg.hidden_size as f32).sqrt();
        embed(
            rec,
            &self.embed,
            &seq.step.ids,
            &seq.step.x,
            0,
            scale,
            Combine::Store,
        )?;
        self.record_layers(rec, seq, true)?;
        seq.len += 1;
        Ok(())
    }

    fn record_layers(&self, rec: &mut Recorder, seq: &Sequence, step: bool) -> Result<()> {
        let c = &self.cfg;
        let a = if step { &seq.step } else { &seq.prefill };
        let (rows, pos0) = (a.rows, seq.len);
        let eps = c.rms_norm_eps;
        let attn_opts = AttnOpts {
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            scale: c.query_pre_attn_scalar.powf(-0.5),
            q_rows: rows,
            q_pos0: pos0,
            kv_len: pos0 + rows,
            prefix_len: seq.prefix_len,
            window: 0,
            softcap: c.attn_logit_softcapping.unwrap_or(0.0),
        };
        let plain = LinearOpts::default();
        let norm = NormOpts::default();
        for (l, layer) in self.layers.iter().enumerate() {
            let (kc, vc) = (&seq.k_cache[l], &seq.v_cache[l]);
            rms_norm(rec, &a.x, &layer.input_norm, &a.h, eps, norm)?;
            linear(rec, &a.h, &layer.q, None, &a.q, plain)?;
            let to_cache = LinearOpts {
                out_row: pos0,
                ..plain
            };
            linear(rec, &a.h, &layer.k, None, kc, to_cache)?;
            linear(rec, &a.h, &layer.v, None, vc, to_cache)?;
            rope(rec, &a.q, c.num_attention_heads, 0, rows, pos0, &seq.rope)?;
            rope(rec, kc, c.num_key_value_heads, pos0, rows, pos0, &seq.rope)?;
            let window = match (c.sliding_layers[l], c.sliding_window) {
                (true, Some(w)) => w,
                _ => 0,
            };
            attention(
                rec,
                &a.q,
                kc,
                vc,
                &a.attn,
                &AttnOpts {
                    window,
                    ..attn_opts
                },
            )?;
            let residual = LinearOpts {
                combine: Combine::Add,
                ..plain
            };
            // The MLP's input norm: Gemma 1 calls it post_attention_layernorm, Gemma 2
            // pre_feedforward_layernorm (its post_attention_layernorm normalises the
            // attention output before the residual add).
            let mlp_norm = match (&a.branch, &layer.ff_norms) {
                (Some(branch), Some((pre_ff, _))) => {
                    linear(rec, &a.attn, &layer.o, None, branch, plain)?;
                    rms_norm(rec, branch, &layer.post_norm, &a.h, eps, norm)?;
                    add(rec, &a.x, &a.h)?;
                    pre_ff
                }
                _ => {
                    linear(rec, &a.attn, &layer.o, None, &a.x, residual)?;
                    &layer.post_norm
                }
            };
            rms_norm(rec, &a.x, mlp_norm, &a.h, eps, norm)?;
            let (mlp_out, mlp_combine) = match &a.branch {
                Some(branch) => (branch, Combine::Store),
                None => (&a.x, Combine::Add),
            };
            for r0 in (0..rows).step_by(a.mlp_rows) {
                let n = a.mlp_rows.min(rows - r0);
                let block = |act, combine, x_row, out_row| LinearOpts {
                    act,
                    combine,
                    x_row,
                    out_row,
                    rows: Some(n),
                };
                linear(
                    rec,
                    &a.h,
                    &layer.gate,
                    None,
                    &a.gate,
                    block(Act::GeluTanh, Combine::Store, r0, 0),
                )?;
                linear(
                    rec,
                    &a.h,
                    &layer.up,
                    None,
                    &a.gate,
                    block(Act::None, Combine::Mul, r0, 0),
                )?;
                linear(
                    rec,
                    &a.gate,
                    &layer.down,
                    None,
                    mlp_out,
                    block(Act::None, mlp_combine, 0, r0),
                )?;
            }
            if let (Some(branch), Some((_, post_ff))) = (&a.branch, &layer.ff_norms) {
                rms_norm(rec, branch, post_ff, &a.h, eps, norm)?;
                add(rec, &a.x, &a.h)?;
            }
        }
        let last = NormOpts {
            x_row: rows - 1,
            out_row: 0,
            rows: Some(1),
        };
        rms_norm(rec, &a.x, &self.final_norm, &seq.last, eps, last)?;
        linear(rec, &seq.last, &self.embed, None, &seq.logits, plain)?;
        if let Some(cap) = c.final_logit_softcapping {
            softcap(rec, &seq.logits, 0, 1, cap)?;
        }
        Ok(())
    }
}
