//! Decoding into the pixel mode the reference (PIL) opens each file in, because the mode decides
//! how the reference resamples: palette images with nearest neighbour, images with alpha
//! premultiplied, CMYK in CMYK. Dimensions are read from the header and checked against the
//! limits before any pixel buffer is allocated.

use std::cell::RefCell;
use std::io::Cursor;

use image::{ColorType, ImageDecoder};

use super::format::ImageFormat;
use super::memory::{DecodeMemory, Permit};
use super::{Limits, PreprocessError};

/// Decoded pixels, in the mode PIL would hold them.
#[derive(Debug)]
pub enum Pixels {
    /// PIL `L`: 8-bit grey, resampled bicubic.
    Gray(Vec<u8>),
    /// PIL `LA`: grey + alpha, resampled premultiplied.
    GrayAlpha(Vec<u8>),
    /// PIL `RGB`.
    Rgb(Vec<u8>),
    /// PIL `RGBA`: resampled premultiplied, alpha then dropped.
    Rgba(Vec<u8>),
    /// PIL `CMYK` (true, not inverted, ink values): resampled in CMYK, converted after.
    Cmyk(Vec<u8>),
    /// PIL `P` or `1`: palette colours expanded to RGB; resampled with nearest neighbour, as PIL
    /// forces for palette images. Transparency is ignored, as PIL's `convert("RGB")` does.
    Indexed(Vec<u8>),
}

/// A decoded image, or the part of it the centre crop needs.
#[derive(Debug)]
pub struct Decoded {
    /// Size of `pixels`.
    pub width: u32,
    pub height: u32,
    pub pixels: Pixels,
    /// Where `pixels` sit in the whole (possibly DCT-scaled) image.
    pub x0: u32,
    pub y0: u32,
    /// The image's own size, on which the resize computes the reference's geometry.
    pub source_width: u32,
    pub source_height: u32,
    /// DCT scale the JPEG was decoded at: `1/denom` (1 = full resolution). A decoded pixel `i`
    /// covers source pixels `[i * denom, (i + 1) * denom)`.
    pub denom: u32,
    /// The decode-memory this image holds until it is resized.
    pub permit: Option<Permit>,
}

impl Decoded {
    /// A decode of the whole image.
    pub fn whole(width: u32, height: u32, pixels: Pixels) -> Self {
        Decoded {
            width,
            height,
            pixels,
            x0: 0,
            y0: 0,
            source_width: width,
            source_height: height,
            denom: 1,
            permit: None,
        }
    }

    /// Size of the whole image at the decoded scale (libjpeg rounds a reduced side up).
    pub fn full_size(&self) -> (u32, u32) {
        (
            self.source_width.div_ceil(self.denom),
            self.source_height.div_ceil(self.denom),
        )
    }

    fn holding(self, permit: Permit) -> Self {
        Decoded {
            permit: Some(permit),
            ..self
        }
    }
}

/// Decode context: the per-image limits and the shared memory budget.
#[derive(Clone, Copy)]
pub struct Budget<'a> {
    pub limits: &'a Limits,
    pub memory: &'a DecodeMemory,
}

impl Budget<'_> {
    /// Checks a `width` x `height` image against the limits, then waits for about
    /// `bytes_per_pixel` bytes per pixel of decode memory.
    fn admit(
        &self,
        width: u32,
        height: u32,
        bytes_per_pixel: u64,
    ) -> Result<Permit, PreprocessError> {
        self.limits.check_dimensions(width, height)?;
        Ok(self
            .memory
            .acquire(u64::from(width) * u64::from(height) * bytes_per_pixel))
    }
}

/// Largest pixel buffer a decode thread keeps for reuse (a 12 MP RGB photo needs 36 MB).
const RETAIN_BYTES: usize = 64 << 20;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `len` bytes, reusing this thread's previous one: faulting in a fresh 36 MB buffer
/// for every photo costs more than resizing it. Contents are stale bytes, not zeros; every
/// decoder below overwrites the whole buffer or fails.
fn buffer(len: usize) -> Vec<u8> {
    let mut v = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if v.len() >= len {
        v.truncate(len);
    } else {
        v.resize(len, 0);
    }
    v
}

