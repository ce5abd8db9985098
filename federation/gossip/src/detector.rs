//! A phi-accrual failure detector (Hayashibara et al.), as pure logic over
//! an injected clock.
//!
//! The detector keeps the intervals between the last heartbeats of one peer
//! and answers, for a moment `now`, how unlikely it is that the peer is
//! still alive given how long it has been silent: `phi = -log10(P(a
//! heartbeat comes later than now))`, with the intervals modelled as a
//! normal distribution (Akka's logistic approximation of its tail). A phi
//! of 1 means a 10 % chance of a mistake, 8 one in a hundred million.
//!
//! Invariants:
//! - Time is milliseconds from any fixed origin, given by the caller; the
//!   detector never reads a clock, so tests drive it with synthetic streams.
//! - Until the first interval is known, the configured first estimate
//!   stands in for the history, so a peer heard once is judged too.
//! - The standard deviation never falls below `min_std_dev_ms`, and the
//!   mean is padded by `acceptable_pause_ms`: a perfectly regular peer does
//!   not become suspect the moment one beat is a little late.

use std::collections::VecDeque;

/// Settings of the detector; the defaults suit heartbeats about once a
/// second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorConfig {
    /// Phi at or above which a peer is suspect.
    pub suspect_phi: f64,
    /// Phi at or above which a peer is dead.
    pub dead_phi: f64,
    /// Intervals remembered per peer.
    pub window: usize,
    /// Lower bound of the standard deviation of the intervals, in ms.
    pub min_std_dev_ms: f64,
    /// Added to the mean interval: the silence that is never suspicious.
    pub acceptable_pause_ms: f64,
    /// Interval assumed before two heartbeats were heard, in ms.
    pub first_interval_ms: f64,
}

impl Default for DetectorConfig {
    /// For heartbeats once a second: phi 5 after about 2.5 s of silence,
    /// phi 8 after about 2.8 s.
    fn default() -> Self {
        Self::for_interval_ms(1_000)
    }
}

impl DetectorConfig {
    /// Settings for heartbeats every `interval_ms`: the padding
    /// (`acceptable_pause_ms`, half an interval), the floor of the standard
    /// deviation (a quarter) and the first estimate (one interval) scale
    /// with it, so a peer is suspect and dead after the same number of
    /// missed beats whatever the interval (about 2.5 and 2.8 intervals of
    /// silence at a steady rhythm).
    pub fn for_interval_ms(interval_ms: u64) -> Self {
        let interval = interval_ms.max(1) as f64;
        Self {
            suspect_phi: 5.0,
            dead_phi: 8.0,
            window: 100,
            min_std_dev_ms: interval / 4.0,
            acceptable_pause_ms: interval / 2.0,
            first_interval_ms: interval,
        }
    }
}

/// What the detector says of a peer at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Liveness {
    /// Heard recently enough.
    Alive,
    /// Silent for longer than its history makes likely.
    Suspect,
    /// Silent for so long that it is taken for dead.
    Dead,
}

/// The heartbeat history of one peer.
#[derive(Debug, Clone)]
pub struct PhiDetector {
    config: DetectorConfig,
    intervals: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    last_ms: Option<u64>,
}

impl PhiDetector {
    /// A detector that has heard nothing yet.
    pub fn new(config: DetectorConfig) -> Self {
        Self {
            config,
            intervals: VecDeque::with_capacity(config.window.min(1_024)),
            sum: 0.0,
            sum_sq: 0.0,
            last_ms: None,
        }
    }

    /// Records a heartbeat heard at `now_ms`. A beat from the past (a clock
    /// that went backwards) counts as heard now, with no interval.
    pub fn heartbeat(&mut self, now_ms: u64) {
        if let Some(last) = self.last_ms
            && now_ms > last
        {
            let interval = (now_ms - last) as f64;
            if self.intervals.len() >= self.config.window.max(1)
                && let Some(old) = self.intervals.pop_front()
            {
                self.sum -= old;
                self.sum_sq -= old * old;
            }
            self.intervals.push_back(interval);
            self.sum += interval;
            self.sum_sq += interval * interval;
        }
        self.last_ms = Some(self.last_ms.map_or(now_ms, |l| l.max(now_ms)));
    }

