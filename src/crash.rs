//! Crash points for tests: `dlsm serve --crash-at NAME` (hidden) or
//! `DLSM_CRASH_AT=NAME` makes a node abort, as a `kill -9` would (nothing
//! flushed or cleaned up), when it passes the point `NAME`. Used by the
//! tests that check a step is repaired after a crash between two of its
//! writes (e.g. `after-claim`: the destination's directory claim done, its
//! table not yet told). A point costs one lock-free load; points sit on
//! control paths only, never on the data path.
//!
//! Pause points (`dlsm serve --pause-at NAME:MS`, hidden) make the node
//! wait MS milliseconds when it passes point `NAME`: they hold a race
//! window open so a test can drive the other side of the race into it
//! (e.g. `rm-after-read`: `volume rm` has read the directory record and
//! not yet acted on it).

use std::sync::OnceLock;

static ARMED: OnceLock<String> = OnceLock::new();

/// Arms crash point `name` for this process.
pub fn arm(name: &str) {
    let _ = ARMED.set(name.to_owned());
}

/// Aborts the process if this point is armed.
pub fn point(name: &str) {
    let armed = ARMED.get_or_init(|| std::env::var("DLSM_CRASH_AT").unwrap_or_default());
    if armed == name {
        eprintln!("crash point {name}: aborting here");
        std::process::abort();
    }
}

static PAUSE: OnceLock<(String, u64)> = OnceLock::new();

/// Arms pause point `spec` (`NAME:MS`) for this process.
pub fn arm_pause(spec: &str) -> Result<(), String> {
    let (name, ms) = spec
        .rsplit_once(':')
        .and_then(|(n, ms)| Some((n, ms.parse::<u64>().ok()?)))
        .ok_or_else(|| format!("--pause-at wants NAME:MILLISECONDS, not {spec:?}"))?;
    let _ = PAUSE.set((name.to_owned(), ms));
    Ok(())
}

/// Waits here if this pause point is armed.
pub async fn pause(name: &str) {
    if let Some((armed, ms)) = PAUSE.get() {
        if armed == name {
            tracing::warn!("pause point {name}: waiting {ms} ms");
            tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
        }
    }
}