/// Hands a pixel buffer back for the next image on this thread.
pub fn recycle(v: Vec<u8>) {
    if v.capacity() <= RETAIN_BYTES {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            if v.capacity() > s.capacity() {
                *s = v;
            }
        });
    }
}

/// Decodes `bytes`, already identified as `format`, for a `size` x `size` centre crop. JPEGs are
/// decoded only where the crop needs pixels; with `draft`, at a reduced DCT scale that still
/// covers `size`.
pub fn decode(
    bytes: &[u8],
    format: ImageFormat,
    budget: Budget<'_>,
    size: u32,
    draft: bool,
) -> Result<Decoded, PreprocessError> {
    // Decoders are third-party code fed hostile input: a panic in one becomes an error for this
    // image, never a crash of the worker.
    std::panic::catch_unwind(|| match format {
        ImageFormat::Jpeg => decode_jpeg(bytes, budget, size, draft, true),
        ImageFormat::Png => decode_png(bytes, budget),
        ImageFormat::Gif => decode_gif(bytes, budget),
        ImageFormat::Bmp => decode_bmp(bytes, budget),
        ImageFormat::Pcx => decode_pcx(bytes, budget),
        ImageFormat::Tiff => {
            let dec = image::codecs::tiff::TiffDecoder::new(Cursor::new(bytes))
                .map_err(|e| image_error(format, e))?;
            decode_with_image(dec, format, budget, false)
        }
        ImageFormat::Webp => {
            let dec = image::codecs::webp::WebPDecoder::new(Cursor::new(bytes))
                .map_err(|e| image_error(format, e))?;
            decode_with_image(dec, format, budget, false)
        }
    })
    .unwrap_or_else(|_| {
        Err(PreprocessError::Corrupt {
            format,
            detail: "the decoder failed on malformed data".into(),
        })
    })
}

fn corrupt(format: ImageFormat, e: impl std::fmt::Display) -> PreprocessError {
    PreprocessError::Corrupt {
        format,
        detail: e.to_string(),
    }
}

/// `image` errors: hitting its allocation limit is a size problem, not corruption.
fn image_error(format: ImageFormat, e: image::ImageError) -> PreprocessError {
    match e {
        image::ImageError::Limits(l) => PreprocessError::Unsupported {
            format,
            detail: format!("decoder memory limit: {l}"),
        },
        image::ImageError::Unsupported(u) => PreprocessError::Unsupported {
            format,
            detail: u.to_string(),
        },
        other => corrupt(format, other),
    }
}

/// Limits handed to the `image` decoders, so their internal allocations are bounded too.
fn image_limits(limits: &Limits) -> image::Limits {
    let mut l = image::Limits::default();
    // 8 bytes per pixel covers 16-bit RGBA, the widest layout we accept.
    l.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    l
}

