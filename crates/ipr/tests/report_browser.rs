//! report.html in a real browser: headless Chromium (Debian's package) loads the file with the
//! network disabled, and the rendered DOM has the tables, the plot and every image decoded.
//! Skipped with a message when Chromium is not installed, unless IPR_REQUIRE_BROWSER is set
//! (CI sets it and installs Chromium).

use ipr::metrics_file::{EvalSplit, MetricsRow};
use ipr::report::{render_report, GalleryItem, ReportData, RoundGallery};
use std::process::Command;

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

#[test]
fn report_renders_in_headless_chromium() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("IPR_REQUIRE_BROWSER").is_none(),
            "IPR_REQUIRE_BROWSER is set but chromium is missing"
        );
        eprintln!("skipped: chromium is not installed (apt-get install chromium)");
        return;
    };
    let vocab = ipr_toy::vocabulary();
    let prompt = ipr_core::Prompt::parse("a leaf above a box", &vocab).unwrap();
    let (_, img) = ipr_toy::oracle::oracle_image(&prompt, &vocab, 1, 0).unwrap();
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let row = |method: &str, iteration, split, v| MetricsRow {
        iteration,
        split,
        oa: 90.0,
        visor_uncond: v,
        visor_cond: v,
        visor_1: v,
        visor_2: v,
        visor_3: v,
        visor_4: v,
        ipr_strict: v,
        method: method.into(),
        clip_score: None,
    };
    let rows = [
        row("base", 0, EvalSplit::Seen, 30.0),
        row("base", 0, EvalSplit::Heldout, 25.0),
        row("ipr", 1, EvalSplit::Seen, 50.0),
        row("ipr", 1, EvalSplit::Heldout, 45.0),
    ];
    let items = (0..3)
        .map(|i| GalleryItem {
            png: png.clone(),
            original_prompt: "a leaf below a box".into(),
            prompt: if i == 0 { "a leaf below a box".into() } else { "a leaf above a box".into() },
            reason: if i == 0 { "correct".into() } else { "location".into() },
        })
        .collect();
    let galleries = [RoundGallery { title: "Round 0".into(), items }];
    let html = render_report(&ReportData {
        title: "browser check",
        config_toml: "name = \"x\"",
        rows: &rows,
        galleries: &galleries,
        notes: "",
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.html");
    std::fs::write(&path, html).unwrap();
    // The page has no scripts: a screenshot shows that it renders, the DOM dump what it holds.
    let profile = dir.path().join("profile");
    let base = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--blink-settings=imagesEnabled=true",
    ];
    let url = format!("file://{}", path.display());
    let shot = dir.path().join("shot.png");
    let o = Command::new(browser)
        .args(base)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1200,1400")
        .arg(&url)
        .output()
        .unwrap();
    assert!(shot.is_file(), "no screenshot: {}", String::from_utf8_lossy(&o.stderr));
    let shot = image::open(&shot).unwrap().to_rgb8();
    let distinct: std::collections::HashSet<_> = shot.pixels().map(|p| p.0).collect();
    assert!(distinct.len() > 20, "the page rendered as a blank image");
    let o = Command::new(browser)
        .args(base)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&o.stdout);
    assert!(dom.contains("<table>") && dom.contains("<svg") && dom.contains("polyline"), "{dom}");
    assert_eq!(dom.matches("data:image/png;base64,").count(), 3);
    assert!(dom.contains("→ a leaf above a box"));
}