    /// When the last heartbeat was heard, if any.
    pub fn last_heard_ms(&self) -> Option<u64> {
        self.last_ms
    }

    /// The suspicion level at `now_ms`: 0 when nothing was heard yet.
    pub fn phi(&self, now_ms: u64) -> f64 {
        let Some(last) = self.last_ms else { return 0.0 };
        let silence = now_ms.saturating_sub(last) as f64;
        let (mean, std_dev) = self.distribution();
        phi(silence, mean + self.config.acceptable_pause_ms, std_dev)
    }

    /// The verdict at `now_ms`.
    pub fn liveness(&self, now_ms: u64) -> Liveness {
        let phi = self.phi(now_ms);
        if phi >= self.config.dead_phi {
            Liveness::Dead
        } else if phi >= self.config.suspect_phi {
            Liveness::Suspect
        } else {
            Liveness::Alive
        }
    }

    /// Mean and standard deviation of the intervals (the first estimate
    /// while none is known), the deviation at least the configured floor.
    fn distribution(&self) -> (f64, f64) {
        let n = self.intervals.len() as f64;
        let (mean, variance) = if self.intervals.is_empty() {
            let m = self.config.first_interval_ms;
            // Akka's first estimate: a deviation of a quarter of the mean.
            (m, (m / 4.0) * (m / 4.0))
        } else {
            let mean = self.sum / n;
            (mean, (self.sum_sq / n - mean * mean).max(0.0))
        };
        (mean, variance.sqrt().max(self.config.min_std_dev_ms))
    }
}

