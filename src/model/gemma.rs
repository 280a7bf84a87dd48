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
//! A decode step fuses what it can into fewer launches: each RMSNorm before a projection
//! into the matrix-vector kernel that reads its output, the gate and up projections and the
//! GeGLU into one launch, and the rotary embedding and the cache write into the attention
//! kernel (five launches a Gemma layer).
//!
//! Gemma 2 also scales scores by `query_pre_attn_scalar^-0.5`, soft-caps them
//! (`50·tanh(s/50)`), restricts generated tokens to a sliding window on alternate layers, and
//! soft-caps the logits (`30·tanh(l/30)`).

use std::ops::Range;

use super::config::TextConfig;
use super::weights::Checkpoint;
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::ops::attention::{attention, attention_decode, AttnOpts};
use crate::ops::elementwise::{add_rows, copy_rows};
use crate::ops::embed::embed;
use crate::ops::linear::{glu, linear, linear_normed, LinearOpts, RmsNorm};
use crate::ops::norm::{rms_norm, NormOpts};
use crate::ops::rope::{rope_qkv, QkvRows, RopeTable};
use crate::ops::softcap::softcap;
use crate::ops::Combine;
use crate::{Error, Result};

const PREFIX: &str = "language_model.model.";

/// Largest number of rows the MLP and the fused q/k/v projection process at once; bounds the
/// `[rows, intermediate]` and `[rows, q + k + v]` activations so that long prompts (896 px
/// images: 4096+ tokens) fit in one binding.
const BLOCK_ROWS: usize = 512;

/// The norms of one decoder layer, which is what tells Gemma 1 and Gemma 2 layers apart.
enum LayerNorms {
    /// Gemma: `input_layernorm` before attention, `post_attention_layernorm` before the MLP.
    Gemma { input: Tensor, pre_mlp: Tensor },
    /// Gemma 2: `input_layernorm` before attention, `post_attention_layernorm` on the
    /// attention output, `pre_feedforward_layernorm` before the MLP and
    /// `post_feedforward_layernorm` on its output.
    Gemma2 {
        input: Tensor,
        post_attn: Tensor,
        pre_mlp: Tensor,
        post_mlp: Tensor,
    },
}

impl LayerNorms {
    fn input(&self) -> &Tensor {
        match self {
            LayerNorms::Gemma { input, .. } | LayerNorms::Gemma2 { input, .. } => input,
        }
    }

    fn pre_mlp(&self) -> &Tensor {
        match self {
            LayerNorms::Gemma { pre_mlp, .. } | LayerNorms::Gemma2 { pre_mlp, .. } => pre_mlp,
        }
    }
}

/// One decoder layer's weights.
pub struct DecoderLayer {
    norms: LayerNorms,
    /// `q_proj`, `k_proj` and `v_proj` stacked: `[q + k + v, hidden]`, one launch.
    qkv: Tensor,
    o: Tensor,
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

/// Activations for a block of `rows` positions (a prompt, or one row per sequence of a decode
/// step).
struct Acts {
    rows: usize,
    /// Rows of the `gate` and `qkv` blocks.
    block_rows: usize,
    ids: Tensor,
    x: Tensor,
    h: Tensor,
    q: Tensor,
    /// The fused projection of a block of rows `[block_rows, q + k + v]`, from which the
    /// rotated queries go to `q` and the keys and values into each sequence's cache.
    qkv: Tensor,
    attn: Tensor,
    gate: Tensor,
    /// Gemma 2: attention / MLP output before its norm `[rows, hidden]`.
    branch: Option<Tensor>,
    /// The final-normed hidden states of the rows the LM head reads `[.., hidden]`.
    last: Tensor,
    /// Their logits `[.., vocab]`.
    logits: Tensor,
}

/// Rows `row..row + rows` of a block of activations are positions `seq.len()..` of `seq`.
struct Span<'s> {
    seq: &'s Sequence,
    row: usize,
    rows: usize,
}

/// The per-sequence state: KV cache and RoPE table.
pub struct Sequence {
    capacity: usize,
    prefix_len: usize,
    len: usize,
    k_cache: Vec<Tensor>,
    v_cache: Vec<Tensor>,
    rope: RopeTable,
}

