//! `clip-worker bench`: throughput figures for `make bench`, which runs the Python reference on
//! the same files in the same run and prints the ratio. Files are read into memory first, as
//! the reference does, so disk speed is not measured; model loading is not timed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use rayon::prelude::*;
use serde_json::json;

use super::decode_pool;
use super::embed::load_engine;
use super::{ModelArgs, PreprocessArgs};
use crate::engine::LabelSource;
use crate::preprocess::PreparedImage;

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// Decode + resize + crop on one thread (images/s per core).
    Preprocess,
    /// Bytes in memory to embeddings: parallel preprocessing overlapped with batched inference.
    Embed,
}

#[derive(Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub mode: BenchMode,
    /// Passes over the file list.
    #[arg(long, default_value_t = 3)]
    pub passes: usize,
    /// Weights directory (embed mode only).
    #[arg(long, value_name = "DIR")]
    pub weights: Option<PathBuf>,
    /// Where inference runs (embed mode): auto, cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = super::parse_device)]
    pub device: crate::model::DeviceChoice,
    /// Precision (embed mode): auto, fp32, fp16 or bf16.
    #[arg(long, default_value = "auto", value_parser = super::parse_precision)]
    pub precision: crate::model::PrecisionChoice,
    /// Images per forward pass (embed mode).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Decode threads (embed mode; default one per core).
    #[arg(long)]
    pub decode_threads: Option<usize>,
    /// Input side (preprocess mode; embed mode uses the model's).
    #[arg(long, default_value_t = 224)]
    pub size: u32,
    /// Preprocess mode: also write each image's normalised tensor (`<n>.f32`, little-endian
    /// `[3, size, size]`) here, for pixel parity checks.
    #[arg(long, value_name = "DIR")]
    pub dump_dir: Option<PathBuf>,
    #[command(flatten)]
    pub preprocess: PreprocessArgs,
    /// Image files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let inputs: Vec<Vec<u8>> = args
        .files
        .iter()
        .map(|f| std::fs::read(f).with_context(|| format!("cannot read {}", f.display())))
        .collect::<Result<_, _>>()?;
    let passes = args.passes.max(1);
    let (images, seconds) = match args.mode {
        BenchMode::Preprocess => {
            // Warm-up pass (page cache, allocator), then timed passes on this one thread.
            // The reference's time includes ToTensor + Normalize: ours includes the same work.
            let pre = args.preprocess.preprocessor(args.size);
            let mut tensor = vec![0f32; 3 * (args.size * args.size) as usize];
            for (n, b) in inputs.iter().enumerate() {
                pre.prepare(b, None)?.write_normalized(&mut tensor);
                if let Some(dir) = &args.dump_dir {
                    let bytes: Vec<u8> = tensor.iter().flat_map(|v| v.to_le_bytes()).collect();
                    std::fs::write(dir.join(format!("{n}.f32")), bytes)?;
                }
            }
            let t = Instant::now();
            for _ in 0..passes {
                for b in &inputs {
                    pre.prepare(b, None)?.write_normalized(&mut tensor);
                    std::hint::black_box(&tensor);
                }
            }
            (inputs.len() * passes, t.elapsed().as_secs_f64())
        }
        BenchMode::Embed => {
            let m = ModelArgs {
                weights: args.weights.clone().context("embed mode needs --weights")?,
                model: crate::model::DEFAULT_MODEL,
                device: args.device,
                precision: args.precision,
                torch_threads: None,
            };
            let engine = load_engine(&m, LabelSource::Off, false)?;
            let pre = args.preprocess.preprocessor(engine.image_size());
            let pool = decode_pool(args.decode_threads)?;
            let batch = args.batch_size.max(1);
            // One warm-up batch so lazy libtorch initialisation is not timed.
            let warm: Vec<PreparedImage> = inputs
                .iter()
                .take(batch)
                .map(|b| pre.prepare(b, None))
                .collect::<Result<_, _>>()?;
            engine.embed_images(&warm.iter().collect::<Vec<_>>(), 5)?;

            let t = Instant::now();
            let work: Vec<&[u8]> = (0..passes)
                .flat_map(|_| inputs.iter().map(Vec::as_slice))
                .collect();
            // A file that fails to decode stops the run: counting it as done would inflate the rate.
            let (tx, rx) = sync_channel::<anyhow::Result<Vec<PreparedImage>>>(1);
            std::thread::scope(|s| -> anyhow::Result<()> {
                s.spawn(|| {
                    pool.install(|| {
                        for chunk in work.chunks(batch) {
                            let prepared = chunk
                                .par_iter()
                                .map(|b| pre.prepare(b, None))
                                .collect::<Result<Vec<_>, _>>()
                                .map_err(anyhow::Error::from);
                            if tx.send(prepared).is_err() {
                                break;
                            }
                        }
                        drop(tx);
                    })
                });
                for prepared in rx {
                    let prepared = prepared?;
                    std::hint::black_box(
                        engine.embed_images(&prepared.iter().collect::<Vec<_>>(), 5)?,
                    );
                }
                Ok(())
            })?;
            (work.len(), t.elapsed().as_secs_f64())
        }
    };
    let line = json!({
        "mode": match args.mode { BenchMode::Preprocess => "preprocess", BenchMode::Embed => "embed" },
        "images": images,
        "seconds": seconds,
        "images_per_second": images as f64 / seconds,
    });
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}
