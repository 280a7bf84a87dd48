//! UI tests of the Studio window with egui_kittest: the real app on a wgpu device (lavapipe
//! in CI) shared with the engine, driven through its widgets, its rendered frames compared
//! with the committed snapshots in `tests/snapshots/` (`UPDATE_SNAPSHOTS=1` rewrites them).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eframe::egui;
use egui_kittest::kittest::{NodeT, Queryable};
use egui_kittest::{Harness, SnapshotOptions};
use studio::{StartOptions, StudioApp};

/// A repository file, relative to this crate (where cargo runs its tests), so the paths
/// shown in the window and its snapshots do not depend on where the repository is.
fn repo(rel: &str) -> PathBuf {
    Path::new("..").join(rel)
}

fn tiny() -> StartOptions {
    StartOptions {
        model: Some(repo("assets/tiny-shapes").display().to_string()),
        image: Some(repo("assets/scenes/scene_000.png")),
        ..Default::default()
    }
}

fn harness(start: StartOptions) -> Harness<'static, StudioApp> {
    Harness::builder()
        .with_size(egui::vec2(1100.0, 720.0))
        .wgpu_setup(studio::wgpu_setup())
        .build_eframe(|cc| StudioApp::new(cc, start, Arc::new(Mutex::new(None))))
}

/// Step the app until `done` holds (the worker thread answers between frames).
fn run_until(h: &mut Harness<'static, StudioApp>, what: &str, done: impl Fn(&StudioApp) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done(h.state()) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; errors shown: {:?}",
            h.state().errors()
        );
        h.step();
        std::thread::sleep(Duration::from_millis(2));
    }
    h.run_steps(3);
}

/// Compare the rendered window with `tests/snapshots/NAME.png`, the timings (which change
/// from run to run) masked out. The tolerance covers text antialiasing differences between
/// Mesa builds; a box or mask that is missing or moved changes thousands of pixels.
fn snapshot(h: &mut Harness<'static, StudioApp>, name: &str) {
    if let Some(rect) = h.state().timings_rect() {
        h.mask(rect);
    }
    h.snapshot_options(
        name,
        &SnapshotOptions::new().threshold(1.0).max_failed_pixels(400),
    );
}

#[test]
fn empty_window_offers_the_pickers() {
    let mut h = harness(StartOptions::default());
    h.run();
    assert!(h.state().model_info().is_none());
    assert!(h.state().errors().is_empty(), "{:?}", h.state().errors());
    h.get_by_label("Open image…");
    h.get_by_label("Folder…");
    assert!(h.get_by_label("Run").accesskit_node().is_disabled());
    snapshot(&mut h, "empty");
}

#[test]
fn loads_the_demo_model_with_an_image() {
    let mut h = harness(tiny());
    run_until(&mut h, "the model", |a| a.model_info().is_some());
    let info = h.state().model_info().unwrap().clone();
    assert_eq!(info.image_size, 224);
    assert!(info.summary.contains("224 px"), "{}", info.summary);
    assert!(h.state().errors().is_empty(), "{:?}", h.state().errors());
    snapshot(&mut h, "loaded");
}

#[test]
fn detect_prompt_draws_boxes() {
    let mut h = harness(StartOptions {
        prompt: Some("detect square".into()),
        run: true,
        ..tiny()
    });
    run_until(&mut h, "the detect answer", |a| {
        a.generation().is_some() && !a.is_busy()
    });
    let app = h.state();
    assert!(app.errors().is_empty(), "{:?}", app.errors());
    let objects = app.objects();
    assert_eq!(objects.len(), 1, "{:?}", app.answer_text());
    assert!(objects[0].valid);
    assert_eq!(objects[0].label, "square");
    // The CLI's answer on this scene: <loc0238><loc0178><loc0544><loc0544> square.
    assert_eq!(
        app.answer_text(),
        Some("<loc0238><loc0178><loc0544><loc0544> square")
    );
    let b = objects[0].bbox;
    let px = |loc: f32| loc / 1024.0 * 224.0;
    assert_eq!(
        [b.x_min, b.y_min, b.x_max, b.y_max],
        [px(178.0), px(238.0), px(544.0), px(544.0)]
    );
    let json: serde_json::Value = serde_json::from_str(&app.objects_json()).unwrap();
    assert_eq!(json["objects"][0]["label"], "square");
    snapshot(&mut h, "detect");
}