/// A prompt's prefill in progress: its activations (freed when it is dropped) and how many
/// layers have been recorded. See [`Gemma::record_prefill`].
pub struct Prefill {
    acts: Acts,
    next_layer: usize,
    done: bool,
}

impl Prefill {
    /// Logits of the last prompt position `[1, vocab]` (valid once the prefill is done).
    pub fn logits(&self) -> &Tensor {
        &self.acts.logits
    }

    /// The final-normed hidden state of the last prompt position `[1, hidden]` (the LM
    /// head's input).
    pub fn last_hidden(&self) -> &Tensor {
        &self.acts.last
    }

    /// Whether every layer and the LM head have been recorded.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// Activations of a decode step for up to `size` sequences at once: one row per sequence,
/// so every weight is read once per step for the whole batch.
pub struct Batch {
    step: Acts,
}

impl Batch {
    /// How many sequences a step can hold.
    pub fn size(&self) -> usize {
        self.step.rows
    }

    /// The final-normed hidden states of the last step `[size, hidden]`.
    pub fn last_hidden(&self) -> &Tensor {
        &self.step.last
    }

    /// Logits of the last step `[size, vocab]`, row `b` for the step's sequence `b`.
    pub fn logits(&self) -> &Tensor {
        &self.step.logits
    }

    /// The input tokens of a step, u32 `[size]`: written by [`Gemma::record_step`], or left
    /// on the GPU by the previous step's greedy picks for [`Gemma::record_step_fed`] (see
    /// [`crate::ops::sample::argmax_logprob_feed`]).
    pub fn ids(&self) -> &Tensor {
        &self.step.ids
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

    /// Length of the prompt (the bidirectional prefix).
    pub fn prefix_len(&self) -> usize {
        self.prefix_len
    }
}

impl DecoderLayer {
    fn load(ck: &Checkpoint, gpu: &Gpu, cfg: &TextConfig, l: usize) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let qd = cfg.num_attention_heads * cfg.head_dim;
        let kvd = cfg.num_key_value_heads * cfg.head_dim;
        let n = |s: &str| format!("{PREFIX}layers.{l}.{s}");
        let input = ck.vector(gpu, &n("input_layernorm.weight"), h)?;
        let post_attention = ck.vector(gpu, &n("post_attention_layernorm.weight"), h)?;
        let norms = if cfg.is_gemma2() {
            LayerNorms::Gemma2 {
                input,
                post_attn: post_attention,
                pre_mlp: ck.vector(gpu, &n("pre_feedforward_layernorm.weight"), h)?,
                post_mlp: ck.vector(gpu, &n("post_feedforward_layernorm.weight"), h)?,
            }
        } else {
            LayerNorms::Gemma {
                input,
                pre_mlp: post_attention,
            }
        };
        let (q, k, v) = (
            n("self_attn.q_proj.weight"),
            n("self_attn.k_proj.weight"),
            n("self_attn.v_proj.weight"),
        );
        let parts: [(&str, &[usize]); 3] = [(&q, &[qd, h]), (&k, &[kvd, h]), (&v, &[kvd, h])];
        Ok(DecoderLayer {
            norms,
            qkv: ck.matrix_cat(gpu, &n("self_attn.qkv_proj.weight"), &parts)?,
            o: ck.matrix(gpu, &n("self_attn.o_proj.weight"), &[h, qd])?,
            gate: ck.matrix(gpu, &n("mlp.gate_proj.weight"), &[i, h])?,
            up: ck.matrix(gpu, &n("mlp.up_proj.weight"), &[i, h])?,
            down: ck.matrix(gpu, &n("mlp.down_proj.weight"), &[h, i])?,
        })
    }

