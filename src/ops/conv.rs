//! Convolutions on channels-last (NHWC) f32 activations (`shaders/conv.wgsl`): [`conv2d`]
//! runs a stride-1 `Conv2d` or a `ConvTranspose2d` with bias, optional ReLU and optional
//! residual accumulation; [`gather`] looks rows of an f32 table up by id (a VQ codebook). They
//! run the VQ-VAE mask decoder of [`crate::tasks`].
//!
//! Weights are f32 `[out, K, K, in]` (taps-major, input channels contiguous), i.e. a PyTorch
//! `Conv2d` weight `[out, in, K, K]` or `ConvTranspose2d` weight `[in, out, K, K]` rearranged
//! on the host by [`taps_last`].

use super::{check, u32_arg};
use crate::gpu::{DType, KernelKey, Recorder, Tensor};
use crate::Result;

/// Hyper-parameters of a [`conv2d`] launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    /// Side of the square kernel.
    pub kernel: usize,
    /// Zero padding (PyTorch's `padding`).
    pub pad: usize,
    /// `Some(stride)` for a transposed convolution (`ConvTranspose2d`), `None` for a
    /// stride-1 `Conv2d`.
    pub transposed_stride: Option<usize>,
    /// Apply ReLU after the bias.
    pub relu: bool,
    /// Add the result to what `out` holds (a residual connection) instead of storing it.
    pub accumulate: bool,
}

impl ConvSpec {
    /// A stride-1 `Conv2d` with "same" padding `(kernel - 1) / 2`.
    pub fn same(kernel: usize) -> Self {
        ConvSpec {
            kernel,
            pad: kernel.saturating_sub(1) / 2,
            transposed_stride: None,
            relu: false,
            accumulate: false,
        }
    }

    /// A `ConvTranspose2d` with the given kernel, stride and padding.
    pub fn transposed(kernel: usize, stride: usize, pad: usize) -> Self {
        ConvSpec {
            kernel,
            pad,
            transposed_stride: Some(stride),
            relu: false,
            accumulate: false,
        }
    }

    /// The same convolution followed by ReLU.
    pub fn relu(self) -> Self {
        ConvSpec { relu: true, ..self }
    }

    /// The same convolution adding onto the output.
    pub fn accumulate(self) -> Self {
        ConvSpec {
            accumulate: true,
            ..self
        }
    }

    /// The output size along an axis of input size `n`, or `None` when it would be empty.
    pub fn out_size(&self, n: usize) -> Option<usize> {
        let size = match self.transposed_stride {
            None => (n + 2 * self.pad).checked_sub(self.kernel).map(|v| v + 1),
            Some(s) => (n.checked_sub(1)? * s + self.kernel).checked_sub(2 * self.pad),
        };
        size.filter(|&v| v > 0)
    }

