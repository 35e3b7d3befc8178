//! `clip-worker query`: the HTTP query endpoint (see [`crate::query`]). Configured like `serve`:
//! every flag has an environment variable, and the model comes from the same cache.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use clap::builder::BoolishValueParser;
use clip_contract::env;

use super::serve::WeightsArgs;
use super::{PreprocessArgs, parse_device, parse_precision};
use crate::engine::LabelSource;
use crate::model::{DeviceChoice, PrecisionChoice};
use crate::query::QueryConfig;
use crate::query::api::RequestLimits;
use crate::service::ModelSettings;

#[derive(Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub weights: WeightsArgs,
    /// auto, cpu or cuda.
    #[arg(long, env = env::CLIP_DEVICE, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,
    /// auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.
    #[arg(long, env = env::CLIP_PRECISION, default_value = "auto", value_parser = parse_precision)]
    pub precision: PrecisionChoice,
    /// libtorch intra-op threads on the CPU.
    #[arg(long, env = env::TORCH_THREADS)]
    pub torch_threads: Option<i32>,
    /// Inputs per forward pass (the inputs of concurrent requests are batched together).
    #[arg(long, env = env::BATCH_SIZE, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub batch_size: u16,
    /// Extra wait for a batch to fill once the model is free, milliseconds. A batch leaves as
    /// soon as the model is free with every input queued by then, so 0 (no lone query ever waits
    /// for companions) is right unless requests arrive in bursts spread over a few milliseconds.
    #[arg(long, env = env::BATCH_WAIT_MS, default_value_t = 0)]
    pub batch_wait_ms: u64,
    /// Decode threads for image inputs (default: one per core).
    #[arg(long, env = env::DECODE_THREADS)]
    pub decode_threads: Option<usize>,
    /// Port of /v1/embeddings, /v1/models, /healthz, /readyz and /metrics.
    #[arg(long, env = env::HTTP_PORT, default_value_t = clip_contract::WORKER_HTTP_PORT)]
    pub http_port: u16,
    /// Inputs accepted and not yet answered, over all requests; beyond it requests get 429.
    #[arg(long, env = env::QUERY_MAX_QUEUE, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_queue: u32,
    /// Inputs (texts and images) in one request.
    #[arg(long, env = env::QUERY_MAX_INPUTS, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_inputs: u32,
    /// Bytes of one text input (CLIP reads its first 77 tokens; the rest is truncated).
    #[arg(long, env = env::QUERY_MAX_TEXT_BYTES, default_value_t = 8192)]
    pub max_text_bytes: usize,
    /// Bytes of one request body (base64 images included).
    #[arg(long, env = env::QUERY_MAX_BODY_BYTES, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// Accept `{"image": "<base64>"}` inputs (true/false). Images are never fetched by URL.
    #[arg(long, env = env::QUERY_IMAGES, default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub images: bool,
    /// Return L2-normalised vectors unless a request says otherwise (`"normalize": false`);
    /// off by default: the raw features, as the queue worker stores them.
    #[arg(long, env = env::QUERY_NORMALIZE, default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub normalize: bool,
    #[command(flatten)]
    pub preprocess: PreprocessArgs,
}

pub fn run(args: QueryArgs) -> anyhow::Result<ExitCode> {
    let cfg = QueryConfig {
        http_port: args.http_port,
        batch_size: usize::from(args.batch_size),
        batch_wait: Duration::from_millis(args.batch_wait_ms),
        max_queue: args.max_queue as usize,
        limits: RequestLimits {
            max_inputs: args.max_inputs as usize,
            max_text_bytes: args.max_text_bytes.max(1),
            images: args.images,
            max_image_bytes: args.preprocess.max_image_bytes,
        },
        max_body_bytes: args.max_body_bytes.max(1),
        normalize: args.normalize,
        decode_threads: args.decode_threads,
        aws_region: args.weights.region.clone(),
        aws_endpoint_url: args.weights.aws_endpoint_url.clone(),
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    let model = ModelSettings {
        weights: args.weights.config(),
        device: args.device,
        precision: args.precision,
        labels: LabelSource::Off,
        torch_threads: args.torch_threads,
        preprocessor: args.preprocess.preprocessor(224),
    };
    super::serve::runtime()?.block_on(crate::query::serve(cfg, model))?;
    Ok(ExitCode::SUCCESS)
}
