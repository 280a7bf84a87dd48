//! Logit soft-capping (`shaders/softcap.wgsl`): `x = cap · tanh(x / cap)` in place, as
//! Gemma 2 applies to its final logits.

use super::{check, u32_arg};
use crate::gpu::{DType, KernelKey, Recorder, Tensor};
use crate::Result;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    off: u32,
    cap: f32,
    pad: u32,
}

/// Record `x = cap · tanh(x / cap)` on rows `row..row + rows` of the f32 tensor `x`.
pub fn softcap(rec: &mut Recorder, x: &Tensor, row: usize, rows: usize, cap: f32) -> Result<()> {
    const K: &str = "softcap";
    check(x.dtype() == DType::F32, K, || {
        format!("{} must be f32", x.name())
    })?;
    check(cap > 0.0 && cap.is_finite(), K, || {
        format!("cap {cap} must be positive")
    })?;
    check(rows > 0 && row + rows <= x.rows(), K, || {
        format!("rows {row}..{} outside {}", row + rows, x.name())
    })?;
    let n = rows * x.cols();
    let params = Params {
        n: u32_arg(K, "elements", n)?,
        off: u32_arg(K, "offset", row * x.cols())?,
        cap,
        pad: 0,
    };
    let workgroups = rec.grid(u32_arg(K, "workgroups", n.div_ceil(256))?);
    rec.dispatch(
        &KernelKey::new("softcap", "softcap"),
        &params,
        &[x.buffer()],
        workgroups,
    )?;
    Ok(())
}

/// CPU reference of [`softcap`].
pub fn softcap_ref(x: &mut [f32], cap: f32) {
    for v in x {
        *v = cap * (*v / cap).tanh();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, gpu_with_limit, rand_vec};

    #[test]
    fn matches_reference_on_selected_rows() {
        let gpu = gpu_with_limit(None);
        let data = rand_vec(3 * 1000, 200.0, 9);
        let t = Tensor::from_f32(&gpu, "logits", &[3, 1000], &data).unwrap();
        let mut rec = Recorder::new(&gpu);
        softcap(&mut rec, &t, 1, 2, 30.0).unwrap();
        rec.run().unwrap();
        let mut want = data.clone();
        softcap_ref(&mut want[1000..], 30.0);
        assert_close(&t.read(&gpu).unwrap(), &want, 1e-5, "softcap");
        assert!(softcap(&mut Recorder::new(&gpu), &t, 2, 2, 30.0).is_err());
        assert!(softcap(&mut Recorder::new(&gpu), &t, 0, 1, 0.0).is_err());
    }
}