/// Shared path for decoders behind `image::ImageDecoder`. `drop_alpha` treats an alpha channel
/// the decoder synthesised (PNG `tRNS` on grey/RGB) as absent, as PIL does.
fn decode_with_image<D: ImageDecoder>(
    mut dec: D,
    format: ImageFormat,
    budget: Budget<'_>,
    drop_alpha: bool,
) -> Result<Decoded, PreprocessError> {
    let (width, height) = dec.dimensions();
    // The decoder's output plus one converted copy (16-bit samples, palette expansion).
    let bpp = u64::from(dec.color_type().bytes_per_pixel());
    let permit = budget.admit(width, height, 2 * bpp)?;
    dec.set_limits(image_limits(budget.limits))
        .map_err(|e| image_error(format, e))?;
    let color = dec.color_type();
    let total = usize::try_from(dec.total_bytes()).map_err(|_| PreprocessError::Unsupported {
        format,
        detail: "image does not fit in memory".into(),
    })?;
    let mut buf = buffer(total);
    dec.read_image(&mut buf)
        .map_err(|e| image_error(format, e))?;
    let pixels = match color {
        ColorType::L8 => Pixels::Gray(buf),
        ColorType::La8 if drop_alpha => Pixels::Gray(take_channels(&buf, 2, 1)),
        ColorType::La8 => Pixels::GrayAlpha(buf),
        ColorType::Rgb8 => Pixels::Rgb(buf),
        ColorType::Rgba8 if drop_alpha => Pixels::Rgb(take_channels(&buf, 4, 3)),
        ColorType::Rgba8 => Pixels::Rgba(buf),
        // 16-bit samples keep their high byte, as PIL does when it opens 16-bit RGB(A) PNGs.
        ColorType::L16 => Pixels::Gray(high_bytes(&buf)),
        ColorType::La16 if drop_alpha => Pixels::Gray(take_channels(&high_bytes(&buf), 2, 1)),
        ColorType::La16 => Pixels::GrayAlpha(high_bytes(&buf)),
        ColorType::Rgb16 => Pixels::Rgb(high_bytes(&buf)),
        ColorType::Rgba16 if drop_alpha => Pixels::Rgb(take_channels(&high_bytes(&buf), 4, 3)),
        ColorType::Rgba16 => Pixels::Rgba(high_bytes(&buf)),
        other => {
            return Err(PreprocessError::Unsupported {
                format,
                detail: format!("pixel layout {other:?}"),
            });
        }
    };
    Ok(Decoded::whole(width, height, pixels).holding(permit))
}

/// The high byte of each native-endian 16-bit sample.
fn high_bytes(buf: &[u8]) -> Vec<u8> {
    buf.chunks_exact(2)
        .map(|s| (u16::from_ne_bytes([s[0], s[1]]) >> 8) as u8)
        .collect()
}

/// The first `keep` of every `stride` bytes.
fn take_channels(buf: &[u8], stride: usize, keep: usize) -> Vec<u8> {
    buf.chunks_exact(stride)
        .flat_map(|p| p[..keep].iter().copied())
        .collect()
}

// ----------------------------------------------------------------------------------------- JPEG

/// `crop`: decode only the window the centre crop reads (always on; off only in the test that
/// proves it changes nothing).
fn decode_jpeg(
    bytes: &[u8],
    budget: Budget<'_>,
    size: u32,
    draft: bool,
    crop: bool,
) -> Result<Decoded, PreprocessError> {
    use super::jpeg::{self, Layout};

    let f = ImageFormat::Jpeg;
    let mut dec = jpeg::Decompressor::new().map_err(|e| corrupt(f, e))?;
    let header = dec.header(bytes).map_err(|e| corrupt(f, e))?;
    budget
        .limits
        .check_dimensions(header.width as u32, header.height as u32)?;
    // PIL opens grey JPEGs as L, CMYK and YCCK ones as CMYK, everything else as RGB; libjpeg-turbo
    // with its defaults (ISLOW IDCT, fancy upsampling) is the decoder PIL uses.
    let layout = match header.colorspace {
        jpeg::CS_GRAY => Layout::Gray,
        jpeg::CS_CMYK | jpeg::CS_YCCK => Layout::Cmyk,
        _ => Layout::Rgb,
    };
    // Draft: the largest 1/d (d = 8, 4, 2) that keeps the shorter side at least twice `size`, so
    // the bicubic resize still antialiases (PIL's draft stops at `size`, which costs parity).
    let short = header.width.min(header.height);
    let denom = if draft {
        [8usize, 4, 2]
            .into_iter()
            .find(|d| short.div_ceil(*d) >= 2 * size as usize)
            .unwrap_or(1)
    } else {
        1
    };
    if denom > 1 {
        dec.set_scale(denom).map_err(|e| corrupt(f, e))?;
    }
    let (full_w, full_h) = (header.width.div_ceil(denom), header.height.div_ceil(denom));
    // Decode only the window the centre crop reads (its left edge on an iMCU boundary).
    let window = super::resize::source_window(
        header.width as u32,
        header.height as u32,
        size,
        denom as u32,
    );
    let (mut x0, y0, x1, y1) = (
        window.0 as usize,
        window.1 as usize,
        window.2 as usize,
        window.3 as usize,
    );
    let cropped = match jpeg::Decompressor::imcu_width(header.subsamp, denom) {
        Some(mcu) if crop && (x0, y0, x1, y1) != (0, 0, full_w, full_h) => {
            x0 -= x0 % mcu;
            dec.set_crop(x0, y0, x1 - x0, y1 - y0).is_ok()
        }
        _ => false,
    };
    let (x0, y0, w, h) = if cropped {
        (x0, y0, x1 - x0, y1 - y0)
    } else {
        (0, 0, full_w, full_h)
    };
    // The decoded window, and the resize's intermediate (`size` columns by the window's rows).
    let ch = layout.channels() as u64;
    let permit = budget
        .memory
        .acquire((w as u64 * h as u64 + u64::from(size) * h as u64) * ch);
    let mut buf = buffer(w * h * layout.channels());
    // Warnings (truncated or corrupt data) are errors: the JPEG is refused, as PIL refuses it.
    dec.decompress(bytes, &mut buf, w, layout)
        .map_err(|e| corrupt(f, e))?;
    let pixels = match layout {
        Layout::Gray => Pixels::Gray(buf),
        Layout::Cmyk => {
            // Adobe CMYK JPEGs store inverted ink values; PIL undoes that (rawmode CMYK;I).
            if has_adobe_marker(bytes) {
                buf.iter_mut().for_each(|v| *v = 255 - *v);
            }
            Pixels::Cmyk(buf)
        }
        Layout::Rgb => Pixels::Rgb(buf),
    };
    Ok(Decoded {
        width: w as u32,
        height: h as u32,
        pixels,
        x0: x0 as u32,
        y0: y0 as u32,
        source_width: header.width as u32,
        source_height: header.height as u32,
        denom: denom as u32,
        permit: Some(permit),
    })
}

