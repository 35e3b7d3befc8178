//! `clip-worker serve` and `clip-worker fetch-weights`: configured by the seed's environment
//! variables (names from `clip_contract::env`, shared with the operator), each with a flag.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use clap::builder::BoolishValueParser;
use clip_contract::env;

use super::{PreprocessArgs, parse_device, parse_model, parse_precision};
use crate::engine::LabelSource;
use crate::model::{DEFAULT_MODEL, DeviceChoice, ModelSpec, PrecisionChoice};
use crate::service::{ModelSettings, ServeConfig};
use crate::weights::WeightsConfig;

/// Where the model comes from (shared by `serve` and `fetch-weights`).
#[derive(Args, Clone)]
pub struct WeightsArgs {
    /// ViT-B/32, ViT-B/16 or ViT-L/14.
    #[arg(long, env = env::CLIP_MODEL, default_value_t = DEFAULT_MODEL, value_parser = parse_model)]
    pub model: ModelSpec,
    /// Model cache root (the shared EFS mount in the cluster); weights live in <dir>/<model slug>.
    #[arg(long, env = env::CACHE_DIR, default_value = clip_contract::CACHE_MOUNT_PATH)]
    pub cache_dir: PathBuf,
    /// A weights directory to use as is, instead of the cache.
    #[arg(long, env = env::CLIP_WEIGHTS_DIR)]
    pub weights_dir: Option<PathBuf>,
    /// Where missing weights are downloaded from: https://... or s3://bucket/prefix/
    /// (default: the model's Hugging Face repository).
    #[arg(long, env = env::CLIP_WEIGHTS_SOURCE)]
    pub weights_source: Option<String>,
    /// AWS region.
    #[arg(long, env = env::AWS_DEFAULT_REGION)]
    pub region: Option<String>,
    /// Endpoint for every AWS service (emulators, private endpoints); the AWS SDK's standard
    /// variable.
    #[arg(long, env = env::AWS_ENDPOINT_URL)]
    pub aws_endpoint_url: Option<String>,
}

impl WeightsArgs {
    /// The AWS clients for this region and endpoint.
    async fn aws(&self) -> crate::aws::Aws {
        crate::aws::Aws::from_env(self.region.clone(), self.aws_endpoint_url.clone()).await
    }
}

impl WeightsArgs {
    pub(crate) fn config(&self) -> WeightsConfig {
        WeightsConfig {
            spec: self.model,
            cache_dir: self.cache_dir.clone(),
            weights_dir: self.weights_dir.clone(),
            source: self.weights_source.clone().filter(|s| !s.is_empty()),
        }
    }
}

