//! The `paligemma` binary end to end: outputs against the HF fixtures, and every kind of bad
//! input giving a clear message and a non-zero exit (never a panic).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fixture_image as image, fixtures};
use paligemma::npy;
use safetensors::SafeTensors;
use serde_json::Value;

fn model() -> PathBuf {
    common::fixture_model("tiny-mqa-f32")
}

fn run(args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_paligemma"));
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Assert a clean failure: exit code 1, an `error:` line containing every `needle`, no panic.
fn assert_fails(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit 1, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains("error:"), "no error line: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("paligemma-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// A copy of the fixture model.
    fn model_copy(tag: &str) -> Self {
        let t = Self::new(tag);
        for entry in std::fs::read_dir(model()).unwrap() {
            let p = entry.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, t.0.join(p.file_name().unwrap())).unwrap();
            }
        }
        t
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rewrite `model.safetensors` in `dir` through `edit(name, shape, bytes)`, which may drop a
/// tensor (None) or change it.
type Edited = Option<(Vec<usize>, Vec<u8>)>;

fn rewrite_weights(dir: &Path, edit: impl Fn(&str, &[usize], &[u8]) -> Edited) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (name, view) in st.tensors() {
        if let Some((shape, data)) = edit(&name, view.shape(), view.data()) {
            kept.push((name, view.dtype(), shape, data));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = kept
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

const FC1_BIAS: &str = "vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias";

#[test]
fn encode_image_matches_hf_on_both_binding_paths() {
    let tmp = TempDir::new("encode");
    let out = tmp.0.join("features.npy");
    let want = npy::read_f32(&model().join("ref/astronaut_image_features.npy")).unwrap();
    let (m, img) = (model(), image("astronaut.png"));
    for extra in [&[][..], &["--max-binding", "65536"][..]] {
        let mut args = vec!["encode-image", "--model", m.to_str().unwrap()];
        args.extend_from_slice(&[
            "--image",
            img.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        args.extend_from_slice(extra);
        let o = run(&args, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("adapter:"),
            "the adapter is named on stderr"
        );
        let got = npy::read_f32(&out).unwrap();
        assert_eq!(got.shape, vec![256, 64]);
        let err = got
            .data
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err <= 2e-3, "max abs diff {err} with {extra:?}");
    }
}

#[test]
fn generate_json_matches_hf_greedy_ids() {
    let o = run(
        &[
            "generate",
            "--model",
            model().to_str().unwrap(),
            "--image",
            image("astronaut.png").to_str().unwrap(),
            "--prompt",
            "caption en",
            "--max-new-tokens",
            "20",
            "--json",
            "--top-logprobs",
            "3",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("stdout is one JSON object");
    let ids: Vec<i64> = v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    let want = npy::read_i64(&model().join("ref/astronaut_gen_ids.npy"))
        .unwrap()
        .data;
    assert_eq!(ids, want);
    assert_eq!(v["prompt_tokens"], 260);
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 20);
    assert_eq!(steps[0]["top"].as_array().unwrap().len(), 3);
    assert_eq!(steps[0]["top"][0][0], steps[0]["id"]);
    for key in ["load_s", "vision_s", "prefill_s", "decode_tok_s"] {
        assert!(v["timings"][key].as_f64().unwrap() >= 0.0, "{key}");
    }
    let text = std::fs::read_to_string(model().join("ref/astronaut_gen_text.txt")).unwrap();
    assert_eq!(v["text"], text);
}

#[test]
fn model_resolves_from_the_hugging_face_cache() {
    let home = TempDir::new("hfhome");
    let snap = home.0.join("hub/models--acme--tiny/snapshots/0123abc");
    std::fs::create_dir_all(&snap).unwrap();
    for entry in std::fs::read_dir(model()).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, snap.join(p.file_name().unwrap())).unwrap();
        }
    }
    let img = image("astronaut.png");
    let args = [
        "generate",
        "--model",
        "acme/tiny",
        "--image",
        img.to_str().unwrap(),
        "--prompt",
        "caption en",
        "--max-new-tokens",
        "3",
    ];
    let o = run(&args, &[("HF_HOME", &home.0)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(
        &[
            "generate",
            "--model",
            "acme/missing",
            "--image",
            "x.png",
            "--prompt",
            "p",
        ],
        &[("HF_HOME", &home.0)],
    );
    assert_fails(
        &o,
        &[
            "acme/missing",
            "not in the local Hugging Face cache",
            "download",
        ],
    );
}

#[test]
fn revisions_pick_a_snapshot_of_the_cache() {
    let home = TempDir::new("hfrev");
    let repo = home.0.join("hub/models--acme--tiny");
    let snap = repo.join("snapshots/4567def");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/v1"), "4567def\n").unwrap();
    for entry in std::fs::read_dir(model()).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, snap.join(p.file_name().unwrap())).unwrap();
        }
    }
    let img = image("astronaut.png");
    let gen = |rev: &str| {
        let args = [
            "generate",
            "--model",
            "acme/tiny",
            "--revision",
            rev,
            "--image",
            img.to_str().unwrap(),
            "--prompt",
            "caption en",
            "-n",
            "2",
        ];
        run(&args, &[("HF_HOME", &home.0)])
    };
    for rev in ["v1", "4567def"] {
        let o = gen(rev);
        assert!(o.status.success(), "{rev}: {}", stderr(&o));
    }
    assert_fails(
        &gen("v2"),
        &["no revision \"v2\"", "refs: [v1]", "snapshots: [4567def]"],
    );
    assert_fails(&gen("../x"), &["no revision"]);
    let dir = model();
    let o = run(
        &[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--revision",
            "v1",
            "--image",
            img.to_str().unwrap(),
            "--prompt",
            "caption en",
        ],
        &[],
    );
    assert_fails(&o, &["is a directory", "Hugging Face cache"]);
}

#[test]
fn aliases_and_an_image_on_standard_input_answer_as_the_long_forms() {
    let dir = model();
    let img = image("astronaut.png");
    let (m, i) = (dir.to_str().unwrap(), img.to_str().unwrap());
    let ids = |o: &Output| -> Value {
        assert!(o.status.success(), "{}", stderr(o));
        serde_json::from_slice::<Value>(&o.stdout).unwrap()["token_ids"].clone()
    };
    let long = ids(&run(
        &[
            "generate",
            "--model",
            m,
            "--image",
            i,
            "--prompt",
            "caption en",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--json",
        ],
        &[],
    ));
    assert_eq!(long.as_array().unwrap().len(), 4);
    for short in [["-n", "4"], ["--max-tokens", "4"]] {
        let o = run(
            &[
                "generate",
                "--model",
                m,
                "--image",
                i,
                "--prompt",
                "caption en",
                short[0],
                short[1],
                "--temp",
                "0",
                "--json",
            ],
            &[],
        );
        assert_eq!(ids(&o), long, "{short:?}");
    }
    let piped = |extra: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_paligemma"))
            .args([
                "generate",
                "--model",
                m,
                "--image",
                "-",
                "--prompt",
                "caption en",
                "-n",
                "4",
                "--json",
            ])
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        let bytes = std::fs::read(&img).unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(&bytes);
        drop(stdin);
        child.wait_with_output().unwrap()
    };
    assert_eq!(ids(&piped(&[])), long);
    assert_fails(
        &piped(&["--annotate", "/tmp/x.png"]),
        &["need the image as a file"],
    );
}