    /// `x += Attn(norm(x))` on the rows of `spans`: the fused q/k/v projection of all rows
    /// (in blocks), RoPE, the new keys and values into each sequence's cache at its position,
    /// attention under the prefix-LM mask, the output projection and the residual add (Gemma 2
    /// normalises the attention output first).
    ///
    /// `from`: the first row whose output is needed (0, or the last prompt row in the final
    /// layer of a one-sequence prefill, where only that row feeds the LM head): keys and
    /// values are kept for every row, queries, attention and the output projection for rows
    /// `from..` only.
    #[allow(clippy::too_many_arguments)]
    fn record_attention(
        &self,
        rec: &mut Recorder,
        cfg: &TextConfig,
        attn: AttnOpts,
        l: usize,
        a: &Acts,
        spans: &[Span],
        from: usize,
    ) -> Result<()> {
        let eps = cfg.rms_norm_eps;
        let rows: usize = spans.iter().map(|s| s.rows).sum();
        if from > 0 && (spans.len() != 1 || from >= rows) {
            return Err(Error::kernel(
                "decoder attention",
                format!(
                    "outputs from row {from} of {rows} rows in {} spans",
                    spans.len()
                ),
            ));
        }
        let outputs = LinearOpts {
            x_row: from,
            out_row: from,
            rows: Some(rows - from),
            ..Default::default()
        };
        let out_norm = NormOpts {
            x_row: from,
            out_row: from,
            rows: Some(rows - from),
        };
        let norm = RmsNorm {
            weight: self.norms.input(),
            eps,
        };
        // A decode row's attention rotates its query and key and fills the cache itself,
        // reading the projection: all rows must fit in one block for that.
        let fused = |s: &Span| s.rows == 1 && s.seq.len > 0 && rows <= a.block_rows;
        for r0 in (0..rows).step_by(a.block_rows) {
            let r1 = (r0 + a.block_rows).min(rows);
            let block = LinearOpts {
                x_row: r0,
                rows: Some(r1 - r0),
                ..Default::default()
            };
            linear_normed(rec, &a.x, norm, &a.h, &self.qkv, &a.qkv, block)?;
            for s in spans {
                let (lo, hi) = (s.row.max(r0), (s.row + s.rows).min(r1));
                if lo >= hi || fused(s) {
                    continue;
                }
                let pos = s.seq.len + lo - s.row;
                let q_from = (s.row + from).clamp(lo, hi) - lo;
                let at = QkvRows {
                    rows: hi - lo,
                    pos0: pos,
                    qkv_row0: lo - r0,
                    cache_row0: pos,
                    q_from,
                    q_row0: lo + q_from,
                };
                let (kc, vc) = (&s.seq.k_cache[l], &s.seq.v_cache[l]);
                let heads = cfg.num_attention_heads;
                rope_qkv(rec, &a.qkv, &a.q, kc, vc, heads, at, &s.seq.rope)?;
            }
        }
        for s in spans {
            let (kc, vc, pos) = (&s.seq.k_cache[l], &s.seq.v_cache[l], s.seq.len);
            let opts = AttnOpts {
                q_rows: s.rows - from,
                q_row0: s.row + from,
                q_pos0: pos + from,
                kv_len: pos + s.rows,
                prefix_len: s.seq.prefix_len,
                ..attn
            };
            match fused(s) {
                true => attention_decode(rec, &a.qkv, s.row, &s.seq.rope, kc, vc, &a.attn, &opts)?,
                false => attention(rec, &a.q, kc, vc, &a.attn, &opts)?,
            }
        }
        match (&self.norms, &a.branch) {
            (LayerNorms::Gemma2 { post_attn, .. }, Some(branch)) => {
                linear(rec, &a.attn, &self.o, None, branch, outputs)?;
                rms_norm(rec, branch, post_attn, &a.h, eps, out_norm)?;
                add_rows(rec, &a.x, &a.h, from, rows - from)
            }
            _ => {
                let residual = LinearOpts {
                    combine: Combine::Add,
                    ..outputs
                };
                linear(rec, &a.attn, &self.o, None, &a.x, residual)
            }
        }
    }

