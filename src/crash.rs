//! Crash points for tests: `dlsm serve --crash-at NAME` (hidden) or
//! `DLSM_CRASH_AT=NAME` makes a node abort, as a `kill -9` would (nothing
//! flushed or cleaned up), when it passes the point `NAME`. Used by the
//! tests that check a step is repaired after a crash between two of its
//! writes (e.g. `after-claim`: the destination's directory claim done, its
//! table not yet told). A point costs one lock-free load; points sit on
//! control paths only, never on the data path.

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
