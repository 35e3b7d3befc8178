//! A small safe wrapper over libjpeg-turbo's TurboJPEG 3 API (the `turbojpeg` crate's raw
//! bindings), for the two things its high-level API lacks: decoding only a cropping region, and
//! reading the subsampling needed to align that region. All unsafe code of the JPEG path is here.

use std::ffi::CStr;

use turbojpeg::raw;

/// Header facts of a JPEG.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub width: usize,
    pub height: usize,
    /// TurboJPEG colour space (`TJCS_*`).
    pub colorspace: i32,
    /// TurboJPEG subsampling (`TJSAMP_*`), negative when unusual.
    pub subsamp: i32,
}

/// Output pixel layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Gray,
    Rgb,
    Cmyk,
}

impl Layout {
    pub fn channels(self) -> usize {
        match self {
            Layout::Gray => 1,
            Layout::Rgb => 3,
            Layout::Cmyk => 4,
        }
    }

    fn tjpf(self) -> i32 {
        match self {
            Layout::Gray => raw::TJPF_TJPF_GRAY,
            Layout::Rgb => raw::TJPF_TJPF_RGB,
            Layout::Cmyk => raw::TJPF_TJPF_CMYK,
        }
    }
}

/// Colour spaces, as TurboJPEG numbers them.
pub const CS_GRAY: i32 = raw::TJCS_TJCS_GRAY as i32;
pub const CS_CMYK: i32 = raw::TJCS_TJCS_CMYK as i32;
pub const CS_YCCK: i32 = raw::TJCS_TJCS_YCCK as i32;

/// A TurboJPEG decompressor handle.
pub struct Decompressor(raw::tjhandle);

// SAFETY: a TurboJPEG handle has no thread affinity; it is used by one thread at a time (&mut).
unsafe impl Send for Decompressor {}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { raw::tj3Destroy(self.0) }
    }
}

impl Decompressor {
    pub fn new() -> Result<Self, String> {
        // SAFETY: plain constructor; a null handle is checked.
        let h = unsafe { raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as i32) };
        if h.is_null() {
            return Err("cannot initialise libjpeg-turbo".into());
        }
        let d = Decompressor(h);
        // Warnings (premature end of data, corrupt entropy data) are errors: a damaged JPEG is
        // refused, as PIL refuses it, instead of being embedded with grey bands.
        d.set(raw::TJPARAM_TJPARAM_STOPONWARNING, 1)?;
        Ok(d)
    }

    fn set(&self, param: raw::TJPARAM, value: i32) -> Result<(), String> {
        // SAFETY: valid handle, documented parameter.
        match unsafe { raw::tj3Set(self.0, param as i32, value) } {
            0 => Ok(()),
            _ => Err(self.error()),
        }
    }

    fn get(&self, param: raw::TJPARAM) -> i32 {
        // SAFETY: valid handle, documented parameter.
        unsafe { raw::tj3Get(self.0, param as i32) }
    }

    fn error(&self) -> String {
        // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the handle.
        unsafe { CStr::from_ptr(raw::tj3GetErrorStr(self.0)) }
            .to_string_lossy()
            .into_owned()
    }

    /// Reads the header of `jpeg`.
    pub fn header(&mut self, jpeg: &[u8]) -> Result<Header, String> {
        // SAFETY: pointer and length describe `jpeg`, which outlives the call.
        let r =
            unsafe { raw::tj3DecompressHeader(self.0, jpeg.as_ptr(), jpeg.len() as raw::size_t) };
        if r != 0 {
            return Err(self.error());
        }
        Ok(Header {
            width: self.get(raw::TJPARAM_TJPARAM_JPEGWIDTH).max(0) as usize,
            height: self.get(raw::TJPARAM_TJPARAM_JPEGHEIGHT).max(0) as usize,
            colorspace: self.get(raw::TJPARAM_TJPARAM_COLORSPACE),
            subsamp: self.get(raw::TJPARAM_TJPARAM_SUBSAMP),
        })
    }

    /// Decodes at `1/denom` scale (1, 2, 4 or 8).
    pub fn set_scale(&mut self, denom: usize) -> Result<(), String> {
        let f = raw::tjscalingfactor {
            num: 1,
            denom: denom as i32,
        };
        // SAFETY: valid handle; TurboJPEG validates the factor.
        match unsafe { raw::tj3SetScalingFactor(self.0, f) } {
            0 => Ok(()),
            _ => Err(self.error()),
        }
    }

    /// Width of an iMCU at `1/denom` scale: cropping regions must start on a multiple of it.
    pub fn imcu_width(subsamp: i32, denom: usize) -> Option<usize> {
        // `tjMCUWidth` from turbojpeg.h (a header-only table, so not linkable), by TJSAMP_*:
        // 444, 422, 420, GRAY, 440, 411, 441.
        const MCU_WIDTH: [usize; 7] = [8, 16, 16, 8, 8, 32, 8];
        let w = *MCU_WIDTH.get(usize::try_from(subsamp).ok()?)?;
        Some((w / denom).max(1))
    }

    /// Restricts decoding to `[x, x + w) x [y, y + h)` of the (scaled) image; `x` must be a
    /// multiple of [`imcu_width`](Self::imcu_width).
    pub fn set_crop(&mut self, x: usize, y: usize, w: usize, h: usize) -> Result<(), String> {
        let r = raw::tjregion {
            x: x as i32,
            y: y as i32,
            w: w as i32,
            h: h as i32,
        };
        // SAFETY: valid handle; TurboJPEG validates the region against the header.
        match unsafe { raw::tj3SetCroppingRegion(self.0, r) } {
            0 => Ok(()),
            _ => Err(self.error()),
        }
    }

    /// Decompresses into `out`, which holds exactly `width * height * channels` bytes of the
    /// (scaled, cropped) output.
    pub fn decompress(
        &mut self,
        jpeg: &[u8],
        out: &mut [u8],
        width: usize,
        layout: Layout,
    ) -> Result<(), String> {
        let pitch = width * layout.channels();
        // SAFETY: `out` is sized by the caller for the region TurboJPEG will write (checked by the
        // caller against header, scale and crop); pointers and lengths describe live slices.
        let r = unsafe {
            raw::tj3Decompress8(
                self.0,
                jpeg.as_ptr(),
                jpeg.len() as raw::size_t,
                out.as_mut_ptr(),
                pitch as i32,
                layout.tjpf(),
            )
        };
        match r {
            0 => Ok(()),
            _ => Err(self.error()),
        }
    }
}

/// `pixels` (packed RGB, `width` x `height`) encoded as a JPEG, for tests.
#[cfg(test)]
pub fn encode_rgb(
    pixels: &[u8],
    width: usize,
    height: usize,
    quality: i32,
    subsamp: turbojpeg::Subsamp,
) -> Vec<u8> {
    let img = turbojpeg::Image {
        pixels,
        width,
        pitch: width * 3,
        height,
        format: turbojpeg::PixelFormat::RGB,
    };
    turbojpeg::compress(img, quality, subsamp)
        .expect("encode")
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imcu_widths_follow_subsampling_and_scale() {
        assert_eq!(
            Decompressor::imcu_width(raw::TJSAMP_TJSAMP_420, 1),
            Some(16)
        );
        assert_eq!(Decompressor::imcu_width(raw::TJSAMP_TJSAMP_444, 1), Some(8));
        assert_eq!(Decompressor::imcu_width(raw::TJSAMP_TJSAMP_420, 8), Some(2));
        assert_eq!(Decompressor::imcu_width(-1, 1), None);
    }
}
