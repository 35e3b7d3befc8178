//! CLIP image and text towers on LibTorch (`tch`), configured from a Hugging Face `config.json`
//! and loaded from `model.safetensors`, so the tiny test model and the real ViT-B/32, ViT-B/16 and
//! ViT-L/14 run through the same code.

pub mod checkpoint;
pub mod config;
mod layers;
mod panels;
mod text;
mod vision;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use tch::{Device, Kind, Tensor};

pub use clip_contract::{DEFAULT_MODEL, MODELS, ModelSpec};
pub use config::ClipConfig;

use checkpoint::Checkpoint;
use text::TextTower;
use vision::VisionTower;

/// Why a model could not be loaded or run. Each variant reads as one sentence with the file named.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("invalid model config {0}: {1}")]
    Config(PathBuf, String),
    #[error("invalid checkpoint {0}: {1}")]
    Checkpoint(PathBuf, String),
    #[error("{0}")]
    Device(String),
    #[error("inference failed: {0}")]
    Forward(String),
}

/// Where inference runs, as the user asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA when libtorch sees a GPU, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            _ => Err(format!("unknown device {s:?}; expected auto, cpu or cuda")),
        }
    }
}

/// Numeric precision of the weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrecisionChoice {
    /// fp16 on CUDA (what the seed's `clip.load` does on a GPU), fp32 on CPU.
    #[default]
    Auto,
    Fp32,
    Fp16,
    Bf16,
}

impl FromStr for PrecisionChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(PrecisionChoice::Auto),
            "fp32" | "float32" => Ok(PrecisionChoice::Fp32),
            "fp16" | "float16" | "half" => Ok(PrecisionChoice::Fp16),
            "bf16" | "bfloat16" => Ok(PrecisionChoice::Bf16),
            _ => Err(format!(
                "unknown precision {s:?}; expected auto, fp32, fp16 or bf16"
            )),
        }
    }
}

/// A resolved device and dtype, and the matrix-multiply backend of the linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub device: Device,
    pub kind: Kind,
    pub gemm: Gemm,
}

/// Which kernels run the linear layers (about 85% of a CLIP forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gemm {
    /// libtorch's `linear` (cuBLAS on CUDA; MKL's sgemm for fp32 on the CPU).
    Libtorch,
    /// oneDNN's inner product, with the weights converted to oneDNN's layout once at load: fp32
    /// on the CPU. MKL's sgemm in the PyTorch wheels runs at about 200 GFLOP/s on the 2-core
    /// AVX-512 AMD machine CI uses where oneDNN reaches about 450, for the same fp32 results up
    /// to rounding (BENCHMARKS.md). The vision tower only: the text tower's products have a few
    /// to a few hundred rows, where converting the activations in and out of oneDNN's layout
    /// around every product costs more than oneDNN saves (see [`Gemm::for_text`]).
    OneDnn,
    /// The text tower's fp32 products on AVX-512 CPUs: the weights packed once into panels of
    /// 32 output columns, streamed by a register-blocked kernel (`panels.rs`). A text query's
    /// products have about ten rows, where MKL's sgemm reaches less than half the memory
    /// bandwidth: a lone query's forward takes a quarter of its time with libtorch's linear, and
    /// batches of 16 queries about 70% (BENCHMARKS.md, query endpoint).
    Panels,
}

impl Gemm {
    /// As the start-up log names it.
    pub fn name(self) -> &'static str {
        match self {
            Gemm::Libtorch => "libtorch",
            Gemm::OneDnn => "onednn",
            Gemm::Panels => "panels",
        }
    }

    /// oneDNN for fp32 on a CPU when libtorch was built with it; libtorch's `linear` otherwise
    /// (CUDA, and bf16 on the CPU, which libtorch already sends to oneDNN).
    pub fn preferred(device: Device, kind: Kind) -> Gemm {
        if device == Device::Cpu && kind == Kind::Float && tch::utils::has_mkldnn() {
            Gemm::OneDnn
        } else {
            Gemm::Libtorch
        }
    }

    /// The text tower's: [`Gemm::Panels`] for fp32 on an AVX-512 CPU, libtorch's `linear`
    /// otherwise (oneDNN's layout conversions around products of a few rows cost more than they
    /// save, see [`Gemm::OneDnn`]).
    pub fn for_text(device: Device, kind: Kind) -> Gemm {
        if device == Device::Cpu && kind == Kind::Float && panels::available() {
            Gemm::Panels
        } else {
            Gemm::Libtorch
        }
    }
}

