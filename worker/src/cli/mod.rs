//! The `clip-worker` command line. Every flag has an environment variable, so the container can
//! be configured either way; the seed's variable names are kept where the seed had one.

mod bench;
mod embed;
mod query;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::model::{DEFAULT_MODEL, DeviceChoice, ModelSpec, PrecisionChoice};
use crate::preprocess::{Limits, Preprocessor};

#[derive(Parser)]
#[command(
    name = "clip-worker",
    version,
    about = "CLIP image embeddings on LibTorch",
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed image files (and optional text queries); one JSON line per input on stdout.
    Embed(embed::EmbedArgs),
    /// Consume Lakechain events from SQS: embed, write vectors to S3, publish to SNS.
    Serve(Box<serve::ServeArgs>),
    /// Serve text and image embeddings over HTTP (OpenAI's /v1/embeddings), from the same model.
    Query(Box<query::QueryArgs>),
    /// Download the model weights into the cache once (the cluster's cache-warm Job).
    FetchWeights(serve::FetchWeightsArgs),
    /// Measure preprocessing and end-to-end throughput on files (used by `make bench`).
    Bench(bench::BenchArgs),
}

/// Log output.
#[derive(Args, Clone)]
pub struct LogArgs {
    /// Log format on stderr.
    #[arg(long, env = clip_contract::env::LOG_FORMAT, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter (`info`, `debug`, `clip_worker=debug,info`, ...).
    #[arg(long, env = clip_contract::env::LOG_LEVEL, default_value = "info", global = true)]
    pub log_level: String,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogArgs {
    /// Installs the global subscriber (stderr; stdout is for results).
    pub fn init(&self) {
        let filter = tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            // Colour only on a terminal: `kubectl logs`, `docker logs` and files get plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        match self.log_format {
            LogFormat::Json => builder.json().flatten_event(true).init(),
            LogFormat::Text => builder.init(),
        }
    }
}

/// Model selection and placement, shared by every command that loads a model.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Directory with config.json, model.safetensors, vocab.json and merges.txt.
    #[arg(long = "weights", env = clip_contract::env::CLIP_WEIGHTS_DIR, value_name = "DIR")]
    pub weights: PathBuf,
    /// Model name the vectors are labelled with: ViT-B/32, ViT-B/16 or ViT-L/14.
    #[arg(long, env = clip_contract::env::CLIP_MODEL, default_value_t = DEFAULT_MODEL, value_parser = parse_model)]
    pub model: ModelSpec,
    /// Where inference runs: auto (CUDA when present), cpu or cuda.
    #[arg(long, env = clip_contract::env::CLIP_DEVICE, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,
    /// Precision: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.
    #[arg(long, env = clip_contract::env::CLIP_PRECISION, default_value = "auto", value_parser = parse_precision)]
    pub precision: PrecisionChoice,
    /// Intra-op threads for libtorch on the CPU (default: libtorch's choice, all cores).
    #[arg(long, env = clip_contract::env::TORCH_THREADS)]
    pub torch_threads: Option<i32>,
}

pub use crate::service::decode_pool;

pub(crate) fn parse_model(s: &str) -> Result<ModelSpec, String> {
    s.parse()
}
pub(crate) fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse()
}
pub(crate) fn parse_precision(s: &str) -> Result<PrecisionChoice, String> {
    s.parse()
}

/// Per-image resource limits and preprocessing options.
#[derive(Args, Clone)]
pub struct PreprocessArgs {
    /// Largest encoded image accepted, in bytes.
    #[arg(long, env = clip_contract::env::MAX_IMAGE_BYTES, default_value_t = Limits::default().max_bytes)]
    pub max_image_bytes: u64,
    /// Largest decoded image accepted, in pixels (checked from the header before decoding).
    #[arg(long, env = clip_contract::env::MAX_IMAGE_PIXELS, default_value_t = Limits::default().max_pixels)]
    pub max_image_pixels: u64,
    /// Smallest accepted shorter side, in pixels.
    #[arg(long, env = clip_contract::env::MIN_IMAGE_SIDE, default_value_t = Limits::default().min_side)]
    pub min_image_side: u32,
    /// Largest accepted ratio of the longer side to the shorter.
    #[arg(long, env = clip_contract::env::MAX_ASPECT_RATIO, default_value_t = Limits::default().max_aspect_ratio)]
    pub max_aspect_ratio: f64,
    /// Faster, approximate JPEG decoding (DCT-domain downscaling, like PIL's draft); off by default
    /// because it is not pixel-equal to the reference.
    #[arg(long, env = clip_contract::env::JPEG_DRAFT, default_value_t = false)]
    pub jpeg_draft: bool,
    /// Pixel memory, in bytes, that all decodes in flight may hold together; a decode waits its
    /// turn when it would go over. Bounds memory when many threads meet very large images.
    #[arg(long, env = clip_contract::env::DECODE_MEMORY, default_value_t = crate::preprocess::DEFAULT_DECODE_MEMORY, value_parser = clap::value_parser!(u64).range(1..))]
    pub decode_memory: u64,
}

impl PreprocessArgs {
    /// The preprocessor for a model taking `size` x `size` images.
    pub fn preprocessor(&self, size: u32) -> Preprocessor {
        Preprocessor {
            size,
            limits: Limits {
                max_bytes: self.max_image_bytes,
                max_pixels: self.max_image_pixels,
                min_side: self.min_image_side.max(1),
                max_aspect_ratio: self.max_aspect_ratio,
            },
            jpeg_draft: self.jpeg_draft,
            memory: crate::preprocess::DecodeMemory::new(self.decode_memory),
        }
    }
}

/// Runs the command line; the exit code says what happened (see each command).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.log.init();
    let result = match cli.command {
        Command::Embed(args) => embed::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Query(args) => query::run(*args),
        Command::FetchWeights(args) => serve::fetch_weights(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
