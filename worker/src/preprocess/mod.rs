//! Image bytes to the model's input tensor, equal to the reference pipeline (OpenAI CLIP's
//! preprocessing on PIL): detect the format from the bytes, decode in PIL's mode, resize and
//! centre-crop as torchvision does on PIL images, convert to RGB, scale and normalise.
//!
//! Hostile input is bounded: the encoded size and the decoded pixel count are checked before
//! any pixel buffer is allocated, decodes together stay within a memory budget
//! ([`DecodeMemory`]), and decoder failures become errors, never panics.

mod decode;
pub mod format;
mod jpeg;
pub mod memory;
mod resize;

pub use format::{ImageFormat, supported_mime_types};
pub use memory::{DEFAULT_DECODE_MEMORY, DecodeMemory};
pub use resize::Geometry;

/// OpenAI CLIP's normalisation constants, written as published; as `f32` they round exactly as
/// torchvision's float32 tensors do.
#[allow(clippy::excessive_precision)]
pub const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

/// Bounds on what one image may cost. Every field is configurable (`--max-image-bytes`,
/// `--max-image-pixels`, `--min-image-side`, `--max-aspect-ratio` and their environment variables).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Largest encoded file accepted, in bytes.
    pub max_bytes: u64,
    /// Largest decoded image accepted, in pixels (checked from the header, before decoding).
    pub max_pixels: u64,
    /// Smallest accepted length of the shorter side, in pixels.
    pub min_side: u32,
    /// Largest accepted ratio of the longer side to the shorter one.
    pub max_aspect_ratio: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 << 20,
            max_pixels: 100_000_000,
            min_side: 8,
            max_aspect_ratio: 25.0,
        }
    }
}

impl Limits {
    /// Checks decoded dimensions, read from the header, against the limits.
    pub fn check_dimensions(&self, width: u32, height: u32) -> Result<(), PreprocessError> {
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_pixels {
            return Err(PreprocessError::TooManyPixels {
                width,
                height,
                limit: self.max_pixels,
            });
        }
        let (short, long) = (width.min(height), width.max(height));
        if short < self.min_side {
            return Err(PreprocessError::TooSmall {
                width,
                height,
                min_side: self.min_side,
            });
        }
        if f64::from(long) / f64::from(short) > self.max_aspect_ratio {
            return Err(PreprocessError::AspectRatio {
                width,
                height,
                max: self.max_aspect_ratio,
            });
        }
        Ok(())
    }
}

/// Why an image cannot be embedded. These are permanent: retrying the same bytes cannot succeed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PreprocessError {
    #[error("the image is empty (0 bytes)")]
    Empty,
    #[error("the image is {size} bytes, over the limit of {limit} bytes (--max-image-bytes)")]
    TooManyBytes { size: u64, limit: u64 },
    #[error(
        "not a supported image: the bytes are not BMP, GIF, JPEG, PNG, TIFF, WebP or PCX (declared {declared}; they start with {magic})"
    )]
    NotAnImage { declared: String, magic: String },
    #[error("the image is {width}x{height} = {:.1} megapixels, over the pixel limit of {:.1} megapixels (--max-image-pixels)", *width as f64 * *height as f64 / 1e6, *limit as f64 / 1e6)]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error(
        "the image is {width}x{height}: too small, the shorter side must be at least {min_side} px (--min-image-side)"
    )]
    TooSmall {
        width: u32,
        height: u32,
        min_side: u32,
    },
    #[error("the image is {width}x{height}: its aspect ratio is over {max}:1 (--max-aspect-ratio)")]
    AspectRatio { width: u32, height: u32, max: f64 },
    #[error("truncated or corrupt {format}: {detail}")]
    Corrupt { format: ImageFormat, detail: String },
    #[error("unsupported {format} variant: {detail}")]
    Unsupported { format: ImageFormat, detail: String },
    #[error("cannot resize the image: {0}")]
    Resize(String),
}

/// A declared MIME type that disagrees with the bytes (the bytes win; the caller logs it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMismatch {
    pub declared: String,
    pub actual: ImageFormat,
}

/// One image, resized and cropped, ready to be normalised into a batch.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// The format detected from the bytes.
    pub format: ImageFormat,
    /// Source dimensions.
    pub width: u32,
    pub height: u32,
    /// `size` x `size` RGB, interleaved, row-major (kept as bytes: 4x smaller than floats while
    /// it waits for a batch).
    pub rgb: Vec<u8>,
    /// Side of the square.
    pub size: u32,
    /// Set when the declared type named a different format than the bytes.
    pub mismatch: Option<TypeMismatch>,
}

impl PreparedImage {
    /// Writes the normalised `[3, size, size]` tensor (channel-major) into `out`, computed as
    /// torchvision does in float32: `(v / 255 - mean) / std`.
    pub fn write_normalized(&self, out: &mut [f32]) {
        let plane = (self.size * self.size) as usize;
        debug_assert_eq!(out.len(), plane * 3);
        for (i, px) in self.rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (f32::from(px[c]) / 255.0 - MEAN[c]) / STD[c];
            }
        }
    }
}

/// How images are prepared for one model. Clones share the decode-memory budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessor {
    /// Side of the square the model takes (224 for the supported models).
    pub size: u32,
    pub limits: Limits,
    /// Opt-in speed mode: decode large JPEGs at 1/2, 1/4 or 1/8 scale in the DCT domain (as PIL's
    /// `draft` does) when the scaled image still covers `size`. Faster on big photos; no longer
    /// pixel-equal to the reference (see BENCHMARKS.md for its parity).
    pub jpeg_draft: bool,
    /// Pixel memory that decodes may hold at the same time (`--decode-memory`).
    pub memory: DecodeMemory,
}

