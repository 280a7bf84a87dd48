//! Detection and segmentation outputs against the PyTorch / Pillow references of
//! `scripts/make_vae_fixture.py` (tests/fixtures/vae): the VQ-VAE decoder on the GPU, boxes,
//! full-image masks, the annotated PNG read back, the `parse` CLI, and bad decoder files.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use paligemma::gpu::Gpu;
use paligemma::npy;
use paligemma::tasks::draw::{line_width, object_color};
use paligemma::tasks::{parse_answer, paste_mask, process_answer, MaskDecoder, OutputOptions};

fn vae_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae")
}

fn vae() -> PathBuf {
    vae_dir().join("vae-random.npz")
}

fn chelsea() -> PathBuf {
    common::fixture_image("chelsea.jpg")
}

fn gpu() -> Arc<Gpu> {
    common::gpu(None)
}

fn answer() -> String {
    std::fs::read_to_string(vae_dir().join("ref_answer.txt"))
        .unwrap()
        .trim()
        .to_string()
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("paligemma-tasks-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The reference full-image masks, unpacked from np.packbits: [objects][y * W + x].
fn ref_full_masks(width: usize) -> Vec<Vec<bool>> {
    let packed = npy::read_i64(&vae_dir().join("ref_full_masks.npy")).unwrap();
    let [n, h, wb] = packed.shape[..] else {
        panic!("shape {:?}", packed.shape)
    };
    (0..n)
        .map(|i| {
            let mut m = Vec::with_capacity(h * width);
            for y in 0..h {
                for x in 0..width {
                    let byte = packed.data[(i * h + y) * wb + x / 8];
                    m.push(byte >> (7 - x % 8) & 1 == 1);
                }
            }
            m
        })
        .collect()
}

fn iou(a: &[bool], b: &[bool]) -> f64 {
    let inter = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
    let union = a.iter().zip(b).filter(|(x, y)| **x || **y).count();
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

#[test]
fn decoder_matches_pytorch() {
    let decoder = MaskDecoder::load(gpu(), &vae()).unwrap();
    assert_eq!((decoder.num_codes(), decoder.embedding_dim()), (128, 512));
    let codes = npy::read_i64(&vae_dir().join("ref_codes.npy")).unwrap();
    let want = npy::read_f32(&vae_dir().join("ref_masks.npy")).unwrap();
    let seqs: Vec<[u32; 16]> = codes
        .data
        .chunks_exact(16)
        .map(|c| std::array::from_fn(|i| c[i] as u32))
        .collect();
    let got = decoder.decode(&seqs).unwrap();
    assert_eq!(got.len(), seqs.len());
    let got: Vec<f32> = got.iter().flatten().copied().collect();
    let max_err = got
        .iter()
        .zip(&want.data)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max);
    println!("decoder max abs error vs PyTorch: {max_err:e}");
    assert!(max_err <= 1e-4, "max abs error {max_err}");
    // Batching does not change anything: one mask alone gives the same logits.
    let one = decoder.decode(&seqs[2..3]).unwrap();
    assert_eq!(one[0][..], got[2 * 4096..3 * 4096]);
    assert!(decoder.decode(&[]).unwrap().is_empty());
    let err = decoder.decode(&[[128; 16]]).unwrap_err().to_string();
    assert!(
        err.contains("code 128") && err.contains("codebook of 128"),
        "{err}"
    );
}

#[test]
fn boxes_and_full_masks_match_the_reference_pipeline() {
    let (w, h) = (451u32, 300u32);
    let objects = parse_answer(&answer(), w, h);
    assert_eq!(objects.len(), 4);
    assert!(objects.iter().all(|o| o.valid), "{objects:?}");
    let labels: Vec<_> = objects.iter().map(|o| o.label.as_str()).collect();
    assert_eq!(labels, ["cat", "big dog", "box only", "tiny thing"]);
    let boxes = npy::read_f32(&vae_dir().join("ref_boxes.npy")).unwrap();
    for (o, b) in objects.iter().zip(boxes.data.chunks_exact(4)) {
        assert_eq!(
            [o.bbox.x_min, o.bbox.y_min, o.bbox.x_max, o.bbox.y_max],
            b,
            "{}",
            o.label
        );
    }
    let decoder = MaskDecoder::load(gpu(), &vae()).unwrap();
    let want = ref_full_masks(w as usize);
    let mut ious = Vec::new();
    for (o, want) in objects.iter().zip(&want) {
        let got: Vec<bool> = match o.seg_codes {
            Some(codes) => {
                let logits = decoder.decode(&[codes]).unwrap();
                let mask = paste_mask(&logits[0], &o.bbox, w, h);
                mask.pixels().map(|p| p.0[0] == 255).collect()
            }
            None => vec![false; (w * h) as usize],
        };
        let area = want.iter().filter(|v| **v).count();
        let v = iou(&got, want);
        println!("{}: reference area {area} px, IoU {v:.6}", o.label);
        if o.seg_codes.is_some() {
            assert!(area > 0, "{}: empty reference", o.label);
        }
        assert!(v >= 0.99, "{}: IoU {v}", o.label);
        ious.push(v);
    }
}

/// Read the annotated PNG back: every box outline is where the JSON says, in its colour.
#[test]
fn annotated_png_and_mask_files_match_the_report() {
    let dir = TempDir::new("annotate");
    let options = OutputOptions {
        vae: Some(vae()),
        annotate: Some(dir.0.join("annotated.png")),
        mask_dir: Some(dir.0.join("masks")),
    };
    let report = process_answer(&answer(), &chelsea(), &options, || Ok(gpu())).unwrap();
    let json = serde_json::to_value(&report).unwrap();
    let objects = json["objects"].as_array().unwrap();
    assert_eq!(objects.len(), 4);
    let png = image::open(dir.0.join("annotated.png")).unwrap().to_rgba8();
    assert_eq!(png.dimensions(), (451, 300));
    // Decoded as the engine decodes it (libjpeg-turbo's decoder, like Pillow).
    let original = paligemma::processor::image::decode_image(&chelsea())
        .unwrap()
        .to_rgba8();
    let t = line_width(451, 300);
    let want_masks = ref_full_masks(451);
    for (i, o) in objects.iter().enumerate() {
        let b = &o["box"];
        let px = |k: &str| b[k].as_f64().unwrap() as u32;
        let (x0, y0, x1, y1) = (px("x_min"), px("y_min"), px("x_max"), px("y_max"));
        let c = object_color(i);
        let color = image::Rgba([c[0], c[1], c[2], 255]);
        let (my, mx) = ((y0 + y1) / 2, (x0 + x1) / 2);
        for (x, y) in [
            (x0, my),
            (x0 + t - 1, my),
            (x1 - 1, my),
            (x1 - t, my),
            (mx, y1 - 1),
            (mx, y1 - t),
        ] {
            assert_eq!(*png.get_pixel(x, y), color, "object {i} at ({x}, {y})");
        }
        // Just outside the left and right edges, and inside, the image is not box-coloured
        // (masks tint, they do not replace).
        for (x, y) in [(x0 + t, my), (x1 - t - 1, my)] {
            assert_ne!(*png.get_pixel(x, y), color, "object {i} at ({x}, {y})");
        }
        match o["mask_png"].as_str() {
            Some(path) => {
                assert_ne!(i, 2, "the box-only object has no mask");
                let mask = image::open(path).unwrap().to_luma8();
                assert_eq!(mask.dimensions(), (451, 300));
                assert!(mask.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
                let got: Vec<bool> = mask.pixels().map(|p| p.0[0] == 255).collect();
                assert!(iou(&got, &want_masks[i]) >= 0.99);
            }
            None => assert_eq!(i, 2),
        }
    }
    // Far from every box the picture is untouched.
    assert_eq!(png.get_pixel(5, 290), original.get_pixel(5, 290));
}

/// The entries of a zip archive: (name, bytes).
type Entries = Vec<(String, Vec<u8>)>;

fn zip_entries(path: &Path) -> Entries {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..zip.len())
        .map(|i| {
            let mut f = zip.by_index(i).unwrap();
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).unwrap();
            (f.name().unwrap().to_string(), bytes)
        })
        .collect()
}

fn write_zip(path: &Path, entries: &Entries) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        zip.start_file(name.as_str(), opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

fn npy_bytes(dir: &Path, shape: &[usize]) -> Vec<u8> {
    let path = dir.join("tmp.npy");
    let n: usize = shape.iter().product();
    npy::write_f32(&path, shape, &vec![0.5; n]).unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn bad_decoder_files_are_named() {
    let dir = TempDir::new("bad");
    let gpu = gpu();
    let load = |path: &Path| match MaskDecoder::load(gpu.clone(), path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    };
    let missing = dir.0.join("nope.npz");
    let err = load(&missing);
    assert!(err.contains("nope.npz"), "{err}");

    let garbage = dir.0.join("garbage.npz");
    std::fs::write(&garbage, b"hello, not a zip").unwrap();
    let err = load(&garbage);
    assert!(
        err.contains("garbage.npz") && err.contains("not a readable .npz"),
        "{err}"
    );

    let entries = zip_entries(&vae());
    let without = |key: &str| -> Entries {
        entries
            .iter()
            .filter(|(n, _)| n != &format!("{key}.npy"))
            .cloned()
            .collect()
    };
    let replaced = |key: &str, bytes: Vec<u8>| -> Entries {
        let mut e = without(key);
        e.push((format!("{key}.npy"), bytes));
        e
    };
    let cases: Vec<(&str, Entries, &[&str])> = vec![
        (
            "no-ct",
            without("decoder.6.weight"),
            &["decoder.6.weight", "missing"],
        ),
        (
            "no-codebook",
            without("_vq_vae._embedding"),
            &["_vq_vae._embedding", "missing"],
        ),
        (
            "ct-shape",
            replaced("decoder.4.weight", npy_bytes(&dir.0, &[64, 128, 4, 4])),
            &[
                "decoder.4.weight",
                "shape [64, 128, 4, 4], expected [128, _, 4, 4]",
            ],
        ),
        (
            "stem-dim",
            replaced("decoder.0.weight", npy_bytes(&dir.0, &[128, 256, 1, 1])),
            &["decoder.0.weight", "expected [_, 512, 1, 1]"],
        ),
        (
            "bias",
            replaced("decoder.2.net.2.bias", npy_bytes(&dir.0, &[127])),
            &["decoder.2.net.2.bias", "expected [128]"],
        ),
        (
            "corrupt-npy",
            replaced("decoder.12.weight", b"\x93NUMPY garbage".to_vec()),
            &["decoder.12.weight", "npy"],
        ),
    ];
    for (tag, entries, needles) in cases {
        let path = dir.0.join(format!("{tag}.npz"));
        write_zip(&path, &entries);
        let err = load(&path);
        assert!(err.contains(&format!("{tag}.npz")), "{tag}: {err}");
        for n in needles {
            assert!(err.contains(n), "{tag}: {err:?} lacks {n:?}");
        }
    }
}

#[test]
fn parse_cli_writes_json_annotation_and_masks() {
    let dir = TempDir::new("cli");
    let bin = env!("CARGO_BIN_EXE_paligemma");
    let out = Command::new(bin)
        .args(["parse", "--text", &answer(), "--json", "--image"])
        .arg(chelsea())
        .arg("--vae")
        .arg(vae())
        .arg("--annotate")
        .arg(dir.0.join("a.png"))
        .arg("--mask-dir")
        .arg(dir.0.join("m"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let objs = v["objects"].as_array().unwrap();
    assert_eq!(objs.len(), 4);
    assert_eq!(objs[1]["label"], "big dog");
    assert_eq!(objs[0]["valid"], true);
    assert!(objs[2]["mask_png"].is_null());
    assert!(objs[0]["mask_png"]
        .as_str()
        .unwrap()
        .ends_with("00_cat.png"));
    assert!(dir.0.join("a.png").is_file());
    assert!(dir.0.join("m/01_big_dog.png").is_file());

    // Masks asked for without the decoder: a usage error naming the flag, exit 2, no panic.
    let out = Command::new(bin)
        .args(["parse", "--text", &answer(), "--image"])
        .arg(chelsea())
        .arg("--mask-dir")
        .arg(dir.0.join("m2"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--vae") && !stderr.contains("panicked"),
        "{stderr}"
    );

    // Plain text output, an invalid object and no GPU needed.
    let out = Command::new(bin)
        .args(["parse", "--text", "<loc0001><loc0002> cat", "--image"])
        .arg(chelsea())
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("cat  invalid: expected 4 <locNNNN> tokens, found 2"),
        "{stdout}"
    );
}

/// `generate` with the task flags: the answer of the random fixture model is parsed, its
/// objects join the JSON and the annotated image is written.
#[test]
fn generate_annotates_its_answer() {
    let dir = TempDir::new("generate");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-mqa-f32");
    let out = Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args([
            "generate",
            "--prompt",
            "detect cat",
            "--max-new-tokens",
            "24",
            "--json",
        ])
        .arg("--model")
        .arg(model)
        .arg("--image")
        .arg(chelsea())
        .arg("--annotate")
        .arg(dir.0.join("g.png"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = v["text"].as_str().unwrap();
    let objects = v["objects"].as_array().unwrap();
    assert_eq!(objects.len(), parse_answer(text, 451, 300).len(), "{text}");
    assert!(
        !objects.is_empty(),
        "the fixture model's answer has <loc> tokens: {text}"
    );
    let png = image::open(dir.0.join("g.png")).unwrap();
    assert_eq!((png.width(), png.height()), (451, 300));
}
