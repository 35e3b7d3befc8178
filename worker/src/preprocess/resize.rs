//! Resize-then-centre-crop equal to the reference (torchvision `Resize(S, BICUBIC)` on a PIL image,
//! then `CenterCrop(S)`), computed only for the pixels the crop keeps.
//!
//! * Geometry: the shorter side becomes `S`, the longer `int(S * long / short)` (truncated); the
//!   crop offset is `round((len - S) / 2)` with Python's half-to-even rounding.
//! * Bicubic: PIL's antialiased Keys kernel (a = -0.5, support widened by the scale factor) is
//!   `fast_image_resize`'s CatmullRom, which normalises weights and clamps taps to the image the
//!   same way. PIL runs the horizontal pass first and rounds to 8 bits in between; we run the two
//!   passes separately in that order. Each pass resamples only the crop window: a source crop box
//!   of `[left * scale, (left + S) * scale)` gives the same filter centres as resizing the whole
//!   image and cropping after.
//! * Palette images: nearest neighbour with PIL's own coordinate arithmetic.
//! * Alpha: premultiplied before, divided out after, with PIL's integer formulas.
//! * CMYK: resampled in CMYK, then PIL's CMYK -> RGB.

use fast_image_resize as fr;
use fr::images::{Image, ImageRef};
use fr::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use super::decode::{Decoded, Pixels};

/// Where the reference's resize and crop put the output square.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Output side (the model's input size).
    pub size: u32,
    /// Size of the whole resized image the reference computes.
    pub resized_w: u32,
    pub resized_h: u32,
    /// Top-left of the crop inside the resized image.
    pub left: u32,
    pub top: u32,
}

impl Geometry {
    /// The reference's geometry for a `width` x `height` source (both >= 1).
    pub fn new(width: u32, height: u32, size: u32) -> Geometry {
        let (short, long) = if width <= height {
            (width, height)
        } else {
            (height, width)
        };
        // torchvision: int(size * long / short), Python float division then truncation.
        let new_long = (f64::from(size) * f64::from(long) / f64::from(short)) as u32;
        let (resized_w, resized_h) = if width <= height {
            (size, new_long)
        } else {
            (new_long, size)
        };
        // torchvision CenterCrop: int(round((len - size) / 2.0)), round half to even.
        let offset = |len: u32| (f64::from(len - size) / 2.0).round_ties_even() as u32;
        Geometry {
            size,
            resized_w,
            resized_h,
            left: offset(resized_w),
            top: offset(resized_h),
        }
    }
}

/// The part of a `width` x `height` image that resize-then-crop to `size` reads, in the pixels of
/// its decode at `1/denom` scale: every tap of the bicubic kernel (support 2, widened by the scale
/// factor) of every kept output pixel, plus one pixel of margin, clamped to the decoded image.
/// Returns `(x0, y0, x1, y1)`, end exclusive.
pub fn source_window(width: u32, height: u32, size: u32, denom: u32) -> (u32, u32, u32, u32) {
    let g = Geometry::new(width, height, size);
    let (x0, x1) = axis_window(width, g.resized_w, g.left, size, denom);
    let (y0, y1) = axis_window(height, g.resized_h, g.top, size, denom);
    (x0, y0, x1, y1)
}

/// Source pixels per output pixel along one axis, in the pixels of a `1/denom` decode: the
/// reference's scale (`len / resized`) divided by `denom`, so that the filter centres of a reduced
/// decode sit exactly where the reference's do.
fn axis_scale(len: u32, resized: u32, denom: u32) -> f64 {
    f64::from(len) / f64::from(resized) / f64::from(denom.max(1))
}

fn axis_window(len: u32, resized: u32, offset: u32, size: u32, denom: u32) -> (u32, u32) {
    let scale = axis_scale(len, resized, denom);
    let support = 2.0 * scale.max(1.0);
    let first_centre = (f64::from(offset) + 0.5) * scale;
    let last_centre = (f64::from(offset + size) - 0.5) * scale;
    let start = (first_centre - support).floor() - 1.0;
    let end = (last_centre + support).ceil() + 1.0;
    (
        start.max(0.0) as u32,
        (end.max(0.0) as u32).min(len.div_ceil(denom.max(1))),
    )
}