/// What the machine offers that the placement depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// CUDA devices libtorch sees.
    pub cuda_devices: usize,
    /// Whether the CPU computes bf16 natively ([`cpu_native_bf16`]).
    pub cpu_bf16: bool,
}

impl Host {
    /// A machine without GPUs whose CPU computes bf16 natively (what the tests resolve against).
    pub const CPU: Host = Host {
        cuda_devices: 0,
        cpu_bf16: true,
    };
}

/// Whether this CPU has bf16 instructions: AVX-512 BF16 on x86-64 (every CPU with AMX has it
/// too: Intel Sapphire Rapids and later, AMD Zen 4 and later), BF16 on Arm. Without them oneDNN
/// emulates bf16 in fp32 and a bf16 forward runs 3-7x slower than fp32 (BENCHMARKS.md).
pub fn cpu_native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("bf16")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The CPU's model name and the bf16-related instruction sets it has, for logs and benchmarks
/// (e.g. `Intel(R) Xeon(R) Platinum 8488C (avx2 avx512f avx512_bf16 amx_bf16)`).
pub fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let model = field("model name");
    let flags = field("flags");
    let isa: Vec<&str> = flags
        .split_whitespace()
        .filter(|f| ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"].contains(f))
        .collect();
    let model = if model.is_empty() {
        std::env::consts::ARCH.to_string()
    } else {
        model
    };
    format!("{model} ({})", isa.join(" "))
}

impl Placement {
    /// Resolves the user's choices against what the machine has. Pure, so the GPU and CPU rules
    /// are tested on any machine.
    pub fn resolve(
        device: DeviceChoice,
        precision: PrecisionChoice,
        host: Host,
    ) -> Result<Self, ModelError> {
        let cuda_devices = host.cuda_devices;
        let device = match device {
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Auto if cuda_devices == 0 => Device::Cpu,
            DeviceChoice::Auto => Device::Cuda(0),
            DeviceChoice::Cuda if cuda_devices == 0 => {
                return Err(ModelError::Device(
                    "--device cuda was requested but libtorch sees no CUDA device (no GPU, no driver, \
                     or a CPU-only libtorch)"
                        .into(),
                ));
            }
            DeviceChoice::Cuda => Device::Cuda(0),
        };
        let kind = match (precision, device) {
            (PrecisionChoice::Auto, Device::Cpu) | (PrecisionChoice::Fp32, _) => Kind::Float,
            (PrecisionChoice::Auto, _) | (PrecisionChoice::Fp16, _) => Kind::Half,
            (PrecisionChoice::Bf16, _) => Kind::BFloat16,
        };
        if kind == Kind::Half && device == Device::Cpu {
            return Err(ModelError::Device(
                "fp16 is only supported on CUDA; use fp32 or bf16 on the CPU".into(),
            ));
        }
        if kind == Kind::BFloat16 && device == Device::Cpu && !host.cpu_bf16 {
            return Err(ModelError::Device(
                "bf16 was requested on a CPU without bf16 instructions (no AVX-512 BF16 or AMX): \
                 libtorch would emulate it at 3-7x the time of fp32; use fp32 (the CPU default), \
                 or run on a CPU with native bf16 (Intel Sapphire Rapids or later, AMD Zen 4 or \
                 later)"
                    .into(),
            ));
        }
        Ok(Placement {
            device,
            kind,
            gemm: Gemm::preferred(device, kind),
        })
    }

    /// Resolves against this machine.
    pub fn detect(device: DeviceChoice, precision: PrecisionChoice) -> Result<Self, ModelError> {
        let cuda_devices = if device == DeviceChoice::Cpu {
            0
        } else {
            tch::Cuda::device_count().max(0) as usize
        };
        let host = Host {
            cuda_devices,
            cpu_bf16: cpu_native_bf16(),
        };
        Self::resolve(device, precision, host).map_err(|e| match e {
            // The bf16 refusal names the CPU it was made for.
            ModelError::Device(msg) if precision == PrecisionChoice::Bf16 && !host.cpu_bf16 => {
                ModelError::Device(format!("{msg} [this CPU: {}]", cpu_description()))
            }
            e => e,
        })
    }

