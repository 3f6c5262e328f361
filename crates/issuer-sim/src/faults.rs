//! Faults injected on purpose, changeable while the issuer runs: a
//! [`FaultControl`] is a cloneable handle; a test can say "drop every reply
//! now", wait until a reply was dropped, then say "answer normally again".
//!
//! The draws come from one seeded generator, so a run with the same seed
//! and the same order of replies injects the same faults.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::watch;

use crate::config::{FaultConfig, Latency};

/// What happens to one reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Written after this delay.
    Answer(Duration),
    /// Never written.
    Drop,
    /// Written after this (longer) delay.
    Late(Duration),
    /// Half the frame written, then the connection closed.
    Close,
}

/// How many replies met each fate so far; tests wait on these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultCounts {
    /// Replies answered (after the latency).
    pub answered: u64,
    /// Replies dropped.
    pub dropped: u64,
    /// Replies held back to answer late.
    pub late: u64,
    /// Replies cut, with their connection closed.
    pub closed: u64,
}

struct State {
    config: FaultConfig,
    rng: StdRng,
    /// The seed `rng` started from (0 before any fault draws, with no
    /// seed configured).
    seed: u64,
    /// Whether a seed drawn at random has been logged: once, when faults
    /// that draw first come into force, so that a run can be repeated.
    announced: bool,
}

impl State {
    fn new(config: FaultConfig) -> State {
        let seed = config.seed.unwrap_or_default();
        let mut state = State {
            rng: StdRng::seed_from_u64(seed),
            seed,
            config,
            announced: false,
        };
        state.announce();
        state
    }

    /// Starts the draws again from `seed`.
    fn reseed(&mut self, seed: u64) {
        self.seed = seed;
        self.rng = StdRng::seed_from_u64(seed);
    }

    /// Draws start again from a seed of their own, told, the moment faults
    /// that draw first come into force: replies before it drew from the
    /// generator too, so the seed it started with would not repeat them.
    fn announce(&mut self) {
        if self.config.seed.is_none() && self.config.draws() && !self.announced {
            self.reseed(rand::random());
            tracing::info!(seed = self.seed, "fault draws seeded at random");
            self.announced = true;
        }
    }
}

/// A cloneable handle on the issuer's faults.
#[derive(Clone)]
pub struct FaultControl {
    state: Arc<Mutex<State>>,
    counts: Arc<watch::Sender<FaultCounts>>,
    /// True while the replies to financial messages are held back.
    held: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for FaultControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultControl")
            .field("config", &self.config())
            .field("counts", &self.counts())
            .finish()
    }
}