/// `-log10` of the probability that a normally distributed interval of
/// `mean` and `std_dev` exceeds `silence` (Akka's approximation).
fn phi(silence: f64, mean: f64, std_dev: f64) -> f64 {
    let y = (silence - mean) / std_dev;
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    let p = if silence > mean {
        e / (1.0 + e)
    } else {
        1.0 - 1.0 / (1.0 + e)
    };
    // A probability of 0 (exp underflow) is certainty: a large finite phi.
    if p <= f64::MIN_POSITIVE { 1_000.0 } else { -p.log10() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Beats every `period` ms with a deterministic jitter of up to
    /// `jitter` ms either way (a linear congruential sequence).
    fn beats(detector: &mut PhiDetector, start: u64, count: u64, period: u64, jitter: u64) -> u64 {
        let mut seed = 12_345u64;
        let mut t = start;
        for _ in 0..count {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let offset = (seed >> 33) % (2 * jitter + 1);
            t = t + period - jitter + offset;
            detector.heartbeat(t);
        }
        t
    }

    #[test]
    fn steady_beats_with_jitter_and_one_late_beat_stay_alive() {
        let config = DetectorConfig::default();
        let mut d = PhiDetector::new(config);
        d.heartbeat(0);
        let mut t = beats(&mut d, 0, 200, 1_000, 150);
        // Check every 10 ms between beats: never suspect.
        for step in 0..=115 {
            assert_eq!(d.liveness(t + step * 10), Liveness::Alive, "at +{}", step * 10);
        }
        // One beat 900 ms late, then steady again.
        t += 1_900;
        assert_eq!(d.liveness(t), Liveness::Alive);
        d.heartbeat(t);
        let t = beats(&mut d, t, 20, 1_000, 150);
        for step in 0..=115 {
            assert_eq!(
                d.liveness(t + step * 10),
                Liveness::Alive,
                "after the late beat, at +{}",
                step * 10
            );
        }
    }

    #[test]
    fn the_settings_scale_with_the_heartbeat_interval() {
        // Beats every 400 ms with 40 ms of jitter: never suspect between
        // them; suspect and dead after the same number of missed beats as
        // at 1 s (about 2.5 and 2.8 intervals).
        let mut d = PhiDetector::new(DetectorConfig::for_interval_ms(400));
        d.heartbeat(0);
        let last = beats(&mut d, 0, 100, 400, 40);
        assert!((0..440).all(|ms| d.liveness(last + ms) == Liveness::Alive));
        let first_at = |state: Liveness| (0..10_000u64).find(|&ms| d.liveness(last + ms) >= state).unwrap();
        let (suspect, dead) = (first_at(Liveness::Suspect), first_at(Liveness::Dead));
        assert!(suspect > 600, "suspect after {suspect} ms: too eager");
        assert!(dead <= 1_200, "dead after {dead} ms of silence");
        assert_eq!(DetectorConfig::for_interval_ms(1_000), DetectorConfig::default());
        // A peer heard once, beating every 5 s: alive until its next beat
        // is due (with 1 s settings it would be dead by then).
        let mut slow = PhiDetector::new(DetectorConfig::for_interval_ms(5_000));
        slow.heartbeat(0);
        assert_eq!(slow.liveness(5_400), Liveness::Alive);
        let mut fixed = PhiDetector::new(DetectorConfig::default());
        fixed.heartbeat(0);
        assert_eq!(fixed.liveness(5_400), Liveness::Dead);
    }

    #[test]
    fn silence_is_suspect_then_dead_within_three_seconds() {
        let config = DetectorConfig::default();
        let mut d = PhiDetector::new(config);
        d.heartbeat(0);
        let last = beats(&mut d, 0, 100, 1_000, 100);
        let first_at = |state: Liveness| {
            (0..10_000u64)
                .map(|ms| last + ms)
                .find(|&t| d.liveness(t) >= state)
                .map(|t| t - last)
        };
        let suspect = first_at(Liveness::Suspect).unwrap();
        let dead = first_at(Liveness::Dead).unwrap();
        assert!(suspect > 1_500, "suspect after {suspect} ms: too eager");
        assert!(dead <= 3_000, "dead after {dead} ms of silence");
        assert!(suspect < dead);
        // Phi only grows with silence.
        let mut prev = 0.0;
        for ms in (0..5_000).step_by(50) {
            let p = d.phi(last + ms);
            assert!(p >= prev, "phi fell from {prev} to {p} at {ms} ms");
            prev = p;
        }
    }

    #[test]
    fn a_peer_heard_once_is_judged_by_the_first_estimate() {
        let mut d = PhiDetector::new(DetectorConfig::default());
        assert_eq!(d.phi(5_000), 0.0, "nothing heard: no opinion");
        d.heartbeat(1_000);
        assert_eq!(d.liveness(2_000), Liveness::Alive);
        assert_eq!(d.liveness(1_000 + 10_000), Liveness::Dead);
    }

    #[test]
    fn a_beat_from_the_past_adds_no_interval() {
        let mut d = PhiDetector::new(DetectorConfig::default());
        d.heartbeat(10_000);
        d.heartbeat(9_000);
        assert_eq!(d.last_heard_ms(), Some(10_000));
        assert!(d.intervals.is_empty());
    }

    #[test]
    fn the_window_bounds_the_history() {
        let config = DetectorConfig {
            window: 10,
            ..DetectorConfig::default()
        };
        let mut d = PhiDetector::new(config);
        d.heartbeat(0);
        // Slow beats first, then fast ones: only the fast ones remain.
        let t = beats(&mut d, 0, 50, 5_000, 0);
        beats(&mut d, t, 10, 1_000, 0);
        assert_eq!(d.intervals.len(), 10);
        let (mean, _) = d.distribution();
        assert!((mean - 1_000.0).abs() < 1e-6, "mean {mean}");
    }
}
