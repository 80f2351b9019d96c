use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::*;

#[test]
fn predict_without_a_model_flag_uses_the_served_default() {
    let dir = tempfile::tempdir().unwrap();
    // An empty repository: the error says how to make a model.
    let out = run(segctl().current_dir(dir.path()).args(["predict", "nothing.jpg"]));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("segctl export") && err.contains("--model") && err.lines().count() == 1, "{err}");

    // As typed after the quick start: `models/pets/1` in the working folder, no flags.
    let (config, run_dir, repo) = trained_model(dir.path(), 16);
    assert_eq!(repo, dir.path().join("models"));
    let photo = std::fs::read_dir(dir.path().join("pets/images")).unwrap().next().unwrap().unwrap().path();
    std::fs::copy(&photo, dir.path().join("photo.jpg")).unwrap();
    let out = run(segctl().current_dir(dir.path()).env("RUST_LOG", "off").args(["predict", "photo.jpg"]));
    assert!(out.status.success());
    assert!(stderr(&out).contains("using model pets version 1"), "{}", stderr(&out));
    let default_mask = image::open(dir.path().join("predictions/photo_mask.png")).unwrap().to_luma8();
    let out = run(segctl().current_dir(dir.path()).args(["predict", "--model", "models/pets/1", "photo.jpg", "--out", "explicit"]));
    assert!(out.status.success());
    let explicit = image::open(dir.path().join("explicit/photo_mask.png")).unwrap().to_luma8();
    assert_eq!(default_mask, explicit, "the default model is version 1");

    // A newer version is the one used; `serve.default_model` picks among models.
    let out = run(segctl().args(["export", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir).args(["--name", "pets", "--repository"]).arg(&repo));
    assert!(out.status.success());
    let out = run(segctl().args(["export", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir).args(["--name", "aaa", "--repository"]).arg(&repo));
    assert!(out.status.success());
    let out = run(segctl().current_dir(dir.path()).args(["predict", "photo.jpg", "--set", "serve.default_model=pets"]));
    assert!(out.status.success());
    assert!(stderr(&out).contains("using model pets version 2"), "{}", stderr(&out));
    let out = run(segctl().current_dir(dir.path()).args(["predict", "photo.jpg"]));
    assert!(stderr(&out).contains("using model aaa version 1"), "first model by name: {}", stderr(&out));
    let out = run(segctl().current_dir(dir.path()).args(["predict", "photo.jpg", "--set", "serve.default_model=nope"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("model `nope`"), "{}", stderr(&out));
}

#[test]
fn completions_parse_in_their_shells() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef segctl"), ("fish", "complete -c segctl"), ("powershell", "Register-ArgumentCompleter"), ("elvish", "edit:completion")] {
        let out = run(segctl().args(["completions", shell]));
        assert!(out.status.success(), "{shell}");
        let script = stdout(&out);
        assert!(script.contains(marker), "{shell}: no `{marker}`");
        for sub in ["train", "predict", "serve", "completions", "config", "max-errors"] {
            assert!(script.contains(sub), "{shell}: `{sub}` missing");
        }
        let path = dir.path().join(format!("segctl.{shell}"));
        std::fs::write(&path, &script).unwrap();
        // Each shell that is installed checks the syntax (.ci/run installs bash, zsh and fish).
        let check = match shell {
            "bash" => Some(("bash", vec!["-n"])),
            "zsh" => Some(("zsh", vec!["-n"])),
            "fish" => Some(("fish", vec!["--no-execute"])),
            _ => None,
        };
        if let Some((bin, args)) = check {
            match Command::new(bin).args(&args).arg(&path).output() {
                Ok(o) => assert!(o.status.success(), "{bin} rejects the script: {}", String::from_utf8_lossy(&o.stderr)),
                Err(_) if bin != "bash" && std::env::var("REQUIRE_ALL").as_deref() != Ok("1") => {
                    eprintln!("{bin} not installed: syntax not checked")
                }
                Err(e) => panic!("bash: {e}"),
            }
        }
    }
    // bash really completes the subcommands.
    let path = dir.path().join("segctl.bash");
    let probe = format!(
        "source {}; COMP_WORDS=(segctl pre); COMP_CWORD=1; _segctl segctl pre segctl; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        path.display()
    );
    let o = Command::new("bash").arg("-c").arg(&probe).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "predict", "{}", String::from_utf8_lossy(&o.stderr));
    let out = run(segctl().args(["completions", "tcsh"]));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn man_pages_render() {
    let out = run(segctl().arg("man"));
    assert!(out.status.success());
    let roff = out.stdout;
    assert!(String::from_utf8_lossy(&roff).starts_with(".ie \\n(.g .ds Aq"), "roff from clap_mangen");
    // groff renders it (installed by .ci/run); the text names every subcommand.
    let mut groff = Command::new("groff").args(["-man", "-Tutf8"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("groff installed");
    groff.stdin.take().unwrap().write_all(&roff).unwrap();
    let rendered = groff.wait_with_output().unwrap();
    assert!(rendered.status.success());
    let text = String::from_utf8_lossy(&rendered.stdout).replace(|c: char| c == '\u{8}', "");
    for word in ["segctl", "fetch-data", "train", "evaluate", "export", "serve", "predict", "benchmark", "completions"] {
        assert!(text.contains(word), "`{word}` missing from the page:\n{text}");
    }
    let out = run(segctl().args(["man", "predict"]));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("segctl\\-predict"));
    let dir = tempfile::tempdir().unwrap();
    let out = run(segctl().args(["man", "--out"]).arg(dir.path()));
    assert!(out.status.success());
    for page in ["segctl.1", "segctl-train.1", "segctl-serve.1", "segctl-man.1"] {
        assert!(dir.path().join(page).is_file(), "{page}");
    }
    let out = run(segctl().args(["man", "nope"]));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn version_names_the_build() {
    let out = run(segctl().arg("--version"));
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.starts_with(&format!("segctl {}", env!("CARGO_PKG_VERSION"))), "{text}");
    assert!(text.contains("cpu kernels: ") && text.contains("cuda: "), "{text}");
    let short = run(segctl().arg("-V"));
    assert_eq!(stdout(&short), text);
    let v = json(&run(segctl().args(["--version", "--json"])));
    for key in ["name", "version", "commit", "target", "features", "kernels", "cpu_features", "cuda"] {
        assert!(v.get(key).is_some(), "key `{key}` missing: {v}");
    }
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(["avx512", "avx2", "portable"].contains(&v["kernels"].as_str().unwrap()), "{v}");
    assert_eq!(v["cuda"]["built"], cfg!(feature = "cuda"));
    // Built from this checkout: the commit is git's.
    if let Ok(o) = Command::new("git").args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"]).output() {
        if o.status.success() {
            assert_eq!(v["commit"].as_str().unwrap().len(), 40, "{v}");
        }
    }
    // SEGCTL_KERNELS is honoured.
    let v = json(&run(segctl().env("SEGCTL_KERNELS", "portable").args(["--version", "--json"])));
    assert_eq!(v["kernels"], "portable");
    assert_eq!(v["bf16_kernels"], "portable");
    assert_eq!(v["int8_kernels"], "portable");
    // bf16 is native where the CPU has AMX-BF16 (and Linux grants the tile state) or
    // AVX512-BF16; int8 where it has AVX512-VNNI or AVX-VNNI.
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let (amx, avx512bf16) = (has("amx_bf16"), has("avx512_bf16"));
    let v = json(&run(segctl().args(["--version", "--json"])));
    let native: Vec<&str> = v["native_precisions"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert_eq!(native.contains(&"bf16"), amx || avx512bf16, "{v}");
    assert_eq!(native.contains(&"int8"), has("avx512_vnni") || has("avx_vnni"), "{v}");
    assert_eq!(v["bf16_kernels"], if amx { "amx" } else if avx512bf16 { "avx512bf16" } else { "portable" });
    let int8 = if has("avx512_vnni") { "avx512vnni" } else if has("avx_vnni") { "avxvnni" } else if has("avx2") { "avx2" } else { "portable" };
    assert_eq!(v["int8_kernels"], int8, "{v}");
    // Every path can be forced (where the CPU has it).
    for (value, field, unit) in [("avx512bf16", "bf16_kernels", "avx512bf16"), ("avx512vnni", "int8_kernels", "avx512vnni"), ("avxvnni", "int8_kernels", "avxvnni"), ("avx2", "int8_kernels", "avx2")] {
        let forced = run(segctl().env("SEGCTL_KERNELS", value).args(["--version", "--json"]));
        let v = json(&forced);
        let supported = match value {
            "avx512bf16" => avx512bf16,
            "avx512vnni" => has("avx512_vnni"),
            "avxvnni" => has("avx_vnni"),
            _ => has("avx2"),
        };
        if supported {
            assert_eq!(v[field], unit, "{value}: {v}");
        } else {
            assert!(v["kernels"].as_str().unwrap().contains(value), "{value}: forcing a missing unit is an error: {v}");
        }
    }
    let forced = run(segctl().env("SEGCTL_KERNELS", "amx").args(["--version", "--json"]));
    if amx {
        assert_eq!(json(&forced)["bf16_kernels"], "amx");
    } else {
        assert!(json(&forced)["kernels"].as_str().unwrap().contains("AMX"), "forcing a missing unit is an error");
    }
    // --json alone is a usage error.
    assert_eq!(run(segctl().arg("--json")).status.code(), Some(2));
}

#[test]
fn serve_json_reports_a_port_that_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 12);
    let server = JsonServer::start(&config, &repo);
    let v = &server.started;
    let port = v["port"].as_u64().unwrap();
    assert!(port > 0);
    assert_eq!(v["url"], format!("http://127.0.0.1:{port}"));
    assert_eq!(v["models"][0]["name"], "pets");
    assert_eq!(v["models"][0]["versions"][0]["version"], 1);
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let mut answered = false;
    for _ in 0..100 {
        if let Ok(r) = agent.get(&format!("http://127.0.0.1:{port}/v1/models/pets")).call() {
            let status: serde_json::Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
            assert_eq!(status["model_version_status"][0]["version"], "1", "{status}");
            answered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(server);
    assert!(answered, "the reported port does not answer");
}