/// Whether the JPEG carries an Adobe APP14 segment before its first scan.
fn has_adobe_marker(bytes: &[u8]) -> bool {
    let mut i = 2;
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        if marker == 0xDA {
            return false;
        }
        let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        if marker == 0xEE && bytes.get(i + 4..i + 9) == Some(b"Adobe") {
            return true;
        }
        i += 2 + len;
    }
    false
}

// ------------------------------------------------------------------------------------------ PNG

fn decode_png(bytes: &[u8], budget: Budget<'_>) -> Result<Decoded, PreprocessError> {
    let f = ImageFormat::Png;
    // IHDR is always the first chunk: bit depth at 24, colour type at 25.
    let (bit_depth, color_type) = match bytes.get(12..26) {
        Some(h) if &h[..4] == b"IHDR" => (h[12], h[13]),
        _ => return Err(corrupt(f, "missing IHDR header")),
    };
    let dec =
        image::codecs::png::PngDecoder::new(Cursor::new(bytes)).map_err(|e| image_error(f, e))?;
    // Colour types 0 (grey) and 2 (RGB) have no alpha channel: an alpha the decoder derives from a
    // tRNS chunk is not one PIL would see.
    let decoded = decode_with_image(dec, f, budget, matches!(color_type, 0 | 2))?;
    // Palette (type 3) and 1-bit grey are PIL modes P and 1: nearest-neighbour resampling.
    let paletted = color_type == 3 || (color_type == 0 && bit_depth == 1);
    Ok(if paletted {
        into_indexed(decoded)
    } else {
        decoded
    })
}

/// Every pixel as RGB, alpha dropped (what PIL's `convert("RGB")` keeps of a palette image).
fn expand_rgb(pixels: Pixels) -> Vec<u8> {
    match pixels {
        Pixels::Gray(g) => g.iter().flat_map(|&v| [v, v, v]).collect(),
        Pixels::GrayAlpha(g) => g.chunks_exact(2).flat_map(|p| [p[0], p[0], p[0]]).collect(),
        Pixels::Rgb(rgb) | Pixels::Indexed(rgb) => rgb,
        Pixels::Rgba(rgba) => take_channels(&rgba, 4, 3),
        Pixels::Cmyk(c) => c
            .chunks_exact(4)
            .flat_map(|p| super::resize::cmyk_to_rgb([p[0], p[1], p[2], p[3]]))
            .collect(),
    }
}

