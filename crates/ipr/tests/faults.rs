//! Faults a real run meets: a second process on the same run folder, a disk that fills up, and
//! `kill -9` at any moment. Each must leave the run resumable to the numbers of an uninterrupted
//! run, with nothing half-written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ipr(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ipr")).current_dir(dir).args(args).output().expect("ipr runs")
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "ipr failed:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A two-round toy run small enough to repeat many times (the shipped base model, so detection
/// finds objects and every stage has work).
const RUN: &str = r#"
rounds = 2
[prompts]
max_train = 4
max_eval = 3
[sampling]
images_per_prompt = 2
steps = 3
batch_size = 4
[train]
steps = 3
batch_size = 4
learning_rate = 0.05
[eval]
images_per_prompt = 2
"#;

fn metrics(run: &Path) -> String {
    std::fs::read_to_string(run.join("metrics.json")).unwrap()
}

/// Files under `dir` whose names say they were being written (`.<name>.tmp-<pid>`).
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap().to_string_lossy().contains(".tmp-") {
                out.push(p.clone());
            }
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

/// The uninterrupted run's metrics, made once for the tests of this file.
fn reference(dir: &Path) -> (String, Duration) {
    std::fs::write(dir.join("run.toml"), RUN).unwrap();
    let t = Instant::now();
    ok(&ipr(dir, &["run", "--config", "run.toml", "--name", "lone", "--quiet"]));
    (metrics(&dir.join("runs/lone")), t.elapsed())
}

#[test]
fn a_second_process_on_a_running_run_is_refused_and_harms_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (want, _) = reference(dir);
    let mut first = Command::new(env!("CARGO_BIN_EXE_ipr"))
        .current_dir(dir)
        .args(["run", "--config", "run.toml", "--name", "busy", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let config = dir.join("runs/busy/run.toml");
    let start = Instant::now();
    while !config.exists() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The advice a user is most likely to follow, --resume, is refused with the holder's pid.
    let second = ipr(dir, &["run", "--config", "run.toml", "--name", "busy", "--resume", "--quiet"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second process must not run");
    assert!(err.contains(&format!("process {}", first.id())) && err.contains("in use"), "{err}");
    let third = ipr(dir, &["run", "--config", "run.toml", "--name", "busy", "--quiet"]);
    assert!(!third.status.success());
    assert!(first.wait().unwrap().success(), "the first run is unharmed");
    assert_eq!(metrics(&dir.join("runs/busy")), want, "and ends with a lone run's metrics");
    // The lock goes with the process: the finished run resumes (doing nothing) without a word.
    ok(&ipr(dir, &["run", "--config", "run.toml", "--name", "busy", "--resume", "--quiet"]));
}

/// SIGKILL at 10 points spread over a run (pseudo-random, from a fixed seed), each followed by
/// `--resume`: every resumed run ends with the uninterrupted run's metrics and leaves nothing
/// half-written.
#[test]
fn killed_at_ten_random_points_each_resumes_to_the_same_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (want, took) = reference(dir);
    let mut x: u64 = 0x5EED;
    for i in 0..10 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        // Somewhere in the first 90% of an uninterrupted run's time.
        let at = took.mul_f64((x >> 11) as f64 / (1u64 << 53) as f64 * 0.9);
        let name = format!("k{i}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ipr"))
            .current_dir(dir)
            .args(["run", "--config", "run.toml", "--name", &name, "--quiet"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        child.kill().unwrap(); // SIGKILL: nothing runs after it
        child.wait().unwrap();
        let run = dir.join("runs").join(&name);
        let resumed = ipr(dir, &["run", "--config", "run.toml", "--name", &name, "--resume", "--quiet"]);
        assert!(
            resumed.status.success(),
            "killed after {at:?}, the resume failed:\n{}",
            String::from_utf8_lossy(&resumed.stderr)
        );
        assert_eq!(metrics(&run), want, "killed after {at:?}: the uninterrupted run's metrics");
        assert!(temporaries(&run).is_empty(), "killed after {at:?}: left {:?}", temporaries(&run));
    }
}

/// Mounts a tmpfs of `bytes` at `at` (CI runs as root); `false` where mounting is not allowed.
fn mount_tmpfs(at: &Path, bytes: u64) -> bool {
    std::fs::create_dir_all(at).unwrap();
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
        .arg(at)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn remount(at: &Path, bytes: u64) {
    let s = Command::new("mount").args(["-o", &format!("remount,size={bytes}")]).arg(at).status().unwrap();
    assert!(s.success());
}

/// A disk that fills up at several points of a run: each time the run stops with an error that
/// names a path and says the disk is full, nothing half-written is left, and after freeing space
/// `--resume` ends with the uninterrupted run's metrics.
#[test]
fn a_full_disk_at_several_points_then_resume_gives_the_same_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (want, _) = reference(dir);
    let size = du(&dir.join("runs/lone"));
    let mount = dir.join("disk");
    if !mount_tmpfs(&mount, 1 << 20) {
        eprintln!("SKIPPED: mounting a tmpfs is not allowed here (needs root); the full-disk test did not run");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    std::fs::copy(dir.join("run.toml"), mount.join("run.toml")).unwrap();
    remount(&mount, 2 << 20);
    let mut points = 0;
    // Disks that fill at about 30%, 60%, 80% and 95% of what the run writes (the base model it
    // exports first is most of it).
    for (i, fraction) in [0.3, 0.6, 0.8, 0.95].into_iter().enumerate() {
        let name = format!("full{i}");
        let used = du(&mount);
        remount(&mount, used + (size as f64 * fraction) as u64);
        let o = ipr(&mount, &["run", "--config", "run.toml", "--name", &name, "--quiet"]);
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.success() {
            continue; // this run fit after all (tmpfs rounds sizes to pages)
        }
        points += 1;
        assert!(err.contains("the disk is full") && err.contains("runs/"), "fraction {fraction}: {err}");
        let run = mount.join("runs").join(&name);
        assert!(temporaries(&run).is_empty(), "fraction {fraction}: left {:?}", temporaries(&run));
        remount(&mount, du(&mount) + 4 * size);
        let resumed = ipr(&mount, &["run", "--config", "run.toml", "--name", &name, "--resume", "--quiet"]);
        assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
        assert_eq!(metrics(&run), want, "fraction {fraction}: resumed to the uninterrupted run's metrics");
        std::fs::remove_dir_all(&run).unwrap();
    }
    assert!(points >= 3, "the disk filled up during only {points} of the runs");
}

/// Bytes under `dir` (file sizes).
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}
