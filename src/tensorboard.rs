//! TensorBoard event files (`events.out.tfevents.*`): scalars and PNG image summaries in
//! TFRecord framing (length, masked CRC-32C of the length, the `Event` protobuf, masked CRC-32C
//! of it), the format TensorBoard, `tf.summary` and PyTorch's `SummaryWriter` write. The
//! messages are prost structs with the field numbers of tensorflow's `event.proto` and
//! `summary.proto`: no TensorFlow, no `protoc`.
//!
//! A resumed run opens a new file starting with a `SessionLog START` event at the first step it
//! will write: TensorBoard then drops what an earlier file logged from that step on (the steps
//! after the checkpoint that the interrupted run had got to), so no step appears twice.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

#[derive(Clone, PartialEq, prost::Message)]
struct SessionLog {
    /// `SessionLog.SessionStatus`: 1 = START.
    #[prost(int32, tag = "1")]
    status: i32,
    #[prost(string, tag = "3")]
    msg: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(oneof = "Value", tags = "2, 4")]
    value: Option<Value>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Value {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(SummaryImage),
}

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryImage {
    #[prost(int32, tag = "1")]
    height: i32,
    #[prost(int32, tag = "2")]
    width: i32,
    /// 3 = RGB.
    #[prost(int32, tag = "3")]
    colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    encoded_image_string: Vec<u8>,
}

/// CRC-32C (Castagnoli), reflected, as TFRecord uses.
fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// Appends events to one `events.out.tfevents.*` file of a run folder.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// A new event file in `dir`. `resume_from_step`: the run continues after this step (see
    /// the module docs); `None` for a fresh run.
    pub fn create(dir: &Path, resume_from_step: Option<u64>) -> Result<Self> {
        crate::util::fs::create_dir_all(dir)?;
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
        let host: String = host.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').collect();
        // Files sort by name (TensorBoard reads them in that order): a counter keeps a resume in
        // the same second after the file it continues.
        let mut n = 0;
        let path = loop {
            let p = dir.join(format!("events.out.tfevents.{secs:010}.{host}.{}.{n}", std::process::id()));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let file = File::create(&path).with_context(|| format!("cannot create `{}`", path.display()))?;
        let mut writer = Self { path, out: BufWriter::new(file) };
        writer.write(0, What::FileVersion("brain.Event:2".into()))?;
        if let Some(step) = resume_from_step {
            writer.write(step + 1, What::SessionLog(SessionLog { status: 1, msg: format!("resumed after step {step}") }))?;
        }
        writer.flush()?;
        Ok(writer)
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, step: u64, what: What) -> Result<()> {
        let wall_time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let data = Event { wall_time, step: step as i64, what: Some(what) }.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.out.write_all(&record).with_context(|| format!("cannot write `{}`", self.path.display()))
    }

    /// Scalars at `step`, one event.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let value = values.iter().map(|(tag, v)| SummaryValue { tag: tag.to_string(), value: Some(Value::SimpleValue(*v as f32)) }).collect();
        self.write(step, What::Summary(Summary { value }))
    }

    /// An RGB image at `step`.
    pub fn image(&mut self, step: u64, tag: &str, image: &image::RgbImage) -> Result<()> {
        let mut png = Vec::new();
        image.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        let summary = SummaryImage { height: image.height() as i32, width: image.width() as i32, colorspace: 3, encoded_image_string: png };
        self.write(step, What::Summary(Summary { value: vec![SummaryValue { tag: tag.into(), value: Some(Value::Image(summary)) }] }))
    }

    /// Makes what was written readable (called at each epoch's end and on exit).
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().with_context(|| format!("cannot write `{}`", self.path.display()))
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn records_are_framed_with_their_lengths_and_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), Some(9)).unwrap();
        w.scalars(10, &[("train/loss", 0.5)]).unwrap();
        w.flush().unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut at = 0;
        let mut events = Vec::new();
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc(data));
            events.push(Event::decode(data).unwrap());
            at += 16 + len;
        }
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].what, Some(What::FileVersion("brain.Event:2".into())));
        assert!(matches!(&events[1].what, Some(What::SessionLog(s)) if s.status == 1) && events[1].step == 10);
        assert_eq!(events[2].step, 10);
        assert!(w.path().file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."));
    }
}
