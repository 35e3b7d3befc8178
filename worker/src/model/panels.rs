//! The text tower's fp32 products on AVX-512 CPUs.
//!
//! A text query is a few token rows, so each linear layer multiplies a matrix of about ten rows by
//! a weight matrix of up to 2048 x 512: the weights are read once per product and every weight
//! is used ten times, and the product is bound by streaming the weights from memory. MKL's sgemm
//! in the PyTorch wheels reaches less than half the machine's bandwidth at this shape (the 48
//! products of a ViT-B/32 query take 18 ms on the 2-core CI host, BENCHMARKS.md).
//!
//! Here the weights are packed once at load into panels of 32 output columns, each panel `[in,
//! 32]` and contiguous, so a product streams the panels front to back, and a register block of up
//! to [`ROWS`] activation rows x 32 columns takes one fused multiply-add per row and 16 columns
//! for every weight vector loaded. The panels are split among libtorch's intra-op thread count:
//! they run on libtorch's own OpenMP threads (see [`OpenMp`]).
//!
//! Every output is one chain of fused multiply-adds over the input dimension in order, then the
//! bias; the results differ from MKL's in rounding only (the text parity tests hold them to
//! transformers' at a cosine of 0.99999).

use std::ffi::{CStr, c_int, c_uint, c_void};
use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, OnceLock};

use tch::{Device, Kind, Tensor};

/// Output columns per panel: two AVX-512 registers of fp32.
pub const PANEL: usize = 32;
/// Activation rows per register block: 2 x 12 accumulators and 2 weight registers of the 32.
const ROWS: usize = 12;

/// Whether this CPU runs the kernel (x86-64 with AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// libtorch's OpenMP runtime (the wheel's `libgomp`), found in the process at run time.
///
/// The products are split over the same OpenMP team that libtorch's own operators use, through
/// `GOMP_parallel`, the entry point a compiler emits for `#pragma omp parallel` (and that Intel's
/// OpenMP runtime exports too). A second pool of threads would compete for the cores with the
/// OpenMP threads, which keep spinning for a while after each of libtorch's parallel operators:
/// with a rayon pool the batched forwards ran at about half speed on two cores.
struct OpenMp {
    parallel: unsafe extern "C" fn(unsafe extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint),
    thread_num: unsafe extern "C" fn() -> c_int,
    num_threads: unsafe extern "C" fn() -> c_int,
}

fn openmp() -> Option<&'static OpenMp> {
    static OMP: OnceLock<Option<OpenMp>> = OnceLock::new();
    OMP.get_or_init(|| {
        let find = |name: &CStr| {
            // SAFETY: dlsym with a NUL-terminated name; a null result is handled.
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            (!p.is_null()).then_some(p)
        };
        let (parallel, thread_num, num_threads) = (
            find(c"GOMP_parallel")?,
            find(c"omp_get_thread_num")?,
            find(c"omp_get_num_threads")?,
        );
        // SAFETY: these symbols have had these C signatures since GCC 4.9's libgomp (OpenMP 4.0).
        unsafe {
            Some(OpenMp {
                parallel: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(
                        unsafe extern "C" fn(*mut c_void),
                        *mut c_void,
                        c_uint,
                        c_uint,
                    ),
                >(parallel),
                thread_num: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(
                    thread_num,
                ),
                num_threads: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(
                    num_threads,
                ),
            })
        }
    })
    .as_ref()
}

