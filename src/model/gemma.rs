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
    /// The embedding table `[vocab, hidden]` (f16 or quantised, split over bindings); also the
    /// LM head.
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

/// The per-sequence state: KV cache, RoPE table and the prefill's activations.
pub struct Sequence {
    capacity: usize,
    prefix_len: usize,
    len: usize,
    k_cache: Vec<Tensor>,
    v_cache: Vec<Tensor>,
    rope: RopeTable,
    prefill: Acts,
    last: Tensor,
    /// Logits of the last prompt position `[1, vocab]` (after the prefill).
    pub logits: Tensor,
}

/// Activations of a decode step for up to `size` sequences at once: one row per sequence,
/// so every weight is read once per step for the whole batch.
pub struct Batch {
    step: Acts,
    k_new: Tensor,
    v_new: Tensor,
    last: Tensor,
    /// Logits of the step `[size, vocab]`, row `b` for sequence `b`.
    pub logits: Tensor,
}

impl Batch {
    /// How many sequences a step can hold.
    pub fn size(&self) -> usize {
        self.step.rows
    }

    /// The final-normed hidden states of the last step `[size, hidden]`.
    pub fn last_hidden(&self) -> &Tensor {
        &self.last
    }
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

    /// The final-normed hidden state of the last prompt position `[1, hidden]` (the LM
    /// head's input).
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
            last: Tensor::zeros(gpu, "last", &[1, c.hidden_size])?,
            logits: Tensor::zeros(gpu, "logits", &[1, c.vocab_size])?,
        })
    }

    /// Allocate decode-step activations for `size` sequences.
    pub fn batch(&self, gpu: &Gpu, size: usize) -> Result<Batch> {
        let c = &self.cfg;
        if size == 0 {
            return Err(Error::Request("a batch needs at least one sequence".into()));
        }
        let kvd = c.num_key_value_heads * c.head_dim;
        Ok(Batch {
            step: self.acts(gpu, size, "step")?,
            k_new: Tensor::zeros(gpu, "step.k", &[size, kvd])?,
            v_new: Tensor::zeros(gpu, "step.v", &[size, kvd])?,
            last: Tensor::zeros(gpu, "step.last", &[size, c.hidden_size])?,
            logits: Tensor::zeros(gpu, "step.logits", &[size, c.vocab_size])?,
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
        self.record_prefill_layers(rec, seq)?;
        seq.len = ids.len();
        Ok(())
    }

    /// Record one decode step: sequence `b` of `seqs` takes token `ids[b]` at its next
    /// position; its logits land in row `b` of `batch.logits`. Sequences may be at different
    /// positions; `seqs.len()` may be smaller than the batch.
    pub fn record_step(
        &self,
        rec: &mut Recorder,
        batch: &Batch,
        seqs: &mut [Sequence],
        ids: &[u32],
    ) -> Result<()> {
        let n = seqs.len();
        if n == 0 || n != ids.len() || n > batch.size() {
            return Err(Error::Request(format!(
                "decode step for {n} sequences with {} ids on a batch of {}",
                ids.len(),
                batch.size()
            )));
        }
        for seq in seqs.iter() {
            if seq.len == 0 || seq.len >= seq.capacity {
                return Err(Error::Request(format!(
                    "decode step at position {} of a sequence with capacity {}",
                    seq.len, seq.capacity
                )));
            }
        }
        self.check_ids(ids)?;
        let a = &batch.step;
        rec.gpu()
            .queue
            .write_buffer(a.ids.buffer(), 0, bytemuck::cast_slice(ids));
        let c = &self.cfg;
        let scale = (c.hidden_size as f32).sqrt();
        embed(rec, &self.embed, &a.ids, &a.x, 0, scale, Combine::Store)?;
        let rows = Some(n);
        let plain = LinearOpts {
            rows,
            ..Default::default()
        };
        let norm = NormOpts {
            rows,
            ..Default::default()
        };
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(rec, &a.x, &layer.input_norm, &a.h, c.rms_norm_eps, norm)?;
            linear(rec, &a.h, &layer.q, None, &a.q, plain)?;
            linear(rec, &a.h, &layer.k, None, &batch.k_new, plain)?;
            linear(rec, &a.h, &layer.v, None, &batch.v_new, plain)?;
            for (b, seq) in seqs.iter().enumerate() {
                let (kc, vc, pos) = (&seq.k_cache[l], &seq.v_cache[l], seq.len);
                copy_rows(rec, &batch.k_new, b, kc, pos, 1)?;
                copy_rows(rec, &batch.v_new, b, vc, pos, 1)?;
                rope(rec, &a.q, c.num_attention_heads, b, 1, pos, &seq.rope)?;
                rope(rec, kc, c.num_key_value_heads, pos, 1, pos, &seq.rope)?;
                let opts = AttnOpts {
                    q_rows: 1,
                    q_row0: b,
                    q_pos0: pos,
                    kv_len: pos + 1,
                    prefix_len: seq.prefix_len,
                    ..self.attn_opts(l)
                };
                attention(rec, &a.q, kc, vc, &a.attn, &opts)?;
            }
            self.record_ffn(rec, a, layer, n)?;
        }
        self.record_head(rec, a, 0, n, &batch.last, &batch.logits)?;
        for seq in seqs.iter_mut() {
            seq.len += 1;
        }
        Ok(())
    }

    /// Attention options of layer `l` (window, soft-cap, scale), to be completed with the
    /// rows and positions.
    fn attn_opts(&self, l: usize) -> AttnOpts {
        let c = &self.cfg;
        AttnOpts {
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            scale: c.query_pre_attn_scalar.powf(-0.5),
            q_rows: 0,
            q_row0: 0,
            q_pos0: 0,
            kv_len: 0,
            prefix_len: 0,
            window: match (c.sliding_layers[l], c.sliding_window) {
                (true, Some(w)) => w,
                _ => 0,
            },
            softcap: c.attn_logit_softcapping.unwrap_or(0.0),
        }
    }

    /// The prompt's layers: q/k/v of all rows, k and v straight into the cache.
    fn record_prefill_layers(&self, rec: &mut Recorder, seq: &Sequence) -> Result<()> {
        let c = &self.cfg;
        let a = &seq.prefill;
        let rows = a.rows;
        let plain = LinearOpts::default();
        for (l, layer) in self.layers.iter().enumerate() {
            let (kc, vc) = (&seq.k_cache[l], &seq.v_cache[l]);
            rms_norm(
                rec,
                &a.x,
                &layer.input_norm,
                &a.h,
                c.rms_norm_eps,
                NormOpts::default(),
            )?;
            linear(rec, &a.h, &layer.q, None, &a.q, plain)?;
            linear(rec, &a.h, &layer.k, None, kc, plain)?;
            linear(rec, &a.h, &layer.v, None, vc, plain)?;
            rope(rec, &a.q, c.num_attention_heads, 0, rows, 0, &seq.rope)?;
            rope(rec, kc, c.num_key_value_heads, 0, rows, 0, &seq.rope)?;
            let opts = AttnOpts {
                q_rows: rows,
                kv_len: rows,
                prefix_len: seq.prefix_len,
                ..self.attn_opts(l)
            };
            attention(rec, &a.q, kc, vc, &a.attn, &opts)?;
            self.record_ffn(rec, a, layer, rows)?;
        }
        self.record_head(rec, a, rows - 1, 1, &seq.last, &seq.logits)
    }

    /// The rest of a layer after attention, on rows `0..rows` of `a`: the output projection
    /// and residual, then the MLP (in blocks of rows) and residual; Gemma 2 normalises both
    /// branches before adding them.
    fn record_ffn(
        &self,
        rec: &mut Recorder,
        a: &Acts,
        layer: &DecoderLayer,
        rows: usize,
    ) -> Result<()> {
        let eps = self.cfg.rms_norm_eps;
        let plain = LinearOpts {
            rows: Some(rows),
            ..Default::default()
        };
        let norm = NormOpts {
            rows: Some(rows),
            ..Default::default()
        };
        // The MLP's input norm: Gemma 1 calls it post_attention_layernorm, Gemma 2
        // pre_feedforward_layernorm (its post_attention_layernorm normalises the attention
        // output before the residual add).
        let mlp_norm = match (&a.branch, &layer.ff_norms) {
            (Some(branch), Some((pre_ff, _))) => {
                linear(rec, &a.attn, &layer.o, None, branch, plain)?;
                rms_norm(rec, branch, &layer.post_norm, &a.h, eps, norm)?;
                add(rec, &a.x, &a.h)?;
                pre_ff
            }
            _ => {
                let residual = LinearOpts {
                    combine: Combine::Add,
                    ..plain
                };
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
        Ok(())
    }

    /// Final norm of rows `row..row + rows` of `a.x` into `last`, then the tied LM head (and
    /// Gemma 2's logit soft-cap) into `logits`.
    fn record_head(
        &self,
        rec: &mut Recorder,
        a: &Acts,
        row: usize,
        rows: usize,
        last: &Tensor,
        logits: &Tensor,
    ) -> Result<()> {
        let norm = NormOpts {
            x_row: row,
            out_row: 0,
            rows: Some(rows),
        };
        rms_norm(
            rec,
            &a.x,
            &self.final_norm,
            last,
            self.cfg.rms_norm_eps,
            norm,
        )?;
        let head = LinearOpts {
            rows: Some(rows),
            ..Default::default()
        };
        linear(rec, last, &self.embed, None, logits, head)?;
        if let Some(cap) = self.cfg.final_logit_softcapping {
            softcap(rec, logits, 0, rows, cap)?;
        }
        Ok(())
    }
}
