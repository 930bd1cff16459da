//! Where a step's time goes, op by op (`ipr bench sample|train-step --profile-ops`): when
//! switched on, each layer's forward (convolution, linear, attention, norms, GEGLU, upsampling)
//! and the backward of the project's graph ops is timed between two device synchronisations
//! (CUDA runs kernels asynchronously: without them the time would land on whichever op waits
//! next). Synchronising costs the overlap of consecutive kernels, so a profiled step is a little
//! slower than a timed one: benchmarks profile extra steps after their timed ones.
//!
//! A scope opened inside another (an op built from other timed ops) is not timed: its time is
//! the outer op's. What no scope covers (elementwise adds, reshapes, the scheduler, candle's own
//! backward of primitive ops, the optimizer) is the step's total minus the table's sum.
//! Timings from several threads at once (the CPU's sharded training, parallel sampling parts)
//! overlap: profile with one shard / part.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<&'static str, (u64, f64)>> = Mutex::new(BTreeMap::new());

thread_local! {
    static OPEN: Cell<bool> = const { Cell::new(false) };
}

/// Switches op timing on or off, process-wide.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// One op kind's share of the profiled work.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpTime {
    /// e.g. `conv`, `conv.backward`, `attention`, `group_norm_silu`.
    pub op: String,
    pub calls: u64,
    pub ms: f64,
}

/// The times gathered since the last call, by op kind (largest first), and clears them.
pub fn take() -> Vec<OpTime> {
    let table = std::mem::take(&mut *TABLE.lock().unwrap_or_else(|e| e.into_inner()));
    let mut rows: Vec<OpTime> =
        table.into_iter().map(|(op, (calls, s))| OpTime { op: op.to_string(), calls, ms: s * 1e3 }).collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    rows
}

/// An open timing scope; its time is added to its kind when it is dropped.
pub struct Scope {
    kind: &'static str,
    device: Device,
    start: Instant,
}

/// Opens a scope for `kind` on `device` when timing is on and no scope is open on this thread;
/// `None` otherwise (then it costs one atomic load).
pub fn scope(kind: &'static str, device: &Device) -> Option<Scope> {
    if !ENABLED.load(Ordering::Relaxed) || OPEN.with(|o| o.replace(true)) {
        return None;
    }
    // A failed synchronisation surfaces at the op's own next device call; timing just goes on.
    let _ = device.synchronize();
    Some(Scope { kind, device: device.clone(), start: Instant::now() })
}

impl Drop for Scope {
    fn drop(&mut self) {
        let _ = self.device.synchronize();
        let s = self.start.elapsed().as_secs_f64();
        OPEN.with(|o| o.set(false));
        let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
        let e = table.entry(self.kind).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += s;
    }
}

/// Runs `run` (which does `steps` steps and waits for the device) with op timing on: the
/// milliseconds per step and the per-step table ([`per_step`]); `None` for no steps. Timing is
/// off again when it returns, whatever `run` returned.
pub fn profile<E>(
    steps: usize,
    run: impl FnOnce() -> std::result::Result<(), E>,
) -> std::result::Result<Option<(f64, Vec<OpTime>)>, E> {
    if steps == 0 {
        return Ok(None);
    }
    take();
    set_enabled(true);
    let start = Instant::now();
    let out = run();
    let ms = start.elapsed().as_secs_f64() * 1e3;
    set_enabled(false);
    out?;
    Ok(Some((ms / steps as f64, per_step(take(), steps, ms))))
}

/// The op table of `steps` profiled steps of `total_ms` in all, per step: each row's calls and
/// milliseconds divided by `steps`, plus an `(untimed)` row for what no scope covered.
pub fn per_step(rows: Vec<OpTime>, steps: usize, total_ms: f64) -> Vec<OpTime> {
    let n = steps.max(1) as f64;
    let timed: f64 = rows.iter().map(|r| r.ms).sum();
    let mut out: Vec<OpTime> = rows
        .into_iter()
        .map(|r| OpTime { op: r.op, calls: (r.calls as f64 / n).round() as u64, ms: r.ms / n })
        .collect();
    out.push(OpTime { op: "(untimed)".into(), calls: 0, ms: (total_ms - timed).max(0.0) / n });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Timing is off by default, nested scopes count once (for the outer kind), and the table
    /// is cleared by `take`. One test, as the switch is process-wide (other tests running at the
    /// same time may add their kinds: only this test's kinds are looked at).
    #[test]
    fn scopes_time_the_outermost_op_only() {
        let d = Device::Cpu;
        assert!(scope("test-conv", &d).is_none());
        set_enabled(true);
        {
            let _outer = scope("test-attention", &d);
            assert!(scope("test-linear", &d).is_none());
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        drop(scope("test-conv", &d));
        drop(scope("test-conv", &d));
        set_enabled(false);
        let mine =
            |rows: Vec<OpTime>| -> Vec<OpTime> { rows.into_iter().filter(|r| r.op.starts_with("test-")).collect() };
        let rows = mine(take());
        assert_eq!(
            rows.iter().map(|r| (r.op.as_str(), r.calls)).collect::<Vec<_>>(),
            [("test-attention", 1), ("test-conv", 2)]
        );
        assert!(rows[0].ms >= 2.0);
        assert!(mine(take()).is_empty());
        let total = rows.iter().map(|r| r.ms).sum::<f64>() + 4.0;
        let table = per_step(rows, 2, total);
        assert_eq!(table[1].calls, 1);
        let untimed = table.last().unwrap();
        assert_eq!(untimed.op, "(untimed)");
        assert!((untimed.ms - 2.0).abs() < 1e-9, "{table:?}");
    }
}
