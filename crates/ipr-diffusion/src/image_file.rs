//! Image files as every stage reads them: decoded with limits, so that a truncated or corrupt
//! file, or one whose header claims more pixels than [`MAX_PIXELS`] (a decompression bomb: a few
//! KB of PNG that would inflate to gigabytes), is an error naming the file before any large
//! allocation.

use std::path::Path;

use image::{DynamicImage, ImageReader, Limits, RgbImage};

use crate::error::{Error, Result};

/// The most pixels an input image may have: 8192 x 8192 (64 M pixels, 192 MB as 8-bit RGB), far
/// above SDXL's 1024 x 1024 and OWLv2's 960 x 960.
pub const MAX_PIXELS: u64 = 8192 * 8192;
/// The most bytes one decode may allocate (a 16-bit RGBA image at [`MAX_PIXELS`] needs 512 MiB).
pub const MAX_ALLOC: u64 = 512 << 20;

fn image_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Image { path: path.to_path_buf(), message: message.into() }
}

fn reader(path: &Path) -> Result<ImageReader<std::io::BufReader<std::fs::File>>> {
    let reader = ImageReader::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    reader.with_guessed_format().map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// `(width, height)` from the file's header, checked against [`MAX_PIXELS`].
pub fn dimensions(path: &Path) -> Result<(u32, u32)> {
    let (w, h) =
        reader(path)?.into_dimensions().map_err(|e| image_error(path, format!("not a readable image ({e})")))?;
    if w == 0 || h == 0 {
        return Err(image_error(path, format!("the image is {w} x {h} pixels: empty")));
    }
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(image_error(
            path,
            format!("the image is {w} x {h} pixels, above the limit of {MAX_PIXELS} pixels (8192 x 8192)"),
        ));
    }
    Ok((w, h))
}

/// The image as 8-bit RGB (grey, alpha and 16-bit images are converted), decoded within the limits.
pub fn open_rgb(path: &Path) -> Result<RgbImage> {
    Ok(open(path)?.to_rgb8())
}

/// The image as decoded, within the limits.
pub fn open(path: &Path) -> Result<DynamicImage> {
    dimensions(path)?;
    let mut r = reader(path)?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(8192 * 8);
    limits.max_image_height = Some(8192 * 8);
    limits.max_alloc = Some(MAX_ALLOC);
    r.limits(limits);
    r.decode().map_err(|e| image_error(path, format!("cannot decode the image ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        RgbImage::from_pixel(w, h, image::Rgb([1, 2, 3])).write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn reads_good_images_and_refuses_truncated_and_oversized_ones() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.png");
        std::fs::write(&good, png(5, 3)).unwrap();
        assert_eq!(dimensions(&good).unwrap(), (5, 3));
        assert_eq!(open_rgb(&good).unwrap().get_pixel(4, 2).0, [1, 2, 3]);

        let bytes = png(64, 64);
        let cut = dir.path().join("cut.png");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = open_rgb(&cut).unwrap_err().to_string();
        assert!(e.contains("cut.png") && e.contains("decode"), "{e}");

        // A bomb: the header claims 100000 x 100000 pixels (CRC fixed so decoders read it).
        let mut bomb = png(1, 1);
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let path = dir.path().join("bomb.png");
        std::fs::write(&path, &bomb).unwrap();
        let e = open_rgb(&path).unwrap_err().to_string();
        assert!(e.contains("bomb.png") && e.contains("100000 x 100000") && e.contains("limit"), "{e}");

        let junk = dir.path().join("junk.png");
        std::fs::write(&junk, b"not an image at all").unwrap();
        assert!(open_rgb(&junk).unwrap_err().to_string().contains("junk.png"));
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
}
