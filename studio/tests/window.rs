//! A smoke test of the real window: `studio --prompt "detect square" --screenshot OUT.png`
//! under Xvfb (`xvfb-run`, which `.ci/run` installs), on the X11 backend and lavapipe. The
//! screenshot must show the scene and the detected box drawn over it, and the exit code must
//! be 0; a model directory that is not one, or an image that is not one, must exit 1 with
//! the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn studio_under_xvfb(args: &[&str]) -> Output {
    let out = Command::new("xvfb-run")
        .args([
            "-a",
            "-s",
            "-screen 0 1280x800x24",
            env!("CARGO_BIN_EXE_studio"),
        ])
        .args(args)
        .env_remove("WAYLAND_DISPLAY")
        .env("WINIT_UNIX_BACKEND", "x11")
        .output();
    match out {
        Ok(o) => o,
        Err(e) => panic!("cannot run xvfb-run (apt-get install xvfb xauth): {e}"),
    }
}

fn near(a: [u8; 3], b: [u8; 3]) -> bool {
    a.iter().zip(b).all(|(&x, y)| x.abs_diff(y) <= 3)
}

#[test]
fn screenshot_of_a_detect_answer_shows_the_image_and_its_box() {
    let shot = std::env::temp_dir().join(format!("studio-shot-{}.png", std::process::id()));
    let _ = std::fs::remove_file(&shot);
    let scene = repo("assets/scenes/scene_000.png");
    let out = studio_under_xvfb(&[
        "--model",
        repo("assets/tiny-shapes").to_str().unwrap(),
        "--image",
        scene.to_str().unwrap(),
        "--prompt",
        "detect square",
        "--screenshot",
        shot.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        shot.display().to_string()
    );
    let image = image::open(&shot).unwrap().to_rgb8();
    std::fs::remove_file(&shot).unwrap();
    assert_eq!(image.dimensions(), (1100, 720));
    let count = |rgb: [u8; 3]| image.pixels().filter(|p| near(p.0, rgb)).count();
    // The scene's square (its fill colour, read from the scene itself) is shown, scaled up.
    let scene = image::open(&scene).unwrap().to_rgb8();
    let fill = scene.get_pixel(80, 85).0;
    let background = scene.get_pixel(3, 3).0;
    assert_ne!(fill, background);
    assert!(
        count(fill) > 60 * 60,
        "square fill {fill:?}: {} px",
        count(fill)
    );
    assert!(
        count(background) > 100_000,
        "scene background: {} px",
        count(background)
    );
    // The box outline in the first object's colour: a 2.5-point frame around a square of
    // 80 image pixels, scaled about 2.5 times.
    let outline = paligemma::tasks::draw::object_color(0);
    assert!(
        count(outline) > 1500,
        "box outline {outline:?}: {} px",
        count(outline)
    );
}

#[test]
fn a_failing_load_or_image_exits_1_with_the_reason() {
    let shot = std::env::temp_dir().join(format!("studio-fail-{}.png", std::process::id()));
    let not_a_model = repo("assets/scenes");
    let not_an_image = repo("tests/fixtures/images/not_an_image.png");
    let tiny = repo("assets/tiny-shapes");
    let scene = repo("assets/scenes/scene_000.png");
    for (model, image, reason) in [
        (&not_a_model, &scene, "config.json"),
        (&tiny, &not_an_image, "not_an_image.png"),
    ] {
        let out = studio_under_xvfb(&[
            "--model",
            model.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--prompt",
            "caption en",
            "--screenshot",
            shot.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(reason), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!shot.exists());
    }
}