/// Resizes and crops a decoded image to `size` x `size` RGB (interleaved, row-major).
pub fn resize_crop(img: Decoded, size: u32) -> Result<Vec<u8>, String> {
    let g = Geometry::new(img.source_width, img.source_height, size);
    let (full_w, full_h) = img.full_size();
    let src = Source {
        w: img.width,
        h: img.height,
        x0: img.x0,
        y0: img.y0,
        full_w,
        full_h,
        scale_x: axis_scale(img.source_width, g.resized_w, img.denom),
        scale_y: axis_scale(img.source_height, g.resized_h, img.denom),
    };
    let w = &src;
    let (out, source) = match img.pixels {
        Pixels::Rgb(p) => (bicubic(&p, w, PixelType::U8x3, &g)?, p),
        Pixels::Gray(p) => (
            bicubic(&p, w, PixelType::U8, &g)?
                .iter()
                .flat_map(|&v| [v, v, v])
                .collect(),
            p,
        ),
        Pixels::Rgba(mut p) => {
            premultiply(&mut p, 4);
            let out = bicubic(&p, w, PixelType::U8x4, &g)?;
            let rgb = out
                .chunks_exact(4)
                .flat_map(|px| unpremultiplied_rgb([px[0], px[1], px[2]], px[3]))
                .collect();
            (rgb, p)
        }
        Pixels::GrayAlpha(mut p) => {
            premultiply(&mut p, 2);
            let out = bicubic(&p, w, PixelType::U8x2, &g)?;
            (
                out.chunks_exact(2)
                    .flat_map(|px| unpremultiplied_rgb([px[0]; 3], px[1]))
                    .collect(),
                p,
            )
        }
        Pixels::Cmyk(p) => {
            let out = bicubic(&p, w, PixelType::U8x4, &g)?;
            (
                out.chunks_exact(4)
                    .flat_map(|px| cmyk_to_rgb([px[0], px[1], px[2], px[3]]))
                    .collect(),
                p,
            )
        }
        Pixels::Indexed(p) => (nearest(&p, w, &g), p),
    };
    super::decode::recycle(source);
    // The decode memory is free again once the pixels are resized.
    drop(img.permit);
    Ok(out)
}

/// The decoded pixels and where they sit in the whole image.
struct Source {
    w: u32,
    h: u32,
    x0: u32,
    y0: u32,
    full_w: u32,
    full_h: u32,
    /// Decoded pixels per output pixel (see [`axis_scale`]).
    scale_x: f64,
    scale_y: f64,
}

/// Per-thread resizer state: the resizer's buffers and the intermediate (`size` x rows) image are
/// reused from one image to the next instead of being faulted in again each time.
struct Scratch {
    resizer: Resizer,
    mid: Vec<u8>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch { resizer: Resizer::new(), mid: Vec::new() });
}

/// Two single-axis passes, horizontal first, each over the crop window only.
fn bicubic(pixels: &[u8], src: &Source, pt: PixelType, g: &Geometry) -> Result<Vec<u8>, String> {
    SCRATCH.with(|scratch| {
        let Scratch { resizer, mid } = &mut *scratch.borrow_mut();
        let s = g.size;
        let opts = ResizeOptions::new()
            .resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom))
            .use_alpha(false);

        let image = ImageRef::new(src.w, src.h, pixels, pt).map_err(|e| e.to_string())?;
        let (x, span_x) = window(g.left, s, src.scale_x, src.x0, src.w);
        mid.resize(s as usize * src.h as usize * pt.size(), 0);
        let mut mid_image = Image::from_slice_u8(s, src.h, mid, pt).map_err(|e| e.to_string())?;
        resizer
            .resize(
                &image,
                &mut mid_image,
                &opts.crop(x, 0.0, span_x, f64::from(src.h)),
            )
            .map_err(|e| e.to_string())?;

        let (y, span_y) = window(g.top, s, src.scale_y, src.y0, src.h);
        let mut out = Image::new(s, s, pt);
        resizer
            .resize(
                &mid_image,
                &mut out,
                &opts.crop(0.0, y, f64::from(s), span_y),
            )
            .map_err(|e| e.to_string())?;
        Ok(out.into_vec())
    })
}

/// The source interval `[offset * scale, (offset + size) * scale)` in the coordinates of decoded
/// pixels that start at `origin`, kept inside them when floating-point rounding would push it
/// out by an ulp.
fn window(offset: u32, size: u32, scale: f64, origin: u32, len: u32) -> (f64, f64) {
    let start = f64::from(offset) * scale - f64::from(origin);
    let span = (f64::from(size) * scale).min(f64::from(len) - start);
    (start, span)
}

/// PIL's nearest neighbour (`ImagingScaleAffine`): source coordinate accumulated in doubles from
/// `scale / 2` and truncated, then the crop.
fn nearest(rgb: &[u8], src: &Source, g: &Geometry) -> Vec<u8> {
    let local =
        |c: usize, origin: u32, len: u32| c.saturating_sub(origin as usize).min(len as usize - 1);
    let cols = nearest_coords(src.full_w, g.resized_w, g.left, g.size);
    let rows = nearest_coords(src.full_h, g.resized_h, g.top, g.size);
    let mut out = Vec::with_capacity((g.size * g.size * 3) as usize);
    for &y in &rows {
        let row = &rgb[local(y, src.y0, src.h) * src.w as usize * 3..];
        for &x in &cols {
            let x = local(x, src.x0, src.w) * 3;
            out.extend_from_slice(&row[x..x + 3]);
        }
    }
    out
}

fn nearest_coords(src_len: u32, resized_len: u32, offset: u32, size: u32) -> Vec<usize> {
    let scale = f64::from(src_len) / f64::from(resized_len);
    let mut pos = scale * 0.5;
    let mut coords = Vec::with_capacity(size as usize);
    for x in 0..offset + size {
        if x >= offset {
            coords.push((pos as usize).min(src_len as usize - 1));
        }
        pos += scale;
    }
    coords
}