#[test]
fn bad_model_directories_are_named() {
    let o = run(
        &[
            "encode-image",
            "--model",
            "/nonexistent/model",
            "--image",
            "a.png",
            "--out",
            "o.npy",
        ],
        &[],
    );
    assert_fails(&o, &["/nonexistent/model", "not a model directory"]);

    let missing = TempDir::model_copy("missing-tensor");
    rewrite_weights(&missing.0, |n, s, b| {
        (n != FC1_BIAS).then(|| (s.to_vec(), b.to_vec()))
    });
    let o = run(
        &[
            "encode-image",
            "--model",
            missing.path(),
            "--image",
            image("astronaut.png").to_str().unwrap(),
            "--out",
            "o.npy",
        ],
        &[],
    );
    assert_fails(&o, &[FC1_BIAS, "missing"]);

    let shape = TempDir::model_copy("wrong-shape");
    rewrite_weights(&shape.0, |n, s, b| {
        if n == FC1_BIAS {
            Some((vec![s[0] - 1], b[..b.len() - 4].to_vec()))
        } else {
            Some((s.to_vec(), b.to_vec()))
        }
    });
    let o = run(
        &[
            "encode-image",
            "--model",
            shape.path(),
            "--image",
            image("astronaut.png").to_str().unwrap(),
            "--out",
            "o.npy",
        ],
        &[],
    );
    assert_fails(&o, &[FC1_BIAS, "has shape [95]", "[96]"]);

    let short = TempDir::model_copy("short");
    let path = short.0.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let o = run(
        &[
            "encode-image",
            "--model",
            short.path(),
            "--image",
            image("astronaut.png").to_str().unwrap(),
            "--out",
            "o.npy",
        ],
        &[],
    );
    assert_fails(&o, &["model.safetensors", "not a valid safetensors file"]);

    let zero = TempDir::model_copy("zero-heads");
    let cfg = std::fs::read_to_string(zero.0.join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let mut v = v;
    v["text_config"]["num_attention_heads"] = 0.into();
    std::fs::write(zero.0.join("config.json"), v.to_string()).unwrap();
    let o = run(
        &[
            "generate",
            "--model",
            zero.path(),
            "--image",
            image("astronaut.png").to_str().unwrap(),
            "--prompt",
            "caption en",
        ],
        &[],
    );
    assert_fails(&o, &["config.json", "num_attention_heads is 0"]);

    let notok = TempDir::model_copy("no-tokenizer");
    std::fs::remove_file(notok.0.join("tokenizer.json")).unwrap();
    let o = run(
        &[
            "generate",
            "--model",
            notok.path(),
            "--image",
            image("astronaut.png").to_str().unwrap(),
            "--prompt",
            "caption en",
        ],
        &[],
    );
    assert_fails(&o, &["tokenizer.json is missing"]);
}

#[test]
fn bad_images_are_named() {
    for (file, needle) in [
        ("not_an_image.png", "not_an_image.png"),
        ("truncated.png", "truncated.png"),
        ("huge_header.png", "30000x30000"),
        ("does_not_exist.png", "does_not_exist.png"),
    ] {
        let o = run(
            &[
                "encode-image",
                "--model",
                model().to_str().unwrap(),
                "--image",
                image(file).to_str().unwrap(),
                "--out",
                "/tmp/never.npy",
            ],
            &[],
        );
        assert_fails(&o, &[needle]);
    }
}

/// The HF beam-search case of `tests/fixtures/beam.json` for tiny-mqa-f32 on the astronaut.
fn beam_case(beams: u64, early: &Value) -> Value {
    let text = std::fs::read_to_string(fixtures().join("beam.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["model"] == "tests/fixtures/models/tiny-mqa-f32"
                && c["pixels"] == "ref/astronaut_pixel_values.npy"
                && c["num_beams"] == beams
                && &c["early_stopping"] == early
        })
        .expect("the fixture has the case")
        .clone()
}

#[test]
fn generate_num_beams_matches_hf_beam_search() {
    let m = model();
    let img = image("astronaut.png");
    let base = [
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--prompt",
        "caption en",
        "--max-new-tokens",
        "20",
    ];
    let runs: [(&[&str], Value); 2] = [
        (&["--num-beams", "3"], beam_case(3, &Value::Bool(false))),
        (
            &[
                "--num-beams",
                "3",
                "--length-penalty",
                "0.5",
                "--early-stopping",
            ],
            beam_case(3, &Value::Bool(true)),
        ),
    ];
    let mut texts = Vec::new();
    for (extra, want) in runs {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        args.push("--json");
        let o = run(&args, &[]);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).expect("stdout is one JSON object");
        assert_eq!(v["token_ids"], want["ids"], "{extra:?}");
        let (score, hf) = (
            v["beam_score"].as_f64().unwrap(),
            want["score"].as_f64().unwrap(),
        );
        assert!(
            (score - hf).abs() < 1e-3,
            "{extra:?}: score {score} vs HF {hf}"
        );
        texts.push(v["text"].as_str().unwrap().to_string());
    }
    // Without --json the answer is printed as text.
    let mut args = base.to_vec();
    args.extend_from_slice(&["--num-beams", "3"]);
    let o = run(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("{}\n", texts[0])
    );
    assert_fails(
        &run(&[&base[..], &["--num-beams", "0"]].concat(), &[]),
        &["--num-beams must be at least 1"],
    );
    assert_fails(
        &run(
            &[&base[..], &["--num-beams", "2", "--temperature", "0.5"]].concat(),
            &[],
        ),
        &["beam search", "temperature 0, not 0.5"],
    );
}

