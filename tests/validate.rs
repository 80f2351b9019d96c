use std::io::Cursor;
use std::path::Path;

use crate::util::*;

fn png_bytes(img: &image::DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

fn stems(root: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(root.join("annotations/list.txt")).unwrap();
    text.lines().filter(|l| !l.starts_with('#')).map(|l| l.split(' ').next().unwrap().to_string()).collect()
}

fn remove_rows(root: &Path, stem: &str) {
    for f in ["list.txt", "trainval.txt", "test.txt"] {
        let p = root.join("annotations").join(f);
        let text = std::fs::read_to_string(&p).unwrap();
        let kept: String = text.lines().filter(|l| l.split(' ').next() != Some(stem)).map(|l| format!("{l}\n")).collect();
        std::fs::write(&p, kept).unwrap();
    }
}

#[test]
fn clean_synthetic_dataset_passes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 16, 1);
    let report_path = dir.path().join("report.json");
    let out = run(segctl().args(["validate", "--root"]).arg(&root).arg("--report").arg(&report_path));
    assert!(out.status.success());
    assert!(stdout(&out).contains("PASSED"));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["valid_pairs"], 16);
    assert_eq!(report["error_count"], 0);
    assert_eq!(report["warning_count"], 0);
    let fractions = &report["class_pixel_fractions"];
    let sum: f64 = ["pet", "background", "border"].iter().map(|k| fractions[k].as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-9);
    assert!(fractions["border"].as_f64().unwrap() > 0.01);
    assert_eq!(report["splits"]["trainval"]["rows"].as_u64().unwrap() + report["splits"]["test"]["rows"].as_u64().unwrap(), 16);
}

#[test]
fn every_real_archive_defect_is_reported_against_its_stem() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 32, 2);
    let s = stems(&root);
    let img = |stem: &str| root.join("images").join(format!("{stem}.jpg"));
    let mask = |stem: &str| root.join("annotations/trimaps").join(format!("{stem}.png"));
    let photo = |stem: &str| image::open(img(stem)).unwrap();

    // PNG and GIF bytes in a .jpg (the real Abyssinian_5 is an RGBA PNG, Abyssinian_34 a GIF).
    let p = photo(&s[0]);
    std::fs::write(img(&s[0]), png_bytes(&image::DynamicImage::ImageRgba8(p.to_rgba8()))).unwrap();
    let p = photo(&s[1]);
    let mut gif = Vec::new();
    p.to_rgba8().write_to(&mut Cursor::new(&mut gif), image::ImageFormat::Gif).unwrap();
    std::fs::write(img(&s[1]), gif).unwrap();
    // CMYK and grayscale JPEGs: warnings only.
    let p = photo(&s[2]).to_rgb8();
    let cmyk: Vec<u8> = p.pixels().flat_map(|px| {
        let [r, g, b] = px.0.map(|v| v as f32 / 255.0);
        let k = 1.0 - r.max(g).max(b);
        let f = |c: f32| if k >= 1.0 { 0 } else { ((1.0 - c - k) / (1.0 - k) * 255.0) as u8 };
        [f(r), f(g), f(b), (k * 255.0) as u8]
    }).collect();
    let mut jpeg = Vec::new();
    jpeg_encoder::Encoder::new(&mut jpeg, 90).encode(&cmyk, p.width() as u16, p.height() as u16, jpeg_encoder::ColorType::Cmyk).unwrap();
    std::fs::write(img(&s[2]), jpeg).unwrap();
    let p = photo(&s[3]);
    let mut jpeg = Vec::new();
    p.to_luma8().write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
    std::fs::write(img(&s[3]), jpeg).unwrap();
    // Truncated JPEG.
    let bytes = std::fs::read(img(&s[4])).unwrap();
    std::fs::write(img(&s[4]), &bytes[..bytes.len() / 2]).unwrap();
    // Mask of the wrong size; mask values outside {1,2,3}; an RGB mask; a missing mask.
    let m = image::open(mask(&s[5])).unwrap().to_luma8();
    let small = image::imageops::resize(&m, m.width() / 2, m.height() / 2, image::imageops::FilterType::Nearest);
    small.save(mask(&s[5])).unwrap();
    let mut m = image::open(mask(&s[6])).unwrap().to_luma8();
    m.put_pixel(0, 0, image::Luma([0]));
    m.put_pixel(1, 0, image::Luma([4]));
    m.save(mask(&s[6])).unwrap();
    let m = image::open(mask(&s[7])).unwrap();
    std::fs::write(mask(&s[7]), png_bytes(&image::DynamicImage::ImageRgb8(m.to_rgb8()))).unwrap();
    std::fs::remove_file(mask(&s[8])).unwrap();
    // A split row naming missing files; a pair in no split.
    let tv = root.join("annotations/trainval.txt");
    let mut text = std::fs::read_to_string(&tv).unwrap();
    text.push_str("ghost_dog_1 9 2 9\n");
    std::fs::write(&tv, text).unwrap();
    remove_rows(&root, &s[9]);
    // Stray files, as in the real archive (.mat files, AppleDouble files).
    std::fs::write(root.join("images/Abyssinian_100.mat"), b"MATLAB").unwrap();
    std::fs::write(root.join(format!("annotations/trimaps/._{}.png", s[10])), b"\x00\x05\x16\x07").unwrap();

    let report_path = dir.path().join("report.json");
    let out = run(segctl().args(["validate", "--root"]).arg(&root).arg("--report").arg(&report_path));
    assert_eq!(out.status.code(), Some(1), "errors fail validation");
    let text = stdout(&out);
    assert!(text.contains("FAILED"));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    let has = |kind: &str, code: &str, who: &str| {
        report[kind].as_array().unwrap().iter().any(|f| {
            f["code"] == code && (f["stem"].as_str() == Some(who) || f["file"].as_str().is_some_and(|p| p.ends_with(who)))
        })
    };
    let expect = [
        ("errors", "image_format_mismatch", s[0].as_str()),
        ("warnings", "alpha_dropped", s[0].as_str()),
        ("errors", "image_format_mismatch", s[1].as_str()),
        ("warnings", "cmyk_converted", s[2].as_str()),
        ("warnings", "grayscale_converted", s[3].as_str()),
        ("errors", "image_truncated", s[4].as_str()),
        ("errors", "mask_size_mismatch", s[5].as_str()),
        ("errors", "mask_bad_values", s[6].as_str()),
        ("errors", "mask_not_single_channel", s[7].as_str()),
        ("errors", "mask_missing", s[8].as_str()),
        ("errors", "split_row_missing_files", "ghost_dog_1"),
        ("errors", "not_in_any_split", s[9].as_str()),
        ("errors", "stray_file", "images/Abyssinian_100.mat"),
        ("errors", "stray_file", &format!("annotations/trimaps/._{}.png", s[10])),
    ];
    for (kind, code, who) in expect {
        assert!(has(kind, code, who), "missing {kind} {code} for {who}");
        assert!(text.contains(code), "summary lists {code}");
    }
    // CMYK and grayscale files are warnings only: those samples stay valid.
    for f in report["errors"].as_array().unwrap() {
        assert!(f["stem"] != s[2].as_str() && f["stem"] != s[3].as_str(), "unexpected error {f}");
    }
    assert_eq!(report["error_count"].as_u64().unwrap(), 13);

    let out = run(segctl().args(["validate", "--max-errors", "13", "--root"]).arg(&root));
    assert_eq!(out.status.code(), Some(0), "within --max-errors passes");
    let out = run(segctl().args(["validate", "--json", "--root"]).arg(&root));
    assert_eq!(json(&out)["error_count"], 13);
}

