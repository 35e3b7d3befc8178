//! Environment variables of the worker. The seed's names are kept where the seed had one; the
//! rest are ours. Each constant's doc says what it means and its default.

/// SQS queue URL to consume (seed). Required for `serve`.
pub const INPUT_QUEUE_URL: &str = "INPUT_QUEUE_URL";
/// SNS topic ARN for enriched events (seed). Empty: events are not published.
pub const SNS_TARGET_TOPIC: &str = "SNS_TARGET_TOPIC";
/// Cache bucket name for vector files (seed). Required for `serve`.
pub const LAKECHAIN_CACHE_STORAGE: &str = "LAKECHAIN_CACHE_STORAGE";
/// Model cache root, the shared EFS mount in the cluster (seed). Default `/cache`.
pub const CACHE_DIR: &str = "CACHE_DIR";
/// `ViT-B/32` (default), `ViT-B/16` or `ViT-L/14` (seed).
pub const CLIP_MODEL: &str = "CLIP_MODEL";
/// `true` (default) or `false`: zero-shot keywords (seed).
pub const EXTRACT_LABELS: &str = "EXTRACT_LABELS";
/// AWS region (seed).
pub const AWS_DEFAULT_REGION: &str = "AWS_DEFAULT_REGION";
/// Cache key prefix and `callStack` entry (seed). Default `clip-image-processor`.
pub const POWERTOOLS_SERVICE_NAME: &str = "POWERTOOLS_SERVICE_NAME";
/// AWS SDK standard: endpoint override (tests use a local emulator).
pub const AWS_ENDPOINT_URL: &str = "AWS_ENDPOINT_URL";
/// Weights directory, overriding `$CACHE_DIR/<model slug>`.
pub const CLIP_WEIGHTS_DIR: &str = "CLIP_WEIGHTS_DIR";
/// Where missing weights are fetched from: `https://...` (default: the model's Hugging Face
/// repository) or `s3://bucket/prefix/`.
pub const CLIP_WEIGHTS_SOURCE: &str = "CLIP_WEIGHTS_SOURCE";
/// Images per forward pass. Default 32.
pub const BATCH_SIZE: &str = "BATCH_SIZE";
/// Longest wait to fill a batch, in milliseconds. Default 50.
pub const BATCH_WAIT_MS: &str = "BATCH_WAIT_MS";
/// Messages in flight at once (received, not yet deleted). Default 64.
pub const MAX_IN_FLIGHT: &str = "MAX_IN_FLIGHT";
/// Concurrent S3 downloads. Default 8.
pub const FETCH_CONCURRENCY: &str = "FETCH_CONCURRENCY";
/// Concurrent long-poll receives. Default 2.
pub const RECEIVE_CONCURRENCY: &str = "RECEIVE_CONCURRENCY";
/// Threads that decode and preprocess. Default: one per core.
pub const DECODE_THREADS: &str = "DECODE_THREADS";
/// Visibility timeout the worker holds on messages it works on, in seconds (extended by a
/// heartbeat until done). Default 60.
pub const VISIBILITY_TIMEOUT: &str = "VISIBILITY_TIMEOUT";
/// Seconds to finish in-flight work after SIGTERM. Default 25.
pub const SHUTDOWN_GRACE_SECONDS: &str = "SHUTDOWN_GRACE_SECONDS";
/// SQS queue URL that receives messages that cannot succeed, with the reason. Default: none
/// (the input queue's redrive policy moves them to its dead-letter queue).
pub const FAILURE_QUEUE_URL: &str = "FAILURE_QUEUE_URL";
/// `auto` (default), `cpu` or `cuda`.
pub const CLIP_DEVICE: &str = "CLIP_DEVICE";
/// `auto` (default: fp16 on CUDA, fp32 on CPU), `fp32`, `fp16`, `bf16`.
pub const CLIP_PRECISION: &str = "CLIP_PRECISION";
/// Label vocabulary file (one label per line). Default: the shipped vocabulary.
pub const LABELS_FILE: &str = "LABELS_FILE";
/// Keywords per image. Default 5.
pub const TOP_K: &str = "TOP_K";
/// Port of `/healthz`, `/readyz`, `/metrics`. Default 8080.
pub const HTTP_PORT: &str = "HTTP_PORT";
/// `text` (default) or `json` logs.
pub const LOG_FORMAT: &str = "LOG_FORMAT";
/// Log filter. Default `info`.
pub const LOG_LEVEL: &str = "LOG_LEVEL";
/// Largest encoded image, bytes. Default 64 MiB.
pub const MAX_IMAGE_BYTES: &str = "MAX_IMAGE_BYTES";
/// Largest decoded image, pixels. Default 100 million.
pub const MAX_IMAGE_PIXELS: &str = "MAX_IMAGE_PIXELS";
/// Smallest accepted shorter side, pixels. Default 8.
pub const MIN_IMAGE_SIDE: &str = "MIN_IMAGE_SIDE";
/// Largest accepted aspect ratio. Default 25.
pub const MAX_ASPECT_RATIO: &str = "MAX_ASPECT_RATIO";
/// `true`: approximate, faster JPEG decoding. Default `false`.
pub const JPEG_DRAFT: &str = "JPEG_DRAFT";
/// Pixel memory all decodes in flight may hold together, bytes. Default 2 GiB.
pub const DECODE_MEMORY: &str = "DECODE_MEMORY";
/// libtorch intra-op threads on the CPU. Default: libtorch's choice.
pub const TORCH_THREADS: &str = "TORCH_THREADS";
/// Seconds between progress log lines. Default 30.
pub const PROGRESS_INTERVAL_SECONDS: &str = "PROGRESS_INTERVAL_SECONDS";

