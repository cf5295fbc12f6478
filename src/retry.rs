//! The one retry policy: doubling waits up to a cap, with a deadline check
//! before each wait. Used by every loop that retries something remote
//! (origin reads, node-to-node calls, the release obligation) and by the
//! background copier after a failed fetch, so they all back off alike.

use std::time::Duration;

/// Doubling waits between retries, up to a cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            next: first,
            max,
        }
    }
    /// The next wait, without taking it.
    pub fn peek(&self) -> Duration {
        self.next
    }
    /// The next wait, taken off: the one after it doubles.
    pub fn next_wait(&mut self) -> Duration {
        let w = self.next;
        self.next = (self.next * 2).min(self.max);
        w
    }
    /// Waits, and doubles the next wait.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_wait()).await;
    }
    /// After a success: the next failure waits the first wait again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
    /// Whether the last attempt failed (a wait was taken since the last
    /// reset).
    pub fn is_backing_off(&self) -> bool {
        self.next > self.first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let mut seen = Vec::new();
        for _ in 0..4 {
            assert!(seen.is_empty() || b.is_backing_off());
            seen.push(b.next_wait());
        }
        assert_eq!(
            seen,
            [100, 200, 350, 350].map(Duration::from_millis).to_vec()
        );
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(100));
    }
}