/// PIL's `MULDIV255`: `(a * b + 127) / 255`, rounded as Pillow does.
fn muldiv255(a: u8, b: u8) -> u8 {
    let t = u32::from(a) * u32::from(b) + 128;
    (((t >> 8) + t) >> 8) as u8
}

/// In place, every colour channel times alpha (the last of `channels`): PIL's RGBA -> RGBa.
fn premultiply(p: &mut [u8], channels: usize) {
    for px in p.chunks_exact_mut(channels) {
        let (colour, alpha) = px.split_at_mut(channels - 1);
        colour.iter_mut().for_each(|c| *c = muldiv255(*c, alpha[0]));
    }
}

/// PIL's RGBa -> RGBA (integer division, clipped), keeping only RGB.
fn unpremultiplied_rgb(c: [u8; 3], alpha: u8) -> [u8; 3] {
    if alpha == 0 || alpha == 255 {
        return c;
    }
    c.map(|v| ((255 * u32::from(v)) / u32::from(alpha)).min(255) as u8)
}

/// PIL's CMYK -> RGB: `(255 - K) - (255 - K) * C / 255` per channel.
pub(crate) fn cmyk_to_rgb(p: [u8; 4]) -> [u8; 3] {
    let nk = 255 - p[3];
    [0, 1, 2].map(|i| nk - muldiv255(p[i], nk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_torchvision() {
        // 451x300 (landscape): short 300 -> 224, long int(224*451/300) = 336; left round(56) = 56.
        assert_eq!(
            Geometry::new(451, 300, 224),
            Geometry {
                size: 224,
                resized_w: 336,
                resized_h: 224,
                left: 56,
                top: 0
            }
        );
        // 597x397: long int(224*597/397) = 336 (336.84...), crop offset 56.
        assert_eq!(Geometry::new(597, 397, 224).resized_w, 336);
        // Portrait 333x601: long int(224*601/333) = 404, top round(90) = 90.
        let g = Geometry::new(333, 601, 224);
        assert_eq!((g.resized_w, g.resized_h, g.left, g.top), (224, 404, 0, 90));
        // Half-way offsets round to even: (229 - 224) / 2 = 2.5 -> 2, (231 - 224) / 2 = 3.5 -> 4.
        assert_eq!(Geometry::new(229, 224, 224).left, 2);
        assert_eq!(Geometry::new(231, 224, 224).left, 4);
        // Upscaling a small image.
        assert_eq!(
            Geometry::new(150, 100, 224),
            Geometry {
                size: 224,
                resized_w: 336,
                resized_h: 224,
                left: 56,
                top: 0
            }
        );
    }

    #[test]
    fn nearest_follows_pil_arithmetic() {
        // Downscale 2:1: centres at 1, 3, 5, ... (0.5 * 2 = 1.0, then += 2).
        assert_eq!(nearest_coords(8, 4, 0, 4), vec![1, 3, 5, 7]);
        // Upscale 1:2 keeps each source pixel twice.
        assert_eq!(nearest_coords(2, 4, 0, 4), vec![0, 0, 1, 1]);
        // Crop offset skips the first coordinates.
        assert_eq!(nearest_coords(8, 4, 1, 2), vec![3, 5]);
    }

    #[test]
    fn alpha_and_cmyk_use_pils_integer_formulas() {
        assert_eq!(muldiv255(255, 255), 255);
        assert_eq!(muldiv255(200, 128), 100); // 200 * 128 / 255 = 100.39
        assert_eq!(muldiv255(1, 127), 0);
        assert_eq!(unpremultiplied_rgb([100, 0, 50], 128), [199, 0, 99]);
        assert_eq!(unpremultiplied_rgb([7, 8, 9], 0), [7, 8, 9]);
        assert_eq!(cmyk_to_rgb([0, 0, 0, 0]), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb([255, 0, 0, 0]), [0, 255, 255]);
        assert_eq!(cmyk_to_rgb([0, 0, 0, 255]), [0, 0, 0]);
    }

    #[test]
    fn output_is_size_squared_rgb_for_every_mode() {
        let (w, h) = (300u32, 200u32);
        let n = (w * h) as usize;
        for pixels in [
            Pixels::Gray(vec![7; n]),
            Pixels::GrayAlpha(vec![7; n * 2]),
            Pixels::Rgb(vec![7; n * 3]),
            Pixels::Rgba(vec![7; n * 4]),
            Pixels::Cmyk(vec![7; n * 4]),
            Pixels::Indexed(vec![7; n * 3]),
        ] {
            let out = resize_crop(Decoded::whole(w, h, pixels), 224).unwrap();
            assert_eq!(out.len(), 224 * 224 * 3);
        }
    }

    #[test]
    fn a_flat_image_stays_flat() {
        // Bicubic weights sum to one: a constant image must come out unchanged.
        let out = resize_crop(
            Decoded::whole(640, 480, Pixels::Rgb(vec![93; 640 * 480 * 3])),
            224,
        )
        .unwrap();
        assert!(out.iter().all(|&v| v == 93));
    }
}