#[derive(Args)]
pub struct ServeArgs {
    /// SQS queue to consume.
    #[arg(long, env = env::INPUT_QUEUE_URL)]
    pub input_queue_url: String,
    /// SNS topic for enriched events (empty: not published).
    #[arg(long, env = env::SNS_TARGET_TOPIC, default_value = "")]
    pub sns_target_topic: String,
    /// Cache bucket for the vector files.
    #[arg(long, env = env::LAKECHAIN_CACHE_STORAGE)]
    pub cache_storage: String,
    /// Cache key prefix and callStack entry.
    #[arg(long, env = env::POWERTOOLS_SERVICE_NAME, default_value = clip_contract::DEFAULT_SERVICE_NAME)]
    pub service_name: String,
    #[command(flatten)]
    pub weights: WeightsArgs,
    /// Zero-shot keywords (true/false).
    #[arg(long, env = env::EXTRACT_LABELS, default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub extract_labels: bool,
    /// Label vocabulary file (default: the shipped one).
    #[arg(long, env = env::LABELS_FILE)]
    pub labels_file: Option<PathBuf>,
    /// Keywords per image.
    #[arg(long, env = env::TOP_K, default_value_t = 5)]
    pub top_k: usize,
    /// auto, cpu or cuda.
    #[arg(long, env = env::CLIP_DEVICE, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,
    /// auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.
    #[arg(long, env = env::CLIP_PRECISION, default_value = "auto", value_parser = parse_precision)]
    pub precision: PrecisionChoice,
    /// Images per forward pass.
    #[arg(long, env = env::BATCH_SIZE, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub batch_size: u16,
    /// Longest wait to fill a batch, milliseconds.
    #[arg(long, env = env::BATCH_WAIT_MS, default_value_t = 50)]
    pub batch_wait_ms: u64,
    /// Messages in flight at once.
    #[arg(long, env = env::MAX_IN_FLIGHT, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_in_flight: u16,
    /// Concurrent S3 downloads.
    #[arg(long, env = env::FETCH_CONCURRENCY, default_value_t = 8)]
    pub fetch_concurrency: usize,
    /// Concurrent long-poll receives.
    #[arg(long, env = env::RECEIVE_CONCURRENCY, default_value_t = 2)]
    pub receive_concurrency: usize,
    /// Decode threads (default: one per core).
    #[arg(long, env = env::DECODE_THREADS)]
    pub decode_threads: Option<usize>,
    /// Visibility timeout held on in-flight messages, seconds (extended by a heartbeat).
    #[arg(long, env = env::VISIBILITY_TIMEOUT, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=43200))]
    pub visibility_timeout: u64,
    /// Seconds to finish in-flight work after SIGTERM.
    #[arg(long, env = env::SHUTDOWN_GRACE_SECONDS, default_value_t = 25)]
    pub shutdown_grace_seconds: u64,
    /// SQS queue for messages that cannot succeed (default: the input queue's redrive policy).
    #[arg(long, env = env::FAILURE_QUEUE_URL)]
    pub failure_queue_url: Option<String>,
    /// Port of /healthz, /readyz and /metrics.
    #[arg(long, env = env::HTTP_PORT, default_value_t = clip_contract::WORKER_HTTP_PORT)]
    pub http_port: u16,
    /// libtorch intra-op threads on the CPU.
    #[arg(long, env = env::TORCH_THREADS)]
    pub torch_threads: Option<i32>,
    /// Seconds between progress log lines.
    #[arg(long, env = env::PROGRESS_INTERVAL_SECONDS, default_value_t = 30)]
    pub progress_interval_seconds: u64,
    #[command(flatten)]
    pub preprocess: PreprocessArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let nonempty = |s: &str| Some(s.to_string()).filter(|s| !s.trim().is_empty());
    let cfg = ServeConfig {
        queue_url: args.input_queue_url.clone(),
        topic: nonempty(&args.sns_target_topic),
        bucket: args.cache_storage.clone(),
        service_name: args.service_name.clone(),
        region: args.weights.region.clone(),
        aws_endpoint_url: args.weights.aws_endpoint_url.clone(),
        batch_size: usize::from(args.batch_size),
        batch_wait: Duration::from_millis(args.batch_wait_ms),
        max_in_flight: usize::from(args.max_in_flight),
        fetch_concurrency: args.fetch_concurrency.max(1),
        receive_concurrency: args.receive_concurrency.max(1),
        decode_threads: args.decode_threads,
        visibility: Duration::from_secs(args.visibility_timeout),
        grace: Duration::from_secs(args.shutdown_grace_seconds),
        failure_queue: args.failure_queue_url.as_deref().and_then(nonempty),
        top_k: args.top_k,
        progress_interval: Duration::from_secs(args.progress_interval_seconds.max(1)),
        http_port: args.http_port,
    };
    let labels = match (args.extract_labels, &args.labels_file) {
        (false, _) => LabelSource::Off,
        (true, Some(f)) => LabelSource::File(f.clone()),
        (true, None) => LabelSource::Default,
    };
    let model = ModelSettings {
        weights: args.weights.config(),
        device: args.device,
        precision: args.precision,
        labels,
        torch_threads: args.torch_threads,
        preprocessor: args.preprocess.preprocessor(224),
    };
    runtime()?.block_on(crate::service::serve(cfg, model))?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct FetchWeightsArgs {
    #[command(flatten)]
    pub weights: WeightsArgs,
}

/// Downloads the weights into the cache once (the cluster's cache-warm Job), or confirms they are
/// there.
pub fn fetch_weights(args: FetchWeightsArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.weights.config();
    let dir = runtime()?.block_on(async {
        let aws = args.weights.aws().await;
        crate::weights::ensure(&cfg, Some(&aws)).await
    })?;
    println!("{}", dir.display());
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tokio")
        .build()?)
}