/// Re-labels an image the decoder expanded from a palette as indexed.
fn into_indexed(d: Decoded) -> Decoded {
    Decoded {
        pixels: Pixels::Indexed(expand_rgb(d.pixels)),
        ..d
    }
}

// ------------------------------------------------------------------------------------------ GIF

/// First frame only, composed the way PIL composes frame 0: a canvas of the logical screen size
/// filled with the transparent index (else 0), the frame pasted at its offset, colours from the
/// frame's palette (else the global one).
fn decode_gif(bytes: &[u8], budget: Budget<'_>) -> Result<Decoded, PreprocessError> {
    let limits = budget.limits;
    let f = ImageFormat::Gif;
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::Indexed);
    opts.set_memory_limit(gif::MemoryLimit::Bytes(
        std::num::NonZeroU64::new(limits.max_pixels.max(1)).expect("max(1) is non-zero"),
    ));
    let mut dec = opts
        .read_info(Cursor::new(bytes))
        .map_err(|e| corrupt(f, e))?;
    let (width, height) = (u32::from(dec.width()), u32::from(dec.height()));
    // The frame, the canvas and the RGB expansion.
    let permit = budget.admit(width, height, 5)?;
    let global = dec.global_palette().map(<[u8]>::to_vec);
    let frame = dec
        .read_next_frame()
        .map_err(|e| corrupt(f, e))?
        .ok_or_else(|| corrupt(f, "no image frame"))?;
    let fill = frame.transparent.unwrap_or(0);
    let (w, h) = (width as usize, height as usize);
    let mut canvas = vec![fill; w * h];
    let (fl, ft, fw, fh) = (
        usize::from(frame.left),
        usize::from(frame.top),
        usize::from(frame.width),
        usize::from(frame.height),
    );
    for y in 0..fh.min(h.saturating_sub(ft)) {
        let src = &frame.buffer[y * fw..][..fw];
        let cols = fw.min(w.saturating_sub(fl));
        canvas[(ft + y) * w + fl..][..cols].copy_from_slice(&src[..cols]);
    }
    let palette = frame.palette.clone().or(global);
    let rgb: Vec<u8> = match palette {
        Some(p) => canvas
            .iter()
            .flat_map(|&i| {
                let o = usize::from(i) * 3;
                p.get(o..o + 3).map_or([0, 0, 0], |c| [c[0], c[1], c[2]])
            })
            .collect(),
        // No palette at all: PIL shows the indices as grey levels (mode L).
        None => {
            return Ok(Decoded::whole(width, height, Pixels::Gray(canvas)).holding(permit));
        }
    };
    Ok(Decoded::whole(width, height, Pixels::Indexed(rgb)).holding(permit))
}

// ------------------------------------------------------------------------------------------ BMP

fn decode_bmp(bytes: &[u8], budget: Budget<'_>) -> Result<Decoded, PreprocessError> {
    let f = ImageFormat::Bmp;
    let palette = bmp_palette(bytes);
    let dec =
        image::codecs::bmp::BmpDecoder::new(Cursor::new(bytes)).map_err(|e| image_error(f, e))?;
    let decoded = decode_with_image(dec, f, budget, false)?;
    Ok(match palette {
        // PIL opens a BMP whose palette is the identity grey ramp as L (bicubic), others as P/1.
        Some(p) if p.len() != 2 && p.iter().enumerate().all(|(i, c)| *c == [i as u8; 3]) => {
            Decoded {
                pixels: Pixels::Gray(take_channels(&expand_rgb(decoded.pixels), 3, 1)),
                ..decoded
            }
        }
        Some(_) => into_indexed(decoded),
        None => decoded,
    })
}

