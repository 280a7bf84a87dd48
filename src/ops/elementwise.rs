//! Element-wise kernels (`shaders/elementwise.wgsl`) on f32 activations:
//! `dst[i] = combine(dst[i], src[i])` over a contiguous range, used as [`add`] (residual
//! connections, `acc += x`) and [`copy_rows`] (moving rows between buffers).

use super::{check, u32_arg, Combine};
use crate::gpu::{DType, KernelKey, Recorder, Tensor};
use crate::Result;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    src_off: u32,
    dst_off: u32,
    pad: u32,
}

/// Threads per workgroup in `elementwise.wgsl`.
const WG: usize = 256;

/// Record `dst[dst_off + i] = combine(dst[dst_off + i], src[src_off + i])` for `i` in `0..n`.
#[allow(clippy::too_many_arguments)]
fn launch(
    rec: &mut Recorder,
    kernel: &str,
    src: &Tensor,
    src_off: usize,
    dst: &Tensor,
    dst_off: usize,
    n: usize,
    combine: Combine,
) -> Result<()> {
    check(
        src.dtype() == DType::F32 && dst.dtype() == DType::F32,
        kernel,
        || format!("{} and {} must be f32", src.name(), dst.name()),
    )?;
    check(src.buffer() != dst.buffer(), kernel, || {
        format!("{} cannot be both source and destination", src.name())
    })?;
    let params = Params {
        n: u32_arg(kernel, "elements", n)?,
        src_off: u32_arg(kernel, "source offset", src_off)?,
        dst_off: u32_arg(kernel, "destination offset", dst_off)?,
        pad: 0,
    };
    let key = KernelKey::new("elementwise", "combine").with("MODE", combine.code());
    let workgroups = rec.grid(u32_arg(kernel, "workgroups", n.div_ceil(WG))?);
    rec.dispatch(&key, &params, &[src.buffer(), dst.buffer()], workgroups)?;
    Ok(())
}

/// Record `acc[r] += x[r]` for rows `row..row + rows` of two f32 tensors of the same shape
/// (a residual connection on part of a batch), in different buffers.
pub fn add_rows(
    rec: &mut Recorder,
    acc: &Tensor,
    x: &Tensor,
    row: usize,
    rows: usize,
) -> Result<()> {
    const K: &str = "add_rows";
    check(
        acc.shape() == x.shape() && row + rows <= acc.rows() && rows > 0,
        K,
        || {
            format!(
                "rows {row}..{} of {} {:?} and {} {:?}",
                row + rows,
                acc.name(),
                acc.shape(),
                x.name(),
                x.shape()
            )
        },
    )?;
    let cols = acc.cols();
    launch(
        rec,
        K,
        x,
        row * cols,
        acc,
        row * cols,
        rows * cols,
        Combine::Add,
    )
}

/// Record `acc += x` element-wise (a residual connection). Both are f32 tensors with the same
/// number of elements, in different buffers.
pub fn add(rec: &mut Recorder, acc: &Tensor, x: &Tensor) -> Result<()> {
    const K: &str = "add";
    check(acc.numel() == x.numel(), K, || {
        format!(
            "{} {:?} and {} {:?} differ in size",
            acc.name(),
            acc.shape(),
            x.name(),
            x.shape()
        )
    })?;
    launch(rec, K, x, 0, acc, 0, acc.numel(), Combine::Add)
}

/// Record a copy of rows `src_row..src_row + rows` of `src` to rows
/// `dst_row..dst_row + rows` of `dst`. Both are f32 tensors with the same number of columns,
/// in different buffers.
pub fn copy_rows(
    rec: &mut Recorder,
    src: &Tensor,
    src_row: usize,
    dst: &Tensor,
    dst_row: usize,
    rows: usize,
) -> Result<()> {
    const K: &str = "copy_rows";
    let cols = src.cols();
    check(dst.cols() == cols, K, || {
        format!(
            "{} has {} columns, {} has {cols}",
            dst.name(),
            dst.cols(),
            src.name()
        )
    })?;
    check(rows > 0 && src_row + rows <= src.rows(), K, || {
        format!("rows {src_row}..{} outside {}", src_row + rows, src.name())
    })?;
    check(dst_row + rows <= dst.rows(), K, || {
        format!("rows {dst_row}..{} outside {}", dst_row + rows, dst.name())
    })?;
    launch(
        rec,
        K,
        src,
        src_row * cols,
        dst,
        dst_row * cols,
        rows * cols,
        Combine::Store,
    )
}