    /// `x += MLP(norm(x))` on the rows `rows` of `a`, in blocks of at most `a.block_rows` rows
    /// (Gemma 2 normalises the MLP output before the residual add).
    fn record_mlp(&self, rec: &mut Recorder, eps: f32, a: &Acts, rows: Range<usize>) -> Result<()> {
        let norm = RmsNorm {
            weight: self.norms.pre_mlp(),
            eps,
        };
        let (mlp_out, mlp_combine) = match &a.branch {
            Some(branch) => (branch, Combine::Store),
            None => (&a.x, Combine::Add),
        };
        for r0 in rows.clone().step_by(a.block_rows) {
            let n = a.block_rows.min(rows.end - r0);
            let block = |combine, x_row, out_row| LinearOpts {
                combine,
                x_row,
                out_row,
                rows: Some(n),
                ..Default::default()
            };
            let gated = block(Combine::Store, r0, 0);
            glu(
                rec,
                &a.x,
                Some(norm),
                &a.h,
                &self.gate,
                &self.up,
                &a.gate,
                gated,
            )?;
            let down = block(mlp_combine, 0, r0);
            linear(rec, &a.gate, &self.down, None, mlp_out, down)?;
        }
        if let (LayerNorms::Gemma2 { post_mlp, .. }, Some(branch)) = (&self.norms, &a.branch) {
            let norm = NormOpts {
                x_row: rows.start,
                out_row: rows.start,
                rows: Some(rows.len()),
            };
            rms_norm(rec, branch, post_mlp, &a.h, eps, norm)?;
            add_rows(rec, &a.x, &a.h, rows.start, rows.len())?;
        }
        Ok(())
    }
}

impl Gemma {
    /// Load the decoder weights (published names under `language_model.model.`).
    pub fn load(ck: &Checkpoint, gpu: &Gpu, cfg: &TextConfig) -> Result<Self> {
        let embed = ck.matrix(
            gpu,
            &format!("{PREFIX}embed_tokens.weight"),
            &[cfg.vocab_size, cfg.hidden_size],
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| DecoderLayer::load(ck, gpu, cfg, l))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = ck.vector(gpu, &format!("{PREFIX}norm.weight"), cfg.hidden_size)?;
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

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Activations for `rows` positions whose LM head reads `head_rows` rows.
    fn acts(&self, gpu: &Gpu, rows: usize, head_rows: usize, tag: &str) -> Result<Acts> {
        let c = &self.cfg;
        let qd = c.num_attention_heads * c.head_dim;
        let kvd = c.num_key_value_heads * c.head_dim;
        let block_rows = rows.min(BLOCK_ROWS);
        let t = |s: &str| format!("{tag}.{s}");
        Ok(Acts {
            rows,
            block_rows,
            ids: Tensor::from_u32(gpu, &t("ids"), &[rows], &vec![0; rows])?,
            x: Tensor::zeros(gpu, &t("x"), &[rows, c.hidden_size])?,
            h: Tensor::zeros(gpu, &t("h"), &[rows, c.hidden_size])?,
            q: Tensor::zeros(gpu, &t("q"), &[rows, qd])?,
            qkv: Tensor::zeros(gpu, &t("qkv"), &[block_rows, qd + 2 * kvd])?,
            attn: Tensor::zeros(gpu, &t("attn"), &[rows, qd])?,
            gate: Tensor::zeros(gpu, &t("gate"), &[block_rows, c.intermediate_size])?,
            branch: match c.is_gemma2() {
                true => Some(Tensor::zeros(gpu, &t("branch"), &[rows, c.hidden_size])?),
                false => None,
            },
            last: Tensor::zeros(gpu, &t("last"), &[head_rows, c.hidden_size])?,
            logits: Tensor::zeros(gpu, &t("logits"), &[head_rows, c.vocab_size])?,
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
        let cache = |kind: &str| {
            (0..self.layers.len())
                .map(|l| Tensor::zeros(gpu, &format!("{kind}_cache.{l}"), &[capacity, kvd]))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Sequence {
            capacity,
            prefix_len,
            len: 0,
            k_cache: cache("k")?,
            v_cache: cache("v")?,
            rope: RopeTable::new(gpu, capacity, c.head_dim, c.rope_theta)?,
        })
    }

    /// Record copying the KV cache of `src` (its first `src.len()` positions, every layer)
    /// into `dst`, which then continues from the same position: beam search forks a prefix
    /// into several beams this way and reorders beams between steps. Both must hold the same
    /// prompt length and `dst` at least `src.len()` positions.
    pub fn record_copy(
        &self,
        rec: &mut Recorder,
        src: &Sequence,
        dst: &mut Sequence,
    ) -> Result<()> {
        if src.prefix_len != dst.prefix_len || src.len > dst.capacity || src.len == 0 {
            return Err(Error::Request(format!(
                "KV cache copy of {} positions (prompt {}) into a sequence of capacity {} (prompt {})",
                src.len, src.prefix_len, dst.capacity, dst.prefix_len
            )));
        }
        for l in 0..self.layers.len() {
            copy_rows(rec, &src.k_cache[l], 0, &dst.k_cache[l], 0, src.len)?;
            copy_rows(rec, &src.v_cache[l], 0, &dst.v_cache[l], 0, src.len)?;
        }
        dst.len = src.len;
        Ok(())
    }

    /// Allocate decode-step activations for `size` sequences.
    pub fn batch(&self, gpu: &Gpu, size: usize) -> Result<Batch> {
        if size == 0 {
            return Err(Error::Request("a batch needs at least one sequence".into()));
        }
        Ok(Batch {
            step: self.acts(gpu, size, size, "step")?,
        })
    }

    /// Check every id is inside the vocabulary.
    pub(crate) fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            Some(id) => Err(Error::Request(format!(
                "token id {id} is outside the vocabulary of {}",
                self.cfg.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// Prepare the prefill of `ids` (the whole prompt, image placeholders included) on the
    /// empty sequence `seq`: allocates its activations and uploads the ids. Record it with
    /// [`Gemma::record_prefill`].
    pub fn prefill(&self, gpu: &Gpu, seq: &Sequence, ids: &[u32]) -> Result<Prefill> {
        if ids.len() != seq.prefix_len || seq.len != 0 {
            return Err(Error::Request(format!(
                "prefill of {} tokens on a sequence prepared for {} (at position {})",
                ids.len(),
                seq.prefix_len,
                seq.len
            )));
        }
        self.check_ids(ids)?;
        let acts = self.acts(gpu, ids.len(), 1, "prefill")?;
        gpu.queue
            .write_buffer(acts.ids.buffer(), 0, bytemuck::cast_slice(ids));
        Ok(Prefill {
            acts,
            next_layer: 0,
            done: false,
        })
    }

    /// Record the next `layers` decoder layers of a prefill: the first call also records the
    /// embeddings, with the first `image_features.rows()` rows replaced by `image_features`
    /// (pass the same features on every call); the call that records the last layer also
    /// records the final norm and LM head of the last prompt position into
    /// [`Prefill::logits`]. Returns whether the prefill is complete. Calling it in parts lets
    /// each part go to the GPU as its own submission.
    pub fn record_prefill(
        &self,
        rec: &mut Recorder,
        seq: &mut Sequence,
        p: &mut Prefill,
        image_features: Option<&Tensor>,
        layers: usize,
    ) -> Result<bool> {
        if p.done || seq.len != 0 || p.acts.rows != seq.prefix_len {
            return Err(Error::Request(
                "this prefill is complete or belongs to another sequence".into(),
            ));
        }
        let a = &p.acts;
        if p.next_layer == 0 {
            let scale = (self.cfg.hidden_size as f32).sqrt();
            embed(rec, &self.embed, &a.ids, &a.x, 0, scale, Combine::Store)?;
            if let Some(f) = image_features {
                if f.rows() > a.rows || f.cols() != self.cfg.hidden_size {
                    return Err(Error::Request(format!(
                        "image features {:?} for a prompt of {} tokens of width {}",
                        f.shape(),
                        a.rows,
                        self.cfg.hidden_size
                    )));
                }
                copy_rows(rec, f, 0, &a.x, 0, f.rows())?;
            }
        }
        let end = (p.next_layer + layers.max(1)).min(self.layers.len());
        let span = [Span {
            seq,
            row: 0,
            rows: a.rows,
        }];
        self.record_layers(rec, a, &span, p.next_layer..end, true)?;
        p.next_layer = end;
        if end == self.layers.len() {
            self.record_head(rec, a, a.rows - 1, 1)?;
            seq.len = a.rows;
            p.done = true;
        }
        Ok(p.done)
    }

    /// Record one decode step: sequence `b` of `seqs` takes token `ids[b]` at its next
    /// position; its logits land in row `b` of [`Batch::logits`]. Sequences may be at
    /// different positions; `seqs.len()` may be smaller than the batch.
    pub fn record_step(
        &self,
        rec: &mut Recorder,
        batch: &Batch,
        seqs: &mut [&mut Sequence],
        ids: &[u32],
    ) -> Result<()> {
        if seqs.len() != ids.len() {
            return Err(Error::Request(format!(
                "decode step for {} sequences with {} ids",
                seqs.len(),
                ids.len()
            )));
        }
        self.check_ids(ids)?;
        self.record_step_inner(rec, batch, seqs, Some(ids))
    }

    /// [`Gemma::record_step`] whose input tokens are already in [`Batch::ids`] on the GPU,
    /// written there by the previous step's [`crate::ops::sample::argmax_logprob_feed`] for
    /// the same sequences in the same rows: the step can be submitted before the previous
    /// one's picks are read back.
    pub fn record_step_fed(
        &self,
        rec: &mut Recorder,
        batch: &Batch,
        seqs: &mut [&mut Sequence],
    ) -> Result<()> {
        self.record_step_inner(rec, batch, seqs, None)
    }

    fn record_step_inner(
        &self,
        rec: &mut Recorder,
        batch: &Batch,
        seqs: &mut [&mut Sequence],
        ids: Option<&[u32]>,
    ) -> Result<()> {
        let n = seqs.len();
        if n == 0 || n > batch.size() {
            return Err(Error::Request(format!(
                "decode step for {n} sequences on a batch of {}",
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
        let a = &batch.step;
        if let Some(ids) = ids {
            rec.gpu()
                .queue
                .write_buffer(a.ids.buffer(), 0, bytemuck::cast_slice(ids));
        }
        let scale = (self.cfg.hidden_size as f32).sqrt();
        embed(rec, &self.embed, &a.ids, &a.x, 0, scale, Combine::Store)?;
        let spans: Vec<Span> = seqs
            .iter()
            .enumerate()
            .map(|(row, seq)| Span { seq, row, rows: 1 })
            .collect();
        self.record_layers(rec, a, &spans, 0..self.layers.len(), false)?;
        self.record_head(rec, a, 0, n)?;
        for seq in seqs.iter_mut() {
            seq.len += 1;
        }
        Ok(())
    }

    /// Record `layers` of the decoder on the rows of `spans` (rows `0..` of `a`, in order).
    /// With `last_row_only`, the final layer computes its output for the last row only (a
    /// prefill, whose other rows' last-layer outputs nothing reads; their keys and values
    /// are still computed).
    fn record_layers(
        &self,
        rec: &mut Recorder,
        a: &Acts,
        spans: &[Span],
        layers: Range<usize>,
        last_row_only: bool,
    ) -> Result<()> {
        let rows: usize = spans.iter().map(|s| s.rows).sum();
        let last = self.layers.len() - 1;
        for l in layers {
            let layer = &self.layers[l];
            let from = if last_row_only && l == last {
                rows - 1
            } else {
                0
            };
            layer.record_attention(rec, &self.cfg, self.attn_opts(l), l, a, spans, from)?;
            layer.record_mlp(rec, self.cfg.rms_norm_eps, a, from..rows)?;
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

    /// Final norm of rows `row..row + rows` of `a.x` into `a.last`, then the tied LM head (and
    /// Gemma 2's logit soft-cap) into `a.logits`.
    fn record_head(&self, rec: &mut Recorder, a: &Acts, row: usize, rows: usize) -> Result<()> {
        let norm = NormOpts {
            x_row: row,
            out_row: 0,
            rows: Some(rows),
        };
        let eps = self.cfg.rms_norm_eps;
        rms_norm(rec, &a.x, &self.final_norm, &a.last, eps, norm)?;
        let head = LinearOpts {
            rows: Some(rows),
            ..Default::default()
        };
        linear(rec, &a.last, &self.embed, None, &a.logits, head)?;
        if let Some(cap) = self.cfg.final_logit_softcapping {
            softcap(rec, &a.logits, 0, rows, cap)?;
        }
        Ok(())
    }
}
