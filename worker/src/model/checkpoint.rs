//! Reads tensors out of `model.safetensors` without a random-initialised `VarStore` first: the
//! file is memory-mapped and each tensor is copied once onto its device, in its compute dtype.
//! Every tensor is checked against the shape `config.json` implies, so a mismatched checkpoint
//! fails with the tensor named instead of a libtorch shape error mid-forward.

use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use tch::{Kind, Tensor};

use super::{Gemm, ModelError, Placement};

/// An open, validated-on-read checkpoint.
pub struct Checkpoint {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl Checkpoint {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| ModelError::Io(path.into(), e))?;
        // SAFETY: the mapping is read-only and lives as long as `self`; the weights cache writes
        // files to a temporary name and renames them into place, so a mapped file is never
        // rewritten underneath us.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::Io(path.into(), e))?;
        Ok(Checkpoint {
            path: path.into(),
            map,
        })
    }

    /// Parses the header; the returned reader borrows the mapping.
    pub fn reader(&self, placement: Placement) -> Result<TensorReader<'_>, ModelError> {
        let st = SafeTensors::deserialize(&self.map)
            .map_err(|e| ModelError::Checkpoint(self.path.clone(), e.to_string()))?;
        Ok(TensorReader {
            st,
            path: &self.path,
            placement,
        })
    }
}

/// Hands out tensors by name with their expected shape.
pub struct TensorReader<'a> {
    st: SafeTensors<'a>,
    path: &'a Path,
    placement: Placement,
}

impl TensorReader<'_> {
    /// The tensor `name`, which must have exactly `shape`, on the model's device and dtype.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor, ModelError> {
        self.get_scaled(name, shape, 1.0)
    }

    /// [`get`](Self::get) multiplied by `scale`, in fp32 before the compute dtype, so folding a
    /// constant into weights adds no rounding beyond fp32's.
    pub fn get_scaled(&self, name: &str, shape: &[i64], scale: f64) -> Result<Tensor, ModelError> {
        let err = |msg: String| ModelError::Checkpoint(self.path.into(), msg);
        let view = self
            .st
            .tensor(name)
            .map_err(|_| err(format!("tensor {name} is missing")))?;
        let actual: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if actual != shape {
            return Err(err(format!(
                "tensor {name} has shape {actual:?} but config.json implies {shape:?}"
            )));
        }
        let src_kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            other => {
                return Err(err(format!(
                    "tensor {name} has unsupported dtype {other:?}"
                )));
            }
        };
        let t = Tensor::f_from_data_size(view.data(), shape, src_kind)
            .map_err(|e| err(format!("tensor {name}: {e}")))?;
        let t = if scale == 1.0 {
            t
        } else {
            t.to_kind(Kind::Float) * scale
        };
        // Convert on the host only when it shrinks the copy; otherwise convert on the device.
        let Placement { device, kind, .. } = self.placement;
        let t = if kind.elt_size_in_bytes() < t.kind().elt_size_in_bytes() {
            t.to_kind(kind).to_device(device)
        } else {
            t.to_device(device).to_kind(kind)
        };
        Ok(t)
    }

    /// The backend the linear layers read from this checkpoint use.
    pub fn gemm(&self) -> Gemm {
        self.placement.gemm
    }

    /// Hands out the next layers' weights for `gemm` instead.
    pub fn set_gemm(&mut self, gemm: Gemm) {
        self.placement.gemm = gemm
    }

    /// Whether the checkpoint has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }
}
