//! The contract between `clip-operator` and `clip-worker`: one source of truth for the names both
//! sides use, so the operator's Deployment builder and the worker's configuration parser can be
//! tested against the same list. No dependencies: the operator does not link libtorch.

pub mod env;
pub mod metrics;
pub mod model;

pub use model::{DEFAULT_MODEL, MODELS, ModelSpec};

/// Port of the worker's HTTP endpoints (`/healthz`, `/readyz`, `/metrics`).
pub const WORKER_HTTP_PORT: u16 = 8080;
/// Liveness endpoint.
pub const HEALTHZ_PATH: &str = "/healthz";
/// Readiness endpoint: model loaded and the queue reachable.
pub const READYZ_PATH: &str = "/readyz";
/// Prometheus metrics endpoint.
pub const METRICS_PATH: &str = "/metrics";
/// Where the model cache is mounted in worker pods (the seed's EFS mount point).
pub const CACHE_MOUNT_PATH: &str = "/cache";
/// Default service name: the cache key prefix and the `callStack` entry (as the seed).
pub const DEFAULT_SERVICE_NAME: &str = "clip-image-processor";
/// The uid/gid the worker image runs as (the seed's EFS access point owner).
pub const WORKER_UID: i64 = 1000;