/// Runs `run(share)` for `0..shares` on libtorch's OpenMP team, or in turn on this thread when
/// the runtime is not found. A panic in a share is raised again here once the team is done.
fn parallel(shares: usize, run: &(dyn Fn(usize, usize) + Sync)) {
    struct Job<'a> {
        omp: &'static OpenMp,
        run: &'a (dyn Fn(usize, usize) + Sync),
        panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    }
    unsafe extern "C" fn member(data: *mut c_void) {
        // SAFETY: `data` is the `Job` below, alive until `GOMP_parallel` returns.
        let job = unsafe { &*(data as *const Job) };
        // SAFETY: called inside the parallel region, as OpenMP requires.
        let (i, n) = unsafe { ((job.omp.thread_num)(), (job.omp.num_threads)()) };
        let (i, n) = (i.max(0) as usize, n.max(1) as usize);
        if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(|| (job.run)(i, n))) {
            *job.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        }
    }
    match openmp() {
        Some(omp) if shares > 1 => {
            let job = Job {
                omp,
                run,
                panic: Mutex::new(None),
            };
            // SAFETY: `member` matches the outlined-function signature and reads only `job`.
            unsafe {
                (omp.parallel)(
                    member,
                    &job as *const Job as *mut c_void,
                    shares as c_uint,
                    0,
                )
            };
            if let Some(p) = job.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
                std::panic::resume_unwind(p);
            }
        }
        _ => run(0, 1),
    }
}

/// `y = x W^T + b` with `W` packed into panels. Build it only where [`available`] is true.
pub struct PanelLinear {
    /// `[panels, in, 32]`, fp32, contiguous; output columns past `out` are zero.
    panels: Tensor,
    /// `[panels * 32]`, zero past `out`.
    bias: Vec<f32>,
    inp: usize,
    out: usize,
}

impl PanelLinear {
    /// Packs dense `[out, in]` weights (any float dtype on the CPU; converted to fp32).
    ///
    /// # Panics
    /// Where [`available`] is false: callers choose this layer through [`super::Gemm::for_text`].
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Self {
        assert!(available(), "the panel kernel needs AVX-512F");
        let [out, inp] = weight.size()[..] else {
            panic!(
                "a linear layer's weight is [out, in], not {:?}",
                weight.size()
            );
        };
        let blocks = (out as usize).div_ceil(PANEL) as i64;
        let pad = blocks * PANEL as i64 - out;
        let panels = weight
            .to_kind(Kind::Float)
            .constant_pad_nd([0, 0, 0, pad])
            .view([blocks, PANEL as i64, inp])
            .transpose(1, 2)
            .contiguous();
        let mut padded = vec![0f32; (blocks as usize) * PANEL];
        if let Some(b) = bias {
            let b = Vec::<f32>::try_from(b.to_kind(Kind::Float).flatten(0, -1))
                .expect("a bias converts to fp32");
            padded[..b.len()].copy_from_slice(&b);
        }
        PanelLinear {
            panels,
            bias: padded,
            inp: inp as usize,
            out: out as usize,
        }
    }

    /// `x`: `[rows, in]`, fp32 on the CPU. Returns `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = x.contiguous();
        let rows = x.size()[0] as usize;
        let y = Tensor::empty([rows as i64, self.out as i64], (Kind::Float, Device::Cpu));
        if rows == 0 {
            return y;
        }
        let xs = fp32_slice(&x);
        let panels = fp32_slice(&self.panels);
        let dst = Dst {
            ptr: y.data_ptr() as *mut f32,
            rows,
            cols: self.out,
        };
        let (inp, bias, blocks) = (self.inp, &self.bias[..], self.bias.len() / PANEL);
        // Share `i` of `n` takes the blocks `i * blocks / n..(i + 1) * blocks / n`.
        let run = |i: usize, n: usize| {
            for b in i * blocks / n..(i + 1) * blocks / n {
                // SAFETY: `available()` held when this layer was built (`new` asserts it); the
                // slices hold `rows x in` and `in x 32` floats; block `b`
                // writes only columns `32 b..32 b + 32` of `dst` (masked to `out`), which no other
                // block writes.
                unsafe {
                    panel_product(
                        xs,
                        rows,
                        inp,
                        &panels[b * inp * PANEL..(b + 1) * inp * PANEL],
                        &bias[b * PANEL..(b + 1) * PANEL],
                        &dst,
                        b * PANEL,
                    )
                }
            }
        };
        let threads = usize::try_from(tch::get_num_threads()).unwrap_or(1);
        parallel(threads.clamp(1, blocks), &run);
        y
    }
}

