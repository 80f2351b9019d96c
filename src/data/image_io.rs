//! Robust image decoding shared by validation, training, inference and serving: format
//! sniffing by content (not extension), header reads before decoding (pixel limits), JPEG
//! truncation checks, CMYK/grayscale/alpha detection, EXIF orientation, and trimap reading.

use std::io::Cursor;

use image::{DynamicImage, GrayImage, ImageDecoder, RgbImage};

/// What a file really is, judged by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Jpeg,
    Png,
    Gif,
    Unknown,
}

impl std::fmt::Display for FileFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileFormat::Jpeg => "JPEG",
            FileFormat::Png => "PNG",
            FileFormat::Gif => "GIF",
            FileFormat::Unknown => "not an image",
        })
    }
}

/// Identifies JPEG, PNG and GIF by their magic bytes.
pub fn sniff(bytes: &[u8]) -> FileFormat {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        FileFormat::Jpeg
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        FileFormat::Png
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        FileFormat::Gif
    } else {
        FileFormat::Unknown
    }
}

/// A colour conversion applied while decoding (a warning in `validate`, never an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ColorNote {
    /// Single-channel image expanded to RGB.
    Grayscale,
    /// CMYK/YCCK JPEG converted to RGB.
    Cmyk,
    /// Alpha channel dropped.
    Alpha,
    /// 16-bit samples reduced to 8 bits.
    HighBitDepth,
}

impl ColorNote {
    /// Short description for reports.
    pub fn describe(self) -> &'static str {
        match self {
            ColorNote::Grayscale => "grayscale image converted to RGB",
            ColorNote::Cmyk => "CMYK image converted to RGB",
            ColorNote::Alpha => "alpha channel dropped (RGBA converted to RGB)",
            ColorNote::HighBitDepth => "16-bit image reduced to 8 bits",
        }
    }
}

/// Why an image could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty file")]
    Empty,
    #[error("not a JPEG, PNG or GIF image")]
    NotAnImage,
    #[error("truncated {0} file (ends before the image data does)")]
    Truncated(FileFormat),
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit}")]
    TooLarge { width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("corrupt {format} data: {message}")]
    Corrupt { format: FileFormat, message: String },
    #[error("progressive JPEG with {scans} scans, over the limit of {limit}")]
    TooManyScans { scans: u32, limit: u32 },
}

/// Width, height and channel layout read from the header, before any decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderInfo {
    pub format: FileFormat,
    pub width: u32,
    pub height: u32,
    /// Components in a JPEG frame (1 gray, 3 YCbCr, 4 CMYK/YCCK); `None` for other formats.
    pub jpeg_components: Option<u8>,
}

/// Reads dimensions from the header of a JPEG, PNG or GIF.
pub fn read_header(bytes: &[u8]) -> Result<HeaderInfo, DecodeError> {
    read_header_scan(bytes).map(|(header, _)| header)
}

/// What the walk over a JPEG's markers found beyond its header.
#[derive(Debug, Clone, Copy)]
struct JpegWalk {
    /// An end-of-image marker follows the scans.
    complete: bool,
    /// Start-of-scan markers (a baseline JPEG has one per component group; a progressive
    /// one, one per refinement).
    scans: u32,
}

/// [`read_header`], and for a JPEG whether an end-of-image marker follows its scans and how
/// many there are (one walk over the file gives all). A GIF's size is the bounding box of its
/// logical screen and every frame: decoders allocate for frames, whatever the screen says.
fn read_header_scan(bytes: &[u8]) -> Result<(HeaderInfo, Option<JpegWalk>), DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let format = sniff(bytes);
    match format {
        FileFormat::Png => {
            if bytes.len() < 26 || &bytes[12..16] != b"IHDR" {
                return Err(DecodeError::Truncated(format));
            }
            let width = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
            let height = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
            Ok((HeaderInfo { format, width, height, jpeg_components: None }, None))
        }
        FileFormat::Gif => {
            if bytes.len() < 10 {
                return Err(DecodeError::Truncated(format));
            }
            let (width, height) = gif_extent(bytes)?;
            Ok((HeaderInfo { format, width, height, jpeg_components: None }, None))
        }
        FileFormat::Jpeg => {
            let scan = scan_jpeg(bytes);
            match scan.frame {
                Some((width, height, components)) => Ok((
                    HeaderInfo { format, width, height, jpeg_components: Some(components) },
                    Some(JpegWalk { complete: scan.complete, scans: scan.scans }),
                )),
                None if scan.ran_out => Err(DecodeError::Truncated(format)),
                None => Err(DecodeError::Corrupt { format, message: "no frame header".into() }),
            }
        }
        FileFormat::Unknown => Err(DecodeError::NotAnImage),
    }
}

