//! `clip-operator`: reconciles `ClipProcessor` resources into a GPU node pool, CLIP workers, an
//! EFS model cache and an SQS-driven scaler.
//!
//! * [`crd`]: the API.
//! * [`class`]: the admin-owned ClipProcessorClass, its budgets and policy (pure).
//! * [`reconcile`]: validate -> build -> apply -> status, and the controller around it.
//! * [`scaler`]: the builtin scaler's decision (pure) and queue reader.
//! * [`render`]: offline rendering of what the operator applies.
//! * [`schema`]: the API server's structural-schema checks, offline, for `render`.
//! * [`external`]: Karpenter and KEDA types generated from their CRDs.

pub mod class;
pub mod crd;
pub mod external;
pub mod metrics;
pub mod reconcile;
pub mod render;
pub mod scaler;
pub mod schema;