#[test]
fn segment_answer_draws_its_mask() {
    let vae = repo("tests/fixtures/vae");
    let mut h = harness(StartOptions {
        image: Some(repo("tests/fixtures/images/chelsea.jpg")),
        vae: Some(vae.join("vae-random.npz")),
        ..Default::default()
    });
    run_until(&mut h, "the mask decoder", |a| {
        a.errors().is_empty() && a.generation().is_none() && a.objects().is_empty()
    });
    let answer = std::fs::read_to_string(vae.join("ref_answer.txt")).unwrap();
    // The decoder may still be loading: the masks follow once it is.
    h.state_mut().show_answer("segment cat", answer.trim());
    run_until(&mut h, "the masks", |a| a.mask_count() > 0 && !a.is_busy());
    let app = h.state();
    assert!(app.errors().is_empty(), "{:?}", app.errors());
    assert_eq!(app.objects().len(), 4);
    // Three objects have mask tokens; "box only" has none.
    assert_eq!(app.mask_count(), 3);
    snapshot(&mut h, "segment");
}

#[test]
fn picking_detect_and_typing_a_label_runs_it() {
    let mut h = harness(tiny());
    run_until(&mut h, "the model", |a| a.model_info().is_some());
    h.get_by_label("Caption").click();
    h.run();
    h.get_by_label("Detect").click();
    h.run();
    h.get_by_label("Objects").click();
    h.run();
    h.get_by_label("Objects").type_text("square");
    h.run();
    assert_eq!(h.state().prompt().as_deref(), Ok("detect square"));
    h.get_by_label("Run").click();
    h.run_steps(2);
    run_until(&mut h, "the answer", |a| {
        a.generation().is_some() && !a.is_busy()
    });
    let app = h.state();
    assert!(app.errors().is_empty(), "{:?}", app.errors());
    let first = app.objects().to_vec();
    assert_eq!(first.len(), 1, "{:?}", app.answer_text());
    assert!(first[0].valid && first[0].label == "square", "{first:?}");
    assert_eq!(app.vision_runs(), Some(1));
    // A second question about the same image reuses its features: the tower does not run.
    h.get_by_label("Raw tokens").click();
    h.get_by_label("Run").click();
    h.run_steps(2);
    run_until(&mut h, "the second answer", |a| {
        a.generation().is_some() && !a.is_busy()
    });
    assert_eq!(h.state().objects(), &first[..]);
    assert_eq!(h.state().vision_runs(), Some(1));
    h.get_by_label("reused");
}

#[test]
fn a_bad_model_directory_and_a_non_image_are_reported_in_the_window() {
    let mut h = harness(StartOptions {
        model: Some(repo("assets/scenes").display().to_string()),
        image: Some(repo("tests/fixtures/images/not_an_image.png")),
        ..Default::default()
    });
    run_until(&mut h, "the load error", |a| {
        !a.is_loading() && a.errors().len() >= 2
    });
    let errors = h.state().errors().join("\n");
    assert!(errors.contains("not_an_image.png"), "{errors}");
    assert!(errors.contains("config.json"), "{errors}");
    assert!(h.state().model_info().is_none());
    // The window keeps working: the demo model still loads.
    h.state_mut()
        .set_model_field(&repo("assets/tiny-shapes").display().to_string());
    h.state_mut().load_model();
    run_until(&mut h, "the model", |a| a.model_info().is_some());
}