#[test]
fn bad_requests_are_explained() {
    let m = model();
    let img = image("astronaut.png");
    let base = [
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        run(&a, &[])
    };
    assert_fails(&with(&["--prompt", "caption <image> en"]), &["<image>"]);
    assert_fails(
        &with(&["--prompt", "caption en", "--max-new-tokens", "10000000"]),
        &["10000000", "8192 positions"],
    );
    assert_fails(
        &with(&["--prompt", "caption en", "--max-new-tokens", "0"]),
        &["at least 1"],
    );
    assert_fails(
        &with(&["--prompt", "caption en", "--top-p", "0"]),
        &["top-p"],
    );
    let long = "a ".repeat(9000);
    assert_fails(
        &with(&["--prompt", &long, "--max-new-tokens", "1"]),
        &["8192 positions"],
    );
}

#[test]
fn bad_adapters_are_explained() {
    let m = model();
    let img = image("astronaut.png");
    let gen = |adapter: &str| {
        run(
            &[
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--image",
                img.to_str().unwrap(),
                "--prompt",
                "caption en",
                "--adapter",
                adapter,
            ],
            &[],
        )
    };
    assert_fails(
        &gen("/nonexistent/adapter"),
        &["/nonexistent/adapter/adapter_config.json"],
    );
    let good = fixtures().join("adapters/tiny-mqa-lora");
    let copy = TempDir::new("rank");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(good.join(f), copy.0.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(copy.0.join("adapter_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["r"] = 8.into();
    std::fs::write(copy.0.join("adapter_config.json"), v.to_string()).unwrap();
    assert_fails(&gen(copy.path()), &["lora_A", "do not fit rank 8"]);
    v["r"] = 4.into();
    v["use_dora"] = true.into();
    std::fs::write(copy.0.join("adapter_config.json"), v.to_string()).unwrap();
    assert_fails(&gen(copy.path()), &["use_dora"]);
    let o = gen(good.to_str().unwrap());
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn batch_file_gives_each_answer_in_order() {
    let tmp = TempDir::new("batch");
    let file = tmp.0.join("requests.jsonl");
    let (a, c) = (image("astronaut.png"), image("camera.png"));
    let lines = [
        serde_json::json!({"image": a, "prompt": "caption en"}),
        serde_json::json!({"image": c, "prompt": "answer en what is this?"}),
        serde_json::json!({"image": a, "prompt": "detect person"}),
    ];
    let body: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&file, body.join("\n")).unwrap();
    let m = model();
    let args = [
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--batch",
        file.to_str().unwrap(),
        "--max-new-tokens",
        "6",
        "--json",
    ];
    let o = run(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let results: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 3);
    for (line, result) in lines.iter().zip(&results) {
        let img = line["image"].as_str().unwrap();
        let prompt = line["prompt"].as_str().unwrap();
        let single = run(
            &[
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--image",
                img,
                "--prompt",
                prompt,
                "--max-new-tokens",
                "6",
                "--json",
            ],
            &[],
        );
        let single: serde_json::Value = serde_json::from_slice(&single.stdout).unwrap();
        assert_eq!(result["token_ids"], single["token_ids"], "{prompt}");
    }
    std::fs::write(&file, "{\"image\": \"a.png\"}\n").unwrap();
    assert_fails(
        &run(
            &[
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--batch",
                file.to_str().unwrap(),
            ],
            &[],
        ),
        &["line 1", "prompt"],
    );
}

fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// Bad lines of a batch file (missing image, not JSON, no prompt) give an error object in
/// their place while the others are answered; the job ends with exit code 1. `--shard I/N`
/// takes every N-th line.
#[test]
fn batch_file_reports_bad_lines_in_place_and_shards() {
    let tmp = TempDir::new("batch-bad");
    let file = tmp.0.join("requests.jsonl");
    let good = |i: usize| serde_json::json!({"image": common::scene(i), "prompt": "detect square"});
    let lines = [
        good(0).to_string(),
        serde_json::json!({"image": tmp.0.join("missing.png"), "prompt": "caption en"}).to_string(),
        "{not json".to_string(),
        good(1).to_string(),
        String::new(),
        serde_json::json!({"image": common::scene(2)}).to_string(),
        good(2).to_string(),
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let m = common::shapes_model();
    let base = [
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--batch",
        file.to_str().unwrap(),
        "--json",
        "--max-batch",
        "2",
    ];
    let o = run(&base, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
    let out = json_lines(&o);
    assert_eq!(out.len(), 6, "one line per non-empty input line");
    let error = |v: &serde_json::Value| v["error"].as_str().unwrap_or("").to_string();
    assert!(error(&out[1]).contains("line 2"), "{}", out[1]);
    assert!(error(&out[1]).contains("missing.png"), "{}", out[1]);
    assert!(error(&out[2]).contains("line 3"), "{}", out[2]);
    assert!(error(&out[4]).contains("line 6") && error(&out[4]).contains("prompt"));
    for (at, scene_index) in [(0, 0), (3, 1), (5, 2)] {
        assert_eq!(out[at]["finish_reason"], "eos", "{}", out[at]);
        let single = run(
            &[
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--image",
                common::scene(scene_index).to_str().unwrap(),
                "--prompt",
                "detect square",
                "--json",
            ],
            &[],
        );
        assert!(single.status.success(), "{}", stderr(&single));
        assert_eq!(out[at]["token_ids"], json_lines(&single)[0]["token_ids"]);
    }
    // Lines 0, 2, 4, 6 (the empty line 4 is skipped): two answers and one error.
    let mut sharded = base.to_vec();
    sharded.extend(["--shard", "0/2"]);
    let o = run(&sharded, &[]);
    let shard = json_lines(&o);
    assert_eq!(shard.len(), 3);
    assert_eq!(shard[0]["token_ids"], out[0]["token_ids"]);
    assert!(error(&shard[1]).contains("line 3"));
    assert_eq!(shard[2]["token_ids"], out[5]["token_ids"]);
    let mut bad_shard = base.to_vec();
    bad_shard.extend(["--shard", "2/2"]);
    let o = run(&bad_shard, &[]);
    assert_eq!(o.status.code(), Some(2), "clap rejects the value");
    assert!(stderr(&o).contains("I/N"), "{}", stderr(&o));
}

/// Several `--prompt`s about one image are answered in order, each as it would be alone;
/// `--stop` ends an answer before its string, and the JSON says why each answer ended.
#[test]
fn several_prompts_stop_strings_and_finish_reasons() {
    let m = common::shapes_model();
    let img = common::scene(0);
    let args = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let go = |extra: &[&str]| {
        let a = args(extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = run(&a, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        o
    };
    let both = json_lines(&go(&[
        "--prompt",
        "detect square",
        "--prompt",
        "caption en",
        "--json",
    ]));
    assert_eq!(both.len(), 2);
    let first = json_lines(&go(&["--prompt", "detect square", "--json"]));
    let second = json_lines(&go(&["--prompt", "caption en", "--json"]));
    assert_eq!(both[0]["token_ids"], first[0]["token_ids"]);
    assert_eq!(both[1]["token_ids"], second[0]["token_ids"]);
    assert_eq!(
        both[0]["text"],
        "<loc0238><loc0178><loc0544><loc0544> square"
    );
    assert_eq!(both[0]["completion_tokens"], 6);
    assert_eq!(both[0]["steps"][4]["text"], " square");
    assert_eq!(both[0]["steps"][5]["text"], "<eos>");
    let text =
        String::from_utf8(go(&["--prompt", "detect square", "--prompt", "caption en"]).stdout)
            .unwrap();
    let answers: Vec<&str> = text.lines().collect();
    assert_eq!(answers[0], first[0]["text"].as_str().unwrap());
    assert_eq!(answers[1], second[0]["text"].as_str().unwrap());
    let stopped = json_lines(&go(&[
        "--prompt",
        "detect square",
        "--stop",
        "<loc0544>",
        "--json",
    ]));
    assert_eq!(stopped[0]["text"], "<loc0238><loc0178>");
    assert_eq!(stopped[0]["finish_reason"], "stop");
    let short = json_lines(&go(&[
        "--prompt",
        "detect square",
        "--max-new-tokens",
        "2",
        "--json",
    ]));
    assert_eq!(short[0]["finish_reason"], "length");
    let a = args(&["--prompt", "caption en", "--repetition-penalty=-1"]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    assert_fails(&run(&a, &[]), &["repetition penalty"]);
}

/// `-v` names the checkpoint's kind (read from its config and its `paligemma-*` name), every
/// JSON object carries it with the request's warnings, and prompts or images that do not fit
/// it are warned about on stderr: a free-form question to a `pt` checkpoint, a `segment`
/// prompt without `--vae`, an image squashed by the square resize.
#[test]
fn checkpoint_kind_and_prompt_warnings() {
    let tmp = TempDir::new("kind");
    let dir = tmp.0.join("paligemma-3b-pt-224");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(common::shapes_model()).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    let wide = image("chelsea.jpg"); // 451 × 300
    let o = run(
        &[
            "-v",
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--image",
            wide.to_str().unwrap(),
            "--prompt",
            "what is this?",
            "--prompt",
            "segment circle",
            "--json",
            "-n",
            "2",
        ],
        &[],
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    // tiny-shapes is 128 wide: no published size.
    assert!(err.contains("checkpoint: PaliGemma 1 pt 224 px"), "{err}");
    assert!(
        err.contains("warning: \"what is this?\" has no task prefix"),
        "{err}"
    );
    assert!(
        err.contains("warning: \"segment circle\" answers with <segNNN> mask codes"),
        "{err}"
    );
    assert!(
        err.contains("the 451×300 image is resized to 224×224"),
        "{err}"
    );
    assert!(err.contains("width is squashed 1.50×"), "{err}");
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 2);
    for (line, second) in lines.iter().zip(["has no task prefix", "no mask decoder"]) {
        assert_eq!(line["model"]["generation"], 1, "{line}");
        assert_eq!(line["model"]["variant"], "pt", "{line}");
        assert_eq!(line["model"]["resolution"], 224, "{line}");
        assert_eq!(line["model"]["size"], Value::Null, "{line}");
        let warnings = line["warnings"].as_array().unwrap();
        assert_eq!(warnings.len(), 2, "{line}");
        assert!(warnings[0].as_str().unwrap().contains("squashed"), "{line}");
        assert!(warnings[1].as_str().unwrap().contains(second), "{line}");
    }
    // A square image and a task prefix: no warnings.
    let o = run(
        &[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--image",
            common::scene(0).to_str().unwrap(),
            "--prompt",
            "caption en",
            "--json",
        ],
        &[],
    );
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    assert_eq!(json_lines(&o)[0]["warnings"], serde_json::json!([]));
}

/// `scripts/device_bench.sh --dry-run` (the GPU benchmark's rehearsal on lavapipe): every step
/// runs at small shapes and the one JSON file holds the probes, the three formats at batch 1
/// and 8 and the kernel profile.
#[test]
fn device_bench_dry_run_writes_its_report() {
    let dir = TempDir::new("device-bench");
    let report = dir.0.join("device_bench.json");
    let o = Command::new(common::root().join("scripts/device_bench.sh"))
        .args([
            "--dry-run",
            "--bin",
            env!("CARGO_BIN_EXE_paligemma"),
            "--out",
        ])
        .arg(&report)
        .output()
        .expect("the script runs");
    assert!(o.status.success(), "exit {:?}: {}", o.status, stderr(&o));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["errors"], serde_json::json!([]));
    let probes = &v["probes"]["probes"];
    assert_eq!(probes["read_buffer_bytes"], 64 << 20);
    assert!(probes["read_gbs"].as_f64().unwrap() > 0.0, "{probes}");
    let models = v["models"]["models"].as_array().unwrap();
    let formats: Vec<&str> = models
        .iter()
        .map(|m| m["weights"].as_str().unwrap())
        .collect();
    assert_eq!(formats, ["f16", "int8", "int4"]);
    for m in models {
        let batches: Vec<u64> = m["batches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["batch"].as_u64().unwrap())
            .collect();
        assert_eq!(batches, [1, 8], "{m}");
    }
    let profile = v["profile"]["models"][0]["profile"].as_array().unwrap();
    assert!(profile.len() > 5, "{profile:?}");
}

/// `--image` twice: one prompt about both images (`tests/fixtures/multi_image.json`, from
/// `scripts/make_multi_image_fixture.py`) gives HF's greedy ids and log-probabilities, asked
/// twice (the images' features are then computed once and shared) and as a `--batch` line
/// with a list of images.
#[test]
fn two_images_in_one_prompt_match_hf() {
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("multi_image.json")).unwrap(),
    )
    .unwrap();
    let root = common::root();
    let m = root.join(fixture["model"].as_str().unwrap());
    let images: Vec<PathBuf> = fixture["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| root.join(p.as_str().unwrap()))
        .collect();
    let prompt = fixture["prompt"].as_str().unwrap();
    let (a, b) = (images[0].to_str().unwrap(), images[1].to_str().unwrap());
    let m = m.to_str().unwrap();
    let check = |v: &Value, how: &str| {
        assert_eq!(v["token_ids"], fixture["gen_ids"], "{how}");
        assert_eq!(v["prompt_tokens"], 522, "{how}");
        assert_eq!(v["text"], fixture["gen_text"], "{how}");
        let steps = v["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 20, "{how}");
        for (s, step) in steps.iter().enumerate() {
            let got = step["logprob"].as_f64().unwrap();
            let want = fixture["gen_logprobs"][s].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 0.02,
                "{how} step {s}: {got} vs {want}"
            );
        }
    };
    let o = run(
        &[
            "generate", "--model", m, "--image", a, "--image", b, "--prompt", prompt, "--prompt",
            prompt, "-n", "20", "--json",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let answers = json_lines(&o);
    assert_eq!(answers.len(), 2);
    for (i, v) in answers.iter().enumerate() {
        check(v, &format!("--image twice, prompt {}", i + 1));
    }
    let tmp = TempDir::new("two-images");
    let file = tmp.0.join("requests.jsonl");
    let lines = [
        serde_json::json!({"image": [a, b], "prompt": prompt}),
        serde_json::json!({"image": [], "prompt": prompt}),
        serde_json::json!({"image": [a, 3], "prompt": prompt}),
    ];
    let body: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&file, body.join("\n")).unwrap();
    let args = [
        "generate",
        "--model",
        m,
        "--batch",
        file.to_str().unwrap(),
        "-n",
        "20",
        "--json",
    ];
    let o = run(&args, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let results = json_lines(&o);
    check(&results[0], "--batch with a list of images");
    let error = |i: usize| results[i]["error"].as_str().unwrap().to_string();
    assert!(
        error(1).contains("line 2") && error(1).contains("empty list"),
        "{}",
        error(1)
    );
    assert!(
        error(2).contains("line 3") && error(2).contains("list of paths"),
        "{}",
        error(2)
    );
}

/// What several images cannot do is refused before the model loads: standard input twice,
/// and the outputs that draw on one image.
#[test]
fn several_images_refusals_are_explained() {
    let m = model();
    let (a, c) = (image("astronaut.png"), image("chelsea.jpg"));
    let (m, a, c) = (
        m.to_str().unwrap(),
        a.to_str().unwrap(),
        c.to_str().unwrap(),
    );
    let two = [
        "generate",
        "--model",
        m,
        "--image",
        a,
        "--image",
        c,
        "--prompt",
        "detect cat",
    ];
    let with = |extra: &[&str]| run(&[&two[..], extra].concat(), &[]);
    assert_fails(
        &with(&["--annotate", "out.png"]),
        &["--annotate", "one image", "2 --image"],
    );
    assert_fails(
        &with(&["--vae", "vae-oid.npz"]),
        &["--vae", "one image", "2 --image"],
    );
    assert_fails(
        &run(
            &[
                "generate",
                "--model",
                m,
                "--image",
                "-",
                "--image",
                "-",
                "--prompt",
                "caption en",
            ],
            &[],
        ),
        &["`--image -` can be given once"],
    );
}