/// The bounding box of a GIF's logical screen and all its frames (image descriptors), found
/// by walking its blocks without decoding any.
fn gif_extent(bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
    let truncated = || DecodeError::Truncated(FileFormat::Gif);
    let corrupt = |m: &str| DecodeError::Corrupt { format: FileFormat::Gif, message: m.into() };
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]) as u32;
    if bytes.len() < 13 {
        return Err(truncated());
    }
    let (mut width, mut height) = (u16_at(6), u16_at(8));
    let table = |flags: u8| if flags & 0x80 != 0 { 3usize << ((flags & 7) + 1) } else { 0 };
    let mut i = 13 + table(bytes[10]);
    // Skips data sub-blocks (length byte, data) up to the zero-length terminator.
    let skip_blocks = |mut i: usize| -> Result<usize, DecodeError> {
        loop {
            let n = *bytes.get(i).ok_or_else(truncated)? as usize;
            i += 1 + n;
            if n == 0 {
                return Ok(i);
            }
        }
    };
    loop {
        match bytes.get(i).copied() {
            // Trailer (or data that simply ends after a frame: decoders accept that too).
            Some(0x3B) | None => return Ok((width, height)),
            Some(0x21) => i = skip_blocks(i + 2)?,
            Some(0x2C) => {
                if i + 10 > bytes.len() {
                    return Err(truncated());
                }
                let (left, top, w, h) = (u16_at(i + 1), u16_at(i + 3), u16_at(i + 5), u16_at(i + 7));
                width = width.max(left + w);
                height = height.max(top + h);
                // Descriptor, local colour table, LZW code size, then the image data.
                i = skip_blocks(i + 10 + table(bytes[i + 9]) + 1)?;
            }
            Some(_) => return Err(corrupt("unknown block")),
        }
    }
}

/// Index of the first 0xFF byte at or after `from` (`bytes.len()` if none), 8 bytes at a time.
fn find_ff(bytes: &[u8], from: usize) -> usize {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = from;
    while i + 8 <= bytes.len() {
        let word = u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        // A byte of `!word` is zero exactly where `word` holds 0xFF.
        let x = !word;
        let found = x.wrapping_sub(LOW) & !x & HIGH;
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < bytes.len() && bytes[i] != 0xFF {
        i += 1;
    }
    i
}

struct JpegScan {
    /// (width, height, components) of the first frame header.
    frame: Option<(u32, u32, u8)>,
    /// An end-of-image marker follows the first scan.
    complete: bool,
    /// The data ended inside a segment or before EOI.
    ran_out: bool,
    /// Start-of-scan markers seen.
    scans: u32,
}

/// Walks the JPEG marker structure: frame header, scans, and the end-of-image marker. Inside
/// entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker, so the first
/// other marker after a scan is a real one; a file that ends before EOI is truncated.
fn scan_jpeg(bytes: &[u8]) -> JpegScan {
    let mut scan = JpegScan { frame: None, complete: false, ran_out: false, scans: 0 };
    let mut i = 2; // after SOI
    loop {
        // Find the next marker (skipping fill bytes).
        while i < bytes.len() && bytes[i] != 0xFF {
            i += 1;
        }
        while i < bytes.len() && bytes[i] == 0xFF {
            i += 1;
        }
        if i >= bytes.len() {
            scan.ran_out = true;
            return scan;
        }
        let marker = bytes[i];
        i += 1;
        match marker {
            0xD9 => {
                scan.complete = true;
                return scan;
            }
            0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        if i + 2 > bytes.len() {
            scan.ran_out = true;
            return scan;
        }
        let length = u16::from_be_bytes([bytes[i], bytes[i + 1]]) as usize;
        if length < 2 || i + length > bytes.len() {
            scan.ran_out = true;
            return scan;
        }
        let segment = &bytes[i + 2..i + length];
        let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof && scan.frame.is_none() && segment.len() >= 6 {
            let height = u16::from_be_bytes([segment[1], segment[2]]) as u32;
            let width = u16::from_be_bytes([segment[3], segment[4]]) as u32;
            scan.frame = Some((width, height, segment[5]));
        }
        i += length;
        if marker == 0xDA {
            scan.scans += 1;
            // Entropy-coded data: skip to the next real marker.
            loop {
                i = find_ff(bytes, i);
                if i + 1 >= bytes.len() {
                    scan.ran_out = true;
                    return scan;
                }
                let next = bytes[i + 1];
                if next == 0x00 || (0xD0..=0xD7).contains(&next) || next == 0xFF {
                    i += if next == 0xFF { 1 } else { 2 };
                    continue;
                }
                break;
            }
        }
    }
}

/// A decoded RGB image and what was converted on the way.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub image: RgbImage,
    pub format: FileFormat,
    pub notes: Vec<ColorNote>,
}

/// How to decode.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Refuse images with more pixels than this, before decoding them.
    pub max_pixels: u64,
    /// Rotate/flip by the EXIF orientation tag (photos from users; not dataset images, whose
    /// trimaps were drawn on the stored pixel grid).
    pub apply_exif_orientation: bool,
    /// Refuse JPEGs with more scans than this (each progressive scan is another pass of
    /// entropy decoding over the whole image), before decoding them.
    pub max_jpeg_scans: u32,
}

