//! `clip-worker`: CLIP image embeddings on LibTorch, served from an SQS queue.
//!
//! * [`preprocess`]: bytes to the model input, equal to the reference (OpenAI CLIP on PIL).
//! * [`model`]: the CLIP towers on `tch`, loaded from a Hugging Face checkpoint directory.
//! * [`tokenizer`], [`labels`]: text side and zero-shot keywords.
//! * [`engine`]: the three together, batched.
//! * [`event`], [`aws`], [`weights`], [`service`]: the queue worker (`clip-worker serve`).
//! * [`query`]: text and image embeddings over HTTP (`clip-worker query`).
//! * [`cli`]: the `clip-worker` command line.

pub mod aws;
pub mod cli;
pub mod engine;
pub mod event;
pub mod labels;
pub mod model;
pub mod preprocess;
pub mod query;
pub mod service;
pub mod tokenizer;
pub mod weights;
