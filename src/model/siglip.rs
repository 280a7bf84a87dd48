//! SigLIP vision tower and the PaliGemma projector:
//!
//! ```text
//! x = PatchEmbed(pixels) + PosEmbed                       (14×14 stride-14 conv = im2col · W)
//! for each layer:  x += Attn(LN1(x));  x += MLP(LN2(x))   (pre-LN, tanh-GELU MLP)
//! features = Linear_proj(LN_post(x))                      (no pooling head)
//! ```
//! Attention is bidirectional over all patches with scale head_dim^-0.5.

use std::sync::atomic::{AtomicU64, Ordering};

use super::config::{PaliGemmaConfig, VisionConfig};
use super::weights::Checkpoint;
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::ops::attention::{attention, AttnOpts};
use crate::ops::embed::embed;
use crate::ops::linear::{linear, LinearOpts};
use crate::ops::norm::{layer_norm, NormOpts};
use crate::ops::patch::im2col;
use crate::ops::{Act, Combine};
use crate::processor::image::PixelValues;
use crate::{Error, Result};

const PREFIX: &str = "vision_tower.vision_model.";

/// A linear layer's weight and bias.
pub struct Linear {
    /// `[out, in]`, f16 or quantised.
    pub weight: Tensor,
    /// f32 `[out]`.
    pub bias: Tensor,
}

impl Linear {
    fn load(ck: &Checkpoint, gpu: &Gpu, name: &str, out: usize, inp: &[usize]) -> Result<Self> {
        let mut shape = vec![out];
        shape.extend_from_slice(inp);
        Ok(Linear {
            weight: ck.matrix(gpu, &format!("{name}.weight"), &shape)?,
            bias: ck.vector(gpu, &format!("{name}.bias"), out)?,
        })
    }

    fn record(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        out: &Tensor,
        act: Act,
        combine: Combine,
    ) -> Result<()> {
        let opts = LinearOpts {
            act,
            combine,
            ..Default::default()
        };
        linear(rec, x, &self.weight, Some(&self.bias), out, opts)
    }
}

/// A LayerNorm's weight and bias (f32).
pub struct LayerNorm {
    /// Scale.
    pub weight: Tensor,
    /// Shift.
    pub bias: Tensor,
}

impl LayerNorm {
    fn load(ck: &Checkpoint, gpu: &Gpu, name: &str, dim: usize) -> Result<Self> {
        Ok(LayerNorm {
            weight: ck.vector(gpu, &format!("{name}.weight"), dim)?,
            bias: ck.vector(gpu, &format!("{name}.bias"), dim)?,
        })
    }
}

/// One pre-LN encoder layer.
pub struct EncoderLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// The SigLIP encoder with the multimodal projector.
pub struct VisionTower {
    cfg: VisionConfig,
    eps: f32,
    out_dim: usize,
    patch: Linear,
    pos: Tensor,
    layers: Vec<EncoderLayer>,
    post: LayerNorm,
    proj: Linear,
    runs: AtomicU64,
}

/// Preallocated activations for one image.
pub struct VisionActivations {
    /// Input pixels `[3, S, S]`.
    pub pixels: Tensor,
    patches: Tensor,
    pos_ids: Tensor,
    /// Residual stream `[N, hidden]`.
    pub x: Tensor,
    h: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: Tensor,
    mlp: Tensor,
    /// Projector output `[N, text_hidden]`.
    pub features: Tensor,
}

