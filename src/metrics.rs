//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade, with
//! the `metrics` feature: whatever exporter the application installs
//! (Prometheus, StatsD, OpenTelemetry bridges) picks them up. Without the
//! feature nothing is recorded, and nothing of it is compiled in; the
//! names below are here either way.
//!
//! | name | kind | what |
//! |---|---|---|
//! | `handover_requests_in_flight` | gauge | requests in flight |
//! | `handover_connections_open` | gauge | connections open |
//! | `handover_upgraded_connections_open` | gauge | upgraded connections (WebSockets) open |
//! | `handover_generation` | gauge | this generation's number |
//! | `handover_drains_total` | counter | drains that ended |
//! | `handover_drain_requests_total{outcome}` | counter | requests drains `finished` or `forced` |
//! | `handover_drain_connections_total{outcome}` | counter | connections drains `finished`, `forced`, or `handed_over` to the next generation |
//! | `handover_drain_upgraded_connections_total{outcome}` | counter | upgraded connections drains `finished` or `forced` |
//! | `handover_drain_duration_seconds` | histogram | how long each drain took |
//! | `handover_upgrades_total{outcome}` | counter | upgrades: `ready`, or why one failed ([`Error::reason`](crate::Error::reason): `child_exited`, `ready_timeout`, `container`, …) |
//! | `handover_upgrade_duration_seconds` | histogram | from an upgrade's start to the new generation being ready |
//!
//! Nothing is recorded per request: the gauges are sampled once a second
//! by each serve loop, and the rest is recorded once per drain or upgrade.
//! A generation's upgrade succeeds as its process ends, so the new
//! generation records it: the success when it becomes ready, the time the
//! upgrade took and its predecessor's drain when that one has drained and
//! says so (see `Handover`'s drain report).

use std::time::Duration;

/// Requests in flight, now (sampled once a second).
pub const REQUESTS_IN_FLIGHT: &str = "handover_requests_in_flight";
/// Connections open, now (sampled once a second).
pub const CONNECTIONS_OPEN: &str = "handover_connections_open";
/// Upgraded connections (WebSockets) open, now (sampled once a second).
pub const UPGRADED_CONNECTIONS_OPEN: &str = "handover_upgraded_connections_open";
/// This generation's number.
pub const GENERATION: &str = "handover_generation";
/// Drains that ended.
pub const DRAINS_TOTAL: &str = "handover_drains_total";
/// Requests that drains finished or forced, by `outcome`.
pub const DRAIN_REQUESTS_TOTAL: &str = "handover_drain_requests_total";
/// Connections that drains finished, forced or handed over, by `outcome`.
pub const DRAIN_CONNECTIONS_TOTAL: &str = "handover_drain_connections_total";
/// Upgraded connections that drains finished or forced, by `outcome`.
pub const DRAIN_UPGRADED_CONNECTIONS_TOTAL: &str = "handover_drain_upgraded_connections_total";
/// How long each drain took.
pub const DRAIN_DURATION_SECONDS: &str = "handover_drain_duration_seconds";
/// Upgrades, by `outcome`: `ready`, or why it failed.
pub const UPGRADES_TOTAL: &str = "handover_upgrades_total";
/// From the upgrade's start (the signal, or the control socket's request)
/// to the new generation being ready.
pub const UPGRADE_DURATION_SECONDS: &str = "handover_upgrade_duration_seconds";

#[cfg(feature = "metrics")]
mod on {
    use std::sync::Once;

