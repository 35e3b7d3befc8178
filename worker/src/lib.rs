//! `clip-worker`: CLIP image embeddings on LibTorch, served from an SQS queue.
//!
//! * [`preprocess`]: bytes to the model input, equal to the reference (OpenAI CLIP on PIL).
//! * [`model`]: the CLIP towers on `tch`, loaded from a Hugging Face checkpoint directory.
//! * [`tokenizer`], [`labels`]: text side and zero-shot keywords.
//! * [`engine`]: the three together, batched.
//! * [`cli`]: the `clip-worker` command line.

pub mod cli;
pub mod engine;
pub mod labels;
pub mod model;
pub mod preprocess;
pub mod tokenizer;