/// A view of a contiguous fp32 CPU tensor's elements.
fn fp32_slice(t: &Tensor) -> &[f32] {
    assert!(
        t.kind() == Kind::Float && t.device() == Device::Cpu && t.is_contiguous(),
        "the text tower's products take contiguous fp32 CPU tensors"
    );
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    // SAFETY: a contiguous fp32 tensor holds `numel` floats at `data_ptr`, alive as long as `t`.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, n) }
}

/// The `[rows, cols]` output, written by column blocks from several threads.
struct Dst {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
}

// SAFETY: the threads write disjoint column blocks (see `PanelLinear::forward`).
unsafe impl Sync for Dst {}

/// One panel times all rows, in register blocks of up to [`ROWS`] rows.
///
/// # Safety
/// The CPU has AVX-512F; `x` holds `rows x inp` floats, `panel` `inp x 32`, `bias` 32; `col` is a
/// multiple of 32 below `dst.cols`, and no other thread writes columns `col..col + 32` of `dst`.
#[cfg(target_arch = "x86_64")]
unsafe fn panel_product(
    x: &[f32],
    rows: usize,
    inp: usize,
    panel: &[f32],
    bias: &[f32],
    dst: &Dst,
    col: usize,
) {
    assert!(x.len() >= rows * inp && panel.len() == inp * PANEL && bias.len() == PANEL);
    assert!(rows <= dst.rows && col < dst.cols);
    let valid = (dst.cols - col).min(PANEL);
    let mut r = 0;
    while r < rows {
        let n = (rows - r).min(ROWS);
        let args = (
            x[r * inp..].as_ptr(),
            inp,
            panel.as_ptr(),
            bias.as_ptr(),
            // SAFETY (of the pointer offset): row `r` < `dst.rows`, column `col` < `dst.cols`.
            unsafe { dst.ptr.add(r * dst.cols + col) },
            dst.cols,
            valid,
        );
        // SAFETY: forwarded from the caller; `n` rows remain from row `r`.
        unsafe {
            match n {
                12 => block::<12>(args),
                11 => block::<11>(args),
                10 => block::<10>(args),
                9 => block::<9>(args),
                8 => block::<8>(args),
                7 => block::<7>(args),
                6 => block::<6>(args),
                5 => block::<5>(args),
                4 => block::<4>(args),
                3 => block::<3>(args),
                2 => block::<2>(args),
                _ => block::<1>(args),
            }
        }
        r += n;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn panel_product(_: &[f32], _: usize, _: usize, _: &[f32], _: &[f32], _: &Dst, _: usize) {
    unreachable!("PanelLinear is only built where AVX-512F is available")
}

/// `(x, inp, panel, bias, out, out_stride, valid_columns)`.
#[cfg(target_arch = "x86_64")]
type BlockArgs = (
    *const f32,
    usize,
    *const f32,
    *const f32,
    *mut f32,
    usize,
    usize,
);

/// `R` rows x 32 columns: `out[r][c] = fma-chain over i of x[r][i] * panel[i][c], + bias[c]`,
/// storing the first `valid` columns.
///
/// # Safety
/// AVX-512F; `x` holds `R` rows of `inp`, `panel` `inp x 32`, `bias` 32, `out` `R` rows of
/// `stride` with `valid` columns writable from it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block<const R: usize>((x, inp, panel, bias, out, stride, valid): BlockArgs) {
    use std::arch::x86_64::*;
    // SAFETY: the pointer arithmetic stays inside the extents the caller guarantees.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for i in 0..inp {
            let w0 = _mm512_loadu_ps(panel.add(i * PANEL));
            let w1 = _mm512_loadu_ps(panel.add(i * PANEL + 16));
            for (r, a) in acc.iter_mut().enumerate() {
                let v = _mm512_set1_ps(*x.add(r * inp + i));
                a[0] = _mm512_fmadd_ps(v, w0, a[0]);
                a[1] = _mm512_fmadd_ps(v, w1, a[1]);
            }
        }
        let b0 = _mm512_loadu_ps(bias);
        let b1 = _mm512_loadu_ps(bias.add(16));
        let m0: __mmask16 = if valid >= 16 {
            0xffff
        } else {
            (1u16 << valid) - 1
        };
        let m1: __mmask16 = if valid >= 32 {
            0xffff
        } else if valid > 16 {
            (1u16 << (valid - 16)) - 1
        } else {
            0
        };
        for (r, a) in acc.iter().enumerate() {
            let o = out.add(r * stride);
            _mm512_mask_storeu_ps(o, m0, _mm512_add_ps(a[0], b0));
            _mm512_mask_storeu_ps(o.add(16), m1, _mm512_add_ps(a[1], b1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Gemm;
    use crate::model::layers::Linear;

    /// `x W^T + b` in f64, element by element.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        x.to_kind(Kind::Double)
            .matmul(&w.to_kind(Kind::Double).tr())
            .g_add(&b.to_kind(Kind::Double))
    }

    /// Every row count up to two register blocks and beyond, output widths that are and are not
    /// multiples of 32, leading dimensions flattened and restored: within fp32 rounding of an f64
    /// product.
    #[test]
    fn matches_an_f64_product_for_all_shapes() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let _g = tch::no_grad_guard();
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        for (inp, out) in [
            (48, 144),
            (64, 32),
            (7, 5),
            (512, 1536),
            (2048, 512),
            (33, 97),
        ] {
            let w = Tensor::randn([out, inp], opts);
            let b = Tensor::randn([out], opts);
            let lin = PanelLinear::new(&w, Some(&b));
            for rows in [1, 2, 11, 12, 13, 25, 40] {
                let x = Tensor::randn([rows, inp], opts);
                let y = lin.forward(&x);
                assert_eq!(y.size(), [rows, out]);
                let want = reference(&x, &w, &b);
                let err = (y.to_kind(Kind::Double) - &want)
                    .abs()
                    .max()
                    .double_value(&[]);
                let scale = want.abs().max().double_value(&[]).max(1.0);
                assert!(
                    err <= 1e-5 * scale * (inp as f64).sqrt(),
                    "in {inp} out {out} rows {rows}: max |error| {err}"
                );
            }
            // Through the layer, which flattens the leading dimensions and restores them.
            let layer = Linear::new(w.copy(), Some(b.copy()), Gemm::Panels);
            let x = Tensor::randn([2, 3, inp], opts);
            assert_eq!(layer.forward(&x).size(), [2, 3, out]);
            assert_eq!(lin.forward(&Tensor::zeros([0, inp], opts)).size(), [0, out]);
        }
        // No bias.
        let w = Tensor::randn([40, 24], opts);
        let x = Tensor::randn([5, 24], opts);
        let y = PanelLinear::new(&w, None).forward(&x);
        let want = x
            .to_kind(Kind::Double)
            .matmul(&w.to_kind(Kind::Double).tr());
        assert!(
            (y.to_kind(Kind::Double) - want)
                .abs()
                .max()
                .double_value(&[])
                < 1e-4
        );
    }

    /// The shares run once each, on libtorch's OpenMP team (as many threads as shares), and a
    /// panic in one reaches the caller instead of aborting the process.
    #[test]
    fn shares_run_on_libtorchs_openmp_threads() {
        assert!(
            openmp().is_some(),
            "libtorch's OpenMP runtime was not found in the process"
        );
        let seen = Mutex::new(Vec::new());
        parallel(2, &|i, n| {
            seen.lock()
                .unwrap()
                .push((i, n, std::thread::current().id()))
        });
        let mut seen = seen.into_inner().unwrap();
        seen.sort_by_key(|s| s.0);
        assert_eq!(
            seen.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
            [(0, 2), (1, 2)]
        );
        assert_ne!(seen[0].2, seen[1].2, "both shares ran on one thread");
        assert_eq!(
            seen[0].2,
            std::thread::current().id(),
            "the caller takes share 0"
        );

        let caught = std::panic::catch_unwind(|| {
            parallel(2, &|i, _| assert!(i != 1, "share {i} failed"));
        });
        let msg = caught.expect_err("the share's panic is raised again");
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("share 1 failed"), "{msg}");
    }
}