    /// Short human form of the vision tower's placement, e.g. `cuda:0 fp16` or `cpu fp32 onednn`.
    pub fn describe(&self) -> String {
        let d = match self.device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".into(),
        };
        let k = match self.kind {
            Kind::Half => "fp16",
            Kind::BFloat16 => "bf16",
            _ => "fp32",
        };
        match self.gemm {
            Gemm::Libtorch => format!("{d} {k}"),
            gemm => format!("{d} {k} {}", gemm.name()),
        }
    }
}

/// Which towers to load: the text tower is only needed for labels and text queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Towers {
    VisionOnly,
    Both,
}

/// A loaded CLIP model.
pub struct ClipModel {
    pub config: ClipConfig,
    pub placement: Placement,
    /// The text tower's linear layers' backend, when it is loaded.
    pub text_gemm: Option<Gemm>,
    vision: VisionTower,
    text: Option<TextTower>,
}

impl ClipModel {
    /// Loads `config.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path, placement: Placement, towers: Towers) -> Result<Self, ModelError> {
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(&dir.join("model.safetensors"))?;
        let mut r = ckpt.reader(placement)?;
        let _guard = tch::no_grad_guard();
        let vision = VisionTower::load(&r, &config.vision, config.projection_dim)?;
        // The text tower's products are a few rows each (see `Gemm::for_text`).
        let text_gemm = Gemm::for_text(placement.device, placement.kind);
        r.set_gemm(text_gemm);
        let text = match towers {
            Towers::Both => Some(TextTower::load(&r, &config.text, config.projection_dim)?),
            Towers::VisionOnly => None,
        };
        Ok(ClipModel {
            config,
            placement,
            text_gemm: text.is_some().then_some(text_gemm),
            vision,
            text,
        })
    }

    /// Side length of the square input image (224 for the supported models).
    pub fn image_size(&self) -> usize {
        self.config.vision.image_size as usize
    }

    /// Length of the embedding vectors.
    pub fn dimensions(&self) -> usize {
        self.config.projection_dim as usize
    }

    /// Image features for a batch of preprocessed images (`[batch, 3, S, S]`, fp32 on the host).
    /// Returns fp32 on the host, `[batch, dimensions]`, not L2-normalised (as the seed stores).
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let x = pixels
                .to_device(self.placement.device)
                .to_kind(self.placement.kind);
            self.vision
                .forward(&x)
                .to_kind(Kind::Float)
                .to_device(Device::Cpu)
        })
    }

    /// Text features for token ids (`[batch, tokens]`, int64) whose end-of-text positions are
    /// `eot` (`[batch]`). Returns fp32 on the host, `[batch, dimensions]`.
    pub fn encode_text(&self, ids: &Tensor, eot: &Tensor) -> Result<Tensor, ModelError> {
        let text = self
            .text
            .as_ref()
            .ok_or_else(|| ModelError::Forward("the text tower was not loaded".into()))?;
        guarded(|| {
            let _guard = tch::no_grad_guard();
            text.forward(&ids.to_device(self.placement.device), eot)
                .to_kind(Kind::Float)
                .to_device(Device::Cpu)
        })
    }

    /// Whether the architecture in `config.json` is the one `spec` names (a mislabelled weights
    /// directory would otherwise embed with the wrong model under the right name).
    pub fn matches(&self, spec: &ModelSpec) -> bool {
        self.config.vision.patch_size == spec.patch_size
            && self.config.vision.tower.hidden_size == spec.vision_width
            && self.config.projection_dim == spec.dimensions
    }
}

