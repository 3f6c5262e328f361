//! Open loop: requests are scheduled by the clock, at a fixed rate, not
//! after the previous reply; latency runs from the scheduled time. A stalled
//! switch therefore shows in the percentiles as the requests that waited
//! behind it, instead of vanishing from them (no coordinated omission).
//!
//! Requests go round-robin to lanes (a lane is a terminal: one request at a
//! time, in order, as a real terminal works); a request whose lane is busy
//! waits, and its wait counts.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::live::Live;

/// Something that sends request `index` and says what it was and how it was
/// answered: (kind, response code, `--` when none came).
pub trait Lane: Send + 'static {
    /// Sends request `index`.
    fn send(&mut self, index: u64) -> impl Future<Output = (&'static str, String)> + Send + '_;
}

/// One request's fate.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Which request.
    pub index: u64,
    /// When it was due, from the start of the run.
    pub scheduled: Duration,
    /// From when it was due to when its answer came.
    pub latency: Duration,
    /// What it was.
    pub kind: &'static str,
    /// The response code.
    pub rc: String,
}

/// Sends `count` requests at `rate` per second over `lanes`; returns the
/// lanes (with their state) and a sample per request. With `live`, every
/// sample also goes to the progress line, shown once a second.
pub async fn run<L: Lane>(
    rate: f64,
    count: u64,
    lanes: Vec<L>,
    mut live: Option<&mut Live>,
) -> (Vec<L>, Vec<Sample>) {
    assert!(
        rate > 0.0 && !lanes.is_empty(),
        "a rate and at least one lane"
    );
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    // Each lane keeps its own share of the schedule (requests `k`, `k + n`,
    // `k + 2n`, ... of `n` lanes) with one timer: the same round robin as one
    // scheduler handing requests out, without a task hop and a channel per
    // request. A request whose lane is still busy when it is due starts
    // when the lane is free; its latency still runs from when it was due.
    let n = lanes.len() as u64;
    let workers: Vec<_> = lanes
        .into_iter()
        .zip(0..n)
        .map(|(mut lane, first)| {
            let done = done_tx.clone();
            tokio::spawn(async move {
                let timer = tokio::time::sleep_until(start);
                tokio::pin!(timer);
                for index in (first..count).step_by(n as usize) {
                    let due = start + interval.mul_f64(index as f64);
                    if Instant::now() < due {
                        timer.as_mut().reset(due);
                        (&mut timer).await;
                    }
                    let (kind, rc) = lane.send(index).await;
                    let _ = done.send(Sample {
                        index,
                        scheduled: due - start,
                        latency: due.elapsed(),
                        kind,
                        rc,
                    });
                }
                lane
            })
        })
        .collect();
    drop(done_tx);
    let schedule = async move {
        let mut lanes = Vec::with_capacity(workers.len());
        for w in workers {
            lanes.push(w.await.expect("a lane does not panic"));
        }
        lanes
    };
    // Samples are collected while the schedule runs (the lanes only send
    // them), and the progress line is drawn from them here.
    let collect = async {
        let mut samples = Vec::with_capacity(count as usize);
        let second = Duration::from_secs(1);
        let mut ticks = tokio::time::interval_at(start + second, second);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                sample = done_rx.recv() => {
                    let Some(s) = sample else { break };
                    if let Some(live) = live.as_deref_mut() {
                        live.record(s.latency, &s.rc);
                    }
                    samples.push(s);
                }
                _ = ticks.tick(), if live.is_some() => {
                    if let Some(live) = live.as_deref_mut() {
                        live.show();
                    }
                }
            }
        }
        samples
    };
    let (lanes, mut samples) = tokio::join!(schedule, collect);
    samples.sort_by_key(|s| s.index);
    (lanes, samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lane whose server stalls on one request, as a switch waiting on a
    /// slow database would.
    struct Stalling {
        stall_on: u64,
        stall: Duration,
    }

    impl Lane for Stalling {
        async fn send(&mut self, index: u64) -> (&'static str, String) {
            if index == self.stall_on {
                tokio::time::sleep(self.stall).await;
            }
            ("purchase", "00".into())
        }
    }

    #[tokio::test]
    async fn a_stall_shows_in_the_latency_of_everything_scheduled_behind_it() {
        // 200 requests a second on one lane; request 10 takes 400 ms.
        let lane = Stalling {
            stall_on: 10,
            stall: Duration::from_millis(400),
        };
        let (_, samples) = run(200.0, 120, vec![lane], None).await;
        assert_eq!(samples.len(), 120);
        assert!(samples.iter().all(|s| s.rc == "00"));
        // Requests due during the stall (every 5 ms for 400 ms) waited for it:
        // a closed loop would have sent them late and measured them fast.
        let delayed = samples
            .iter()
            .filter(|s| s.index > 10 && s.latency >= Duration::from_millis(100))
            .count();
        assert!(delayed >= 40, "only {delayed} requests show the stall");
        // The schedule did not slow down: the last was due at about 595 ms.
        let last = samples.last().unwrap();
        assert_eq!(last.index, 119);
        assert!(
            last.scheduled >= Duration::from_millis(590)
                && last.scheduled <= Duration::from_millis(600)
        );
    }

    #[tokio::test]
    async fn the_progress_line_hears_of_every_request() {
        struct Flaky;
        impl Lane for Flaky {
            async fn send(&mut self, index: u64) -> (&'static str, String) {
                let rc = match index % 10 {
                    0 => "--",
                    5 => "51",
                    _ => "00",
                };
                ("purchase", rc.into())
            }
        }
        let started = std::time::Instant::now();
        let mut live = Live::new(started);
        let (_, samples) = run(2000.0, 40, vec![Flaky, Flaky], Some(&mut live)).await;
        assert_eq!(samples.len(), 40);
        let line = live.tick(started + Duration::from_secs(1));
        assert!(line.contains("     40/s"), "{line}");
        assert!(line.ends_with("no answer 4  not 00 4"), "{line}");
    }

    #[tokio::test]
    async fn requests_go_round_robin_to_the_lanes() {
        struct Counting(Vec<u64>);
        impl Lane for Counting {
            async fn send(&mut self, index: u64) -> (&'static str, String) {
                self.0.push(index);
                ("purchase", "00".into())
            }
        }
        let (lanes, samples) = run(
            1000.0,
            9,
            vec![Counting(vec![]), Counting(vec![]), Counting(vec![])],
            None,
        )
        .await;
        assert_eq!(samples.len(), 9);
        assert_eq!(lanes[0].0, [0, 3, 6]);
        assert_eq!(lanes[2].0, [2, 5, 8]);
    }
}
