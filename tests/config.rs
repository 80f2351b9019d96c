use crate::util::*;

#[test]
fn unknown_key_and_wrong_type_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "data:\n  root: /tmp/x\n  imagesize: 128\n").unwrap();
    let out = run(segctl().args(["validate", "--config"]).arg(&bad));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("bad.yaml") && err.contains("imagesize"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    std::fs::write(&bad, "train:\n  epochs: ten\n").unwrap();
    let out = run(segctl().args(["validate", "--config"]).arg(&bad));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("train.epochs"), "{}", stderr(&out));

    let out = run(segctl().args(["validate", "--set", "data.image_size=100"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("data.image_size"), "{}", stderr(&out));

    let out = run(segctl().args(["validate", "--set", "nonsense"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("KEY=VALUE"), "{}", stderr(&out));
}

#[test]
fn shipped_configs_load() {
    for name in ["configs/pets.yaml", "configs/smoke.yaml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
        let dir = tempfile::tempdir().unwrap();
        // validate on an empty root fails with 2 *after* the config loaded fine.
        let out = run(segctl().args(["validate", "--config"]).arg(&path).arg("--root").arg(dir.path().join("none")));
        assert_eq!(out.status.code(), Some(2));
        assert!(stderr(&out).contains("does not exist"), "{name}: {}", stderr(&out));
    }
}