impl Preprocessor {
    /// Reference-exact preprocessing at `size` with default limits and its own default budget.
    pub fn new(size: u32) -> Self {
        Preprocessor {
            size,
            limits: Limits::default(),
            jpeg_draft: false,
            memory: DecodeMemory::default(),
        }
    }

    /// Detects, decodes, resizes and crops `bytes` to `size` x `size`.
    ///
    /// `declared` is the MIME type the event (or file extension) claims; it is not trusted: the
    /// bytes decide the format, and a disagreement is reported in [`PreparedImage::mismatch`].
    pub fn prepare(
        &self,
        bytes: &[u8],
        declared: Option<&str>,
    ) -> Result<PreparedImage, PreprocessError> {
        let limits = &self.limits;
        if bytes.is_empty() {
            return Err(PreprocessError::Empty);
        }
        if bytes.len() as u64 > limits.max_bytes {
            return Err(PreprocessError::TooManyBytes {
                size: bytes.len() as u64,
                limit: limits.max_bytes,
            });
        }
        let format = ImageFormat::sniff(bytes).ok_or_else(|| PreprocessError::NotAnImage {
            declared: declared.unwrap_or("nothing").to_string(),
            magic: format::describe_magic(bytes),
        })?;
        let mismatch = declared.and_then(|d| match ImageFormat::from_mime(d) {
            Some(f) if f == format => None,
            _ => Some(TypeMismatch {
                declared: d.to_string(),
                actual: format,
            }),
        });
        let budget = decode::Budget {
            limits,
            memory: &self.memory,
        };
        let img = decode::decode(bytes, format, budget, self.size, self.jpeg_draft)?;
        let (width, height) = (img.source_width, img.source_height);
        let rgb = resize::resize_crop(img, self.size).map_err(PreprocessError::Resize)?;
        Ok(PreparedImage {
            format,
            width,
            height,
            rgb,
            size: self.size,
            mismatch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked_in_a_useful_order() {
        let l = Limits::default();
        assert!(l.check_dimensions(4000, 3000).is_ok());
        let e = l.check_dimensions(30000, 30000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the image is 30000x30000 = 900.0 megapixels, over the pixel limit of 100.0 megapixels (--max-image-pixels)"
        );
        assert!(matches!(
            l.check_dimensions(1, 1),
            Err(PreprocessError::TooSmall { .. })
        ));
        assert!(matches!(
            l.check_dimensions(12000, 20),
            Err(PreprocessError::AspectRatio { .. })
        ));
        assert!(l.check_dimensions(2500, 100).is_ok());
    }

    #[test]
    fn empty_and_foreign_bytes_are_named() {
        let l = Limits::default();
        assert_eq!(
            Preprocessor {
                limits: l,
                ..Preprocessor::new(224)
            }
            .prepare(b"", Some("image/png"))
            .unwrap_err(),
            PreprocessError::Empty
        );
        let e = Preprocessor {
            limits: l,
            ..Preprocessor::new(224)
        }
        .prepare(b"%PDF-1.7 not an image", Some("image/jpeg"))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "not a supported image: the bytes are not BMP, GIF, JPEG, PNG, TIFF, WebP or PCX (declared image/jpeg; they start with \"%PDF-1.7\")"
        );
        let small = Limits { max_bytes: 4, ..l };
        assert!(matches!(
            Preprocessor {
                limits: small,
                ..Preprocessor::new(224)
            }
            .prepare(b"12345", None),
            Err(PreprocessError::TooManyBytes { .. })
        ));
    }

    #[test]
    fn concurrent_decodes_stay_within_the_memory_budget() {
        // 1600x1200: the crop window (about 1600x1200 RGB) plus the intermediate take ~6 MB each.
        let (w, h) = (1600usize, 1200usize);
        let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
        let jpeg = jpeg::encode_rgb(&pixels, w, h, 85, turbojpeg::Subsamp::Sub2x2);
        let budget = 14 << 20;
        let pre = Preprocessor {
            memory: DecodeMemory::new(budget),
            ..Preprocessor::new(224)
        };
        std::thread::scope(|s| {
            for _ in 0..6 {
                s.spawn(|| {
                    for _ in 0..4 {
                        pre.prepare(&jpeg, Some("image/jpeg")).unwrap();
                    }
                });
            }
        });
        assert_eq!(pre.memory.in_use(), 0);
        // At most two decodes fitted at once: the budget was both used and respected.
        assert!(pre.memory.peak() <= budget, "peak {}", pre.memory.peak());
        assert!(pre.memory.peak() >= 5 << 20, "peak {}", pre.memory.peak());
    }

    #[test]
    #[allow(clippy::excessive_precision)]
    fn normalisation_matches_torchvision_constants() {
        let img = PreparedImage {
            format: ImageFormat::Png,
            width: 1,
            height: 1,
            rgb: vec![0, 255, 128],
            size: 1,
            mismatch: None,
        };
        let mut out = [0f32; 3];
        img.write_normalized(&mut out);
        assert!((out[0] - (-0.481_454_66 / 0.268_629_54)).abs() < 1e-6);
        assert!((out[1] - ((1.0 - 0.457_827_5) / 0.261_302_58)).abs() < 1e-6);
        assert!((out[2] - ((128.0 / 255.0 - 0.408_210_73) / 0.275_777_1)).abs() < 1e-6);
    }
}