/// Scans of the most elaborate progressive JPEGs encoders write (libjpeg's default script
/// has 10; mozjpeg's, up to about 20).
pub const DEFAULT_MAX_JPEG_SCANS: u32 = 64;

impl Default for DecodeOptions {
    fn default() -> Self {
        Self { max_pixels: 100_000_000, apply_exif_orientation: false, max_jpeg_scans: DEFAULT_MAX_JPEG_SCANS }
    }
}

/// Decodes JPEG/PNG/GIF bytes to 8-bit RGB, whatever the extension said, refusing truncated
/// files and oversized images.
pub fn decode_rgb(bytes: &[u8], options: DecodeOptions) -> Result<Decoded, DecodeError> {
    let (header, jpeg) = read_header_scan(bytes)?;
    check_header(&header, jpeg, options)?;
    decode_checked(bytes, &header, options)
}

/// The bounds every decode checks from the header, before any pixel is decoded.
fn check_header(header: &HeaderInfo, jpeg: Option<JpegWalk>, options: DecodeOptions) -> Result<(), DecodeError> {
    let pixels = header.width as u64 * header.height as u64;
    if pixels > options.max_pixels {
        return Err(DecodeError::TooLarge {
            width: header.width,
            height: header.height,
            pixels,
            limit: options.max_pixels,
        });
    }
    if pixels == 0 {
        return Err(DecodeError::Corrupt { format: header.format, message: "zero-sized image".into() });
    }
    if let Some(walk) = jpeg {
        if !walk.complete {
            return Err(DecodeError::Truncated(FileFormat::Jpeg));
        }
        if walk.scans > options.max_jpeg_scans {
            return Err(DecodeError::TooManyScans { scans: walk.scans, limit: options.max_jpeg_scans });
        }
    }
    Ok(())
}

/// [`decode_rgb`] after [`check_header`] passed.
fn decode_checked(bytes: &[u8], header: &HeaderInfo, options: DecodeOptions) -> Result<Decoded, DecodeError> {
    let format = header.format;
    // Decoders are third-party code fed with untrusted bytes: a panic must not take the
    // caller (a training run, a server worker) down.
    let decoded = std::panic::catch_unwind(|| decode_dynamic(bytes, format, options))
        .unwrap_or_else(|_| {
            Err(DecodeError::Corrupt { format, message: "decoder failed".into() })
        })?;
    let mut notes = Vec::new();
    if header.jpeg_components == Some(4) {
        notes.push(ColorNote::Cmyk);
    }
    use image::ColorType as C;
    match decoded.color() {
        C::L8 | C::L16 => notes.push(ColorNote::Grayscale),
        C::La8 | C::La16 => notes.extend([ColorNote::Grayscale, ColorNote::Alpha]),
        // GIF frames always decode as RGBA: only real transparency counts there.
        C::Rgba8 if format == FileFormat::Gif => {
            if decoded.as_rgba8().is_some_and(|i| i.pixels().any(|p| p.0[3] < 255)) {
                notes.push(ColorNote::Alpha);
            }
        }
        C::Rgba8 | C::Rgba16 | C::Rgba32F => notes.push(ColorNote::Alpha),
        _ => {}
    }
    if matches!(decoded.color(), C::L16 | C::La16 | C::Rgb16 | C::Rgba16) {
        notes.push(ColorNote::HighBitDepth);
    }
    Ok(Decoded { image: decoded.into_rgb8(), format, notes })
}