    use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};

    use super::*;

    pub(super) fn describe() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            describe_gauge!(REQUESTS_IN_FLIGHT, Unit::Count, "Requests in flight.");
            describe_gauge!(CONNECTIONS_OPEN, Unit::Count, "Connections open.");
            describe_gauge!(
                UPGRADED_CONNECTIONS_OPEN,
                Unit::Count,
                "Upgraded connections (WebSockets) open."
            );
            describe_gauge!(GENERATION, Unit::Count, "This generation's number.");
            describe_counter!(DRAINS_TOTAL, Unit::Count, "Drains that ended.");
            describe_counter!(
                DRAIN_REQUESTS_TOTAL,
                Unit::Count,
                "Requests that drains finished or forced."
            );
            describe_counter!(
                DRAIN_CONNECTIONS_TOTAL,
                Unit::Count,
                "Connections that drains finished, forced or handed over to the next generation."
            );
            describe_counter!(
                DRAIN_UPGRADED_CONNECTIONS_TOTAL,
                Unit::Count,
                "Upgraded connections that drains finished or forced."
            );
            describe_histogram!(
                DRAIN_DURATION_SECONDS,
                Unit::Seconds,
                "How long each drain took."
            );
            describe_counter!(UPGRADES_TOTAL, Unit::Count, "Upgrades, by outcome.");
            describe_histogram!(
                UPGRADE_DURATION_SECONDS,
                Unit::Seconds,
                "From an upgrade's start to the new generation being ready."
            );
        });
    }

    pub(super) fn gauges(in_flight: usize, connections: usize, upgraded: usize) {
        gauge!(REQUESTS_IN_FLIGHT).set(in_flight as f64);
        gauge!(CONNECTIONS_OPEN).set(connections as f64);
        gauge!(UPGRADED_CONNECTIONS_OPEN).set(upgraded as f64);
    }

    pub(super) fn generation(generation: u64) {
        gauge!(GENERATION).set(generation as f64);
    }

    pub(super) fn drained(drained: Drained, elapsed: Duration) {
        counter!(DRAINS_TOTAL).increment(1);
        let names = [
            DRAIN_REQUESTS_TOTAL,
            DRAIN_CONNECTIONS_TOTAL,
            DRAIN_UPGRADED_CONNECTIONS_TOTAL,
        ];
        for (name, (finished, forced)) in names.into_iter().zip(drained.counts) {
            counter!(name, "outcome" => "finished").increment(finished as u64);
            counter!(name, "outcome" => "forced").increment(forced as u64);
        }
        counter!(DRAIN_CONNECTIONS_TOTAL, "outcome" => "handed_over")
            .increment(drained.handed_over as u64);
        metrics::histogram!(DRAIN_DURATION_SECONDS).record(elapsed.as_secs_f64());
    }

    pub(super) fn upgrade(outcome: &str) {
        counter!(UPGRADES_TOTAL, "outcome" => outcome.to_owned()).increment(1);
    }

    pub(super) fn upgrade_took(took: Duration) {
        metrics::histogram!(UPGRADE_DURATION_SECONDS).record(took.as_secs_f64());
    }
}

/// Describes every metric to the recorder (once per process).
#[inline]
pub(crate) fn describe() {
    #[cfg(feature = "metrics")]
    on::describe();
}

/// Sets the gauges of what is open now.
#[cfg(feature = "metrics")]
pub(crate) fn gauges(in_flight: usize, connections: usize, upgraded: usize) {
    on::gauges(in_flight, connections, upgraded);
}

/// Sets this generation's number.
#[inline]
pub(crate) fn generation(generation: u64) {
    #[cfg(feature = "metrics")]
    on::generation(generation);
    #[cfg(not(feature = "metrics"))]
    let _ = generation;
}

/// What a drain finished and forced: requests, connections and upgraded
/// connections, each (finished, forced); and the connections it handed
/// over.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) struct Drained {
    pub(crate) counts: [(usize, usize); 3],
    pub(crate) handed_over: usize,
}

/// Records a drain that ended.
#[inline]
pub(crate) fn drained(counts: Drained, elapsed: Duration) {
    #[cfg(feature = "metrics")]
    on::drained(counts, elapsed);
    #[cfg(not(feature = "metrics"))]
    let _ = (counts, elapsed);
}

/// Counts an upgrade's outcome: `ready`, or a failure's `Error::reason`.
#[inline]
pub(crate) fn upgrade(outcome: &str) {
    #[cfg(feature = "metrics")]
    on::upgrade(outcome);
    #[cfg(not(feature = "metrics"))]
    let _ = outcome;
}

/// Records how long a successful upgrade took.
#[inline]
pub(crate) fn upgrade_took(took: Duration) {
    #[cfg(feature = "metrics")]
    on::upgrade_took(took);
    #[cfg(not(feature = "metrics"))]
    let _ = took;
}
