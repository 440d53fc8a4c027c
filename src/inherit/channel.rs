//! The readiness channel between two generations: a Unix stream socket
//! whose new end crosses `exec` as `HANDOVER_READY_FD`. The new generation
//! says it is ready on it; the previous one, once drained, says how its
//! drain went. Each message is one line.

use std::time::Duration;

use crate::drain::DrainReport;

/// The longest line either side reads.
pub(crate) const MAX_LINE: u64 = 256;

/// What the new generation writes once it is ready.
pub(crate) fn ready_line(pid: u32) -> String {
    format!("READY={pid}\n")
}

/// Whether `line` says the new generation is ready.
pub(crate) fn is_ready_line(line: &[u8]) -> bool {
    line.starts_with(b"READY=")
}

/// What a generation that handed over tells the new one once drained:
/// how long the upgrade took, and its drain report.
pub(crate) fn drain_report_line(took: Duration, report: &DrainReport) -> String {
    format!(
        "DRAINED upgrade_ms={:.3} drain_ms={:.3} requests_finished={} requests_forced={} \
         connections_finished={} connections_forced={} upgraded_finished={} upgraded_forced={}\n",
        took.as_secs_f64() * 1e3,
        report.elapsed.as_secs_f64() * 1e3,
        report.requests_finished,
        report.requests_forced,
        report.connections_finished,
        report.connections_forced,
        report.upgraded_finished,
        report.upgraded_forced,
    )
}

/// The other side of [`drain_report_line`]; `None` if it is not one.
pub(crate) fn parse_drain_report(line: &str) -> Option<(Duration, DrainReport)> {
    let fields = line.trim_end().strip_prefix("DRAINED ")?;
    let mut report = DrainReport::default();
    let mut took = Duration::ZERO;
    let ms = |value: &str| {
        value
            .parse::<f64>()
            .ok()
            .and_then(|ms| Duration::try_from_secs_f64(ms / 1e3).ok())
    };
    for field in fields.split(' ') {
        let (key, value) = field.split_once('=')?;
        let count = || value.parse::<usize>().ok();
        match key {
            "upgrade_ms" => took = ms(value)?,
            "drain_ms" => report.elapsed = ms(value)?,
            "requests_finished" => report.requests_finished = count()?,
            "requests_forced" => report.requests_forced = count()?,
            "connections_finished" => report.connections_finished = count()?,
            "connections_forced" => report.connections_forced = count()?,
            "upgraded_finished" => report.upgraded_finished = count()?,
            "upgraded_forced" => report.upgraded_forced = count()?,
            // A newer generation's: not ours to read.
            _ => {}
        }
    }
    Some((took, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_report_reads_back_and_a_line_that_is_not_one_does_not() {
        let report = DrainReport {
            requests_finished: 7,
            requests_forced: 1,
            connections_finished: 5,
            connections_forced: 2,
            upgraded_finished: 3,
            upgraded_forced: 4,
            elapsed: Duration::from_millis(1500),
        };
        let took = Duration::from_micros(3_210);
        let line = drain_report_line(took, &report);
        assert_eq!(parse_drain_report(&line), Some((took, report)));
        // A newer generation's extra keys are passed over.
        let newer = line.replace("DRAINED ", "DRAINED extra=1 ");
        assert_eq!(parse_drain_report(&newer), Some((took, report)));
        assert_eq!(parse_drain_report("READY=12\n"), None);
        assert_eq!(parse_drain_report("DRAINED drain_ms=x"), None);
        assert_eq!(parse_drain_report("DRAINED requests_finished"), None);
    }

    #[test]
    fn a_ready_line_is_told_from_others() {
        assert!(is_ready_line(ready_line(42).as_bytes()));
        assert!(!is_ready_line(b"DRAINED upgrade_ms=1\n"));
    }
}