/// A photo decoded for a model whose square input has side `model_side`.
#[derive(Debug)]
pub struct ModelPhoto {
    /// The pixels the model input is resized from: the photo itself, or a JPEG decoded at a
    /// reduced DCT scale.
    pub image: RgbImage,
    /// The photo's displayed size (EXIF orientation applied when asked): masks are answered
    /// at this size.
    pub width: u32,
    pub height: u32,
    /// The DCT scale denominator the JPEG was decoded at (1 = full size).
    pub scale: u32,
}

/// The DCT scale denominator (8, 4, 2 or 1) for decoding a `width`×`height` JPEG whose pixels
/// only feed a `model_side`² model input: the largest that keeps both sides at least
/// `model_side` (as PIL's `draft` mode), so that resizing still only shrinks.
pub fn dct_scale_for(width: u32, height: u32, model_side: u32) -> u32 {
    [8, 4, 2].into_iter().find(|&d| width.div_ceil(d) >= model_side && height.div_ceil(d) >= model_side).unwrap_or(1)
}

/// Decodes `bytes` for a model input of `model_side`²: a JPEG (YCbCr or grayscale) at the
/// reduced DCT scale of [`dct_scale_for`] — the entropy decoding is the same, but the inverse
/// DCT, colour conversion and the resize that follows touch 4–64× fewer pixels — and anything
/// else exactly as [`decode_rgb`]. Same bounds and checks as [`decode_rgb`] (from the header,
/// before decoding); a JPEG the scaling decoder refuses is decoded at full size instead.
pub fn decode_rgb_for_model(bytes: &[u8], options: DecodeOptions, model_side: u32) -> Result<ModelPhoto, DecodeError> {
    // One walk over the file gives the header and its completeness, for both paths.
    let (header, jpeg) = read_header_scan(bytes)?;
    check_header(&header, jpeg, options)?;
    let scale = dct_scale_for(header.width, header.height, model_side.max(1));
    if header.format == FileFormat::Jpeg && matches!(header.jpeg_components, Some(1 | 3)) && scale > 1 {
        if let Ok(Some(photo)) = std::panic::catch_unwind(|| decode_jpeg_scaled(bytes, &header, scale, options)) {
            return Ok(photo);
        }
    }
    let decoded = decode_checked(bytes, &header, options)?;
    let (width, height) = decoded.image.dimensions();
    Ok(ModelPhoto { image: decoded.image, width, height, scale: 1 })
}

/// `None` when the scaling decoder cannot do it (the caller decodes at full size).
fn decode_jpeg_scaled(bytes: &[u8], header: &HeaderInfo, scale: u32, options: DecodeOptions) -> Option<ModelPhoto> {
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    // The header was bounded by max_pixels; the decoder's own buffers stay within that too.
    decoder.set_max_decoding_buffer_size(usize::try_from(options.max_pixels.saturating_mul(4)).unwrap_or(usize::MAX));
    let want = |side: u32| u16::try_from(side.div_ceil(scale)).ok();
    let (w, h) = decoder.scale(want(header.width)?, want(header.height)?).ok()?;
    let pixels = decoder.decode().ok()?;
    let info = decoder.info()?;
    let (w, h) = (u32::from(w), u32::from(h));
    // `info` reports the scaled size; it must be the one asked for.
    if (u32::from(info.width), u32::from(info.height)) != (w, h) || w != header.width.div_ceil(scale) || h != header.height.div_ceil(scale) {
        return None;
    }
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => RgbImage::from_raw(w, h, pixels)?,
        jpeg_decoder::PixelFormat::L8 => DynamicImage::ImageLuma8(GrayImage::from_raw(w, h, pixels)?).into_rgb8(),
        _ => return None,
    };
    let mut image = DynamicImage::ImageRgb8(rgb);
    let (mut width, mut height) = (header.width, header.height);
    if options.apply_exif_orientation {
        if let Some(o) = decoder.exif_data().and_then(image::metadata::Orientation::from_exif_chunk) {
            use image::metadata::Orientation as O;
            if matches!(o, O::Rotate90 | O::Rotate270 | O::Rotate90FlipH | O::Rotate270FlipH) {
                (width, height) = (height, width);
            }
            image.apply_orientation(o);
        }
    }
    Some(ModelPhoto { image: image.into_rgb8(), width, height, scale })
}