    /// The input pixel feeding output pixel `o` through kernel tap `k`, if any.
    fn source(&self, o: usize, k: usize, size: usize) -> Option<usize> {
        let i = match self.transposed_stride {
            None => (o + k).checked_sub(self.pad)?,
            Some(s) => {
                let n = (o + self.pad).checked_sub(k)?;
                if n % s != 0 {
                    return None;
                }
                n / s
            }
        };
        (i < size).then_some(i)
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    total: u32,
    in_h: u32,
    in_w: u32,
    in_c: u32,
    out_h: u32,
    out_w: u32,
    out_c: u32,
    pad: u32,
}

/// Threads per workgroup in `conv.wgsl`.
const WG: usize = 64;

fn dims4(t: &Tensor) -> Option<[usize; 4]> {
    t.shape().try_into().ok()
}

/// Record `out = combine(out, act(conv(x, w) + bias))`: `x` f32 `[B, H, W, Cin]`, `w` f32
/// `[Cout, K, K, Cin]`, `bias` f32 `[Cout]`, `out` f32 `[B, OH, OW, Cout]` with `OH`, `OW`
/// given by [`ConvSpec::out_size`]. `x` and `out` must be different buffers.
pub fn conv2d(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    out: &Tensor,
    spec: ConvSpec,
) -> Result<()> {
    const KN: &str = "conv2d";
    let all_f32 = [x, w, bias, out].iter().all(|t| t.dtype() == DType::F32);
    check(all_f32, KN, || {
        format!(
            "{}, {}, {} and {} must be f32",
            x.name(),
            w.name(),
            bias.name(),
            out.name()
        )
    })?;
    let ([b, h, wd, cin], [cout, kh, kw, wcin], [ob, oh, ow, oc]) =
        match (dims4(x), dims4(w), dims4(out)) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => {
                return Err(crate::Error::kernel(
                    KN,
                    format!(
                        "{} {:?}, {} {:?} and {} {:?} must be 4-D",
                        x.name(),
                        x.shape(),
                        w.name(),
                        w.shape(),
                        out.name(),
                        out.shape()
                    ),
                ))
            }
        };
    let k = spec.kernel;
    check(k > 0 && kh == k && kw == k, KN, || {
        format!("{} {:?} is not a {k}x{k} kernel", w.name(), w.shape())
    })?;
    check(spec.transposed_stride != Some(0), KN, || "stride 0".into())?;
    check(wcin == cin, KN, || {
        format!(
            "{} has {cin} channels, weight {} expects {wcin}",
            x.name(),
            w.name()
        )
    })?;
    check(bias.numel() == cout, KN, || {
        format!("bias {} must have {cout} values", bias.name())
    })?;
    let (Some(want_h), Some(want_w)) = (spec.out_size(h), spec.out_size(wd)) else {
        return Err(crate::Error::kernel(
            KN,
            format!(
                "{} {:?} gives an empty output with {spec:?}",
                x.name(),
                x.shape()
            ),
        ));
    };
    check([ob, oh, ow, oc] == [b, want_h, want_w, cout], KN, || {
        format!(
            "{} is {:?}, expected [{b}, {want_h}, {want_w}, {cout}]",
            out.name(),
            out.shape()
        )
    })?;
    check(x.buffer() != out.buffer(), KN, || {
        format!("{} cannot be both input and output", x.name())
    })?;
    let total = out.numel();
    let params = Params {
        total: u32_arg(KN, "outputs", total)?,
        in_h: u32_arg(KN, "input height", h)?,
        in_w: u32_arg(KN, "input width", wd)?,
        in_c: u32_arg(KN, "input channels", cin)?,
        out_h: u32_arg(KN, "output height", oh)?,
        out_w: u32_arg(KN, "output width", ow)?,
        out_c: u32_arg(KN, "output channels", cout)?,
        pad: 0,
    };
    let key = KernelKey::new("conv", "conv2d")
        .with("K", u32_arg(KN, "kernel", k)?)
        .with(
            "STRIDE",
            u32_arg(KN, "stride", spec.transposed_stride.unwrap_or(1))?,
        )
        .with("PAD", u32_arg(KN, "padding", spec.pad)?)
        .with("TRANSPOSED", spec.transposed_stride.is_some() as u32)
        .with("RELU", spec.relu as u32)
        .with("ACCUM", spec.accumulate as u32);
    let workgroups = rec.grid(u32_arg(KN, "workgroups", total.div_ceil(WG))?);
    let buffers = [x.buffer(), w.buffer(), bias.buffer(), out.buffer()];
    rec.dispatch(&key, &params, &buffers, workgroups)?;
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GatherParams {
    rows: u32,
    dim: u32,
    table_rows: u32,
    pad: u32,
}

/// Record `out[r, :] = table[ids[r], :]`: `ids` u32 `[n]`, `table` f32 `[rows, dim]`, `out`
/// f32 with `n * dim` values. Ids outside the table give zero rows; callers reject them first.
pub fn gather(rec: &mut Recorder, ids: &Tensor, table: &Tensor, out: &Tensor) -> Result<()> {
    const KN: &str = "gather";
    check(ids.dtype() == DType::U32, KN, || {
        format!("ids {} must be u32", ids.name())
    })?;
    check(
        table.dtype() == DType::F32 && out.dtype() == DType::F32,
        KN,
        || format!("{} and {} must be f32", table.name(), out.name()),
    )?;
    let (n, dim) = (ids.numel(), table.cols());
    check(out.numel() == n * dim, KN, || {
        format!(
            "{} {:?} cannot hold {n} rows of {dim}",
            out.name(),
            out.shape()
        )
    })?;
    let params = GatherParams {
        rows: u32_arg(KN, "rows", n)?,
        dim: u32_arg(KN, "dim", dim)?,
        table_rows: u32_arg(KN, "table rows", table.rows())?,
        pad: 0,
    };
    let key = KernelKey::new("conv", "gather");
    let workgroups = rec.grid(u32_arg(KN, "workgroups", (n * dim).div_ceil(WG))?);
    let buffers = [ids.buffer(), table.buffer(), out.buffer()];
    rec.dispatch(&key, &params, &buffers, workgroups)?;
    Ok(())
}

/// Rearrange a PyTorch convolution weight to the `[out, K, K, in]` layout of [`conv2d`]:
/// `w` is `[out, in, K, K]` (`Conv2d`) or, with `transposed`, `[in, out, K, K]`
/// (`ConvTranspose2d`); `dims` are its four dimensions as stored.
pub fn taps_last(w: &[f32], dims: [usize; 4], transposed: bool) -> Vec<f32> {
    let [d0, d1, kh, kw] = dims;
    let (cout, cin) = if transposed { (d1, d0) } else { (d0, d1) };
    let mut out = vec![0.0; w.len()];
    for o in 0..cout {
        for i in 0..cin {
            let src = if transposed { i * d1 + o } else { o * d1 + i };
            for y in 0..kh {
                for x in 0..kw {
                    out[((o * kh + y) * kw + x) * cin + i] = w[(src * kh + y) * kw + x];
                }
            }
        }
    }
    out
}

/// CPU reference of [`conv2d`] on row-major slices: `x` is `[B, H, W, Cin]` with
/// `x_dims = [B, H, W, Cin]`, `w` `[Cout, K, K, Cin]`, `bias` `[Cout]`; `out` is
/// `[B, OH, OW, Cout]` and is combined with the result as the spec says.
pub fn conv2d_ref(
    x: &[f32],
    x_dims: [usize; 4],
    w: &[f32],
    bias: &[f32],
    spec: ConvSpec,
    out: &mut [f32],
) {
    let [b, h, wd, cin] = x_dims;
    let cout = bias.len();
    let k = spec.kernel;
    let (oh, ow) = (
        spec.out_size(h).unwrap_or(0),
        spec.out_size(wd).unwrap_or(0),
    );
    for n in 0..b {
        for oy in 0..oh {
            for ox in 0..ow {
                for (co, &b0) in bias.iter().enumerate() {
                    let mut acc = b0;
                    for ky in 0..k {
                        let Some(iy) = spec.source(oy, ky, h) else {
                            continue;
                        };
                        for kx in 0..k {
                            let Some(ix) = spec.source(ox, kx, wd) else {
                                continue;
                            };
                            let xb = ((n * h + iy) * wd + ix) * cin;
                            let wb = ((co * k + ky) * k + kx) * cin;
                            for ci in 0..cin {
                                acc = x[xb + ci].mul_add(w[wb + ci], acc);
                            }
                        }
                    }
                    if spec.relu {
                        acc = acc.max(0.0);
                    }
                    let i = ((n * oh + oy) * ow + ox) * cout + co;
                    out[i] = if spec.accumulate { out[i] + acc } else { acc };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, gpu_with_limit, rand_vec};

    fn run_case(x_dims: [usize; 4], cout: usize, spec: ConvSpec) {
        let gpu = gpu_with_limit(None);
        let [b, h, w, cin] = x_dims;
        let (oh, ow) = (spec.out_size(h).unwrap(), spec.out_size(w).unwrap());
        let k = spec.kernel;
        let x = rand_vec(b * h * w * cin, 1.0, 11);
        let wt = rand_vec(cout * k * k * cin, 0.5, 12);
        let bias = rand_vec(cout, 0.3, 13);
        let init = rand_vec(b * oh * ow * cout, 1.0, 14);
        let xt = Tensor::from_f32(&gpu, "x", &x_dims, &x).unwrap();
        let wtt = Tensor::from_f32(&gpu, "w", &[cout, k, k, cin], &wt).unwrap();
        let bt = Tensor::from_f32(&gpu, "b", &[cout], &bias).unwrap();
        let ot = Tensor::from_f32(&gpu, "out", &[b, oh, ow, cout], &init).unwrap();
        let mut rec = Recorder::new(&gpu);
        conv2d(&mut rec, &xt, &wtt, &bt, &ot, spec).unwrap();
        rec.run().unwrap();
        let got = ot.read(&gpu).unwrap();
        let mut want = init;
        conv2d_ref(&x, x_dims, &wt, &bias, spec, &mut want);
        assert_close(
            &got,
            &want,
            1e-5,
            &format!("conv {x_dims:?} -> {cout} {spec:?}"),
        );
    }

    #[test]
    fn conv_matches_reference() {
        run_case([2, 5, 6, 7], 9, ConvSpec::same(3).relu());
        run_case([1, 4, 4, 33], 8, ConvSpec::same(1));
        run_case([3, 4, 3, 5], 6, ConvSpec::same(1).accumulate());
        run_case([1, 7, 5, 3], 2, ConvSpec::same(3).relu().accumulate());
    }

    #[test]
    fn transposed_matches_reference() {
        run_case([2, 3, 4, 5], 6, ConvSpec::transposed(4, 2, 1).relu());
        run_case([1, 4, 4, 16], 1, ConvSpec::transposed(4, 2, 1));
        run_case([1, 3, 5, 4], 3, ConvSpec::transposed(3, 2, 1));
        run_case([2, 2, 3, 3], 4, ConvSpec::transposed(3, 3, 0).accumulate());
    }

    /// The reference's transposed convolution is PyTorch's: every input pixel scatters its
    /// kernel onto the output at `i * stride - pad + k`.
    #[test]
    fn transposed_reference_is_a_scatter() {
        let (h, w, cin, cout) = (3, 2, 2, 3);
        let spec = ConvSpec::transposed(4, 2, 1);
        let x = rand_vec(h * w * cin, 1.0, 21);
        let torch_w = rand_vec(cin * cout * 16, 1.0, 22); // [in, out, 4, 4]
        let bias = rand_vec(cout, 1.0, 23);
        let (oh, ow) = (spec.out_size(h).unwrap(), spec.out_size(w).unwrap());
        assert_eq!((oh, ow), (6, 4));
        let mut want = vec![0.0f32; oh * ow * cout];
        for (i, v) in want.iter_mut().enumerate() {
            *v = bias[i % cout];
        }
        for iy in 0..h {
            for ix in 0..w {
                for ci in 0..cin {
                    for co in 0..cout {
                        for ky in 0..4 {
                            for kx in 0..4 {
                                let (oy, ox) = ((iy * 2 + ky) as i64 - 1, (ix * 2 + kx) as i64 - 1);
                                if oy < 0 || ox < 0 || oy >= oh as i64 || ox >= ow as i64 {
                                    continue;
                                }
                                want[((oy as usize) * ow + ox as usize) * cout + co] += x
                                    [(iy * w + ix) * cin + ci]
                                    * torch_w[((ci * cout + co) * 4 + ky) * 4 + kx];
                            }
                        }
                    }
                }
            }
        }
        let mut got = vec![0.0; want.len()];
        let wt = taps_last(&torch_w, [cin, cout, 4, 4], true);
        conv2d_ref(&x, [1, h, w, cin], &wt, &bias, spec, &mut got);
        assert_close(&got, &want, 1e-5, "transposed reference");
    }

    #[test]
    fn gather_matches_reference() {
        let gpu = gpu_with_limit(None);
        let table = rand_vec(10 * 12, 1.0, 31);
        let ids = [3u32, 0, 9, 3, 42];
        let it = Tensor::from_u32(&gpu, "ids", &[5], &ids).unwrap();
        let tt = Tensor::from_f32(&gpu, "table", &[10, 12], &table).unwrap();
        let ot = Tensor::from_f32(&gpu, "out", &[5, 12], &[7.0; 60]).unwrap();
        let mut rec = Recorder::new(&gpu);
        gather(&mut rec, &it, &tt, &ot).unwrap();
        rec.run().unwrap();
        let got = ot.read(&gpu).unwrap();
        let mut want = Vec::new();
        for &id in &ids {
            match table.get(id as usize * 12..id as usize * 12 + 12) {
                Some(row) => want.extend_from_slice(row),
                None => want.extend_from_slice(&[0.0; 12]),
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let gpu = gpu_with_limit(None);
        let x = Tensor::zeros(&gpu, "x", &[1, 4, 4, 8]).unwrap();
        let w = Tensor::zeros(&gpu, "w", &[2, 3, 3, 6]).unwrap();
        let b = Tensor::zeros(&gpu, "b", &[2]).unwrap();
        let o = Tensor::zeros(&gpu, "o", &[1, 4, 4, 2]).unwrap();
        let mut rec = Recorder::new(&gpu);
        let err = conv2d(&mut rec, &x, &w, &b, &o, ConvSpec::same(3)).unwrap_err();
        assert!(err.to_string().contains("expects 6"), "{err}");
        let w = Tensor::zeros(&gpu, "w", &[2, 3, 3, 8]).unwrap();
        let o = Tensor::zeros(&gpu, "o", &[1, 8, 8, 2]).unwrap();
        let err = conv2d(&mut rec, &x, &w, &b, &o, ConvSpec::same(3)).unwrap_err();
        assert!(err.to_string().contains("expected [1, 4, 4, 2]"), "{err}");
    }
}
