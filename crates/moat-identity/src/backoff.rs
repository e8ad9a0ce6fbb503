//! Exponential backoff between attempts to reopen a broken stream: both SPIRE streams (a
//! container's SVIDs and a socket's bundles) retry through it.

use std::time::Duration;

/// Pauses that double from `first` up to `max`, and start again from `first` after a success.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Pauses from `first` up to `max`.
    pub(crate) const fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The pause to wait now; the one after it is twice as long, up to `max`.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        pause
    }

    /// After a success: the next pause is `first` again.
    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pauses_double_up_to_the_cap() {
        let mut b = Backoff::new(50 * MS, 300 * MS);
        let pauses: Vec<Duration> = (0..6).map(|_| b.next_pause()).collect();
        assert_eq!(
            pauses,
            [50 * MS, 100 * MS, 200 * MS, 300 * MS, 300 * MS, 300 * MS]
        );
    }

    #[test]
    fn a_success_starts_again_from_the_first_pause() {
        let mut b = Backoff::new(50 * MS, 5000 * MS);
        b.next_pause();
        b.next_pause();
        b.reset();
        assert_eq!(b.next_pause(), 50 * MS);
    }

    #[test]
    fn a_huge_cap_does_not_overflow() {
        let mut b = Backoff::new(Duration::MAX / 2 + MS, Duration::MAX);
        b.next_pause();
        assert_eq!(b.next_pause(), Duration::MAX);
    }
}