/// The colour table of a palette BMP (bits per pixel <= 8), or `None`.
fn bmp_palette(b: &[u8]) -> Option<Vec<[u8; 3]>> {
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let header = u32_at(14)? as usize;
    let (bpp, used, entry) = if header == 12 {
        (u16_at(24)?, 0, 3) // OS/2 1.x: 3-byte entries
    } else {
        (u16_at(28)?, u32_at(46)? as usize, 4)
    };
    if bpp > 8 {
        return None;
    }
    let colors = if used == 0 {
        1usize << bpp
    } else {
        used.min(1 << bpp)
    };
    let start = 14 + header;
    let table = b.get(start..start + colors * entry)?;
    Some(
        table
            .chunks_exact(entry)
            .map(|c| [c[2], c[1], c[0]])
            .collect(),
    )
}

// ------------------------------------------------------------------------------------------ PCX

fn decode_pcx(bytes: &[u8], budget: Budget<'_>) -> Result<Decoded, PreprocessError> {
    let f = ImageFormat::Pcx;
    let mut r = pcx::Reader::from_mem(bytes).map_err(|e| corrupt(f, e))?;
    let (width, height) = (u32::from(r.width()), u32::from(r.height()));
    // Indices plus their RGB expansion, or RGB.
    let permit = budget.admit(width, height, 4)?;
    let (w, h) = (width as usize, height as usize);
    if r.is_paletted() {
        let colors = usize::from(r.palette_length().unwrap_or(0));
        let mut idx = vec![0u8; w * h];
        for row in idx.chunks_exact_mut(w) {
            r.next_row_paletted(row).map_err(|e| corrupt(f, e))?;
        }
        let mut pal = vec![0u8; 256 * 3];
        let n = r.read_palette(&mut pal).map_err(|e| corrupt(f, e))?;
        // PIL opens an 8-bit PCX with the identity grey palette as L (bicubic), others as P/1.
        if colors == 256
            && n == 256
            && pal
                .chunks_exact(3)
                .enumerate()
                .all(|(i, c)| c == [i as u8; 3])
        {
            return Ok(Decoded::whole(width, height, Pixels::Gray(idx)).holding(permit));
        }
        let rgb = idx
            .iter()
            .flat_map(|&i| pal[usize::from(i) * 3..][..3].to_vec())
            .collect();
        Ok(Decoded::whole(width, height, Pixels::Indexed(rgb)).holding(permit))
    } else {
        let mut rgb = buffer(w * h * 3);
        for row in rgb.chunks_exact_mut(w * 3) {
            r.next_row_rgb(row).map_err(|e| corrupt(f, e))?;
        }
        Ok(Decoded::whole(width, height, Pixels::Rgb(rgb)).holding(permit))
    }
}

#[cfg(test)]
mod tests {
    use super::super::jpeg::encode_rgb;
    use super::*;
    use std::sync::LazyLock;