/// CPU reference of [`add`].
pub fn add_ref(acc: &mut [f32], x: &[f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

/// CPU reference of [`copy_rows`] on row-major slices of `cols` columns.
pub fn copy_rows_ref(
    src: &[f32],
    src_row: usize,
    dst: &mut [f32],
    dst_row: usize,
    rows: usize,
    cols: usize,
) {
    dst[dst_row * cols..(dst_row + rows) * cols]
        .copy_from_slice(&src[src_row * cols..(src_row + rows) * cols]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, gpu_with_limit, rand_vec};

    #[test]
    fn add_matches_reference() {
        let gpu = gpu_with_limit(None);
        for shape in [&[1usize, 37][..], &[5, 72], &[300, 1152], &[3, 7, 2050]] {
            let n: usize = shape.iter().product();
            let a = rand_vec(n, 1.0, 41);
            let x = rand_vec(n, 1.0, 42);
            let at = Tensor::from_f32(&gpu, "acc", shape, &a).unwrap();
            // Same element count, different shape: add is element-wise on the flat storage.
            let xt = Tensor::from_f32(&gpu, "x", &[n], &x).unwrap();
            let mut rec = Recorder::new(&gpu);
            add(&mut rec, &at, &xt).unwrap();
            rec.run().unwrap();
            let mut want = a.clone();
            add_ref(&mut want, &x);
            assert_close(
                &at.read(&gpu).unwrap(),
                &want,
                0.0,
                &format!("add {shape:?}"),
            );
        }
    }

    #[test]
    fn add_rows_touches_only_its_rows() {
        let gpu = gpu_with_limit(None);
        let (rows, cols, row, n) = (9, 37, 8, 1);
        let a = rand_vec(rows * cols, 1.0, 43);
        let x = rand_vec(rows * cols, 1.0, 44);
        let at = Tensor::from_f32(&gpu, "acc", &[rows, cols], &a).unwrap();
        let xt = Tensor::from_f32(&gpu, "x", &[rows, cols], &x).unwrap();
        let mut rec = Recorder::new(&gpu);
        add_rows(&mut rec, &at, &xt, row, n).unwrap();
        rec.run().unwrap();
        let mut want = a.clone();
        add_ref(&mut want[row * cols..], &x[row * cols..]);
        assert_close(&at.read(&gpu).unwrap(), &want, 0.0, "add_rows");
        let mut rec = Recorder::new(&gpu);
        let err = add_rows(&mut rec, &at, &xt, 8, 2).unwrap_err().to_string();
        assert!(err.contains("rows 8..10"), "{err}");
    }

    #[test]
    fn copy_rows_matches_reference_with_offsets() {
        let gpu = gpu_with_limit(None);
        for (cols, srows, drows, src_row, dst_row, rows) in [
            (37, 10, 12, 3, 5, 6),
            (1152, 300, 301, 0, 1, 300),
            (2050, 4, 9, 3, 8, 1),
        ] {
            let s = rand_vec(srows * cols, 1.0, 51);
            let d = rand_vec(drows * cols, 1.0, 52);
            let st = Tensor::from_f32(&gpu, "src", &[srows, cols], &s).unwrap();
            let dt = Tensor::from_f32(&gpu, "dst", &[drows, cols], &d).unwrap();
            let mut rec = Recorder::new(&gpu);
            copy_rows(&mut rec, &st, src_row, &dt, dst_row, rows).unwrap();
            rec.run().unwrap();
            let mut want = d.clone();
            copy_rows_ref(&s, src_row, &mut want, dst_row, rows, cols);
            let what = format!("copy_rows cols={cols} {src_row}->{dst_row} x{rows}");
            assert_close(&dt.read(&gpu).unwrap(), &want, 0.0, &what);
            assert_eq!(st.read(&gpu).unwrap(), s, "source unchanged");
        }
    }

    #[test]
    fn rejects_bad_arguments() {
        let gpu = gpu_with_limit(None);
        let a = Tensor::zeros(&gpu, "a", &[4, 8]).unwrap();
        let b = Tensor::zeros(&gpu, "b", &[4, 7]).unwrap();
        let c = Tensor::zeros(&gpu, "c", &[2, 8]).unwrap();
        let ids = Tensor::from_u32(&gpu, "ids", &[4, 8], &[0; 32]).unwrap();
        let mut rec = Recorder::new(&gpu);
        let err = |r: Result<()>| r.unwrap_err().to_string();
        assert!(err(add(&mut rec, &a, &b)).contains("differ in size"));
        assert!(err(add(&mut rec, &a, &a)).contains("both source and destination"));
        assert!(err(add(&mut rec, &a, &ids)).contains("f32"));
        assert!(err(copy_rows(&mut rec, &a, 0, &b, 0, 1)).contains("columns"));
        assert!(err(copy_rows(&mut rec, &a, 2, &c, 0, 3)).contains("outside a"));
        assert!(err(copy_rows(&mut rec, &a, 0, &c, 1, 2)).contains("outside c"));
        assert!(err(copy_rows(&mut rec, &a, 0, &c, 0, 0)).contains("outside"));
        assert!(rec.is_empty());
    }
}