fn decode_dynamic(
    bytes: &[u8],
    format: FileFormat,
    options: DecodeOptions,
) -> Result<DynamicImage, DecodeError> {
    let corrupt = |e: image::ImageError| match e {
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            DecodeError::Truncated(format)
        }
        other => DecodeError::Corrupt { format, message: other.to_string() },
    };
    let image_format = match format {
        FileFormat::Jpeg => image::ImageFormat::Jpeg,
        FileFormat::Png => image::ImageFormat::Png,
        FileFormat::Gif => image::ImageFormat::Gif,
        FileFormat::Unknown => return Err(DecodeError::NotAnImage),
    };
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), image_format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(options.max_pixels.saturating_mul(16).max(1 << 26));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let orientation = if options.apply_exif_orientation {
        decoder.orientation().ok()
    } else {
        None
    };
    let mut image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    if let Some(o) = orientation {
        image.apply_orientation(o);
    }
    Ok(image)
}

/// Why a trimap could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    #[error("mask is {0}, not PNG")]
    NotPng(FileFormat),
    #[error("mask has {0} channels, expected 1")]
    NotSingleChannel(u8),
    #[error("mask: {0}")]
    Decode(DecodeError),
}

/// Reads a trimap PNG as one 8-bit channel (values as stored: 1, 2, 3).
pub fn decode_trimap(bytes: &[u8]) -> Result<GrayImage, MaskError> {
    let format = sniff(bytes);
    if format != FileFormat::Png {
        return Err(if bytes.is_empty() {
            MaskError::Decode(DecodeError::Empty)
        } else {
            MaskError::NotPng(format)
        });
    }
    let options = DecodeOptions::default();
    let header = read_header(bytes).map_err(MaskError::Decode)?;
    let pixels = header.width as u64 * header.height as u64;
    if pixels > options.max_pixels {
        return Err(MaskError::Decode(DecodeError::TooLarge {
            width: header.width,
            height: header.height,
            pixels,
            limit: options.max_pixels,
        }));
    }
    let image = std::panic::catch_unwind(|| decode_dynamic(bytes, format, options))
        .unwrap_or_else(|_| Err(DecodeError::Corrupt { format, message: "decoder failed".into() }))
        .map_err(MaskError::Decode)?;
    match image {
        DynamicImage::ImageLuma8(gray) => Ok(gray),
        other => Err(MaskError::NotSingleChannel(other.color().channel_count())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_ff_finds_the_first_marker_byte() {
        for len in 0..40 {
            for at in 0..=len {
                let mut v = vec![0x7Fu8; len];
                if at < len {
                    v[at] = 0xFF;
                    if at + 3 < len {
                        v[at + 3] = 0xFF;
                    }
                }
                for from in 0..=at.min(len) {
                    assert_eq!(find_ff(&v, from), at, "len {len} at {at} from {from}");
                }
            }
        }
        assert_eq!(find_ff(&[0xFE, 0xFF, 0x00], 0), 1);
    }

    fn jpeg_bytes(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .unwrap();
        out
    }

    #[test]
    fn sniffing_and_headers() {
        let jpg = jpeg_bytes(40, 30);
        assert_eq!(sniff(&jpg), FileFormat::Jpeg);
        let h = read_header(&jpg).unwrap();
        assert_eq!((h.width, h.height, h.jpeg_components), (40, 30, Some(3)));
        assert_eq!(sniff(b"hello"), FileFormat::Unknown);
        assert_eq!(read_header(b""), Err(DecodeError::Empty));
    }

    #[test]
    fn truncated_jpeg_is_refused() {
        let jpg = jpeg_bytes(64, 64);
        assert!(decode_rgb(&jpg, DecodeOptions::default()).is_ok());
        let cut = &jpg[..jpg.len() * 2 / 3];
        assert_eq!(
            decode_rgb(cut, DecodeOptions::default()).unwrap_err(),
            DecodeError::Truncated(FileFormat::Jpeg)
        );
    }

    #[test]
    fn pixel_limit_applies_before_decoding() {
        // A PNG header claiming 100000x100000, with no data behind it.
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend_from_slice(&100_000u32.to_be_bytes());
        png.extend_from_slice(&100_000u32.to_be_bytes());
        png.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        let err = decode_rgb(&png, DecodeOptions { max_pixels: 1_000_000, ..Default::default() });
        assert!(matches!(err, Err(DecodeError::TooLarge { width: 100_000, .. })), "{err:?}");
    }

    /// A GIF whose logical screen is 1×1 and whose one frame is `side`², with a few bytes of
    /// image data (what a decoder would allocate the frame for).
    fn gif_frame_bomb(side: u16) -> Vec<u8> {
        let mut g = b"GIF89a".to_vec();
        g.extend_from_slice(&[1, 0, 1, 0, 0, 0, 0]);
        g.push(0x2C);
        g.extend_from_slice(&[0, 0, 0, 0]);
        g.extend_from_slice(&side.to_le_bytes());
        g.extend_from_slice(&side.to_le_bytes());
        g.push(0x80); // a local colour table of 2 entries
        g.extend_from_slice(&[0, 0, 0, 255, 255, 255]);
        g.extend_from_slice(&[2, 2, 0x4C, 0x01, 0, 0x3B]);
        g
    }

    /// `jpeg` with its scan repeated until it has `scans` of them (a scan bomb's structure).
    fn with_scans(jpeg: &[u8], scans: usize) -> Vec<u8> {
        let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let eoi = jpeg.len() - 2;
        let mut out = jpeg[..eoi].to_vec();
        for _ in 1..scans {
            out.extend_from_slice(&jpeg[sos..eoi]);
        }
        out.extend_from_slice(&jpeg[eoi..]);
        out
    }

    #[test]
    fn every_gif_frame_counts_against_the_pixel_limit() {
        let bomb = gif_frame_bomb(12_000);
        assert_eq!((read_header(&bomb).unwrap().width, read_header(&bomb).unwrap().height), (12_000, 12_000));
        let err = decode_rgb(&bomb, DecodeOptions { max_pixels: 40_000_000, ..Default::default() }).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { width: 12_000, height: 12_000, .. }), "{err:?}");
        // An ordinary GIF still decodes, at its size.
        let img = image::RgbaImage::from_pixel(7, 5, image::Rgba([10, 200, 30, 255]));
        let mut gif = Vec::new();
        image::codecs::gif::GifEncoder::new(&mut gif).encode(img.as_raw(), 7, 5, image::ExtendedColorType::Rgba8).unwrap();
        let decoded = decode_rgb(&gif, DecodeOptions::default()).unwrap();
        assert_eq!(decoded.image.dimensions(), (7, 5));
        assert_eq!(decoded.image.get_pixel(3, 2).0[1], 200);
        // Cut inside its frame: truncated, not a crash.
        assert_eq!(read_header(&gif[..gif.len() - 4]).unwrap_err(), DecodeError::Truncated(FileFormat::Gif));
    }

    #[test]
    fn jpeg_scans_are_counted_and_capped_on_both_decode_paths() {
        let jpg = jpeg_bytes(256, 192);
        let (_, walk) = read_header_scan(&jpg).unwrap();
        assert_eq!(walk.unwrap().scans, 1);
        let bomb = with_scans(&jpg, 65);
        assert_eq!(read_header_scan(&bomb).unwrap().1.unwrap().scans, 65);
        let options = DecodeOptions::default();
        let refused = DecodeError::TooManyScans { scans: 65, limit: DEFAULT_MAX_JPEG_SCANS };
        assert_eq!(decode_rgb(&bomb, options).unwrap_err(), refused);
        assert_eq!(decode_rgb_for_model(&bomb, options, 64).unwrap_err(), refused, "the reduced-scale path too");
        let tight = DecodeOptions { max_jpeg_scans: 0, ..options };
        assert!(matches!(decode_rgb_for_model(&jpg, tight, 64), Err(DecodeError::TooManyScans { scans: 1, limit: 0 })));
        let at_cap = decode_rgb_for_model(&with_scans(&jpg, 64), options, 64);
        assert!(!matches!(at_cap, Err(DecodeError::TooManyScans { .. })), "64 scans pass the cap: {at_cap:?}");
    }

    #[test]
    fn png_in_jpg_decodes_by_content_and_alpha_is_noted() {
        let img = image::RgbaImage::from_pixel(5, 4, image::Rgba([1, 2, 3, 4]));
        let mut png = Vec::new();
        img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        let d = decode_rgb(&png, DecodeOptions::default()).unwrap();
        assert_eq!(d.format, FileFormat::Png);
        assert_eq!(d.notes, vec![ColorNote::Alpha]);
        assert_eq!(d.image.dimensions(), (5, 4));
    }

    #[test]
    fn trimap_must_be_single_channel_png() {
        let gray = GrayImage::from_pixel(3, 3, image::Luma([2]));
        let mut png = Vec::new();
        gray.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        assert_eq!(decode_trimap(&png).unwrap().get_pixel(1, 1).0, [2]);
        let rgb = RgbImage::from_pixel(3, 3, image::Rgb([1, 1, 1]));
        let mut png = Vec::new();
        rgb.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        assert_eq!(decode_trimap(&png), Err(MaskError::NotSingleChannel(3)));
        assert!(matches!(decode_trimap(&jpeg_bytes(4, 4)), Err(MaskError::NotPng(FileFormat::Jpeg))));
    }

    /// A smooth 2-D pattern (what DCT scaling keeps), as a JPEG, optionally with EXIF
    /// orientation 6 (rotate 90° clockwise to display).
    fn smooth_jpeg(w: u32, h: u32, orientation6: bool) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            image::Rgb([(255.0 * fx) as u8, (255.0 * fy) as u8, (128.0 + 100.0 * (6.0 * fx).sin() * (4.0 * fy).cos()) as u8])
        });
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 92).encode_image(&img).unwrap();
        if !orientation6 {
            return jpeg;
        }
        let mut payload = b"Exif\0\0MM\x00\x2a\x00\x00\x00\x08\x00\x01".to_vec();
        payload.extend_from_slice(b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00");
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn dct_scale_keeps_both_sides_at_least_the_model_input() {
        assert_eq!(dct_scale_for(500, 333, 128), 2);
        assert_eq!(dct_scale_for(1024, 1024, 128), 8);
        assert_eq!(dct_scale_for(1016, 1024, 128), 4);
        assert_eq!(dct_scale_for(4000, 3000, 128), 8);
        assert_eq!(dct_scale_for(200, 900, 128), 1);
        assert_eq!(dct_scale_for(128, 128, 128), 1);
    }

    #[test]
    fn jpegs_for_a_model_decode_at_a_reduced_scale_with_their_full_size() {
        let options = DecodeOptions { max_pixels: 10_000_000, apply_exif_orientation: true, ..Default::default() };
        let jpg = smooth_jpeg(500, 333, false);
        let photo = decode_rgb_for_model(&jpg, options, 128).unwrap();
        assert_eq!((photo.width, photo.height, photo.scale), (500, 333, 2));
        assert_eq!(photo.image.dimensions(), (250, 167));
        // The same content as the full decode shrunk by 2 (box filter): within JPEG noise.
        let full = decode_rgb(&jpg, options).unwrap().image;
        let mut diff = 0u64;
        for (x, y, p) in photo.image.enumerate_pixels().filter(|(x, y, _)| *x < 249 && *y < 166) {
            for c in 0..3 {
                let mean: u32 = [(0, 0), (1, 0), (0, 1), (1, 1)].iter().map(|(dx, dy)| full.get_pixel(2 * x + dx, 2 * y + dy).0[c] as u32).sum::<u32>() / 4;
                diff += (p.0[c] as i64 - mean as i64).unsigned_abs();
            }
        }
        let mean_diff = diff as f64 / (249.0 * 166.0 * 3.0);
        assert!(mean_diff < 2.0, "mean difference {mean_diff}");
        // EXIF orientation: displayed as 333×500, the scaled pixels rotated the same way.
        let photo = decode_rgb_for_model(&smooth_jpeg(500, 333, true), options, 128).unwrap();
        assert_eq!((photo.width, photo.height), (333, 500));
        assert_eq!(photo.image.dimensions(), (167, 250));
        // Too small to scale, or not a JPEG: exactly decode_rgb.
        let small = smooth_jpeg(200, 150, false);
        let photo = decode_rgb_for_model(&small, options, 128).unwrap();
        assert_eq!(photo.scale, 1);
        assert_eq!(photo.image, decode_rgb(&small, options).unwrap().image);
        // Limits and damage are refused as by decode_rgb.
        let tight = DecodeOptions { max_pixels: 1000, ..options };
        assert!(matches!(decode_rgb_for_model(&jpg, tight, 128), Err(DecodeError::TooLarge { .. })));
        assert!(matches!(decode_rgb_for_model(&jpg[..jpg.len() / 2], options, 128), Err(DecodeError::Truncated(_))));
    }
}