impl VisionTower {
    /// Load the tower and projector weights named as in the published checkpoints.
    pub fn load(ck: &Checkpoint, gpu: &Gpu, config: &PaliGemmaConfig) -> Result<Self> {
        let c = &config.vision;
        let (d, p) = (c.hidden_size, c.patch_size);
        let n = config.num_image_tokens();
        let e = |s: &str| format!("{PREFIX}embeddings.{s}");
        // The patch embedding and position embeddings stay f16 in every weight format
        // (`weights::quantizable`).
        let patch = Linear {
            weight: ck.matrix(
                gpu,
                &e("patch_embedding.weight"),
                &[d, c.num_channels, p, p],
            )?,
            bias: ck.vector(gpu, &e("patch_embedding.bias"), d)?,
        };
        let pos = ck.matrix(gpu, &e("position_embedding.weight"), &[n, d])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = |s: &str| format!("{PREFIX}encoder.layers.{i}.{s}");
            layers.push(EncoderLayer {
                ln1: LayerNorm::load(ck, gpu, &l("layer_norm1"), d)?,
                q: Linear::load(ck, gpu, &l("self_attn.q_proj"), d, &[d])?,
                k: Linear::load(ck, gpu, &l("self_attn.k_proj"), d, &[d])?,
                v: Linear::load(ck, gpu, &l("self_attn.v_proj"), d, &[d])?,
                o: Linear::load(ck, gpu, &l("self_attn.out_proj"), d, &[d])?,
                ln2: LayerNorm::load(ck, gpu, &l("layer_norm2"), d)?,
                fc1: Linear::load(ck, gpu, &l("mlp.fc1"), c.intermediate_size, &[d])?,
                fc2: Linear::load(ck, gpu, &l("mlp.fc2"), d, &[c.intermediate_size])?,
            });
        }
        let post = LayerNorm::load(ck, gpu, &format!("{PREFIX}post_layernorm"), d)?;
        let proj = Linear::load(
            ck,
            gpu,
            "multi_modal_projector.linear",
            config.projection_dim,
            &[d],
        )?;
        Ok(VisionTower {
            cfg: c.clone(),
            eps: c.layer_norm_eps,
            out_dim: config.projection_dim,
            patch,
            pos,
            layers,
            post,
            proj,
            runs: AtomicU64::new(0),
        })
    }

    /// Number of patches (image tokens).
    pub fn num_patches(&self) -> usize {
        let side = self.cfg.image_size / self.cfg.patch_size;
        side * side
    }

    /// Allocate the activations for one image.
    pub fn activations(&self, gpu: &Gpu) -> Result<VisionActivations> {
        let c = &self.cfg;
        let (n, d, s, p) = (
            self.num_patches(),
            c.hidden_size,
            c.image_size,
            c.patch_size,
        );
        let ids: Vec<u32> = (0..n as u32).collect();
        Ok(VisionActivations {
            pixels: Tensor::zeros(gpu, "pixels", &[3, s, s])?,
            patches: Tensor::zeros(gpu, "patches", &[n, 3 * p * p])?,
            pos_ids: Tensor::from_u32(gpu, "position_ids", &[n], &ids)?,
            x: Tensor::zeros(gpu, "vision.x", &[n, d])?,
            h: Tensor::zeros(gpu, "vision.h", &[n, d])?,
            q: Tensor::zeros(gpu, "vision.q", &[n, d])?,
            k: Tensor::zeros(gpu, "vision.k", &[n, d])?,
            v: Tensor::zeros(gpu, "vision.v", &[n, d])?,
            attn: Tensor::zeros(gpu, "vision.attn", &[n, d])?,
            mlp: Tensor::zeros(gpu, "vision.mlp", &[n, c.intermediate_size])?,
            features: Tensor::zeros(gpu, "image_features", &[n, self.out_dim])?,
        })
    }

    /// Number of encoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Record the embeddings and the first `layers` encoder layers; with `finish`, also the
    /// post-LayerNorm and the projector (into `a.features`). The residual stream is `a.x`.
    pub fn record(
        &self,
        rec: &mut Recorder,
        a: &VisionActivations,
        layers: usize,
        finish: bool,
    ) -> Result<()> {
        let layers = layers.min(self.layers.len());
        self.record_embeddings(rec, a)?;
        for layer in &self.layers[..layers] {
            self.record_layer(rec, a, layer)?;
        }
        if finish {
            self.record_projector(rec, a, &a.features)?;
        }
        Ok(())
    }

    /// Record a part of the tower, so that each part can go to the GPU as its own
    /// submission: the embeddings when `layers.start == 0`, encoder layers `layers`, and, when
    /// `layers.end` is the number of layers, the post-LayerNorm and the projector into
    /// `features` (`[num_patches, projection_dim]`).
    pub fn record_part(
        &self,
        rec: &mut Recorder,
        a: &VisionActivations,
        layers: std::ops::Range<usize>,
        features: &Tensor,
    ) -> Result<()> {
        if layers.start > layers.end || layers.end > self.layers.len() {
            return Err(Error::Request(format!(
                "vision layers {layers:?} of a tower of {}",
                self.layers.len()
            )));
        }
        if layers.start == 0 {
            self.record_embeddings(rec, a)?;
        }
        for layer in &self.layers[layers.clone()] {
            self.record_layer(rec, a, layer)?;
        }
        if layers.end == self.layers.len() {
            self.record_projector(rec, a, features)?;
        }
        Ok(())
    }

    /// Allocate the output of the projector for one image, `[num_patches, projection_dim]`.
    pub fn features(&self, gpu: &Gpu) -> Result<Tensor> {
        Tensor::zeros(gpu, "image_features", &[self.num_patches(), self.out_dim])
    }

    /// Patch embedding (im2col · W + b) plus the position embeddings into `a.x`.
    fn record_embeddings(&self, rec: &mut Recorder, a: &VisionActivations) -> Result<()> {
        im2col(rec, &a.pixels, &a.patches, self.cfg.patch_size)?;
        self.patch
            .record(rec, &a.patches, &a.x, Act::None, Combine::Store)?;
        embed(rec, &self.pos, &a.pos_ids, &a.x, 0, 1.0, Combine::Add)
    }

    /// One pre-LN encoder layer on `a.x`: `x += Attn(LN1(x)); x += MLP(LN2(x))`.
    fn record_layer(
        &self,
        rec: &mut Recorder,
        a: &VisionActivations,
        layer: &EncoderLayer,
    ) -> Result<()> {
        let heads = self.cfg.num_attention_heads;
        let head_dim = self.cfg.hidden_size / heads;
        let n = self.num_patches();
        let attn_opts = AttnOpts {
            heads,
            kv_heads: heads,
            head_dim,
            scale: (head_dim as f32).powf(-0.5),
            q_rows: n,
            q_pos0: 0,
            kv_len: n,
            prefix_len: n,
            window: 0,
            softcap: 0.0,
            q_row0: 0,
        };
        let (ln1, ln2) = (&layer.ln1, &layer.ln2);
        let all = NormOpts::default();
        layer_norm(rec, &a.x, &ln1.weight, &ln1.bias, &a.h, self.eps, all)?;
        layer.q.record(rec, &a.h, &a.q, Act::None, Combine::Store)?;
        layer.k.record(rec, &a.h, &a.k, Act::None, Combine::Store)?;
        layer.v.record(rec, &a.h, &a.v, Act::None, Combine::Store)?;
        attention(rec, &a.q, &a.k, &a.v, &a.attn, &attn_opts)?;
        layer
            .o
            .record(rec, &a.attn, &a.x, Act::None, Combine::Add)?;
        layer_norm(rec, &a.x, &ln2.weight, &ln2.bias, &a.h, self.eps, all)?;
        layer
            .fc1
            .record(rec, &a.h, &a.mlp, Act::GeluTanh, Combine::Store)?;
        layer.fc2.record(rec, &a.mlp, &a.x, Act::None, Combine::Add)
    }

    /// The post-LayerNorm of `a.x`, then the projector into `features`.
    fn record_projector(
        &self,
        rec: &mut Recorder,
        a: &VisionActivations,
        features: &Tensor,
    ) -> Result<()> {
        let post = &self.post;
        let all = NormOpts::default();
        layer_norm(rec, &a.x, &post.weight, &post.bias, &a.h, self.eps, all)?;
        self.proj
            .record(rec, &a.h, features, Act::None, Combine::Store)
    }

    /// Check that `pixels` have the tower's resolution.
    pub(crate) fn check_pixels(&self, pixels: &PixelValues) -> Result<()> {
        let s = self.cfg.image_size;
        if pixels.height != s || pixels.width != s || pixels.data.len() != 3 * s * s {
            return Err(Error::Request(format!(
                "pixel values are {}×{}, the model expects {s}×{s}",
                pixels.height, pixels.width
            )));
        }
        Ok(())
    }

    /// Upload `pixels` into `a.pixels`, checking the resolution.
    pub fn upload(&self, gpu: &Gpu, a: &VisionActivations, pixels: &PixelValues) -> Result<()> {
        self.check_pixels(pixels)?;
        gpu.queue
            .write_buffer(a.pixels.buffer(), 0, bytemuck::cast_slice(&pixels.data));
        Ok(())
    }

    /// Run the whole tower on `pixels` into `features` (see [`VisionTower::features`]), at
    /// most `layers_per_submission` encoder layers per queue submission, each waited for
    /// before the next is submitted (so that other work on the queue, such as an app's
    /// rendering, runs in between). Counts one [`VisionTower::runs`].
    pub fn encode_into(
        &self,
        gpu: &Gpu,
        a: &VisionActivations,
        pixels: &PixelValues,
        features: &Tensor,
        layers_per_submission: usize,
    ) -> Result<()> {
        self.upload(gpu, a, pixels)?;
        let step = layers_per_submission.max(1);
        let mut start = 0;
        loop {
            let end = (start + step).min(self.layers.len());
            let mut rec = Recorder::new(gpu);
            self.record_part(&mut rec, a, start..end, features)?;
            rec.run()?;
            if end == self.layers.len() {
                break;
            }
            start = end;
        }
        self.runs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// How many times the whole tower has run through [`VisionTower::encode_into`] (tests
    /// count it to show that image features are reused).
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Run the whole tower on one image, one layer per submission, and read back the
    /// projector output `[num_patches, projection_dim]` (row-major).
    pub fn encode(&self, gpu: &Gpu, pixels: &PixelValues) -> Result<Vec<f32>> {
        let a = self.activations(gpu)?;
        let features = self.features(gpu)?;
        self.encode_into(gpu, &a, pixels, &features, 1)?;
        features.read(gpu)
    }
}
