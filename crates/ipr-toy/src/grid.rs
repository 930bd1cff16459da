//! Image grids: many small images tiled into one PNG, for looking at samples by eye.
//!
//! Used by `ipr toy grid` and the report. Images are tiled row by row with a gap between
//! them, optionally enlarged by an integer factor (nearest neighbour, so pixels stay sharp).
//! The file is written under a temporary name and renamed, so a reader never sees half a PNG.

use image::{imageops, ImageFormat, Rgb, RgbImage};
use std::path::{Path, PathBuf};

/// How a grid is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridOptions {
    /// Pixels between neighbouring images (and around the border), after scaling.
    pub gap: u32,
    /// Integer enlargement of every image (1 = as is).
    pub scale: u32,
    /// Colour of the gaps.
    pub gap_colour: [u8; 3],
}

impl Default for GridOptions {
    fn default() -> Self {
        Self { gap: 2, scale: 1, gap_colour: [255, 255, 255] }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GridError {
    #[error("no images to put in a grid")]
    Empty,
    #[error("a grid needs at least one column and a scale of at least 1 (got {cols} columns, scale {scale})")]
    Layout { cols: usize, scale: u32 },
    #[error("image {index} is {got:?} pixels, expected {expected:?} like the first image")]
    SizeMismatch { index: usize, got: (u32, u32), expected: (u32, u32) },
    #[error("writing grid {path}: {source}")]
    Image { path: PathBuf, source: image::ImageError },
    #[error("writing grid {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Tile `images` (all the same size) into rows of `cols`.
pub fn grid(images: &[RgbImage], cols: usize, opts: &GridOptions) -> Result<RgbImage, GridError> {
    let first = images.first().ok_or(GridError::Empty)?;
    if cols == 0 || opts.scale == 0 {
        return Err(GridError::Layout { cols, scale: opts.scale });
    }
    let expected = first.dimensions();
    if let Some((index, img)) = images.iter().enumerate().find(|(_, i)| i.dimensions() != expected) {
        return Err(GridError::SizeMismatch { index, got: img.dimensions(), expected });
    }
    let (w, h) = (expected.0 * opts.scale, expected.1 * opts.scale);
    let cols = cols.min(images.len());
    let rows = images.len().div_ceil(cols);
    let (cols32, rows32) = (cols as u32, rows as u32);
    let mut out = RgbImage::from_pixel(
        cols32 * (w + opts.gap) + opts.gap,
        rows32 * (h + opts.gap) + opts.gap,
        Rgb(opts.gap_colour),
    );
    for (k, img) in images.iter().enumerate() {
        let (c, r) = ((k % cols) as u32, (k / cols) as u32);
        let tile =
            if opts.scale == 1 { img.clone() } else { imageops::resize(img, w, h, imageops::FilterType::Nearest) };
        let (x, y) = (opts.gap + c * (w + opts.gap), opts.gap + r * (h + opts.gap));
        imageops::replace(&mut out, &tile, i64::from(x), i64::from(y));
    }
    Ok(out)
}

/// Write a grid of `images` with `cols` columns and the default layout to the PNG `path`.
pub fn write_grid(images: &[RgbImage], cols: usize, path: &Path) -> Result<(), GridError> {
    write_grid_with(images, cols, path, &GridOptions::default())
}

/// [`write_grid`] with an explicit layout.
pub fn write_grid_with(images: &[RgbImage], cols: usize, path: &Path, opts: &GridOptions) -> Result<(), GridError> {
    let img = grid(images, cols, opts)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    img.save_with_format(&tmp, ImageFormat::Png)
        .map_err(|source| GridError::Image { path: path.to_path_buf(), source })?;
    std::fs::rename(&tmp, path).map_err(|source| GridError::Io { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(v: u8) -> RgbImage {
        RgbImage::from_pixel(4, 3, Rgb([v, v, v]))
    }

    #[test]
    fn lays_out_rows_with_gaps() {
        let imgs: Vec<RgbImage> = (0..5).map(|i| solid(i * 10)).collect();
        let g = grid(&imgs, 2, &GridOptions { gap: 1, scale: 2, gap_colour: [255, 0, 0] }).unwrap();
        // 2 columns of 8 px, 3 rows of 6 px, gaps of 1 around and between.
        assert_eq!(g.dimensions(), (2 * 9 + 1, 3 * 7 + 1));
        assert_eq!(g.get_pixel(0, 0).0, [255, 0, 0]);
        assert_eq!(g.get_pixel(1, 1).0, [0, 0, 0]);
        assert_eq!(g.get_pixel(10, 1).0, [10, 10, 10]);
        assert_eq!(g.get_pixel(1 + 9, 1 + 7 * 2).0, [255, 0, 0], "the sixth cell is empty");
        assert_eq!(g.get_pixel(1, 1 + 7 * 2).0, [40, 40, 40]);
    }

    #[test]
    fn errors_and_writes() {
        assert!(matches!(grid(&[], 2, &GridOptions::default()), Err(GridError::Empty)));
        assert!(matches!(grid(&[solid(0)], 0, &GridOptions::default()), Err(GridError::Layout { .. })));
        let e = grid(&[solid(0), RgbImage::new(5, 5)], 2, &GridOptions::default()).unwrap_err();
        assert!(e.to_string().contains("image 1 is (5, 5)"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        write_grid(&[solid(1), solid(2), solid(3)], 2, &path).unwrap();
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), (2 * 6 + 2, 2 * 5 + 2));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        let e = write_grid(&[solid(1)], 1, &dir.path().join("missing/grid.png")).unwrap_err();
        assert!(e.to_string().contains("missing/grid.png"), "{e}");
    }
}
