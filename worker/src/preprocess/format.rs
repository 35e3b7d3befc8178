//! The seven image formats the seed accepts, their MIME types, and detection from the bytes.

use std::fmt;

/// An image format the worker decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Bmp,
    Gif,
    Jpeg,
    Png,
    Tiff,
    Webp,
    Pcx,
}

impl ImageFormat {
    /// Every supported format, in the seed's order.
    pub const ALL: [ImageFormat; 7] = [
        ImageFormat::Bmp,
        ImageFormat::Gif,
        ImageFormat::Jpeg,
        ImageFormat::Png,
        ImageFormat::Tiff,
        ImageFormat::Webp,
        ImageFormat::Pcx,
    ];

    /// The canonical MIME type (the one Lakechain events carry).
    pub const fn mime(self) -> &'static str {
        match self {
            ImageFormat::Bmp => "image/bmp",
            ImageFormat::Gif => "image/gif",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Png => "image/png",
            ImageFormat::Tiff => "image/tiff",
            ImageFormat::Webp => "image/webp",
            ImageFormat::Pcx => "image/x-pcx",
        }
    }

    /// Short upper-case name for messages.
    pub const fn name(self) -> &'static str {
        match self {
            ImageFormat::Bmp => "BMP",
            ImageFormat::Gif => "GIF",
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Png => "PNG",
            ImageFormat::Tiff => "TIFF",
            ImageFormat::Webp => "WebP",
            ImageFormat::Pcx => "PCX",
        }
    }

    /// The format a MIME type names: the canonical types plus common aliases. Parameters
    /// (`; charset=...`) and case are ignored.
    pub fn from_mime(mime: &str) -> Option<Self> {
        let essence = mime
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        Some(match essence.as_str() {
            "image/bmp" | "image/x-bmp" | "image/x-ms-bmp" => ImageFormat::Bmp,
            "image/gif" => ImageFormat::Gif,
            "image/jpeg" | "image/jpg" | "image/pjpeg" => ImageFormat::Jpeg,
            "image/png" | "image/x-png" => ImageFormat::Png,
            "image/tiff" | "image/tif" => ImageFormat::Tiff,
            "image/webp" => ImageFormat::Webp,
            "image/x-pcx" | "image/pcx" | "image/vnd.zbrush.pcx" => ImageFormat::Pcx,
            _ => return None,
        })
    }

    /// The format a file extension usually means (what the CLI declares for a file).
    pub fn from_extension(ext: &str) -> Option<Self> {
        Some(match ext.to_ascii_lowercase().as_str() {
            "bmp" | "dib" => ImageFormat::Bmp,
            "gif" => ImageFormat::Gif,
            "jpg" | "jpeg" | "jpe" | "jfif" => ImageFormat::Jpeg,
            "png" => ImageFormat::Png,
            "tif" | "tiff" => ImageFormat::Tiff,
            "webp" => ImageFormat::Webp,
            "pcx" => ImageFormat::Pcx,
            _ => return None,
        })
    }

    /// Detects the format from the first bytes, ignoring any declared type.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        let starts = |magic: &[u8]| bytes.starts_with(magic);
        if starts(b"\xFF\xD8\xFF") {
            Some(ImageFormat::Jpeg)
        } else if starts(b"\x89PNG\r\n\x1a\n") {
            Some(ImageFormat::Png)
        } else if starts(b"GIF87a") || starts(b"GIF89a") {
            Some(ImageFormat::Gif)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(ImageFormat::Webp)
        } else if starts(b"II*\0") || starts(b"MM\0*") || starts(b"II+\0") || starts(b"MM\0+") {
            Some(ImageFormat::Tiff)
        } else if starts(b"BM") && bytes.len() >= 26 {
            Some(ImageFormat::Bmp)
        } else if is_pcx(bytes) {
            Some(ImageFormat::Pcx)
        } else {
            None
        }
    }
}

/// PCX has no magic number; check the header fields a real file must have.
fn is_pcx(b: &[u8]) -> bool {
    b.len() >= 128
        && b[0] == 0x0A
        && matches!(b[1], 0 | 2 | 3 | 4 | 5)
        && b[2] <= 1
        && matches!(b[3], 1 | 2 | 4 | 8)
        && b[65] >= 1
        && b[65] <= 4
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The MIME types the worker processes, in the seed's order.
pub fn supported_mime_types() -> [&'static str; 7] {
    ImageFormat::ALL.map(ImageFormat::mime)
}

/// A short, printable description of what unknown bytes start with, for error messages.
pub fn describe_magic(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(8)];
    if head.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{:?}", String::from_utf8_lossy(head))
    } else {
        head.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_types_round_trip() {
        assert_eq!(
            supported_mime_types(),
            [
                "image/bmp",
                "image/gif",
                "image/jpeg",
                "image/png",
                "image/tiff",
                "image/webp",
                "image/x-pcx"
            ]
        );
        for f in ImageFormat::ALL {
            assert_eq!(ImageFormat::from_mime(f.mime()), Some(f));
        }
        assert_eq!(
            ImageFormat::from_mime("IMAGE/JPEG; q=1"),
            Some(ImageFormat::Jpeg)
        );
        assert_eq!(ImageFormat::from_mime("image/jpg"), Some(ImageFormat::Jpeg));
        assert_eq!(ImageFormat::from_mime("image/avif"), None);
        assert_eq!(ImageFormat::from_mime("text/plain"), None);
    }

    #[test]
    fn sniffs_magic_numbers() {
        assert_eq!(
            ImageFormat::sniff(b"\xFF\xD8\xFF\xE0rest"),
            Some(ImageFormat::Jpeg)
        );
        assert_eq!(
            ImageFormat::sniff(b"\x89PNG\r\n\x1a\nxxxx"),
            Some(ImageFormat::Png)
        );
        assert_eq!(ImageFormat::sniff(b"GIF89a...."), Some(ImageFormat::Gif));
        assert_eq!(
            ImageFormat::sniff(b"RIFF\0\0\0\0WEBPVP8 "),
            Some(ImageFormat::Webp)
        );
        assert_eq!(ImageFormat::sniff(b"RIFF\0\0\0\0WAVEfmt "), None);
        assert_eq!(
            ImageFormat::sniff(b"MM\0*\0\0\0\x08"),
            Some(ImageFormat::Tiff)
        );
        assert_eq!(ImageFormat::sniff(b"%PDF-1.7"), None);
        assert_eq!(ImageFormat::sniff(b""), None);
        let mut pcx = vec![0u8; 128];
        pcx[..4].copy_from_slice(&[0x0A, 5, 1, 8]);
        pcx[65] = 1;
        assert_eq!(ImageFormat::sniff(&pcx), Some(ImageFormat::Pcx));
        pcx[65] = 9;
        assert_eq!(ImageFormat::sniff(&pcx), None);
    }

    #[test]
    fn describes_unknown_bytes() {
        assert_eq!(describe_magic(b"%PDF-1.7\nmore"), "\"%PDF-1.7\"");
        assert_eq!(describe_magic(&[0, 1, 255]), "00 01 ff");
    }
}