    /// Default limits and a default budget, shared by the tests.
    fn default_budget() -> Budget<'static> {
        static LIMITS: LazyLock<Limits> = LazyLock::new(Limits::default);
        static MEMORY: LazyLock<DecodeMemory> = LazyLock::new(DecodeMemory::default);
        Budget {
            limits: &LIMITS,
            memory: &MEMORY,
        }
    }

    #[test]
    fn adobe_marker_is_found_before_the_scan_only() {
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0, 0];
        jpeg.extend_from_slice(&[0xFF, 0xEE, 0, 14]);
        jpeg.extend_from_slice(b"Adobe\0\0\0\0\0\0\x02");
        assert!(has_adobe_marker(&jpeg));
        let no = [
            0xFF, 0xD8, 0xFF, 0xDA, 0, 4, 0, 0, 0xFF, 0xEE, 0, 7, b'A', b'd', b'o', b'b', b'e',
        ];
        assert!(!has_adobe_marker(&no));
        assert!(!has_adobe_marker(&[0xFF, 0xD8, 0xFF]));
    }

    /// A JPEG with detail everywhere (gradients plus a deterministic pattern).
    fn test_jpeg(w: usize, h: usize, subsamp: turbojpeg::Subsamp) -> Vec<u8> {
        let pixels: Vec<u8> = (0..w * h * 3)
            .map(|i| {
                let (p, c) = (i / 3, i % 3);
                let (x, y) = (p % w, p / w);
                ((x * (c + 1) + y * 3 + (x * y) % 97 * 2) % 256) as u8
            })
            .collect();
        encode_rgb(&pixels, w, h, 90, subsamp)
    }

    #[test]
    fn decoding_only_the_crop_window_changes_nothing() {
        use super::super::resize::resize_crop;
        let budget = default_budget();
        for (w, h, ss) in [
            (1000, 700, turbojpeg::Subsamp::Sub2x2),
            (700, 1000, turbojpeg::Subsamp::Sub2x2),
            (1237, 611, turbojpeg::Subsamp::None),
            (300, 2000, turbojpeg::Subsamp::Sub2x1),
            (230, 225, turbojpeg::Subsamp::Sub2x2),
        ] {
            let jpeg = test_jpeg(w, h, ss);
            let cropped = decode_jpeg(&jpeg, budget, 224, false, true).unwrap();
            assert!(
                cropped.width < cropped.full_size().0
                    || cropped.height < cropped.full_size().1
                    || w < 400,
                "{w}x{h} was not cropped"
            );
            let whole = decode_jpeg(&jpeg, budget, 224, false, false).unwrap();
            assert_eq!(
                resize_crop(cropped, 224).unwrap(),
                resize_crop(whole, 224).unwrap(),
                "{w}x{h}"
            );
        }
    }

    #[test]
    fn draft_keeps_twice_the_input_size() {
        let jpeg = test_jpeg(2000, 1000, turbojpeg::Subsamp::Sub2x2);
        let budget = default_budget();
        let d = decode_jpeg(&jpeg, budget, 224, true, false).unwrap();
        // 1/2 leaves a 500 px short side (>= 448); 1/4 would leave 250.
        assert_eq!(d.full_size(), (1000, 500));
        let exact = decode_jpeg(&jpeg, budget, 224, false, false).unwrap();
        assert_eq!(exact.full_size().0, 2000);
    }

    #[test]
    fn draft_filters_at_the_references_positions() {
        use super::super::resize::resize_crop;
        // Odd sides, so 1/2 and 1/4 scale round up (1791 -> 896 -> 448): the resize must still
        // centre its filters where the reference's full-resolution ones are. A smooth wave survives
        // DCT-domain scaling almost unchanged, so any misalignment shows as a difference.
        let (w, h) = (1791usize, 1401usize);
        let pixels: Vec<u8> = (0..w * h)
            .flat_map(|p| {
                let (x, y) = ((p % w) as f64, (p / w) as f64);
                let v = 128.0
                    + 100.0
                        * (x * std::f64::consts::TAU / 40.0).sin()
                        * (y * std::f64::consts::TAU / 52.0).cos();
                [v as u8, (255.0 - v) as u8, 128]
            })
            .collect();
        let jpeg = encode_rgb(&pixels, w, h, 95, turbojpeg::Subsamp::None);
        let budget = default_budget();
        let draft = decode_jpeg(&jpeg, budget, 224, true, true).unwrap();
        assert_eq!(
            (draft.denom, draft.source_width, draft.full_size().0),
            (2, 1791, 896)
        );
        let exact = decode_jpeg(&jpeg, budget, 224, false, true).unwrap();
        let (a, b) = (
            resize_crop(draft, 224).unwrap(),
            resize_crop(exact, 224).unwrap(),
        );
        let mad = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| f64::from(x.abs_diff(y)))
            .sum::<f64>()
            / a.len() as f64;
        assert!(mad < 0.5, "draft differs from exact by {mad:.2} levels");
    }

    #[test]
    fn sixteen_bit_samples_keep_the_high_byte() {
        let samples: Vec<u8> = [0xABCDu16, 0x00FF, 0xFF00]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        assert_eq!(high_bytes(&samples), vec![0xAB, 0x00, 0xFF]);
    }
}