#[test]
fn a_missing_root_cannot_run() {
    let out = run(segctl().args(["validate", "--root", "/nonexistent/pets"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/nonexistent/pets"));
}

/// A split row whose "stem" is a path (`/tmp/t/x 1 1 1`): with `data.cache_dir` set, the
/// pipeline used to read `/tmp/t/x.jpg` and write `/tmp/t/x.bin`.
#[test]
fn a_path_like_split_row_is_reported_and_never_opened() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 16, 3);
    let first = stems(&root)[0].clone();
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::copy(root.join(format!("images/{first}.jpg")), outside.join("x.jpg")).unwrap();
    std::fs::copy(root.join(format!("annotations/trimaps/{first}.png")), outside.join("x.png")).unwrap();
    // Access times far in the past: a read moves them (relatime updates an atime older than
    // the modification time), so they tell whether anything opened the files.
    let long_ago = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    for name in ["x.jpg", "x.png"] {
        let file = std::fs::OpenOptions::new().write(true).open(outside.join(name)).unwrap();
        file.set_times(std::fs::FileTimes::new().set_accessed(long_ago)).unwrap();
    }
    let atime = |name: &str| std::fs::metadata(outside.join(name)).unwrap().accessed().unwrap();
    let row = format!("{} 1 1 1", outside.join("x").display());
    for file in ["trainval.txt", "list.txt"] {
        let path = root.join("annotations").join(file);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!("{row}\n"));
        std::fs::write(&path, text).unwrap();
    }

    let out = run(segctl().args(["validate", "--json", "--root"]).arg(&root));
    assert_eq!(out.status.code(), Some(1));
    let report = json(&out);
    let errors = report["errors"].as_array().unwrap();
    let malformed: Vec<_> = errors.iter().filter(|f| f["code"] == "split_row_malformed").collect();
    assert_eq!(malformed.len(), 2, "one per split file: {errors:?}");
    assert!(malformed.iter().all(|f| f["message"].as_str().unwrap().contains(&row)), "{malformed:?}");
    assert_eq!(report["error_count"], 2, "the row is reported once per file, not as a sample: {errors:?}");

    let config = tiny_config(dir.path(), &root, 1);
    let cache = dir.path().join("cache");
    let out = run(segctl().args(["train", "--json", "--config"]).arg(&config).arg("--set").arg(format!("data.cache_dir={}", cache.display())));
    assert!(out.status.success());
    assert_eq!(names_under(&outside), vec!["x.jpg", "x.png"], "nothing written beside the files the row names");
    assert_eq!((atime("x.jpg"), atime("x.png")), (long_ago, long_ago), "the files the row names were never read");
    assert!(!names_under(&cache).is_empty(), "the cache was used");
}

fn names_under(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}