impl FaultControl {
    /// A handle starting with `config`.
    pub fn new(config: FaultConfig) -> FaultControl {
        FaultControl {
            state: Arc::new(Mutex::new(State::new(config))),
            counts: Arc::new(watch::Sender::new(FaultCounts::default())),
            held: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Holds back the replies to financial messages (authorisations,
    /// financial requests, reversals and their advices), decided and posted
    /// as usual, until [`FaultControl::release`]; network management
    /// (sign-on, echo) is answered. While held, a request the switch sent
    /// stays at the issuer for as long as the test needs: to kill the switch
    /// with a transaction certainly in flight, say. A reply whose connection
    /// closes meanwhile is never written.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Lets the held replies go, and the ones after them.
    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// Whether replies are held now.
    pub(crate) fn held(&self) -> bool {
        *self.held.borrow()
    }

    /// Waits while replies are held.
    pub(crate) async fn while_held(&self) {
        let mut held = self.held.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = held.wait_for(|held| !held).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: go on.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The faults in force.
    pub fn config(&self) -> FaultConfig {
        self.lock().config.clone()
    }

    /// Replaces the faults from the next reply on. A config with a seed
    /// restarts the draws from it.
    pub fn set(&self, config: FaultConfig) {
        let mut state = self.lock();
        if let Some(seed) = config.seed {
            state.reseed(seed);
        }
        state.config = config;
        state.announce();
    }

    /// Changes some of the faults, e.g. `faults.update(|f| f.drop_reply = 1.0)`.
    /// The draws go on where they were unless the change sets a new seed.
    pub fn update(&self, change: impl FnOnce(&mut FaultConfig)) {
        let mut state = self.lock();
        let seed = state.config.seed;
        change(&mut state.config);
        if let Some(new) = state.config.seed.filter(|&new| Some(new) != seed) {
            state.reseed(new);
        }
        state.announce();
    }

    /// Back to no fault at all (the latency included).
    pub fn clear(&self) {
        self.update(|f| {
            *f = FaultConfig {
                seed: None,
                ..FaultConfig::default()
            }
        });
    }

    /// How many replies met each fate so far.
    pub fn counts(&self) -> FaultCounts {
        *self.counts.borrow()
    }

    /// A receiver of the counts, to wait for a fault to have happened:
    /// `faults.watch().wait_for(|c| c.dropped == 1).await`.
    pub fn watch(&self) -> watch::Receiver<FaultCounts> {
        self.counts.subscribe()
    }

    /// Draws the fate of one reply, and counts it.
    pub(crate) fn draw(&self) -> Fate {
        let fate = {
            let mut state = self.lock();
            let State { config, rng, .. } = &mut *state;
            let latency = sample(&config.latency, rng);
            let u: f64 = rng.random();
            if u < config.close_connection {
                Fate::Close
            } else if u < config.close_connection + config.drop_reply {
                Fate::Drop
            } else if u < config.close_connection + config.drop_reply + config.late_reply {
                Fate::Late(latency + config.late_by)
            } else {
                Fate::Answer(latency)
            }
        };
        self.counts.send_modify(|c| match fate {
            Fate::Answer(_) => c.answered += 1,
            Fate::Drop => c.dropped += 1,
            Fate::Late(_) => c.late += 1,
            Fate::Close => c.closed += 1,
        });
        fate
    }
}

/// One delay drawn from the latency distribution.
fn sample(latency: &Latency, rng: &mut StdRng) -> Duration {
    match *latency {
        Latency::Fixed(d) => d,
        Latency::Uniform { min, max } => {
            let (lo, hi) = (min.as_micros() as u64, max.as_micros() as u64);
            Duration::from_micros(rng.random_range(lo..=hi))
        }
        Latency::LogNormal { median, sigma, max } => {
            // Box-Muller: one standard normal from two uniforms in (0, 1].
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random();
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            let secs = median.as_secs_f64() * (sigma * z).exp();
            Duration::from_secs_f64(secs.min(max.as_secs_f64()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(change: impl FnOnce(&mut FaultConfig)) -> FaultControl {
        let mut config = FaultConfig {
            seed: Some(7),
            ..FaultConfig::default()
        };
        change(&mut config);
        FaultControl::new(config)
    }

    #[test]
    fn no_faults_by_default() {
        let f = FaultControl::new(FaultConfig::default());
        for _ in 0..100 {
            assert_eq!(f.draw(), Fate::Answer(Duration::ZERO));
        }
        assert_eq!(f.counts().answered, 100);
    }

    #[test]
    fn shares_follow_the_probabilities_and_the_seed_repeats_them() {
        let f = seeded(|c| {
            c.drop_reply = 0.2;
            c.close_connection = 0.1;
            c.late_reply = 0.3;
        });
        let fates: Vec<Fate> = (0..10_000).map(|_| f.draw()).collect();
        let c = f.counts();
        assert_eq!(c.answered + c.dropped + c.late + c.closed, 10_000);
        for (n, share) in [
            (c.dropped, 0.2),
            (c.closed, 0.1),
            (c.late, 0.3),
            (c.answered, 0.4),
        ] {
            assert!((n as f64 / 10_000.0 - share).abs() < 0.03, "{c:?}");
        }
        assert!(fates.contains(&Fate::Late(Duration::from_secs(15))));
        let again = seeded(|c| {
            c.drop_reply = 0.2;
            c.close_connection = 0.1;
            c.late_reply = 0.3;
        });
        assert!(fates.iter().all(|&fate| fate == again.draw()));
    }

    #[test]
    fn a_random_seed_is_told_when_faults_that_draw_come_into_force() {
        let f = FaultControl::new(FaultConfig::default());
        assert!(!f.lock().announced, "nothing drawn: nothing to repeat");
        f.update(|c| c.latency = Latency::Fixed(Duration::from_millis(5)));
        assert!(!f.lock().announced, "a fixed latency draws nothing");
        // Replies answered before the faults came: the seed told must
        // repeat what follows all the same.
        for _ in 0..5 {
            assert_eq!(f.draw(), Fate::Answer(Duration::from_millis(5)));
        }
        f.update(|c| c.drop_reply = 0.5);
        assert!(f.lock().announced);
        // The seed told repeats the draws.
        let told = f.lock().seed;
        let fates: Vec<Fate> = (0..50).map(|_| f.draw()).collect();
        let again = seeded(|c| {
            c.seed = Some(told);
            c.latency = Latency::Fixed(Duration::from_millis(5));
            c.drop_reply = 0.5;
        });
        assert!(fates.iter().all(|&fate| fate == again.draw()));
        // A seed of the config's own is not a random one.
        assert!(!seeded(|c| c.drop_reply = 0.5).lock().announced);
    }

    #[test]
    fn changes_apply_from_the_next_reply() {
        let f = seeded(|c| c.drop_reply = 1.0);
        assert_eq!(f.draw(), Fate::Drop);
        f.clear();
        assert_eq!(f.draw(), Fate::Answer(Duration::ZERO));
        f.update(|c| c.close_connection = 1.0);
        assert_eq!(f.draw(), Fate::Close);
    }

    #[test]
    fn an_update_goes_on_with_the_draws_and_a_new_seed_restarts_them() {
        let fates = |f: &FaultControl, n| (0..n).map(|_| f.draw()).collect::<Vec<_>>();
        let whole = fates(&seeded(|c| c.drop_reply = 0.5), 20);
        let f = seeded(|c| c.drop_reply = 0.5);
        let mut halves = fates(&f, 10);
        f.update(|c| c.late_by = Duration::from_secs(3));
        halves.extend(fates(&f, 10));
        assert_eq!(halves, whole, "the same sequence across the update");
        f.update(|c| c.seed = Some(7 + 1));
        let reseeded = fates(&f, 20);
        assert_eq!(
            reseeded,
            fates(
                &seeded(|c| {
                    c.drop_reply = 0.5;
                    c.seed = Some(8)
                }),
                20
            )
        );
    }

    #[test]
    fn latencies_stay_in_their_bounds() {
        let uniform = seeded(|c| {
            c.latency = Latency::Uniform {
                min: Duration::from_millis(5),
                max: Duration::from_millis(50),
            }
        });
        let lognormal = seeded(|c| {
            c.latency = Latency::LogNormal {
                median: Duration::from_millis(20),
                sigma: 1.0,
                max: Duration::from_millis(500),
            }
        });
        let mut below_median = 0;
        for _ in 0..2_000 {
            let Fate::Answer(d) = uniform.draw() else {
                panic!()
            };
            assert!((Duration::from_millis(5)..=Duration::from_millis(50)).contains(&d));
            let Fate::Answer(d) = lognormal.draw() else {
                panic!()
            };
            assert!(d <= Duration::from_millis(500));
            below_median += usize::from(d < Duration::from_millis(20));
        }
        assert!((800..1200).contains(&below_median), "{below_median}");
    }
}