/// `clip-worker query`: inputs accepted and not yet answered, over all requests (beyond: 429).
pub const QUERY_MAX_QUEUE: &str = "QUERY_MAX_QUEUE";
/// `clip-worker query`: inputs in one request.
pub const QUERY_MAX_INPUTS: &str = "QUERY_MAX_INPUTS";
/// `clip-worker query`: bytes of one text input.
pub const QUERY_MAX_TEXT_BYTES: &str = "QUERY_MAX_TEXT_BYTES";
/// `clip-worker query`: bytes of one request body.
pub const QUERY_MAX_BODY_BYTES: &str = "QUERY_MAX_BODY_BYTES";
/// `clip-worker query`: whether `{"image": base64}` inputs are accepted.
pub const QUERY_IMAGES: &str = "QUERY_IMAGES";
/// `clip-worker query`: L2-normalised vectors by default (requests may say otherwise).
pub const QUERY_NORMALIZE: &str = "QUERY_NORMALIZE";

/// Every variable `clip-worker query` reads (the operator's query Deployment and docs/query.md).
pub const QUERY: [&str; 27] = [
    CLIP_MODEL,
    CACHE_DIR,
    CLIP_WEIGHTS_DIR,
    CLIP_WEIGHTS_SOURCE,
    AWS_DEFAULT_REGION,
    AWS_ENDPOINT_URL,
    CLIP_DEVICE,
    CLIP_PRECISION,
    TORCH_THREADS,
    BATCH_SIZE,
    BATCH_WAIT_MS,
    DECODE_THREADS,
    HTTP_PORT,
    LOG_FORMAT,
    LOG_LEVEL,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    MAX_ASPECT_RATIO,
    JPEG_DRAFT,
    DECODE_MEMORY,
    QUERY_MAX_QUEUE,
    QUERY_MAX_INPUTS,
    QUERY_MAX_TEXT_BYTES,
    QUERY_MAX_BODY_BYTES,
    QUERY_IMAGES,
    QUERY_NORMALIZE,
];

/// Every variable `clip-worker serve` reads, for the operator's tests and the docs.
pub const ALL: [&str; 35] = [
    INPUT_QUEUE_URL,
    SNS_TARGET_TOPIC,
    LAKECHAIN_CACHE_STORAGE,
    CACHE_DIR,
    CLIP_MODEL,
    EXTRACT_LABELS,
    AWS_DEFAULT_REGION,
    POWERTOOLS_SERVICE_NAME,
    AWS_ENDPOINT_URL,
    CLIP_WEIGHTS_DIR,
    CLIP_WEIGHTS_SOURCE,
    BATCH_SIZE,
    BATCH_WAIT_MS,
    MAX_IN_FLIGHT,
    FETCH_CONCURRENCY,
    RECEIVE_CONCURRENCY,
    DECODE_THREADS,
    VISIBILITY_TIMEOUT,
    SHUTDOWN_GRACE_SECONDS,
    FAILURE_QUEUE_URL,
    CLIP_DEVICE,
    CLIP_PRECISION,
    LABELS_FILE,
    TOP_K,
    HTTP_PORT,
    LOG_FORMAT,
    LOG_LEVEL,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    MAX_ASPECT_RATIO,
    JPEG_DRAFT,
    DECODE_MEMORY,
    TORCH_THREADS,
    PROGRESS_INTERVAL_SECONDS,
];

/// The seed's variables: a drop-in replacement must read every one of them.
pub const SEED: [&str; 8] = [
    POWERTOOLS_SERVICE_NAME,
    INPUT_QUEUE_URL,
    SNS_TARGET_TOPIC,
    LAKECHAIN_CACHE_STORAGE,
    CACHE_DIR,
    CLIP_MODEL,
    EXTRACT_LABELS,
    AWS_DEFAULT_REGION,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variable_is_documented() {
        let doc = include_str!("../../docs/worker.md");
        for v in ALL {
            assert!(
                doc.contains(&format!("| `{v}` |")),
                "docs/worker.md does not document {v}"
            );
        }
    }

    #[test]
    fn every_query_variable_is_documented() {
        let doc = include_str!("../../docs/query.md");
        for v in QUERY {
            assert!(
                doc.contains(&format!("| `{v}` |")),
                "docs/query.md does not document {v}"
            );
        }
        let mut sorted = QUERY.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), QUERY.len(), "no variable listed twice");
    }

    #[test]
    fn the_seed_variables_are_part_of_the_contract() {
        for v in SEED {
            assert!(ALL.contains(&v), "{v}");
        }
        let mut sorted = ALL.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ALL.len(), "no variable listed twice");
    }
}