/// Runs libtorch work, turning its exceptions (which `tch` raises as panics: CUDA out of memory,
/// a driver fault) into an error the caller can retry or report, instead of killing the worker.
fn guarded<F: FnOnce() -> Tensor>(f: F) -> Result<Tensor, ModelError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "libtorch raised an error".into());
        ModelError::Forward(msg.lines().next().unwrap_or_default().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(n: usize) -> Host {
        Host {
            cuda_devices: n,
            cpu_bf16: false,
        }
    }

    #[test]
    fn bf16_is_refused_on_a_cpu_that_would_emulate_it() {
        let no_bf16 = Host {
            cuda_devices: 0,
            cpu_bf16: false,
        };
        let e = Placement::resolve(DeviceChoice::Auto, PrecisionChoice::Bf16, no_bf16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("CPU without bf16 instructions"), "{e}");
        assert!(e.contains("use fp32"), "{e}");
        // fp32 there is fine, bf16 on a GPU does not depend on the CPU, and a CPU with bf16
        // instructions gets bf16.
        let p = Placement::resolve(DeviceChoice::Auto, PrecisionChoice::Auto, no_bf16).unwrap();
        assert_eq!(p.kind, Kind::Float);
        let p = Placement::resolve(DeviceChoice::Auto, PrecisionChoice::Bf16, gpus(1)).unwrap();
        assert_eq!((p.device, p.kind), (Device::Cuda(0), Kind::BFloat16));
        let p = Placement::resolve(DeviceChoice::Cpu, PrecisionChoice::Bf16, Host::CPU).unwrap();
        assert_eq!((p.device, p.kind), (Device::Cpu, Kind::BFloat16));
    }

    #[test]
    fn the_cpu_description_names_the_model_and_its_isa() {
        let d = cpu_description();
        assert!(d.ends_with(')') && d.contains(" ("), "{d}");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            d.contains("avx512_bf16"),
            cpu_native_bf16(),
            "/proc/cpuinfo and the CPUID check disagree: {d}"
        );
    }

    #[test]
    fn auto_picks_fp16_cuda_when_a_gpu_is_present() {
        let p = Placement::resolve(DeviceChoice::Auto, PrecisionChoice::Auto, gpus(1)).unwrap();
        assert_eq!(
            p,
            Placement {
                device: Device::Cuda(0),
                kind: Kind::Half,
                gemm: Gemm::Libtorch,
            }
        );
        assert_eq!(p.describe(), "cuda:0 fp16");
        let p = Placement::resolve(DeviceChoice::Auto, PrecisionChoice::Bf16, gpus(2)).unwrap();
        assert_eq!(p.kind, Kind::BFloat16);
    }

    #[test]
    fn auto_falls_back_to_fp32_cpu() {
        let p = Placement::resolve(DeviceChoice::Auto, PrecisionChoice::Auto, Host::CPU).unwrap();
        assert_eq!(
            p,
            Placement {
                device: Device::Cpu,
                kind: Kind::Float,
                gemm: Gemm::OneDnn,
            }
        );
        assert_eq!(p.describe(), "cpu fp32 onednn");
        let p = Placement::resolve(DeviceChoice::Cpu, PrecisionChoice::Bf16, Host::CPU).unwrap();
        assert_eq!(p.gemm, Gemm::Libtorch);
        let p = Placement::resolve(DeviceChoice::Cpu, PrecisionChoice::Auto, gpus(4)).unwrap();
        assert_eq!(p.device, Device::Cpu);
    }

    /// The text tower's products use the panel kernel for fp32 on an AVX-512 CPU only.
    #[test]
    fn the_text_tower_takes_panels_for_fp32_on_avx512() {
        let want = if panels::available() {
            Gemm::Panels
        } else {
            Gemm::Libtorch
        };
        assert_eq!(Gemm::for_text(Device::Cpu, Kind::Float), want);
        assert_eq!(Gemm::for_text(Device::Cpu, Kind::BFloat16), Gemm::Libtorch);
        assert_eq!(Gemm::for_text(Device::Cuda(0), Kind::Float), Gemm::Libtorch);
        assert_eq!(Gemm::for_text(Device::Cuda(0), Kind::Half), Gemm::Libtorch);
    }

    #[test]
    fn impossible_requests_are_clear_errors() {
        let e =
            Placement::resolve(DeviceChoice::Cuda, PrecisionChoice::Auto, Host::CPU).unwrap_err();
        assert!(e.to_string().contains("no CUDA device"), "{e}");
        let e =
            Placement::resolve(DeviceChoice::Cpu, PrecisionChoice::Fp16, Host::CPU).unwrap_err();
        assert!(
            e.to_string().contains("fp16 is only supported on CUDA"),
            "{e}"
        );
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert_eq!("BF16".parse::<PrecisionChoice>(), Ok(PrecisionChoice::Bf16));
    }
}
