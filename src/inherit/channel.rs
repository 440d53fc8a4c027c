//! The readiness channel between two generations: a Unix stream socket
//! whose new end crosses `exec` as `HANDOVER_READY_FD`. The new generation
//! says it is ready on it; the previous one, once drained, says how its
//! drain went. Each message is one line.

use std::time::Duration;

use crate::drain::DrainReport;

/// The longest line either side reads.
pub(crate) const MAX_LINE: u64 = 256;

/// What the new generation writes once it is ready; `connections`: that it
/// takes the previous generation's idle connections, on the channel passed
/// as `HANDOVER_CONNECTIONS_FD`.
pub(crate) fn ready_line(pid: u32, connections: bool) -> String {
    if connections {
        format!("READY={pid} connections=1\n")
    } else {
        format!("READY={pid}\n")
    }
}

/// What a `READY=` line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ready {
    /// The new generation takes the idle connections.
    pub(crate) connections: bool,
}

/// What `line` says, if it says the new generation is ready. A word it
/// does not know (a newer generation's) is passed over.
pub(crate) fn parse_ready_line(line: &[u8]) -> Option<Ready> {
    let rest = line.strip_prefix(b"READY=")?;
    let text = std::str::from_utf8(rest).ok()?;
    let connections = text
        .split_ascii_whitespace()
        .skip(1)
        .any(|word| word == "connections=1");
    Some(Ready { connections })
}

/// What a generation that handed over tells the new one once drained:
/// how long the upgrade took, and its drain report.
pub(crate) fn drain_report_line(took: Duration, report: &DrainReport) -> String {
    format!(
        "DRAINED upgrade_ms={:.3} drain_ms={:.3} requests_finished={} requests_forced={} \
         connections_finished={} connections_forced={} upgraded_finished={} upgraded_forced={} \
         connections_handed_over={}\n",
        took.as_secs_f64() * 1e3,
        report.elapsed.as_secs_f64() * 1e3,
        report.requests_finished,
        report.requests_forced,
        report.connections_finished,
        report.connections_forced,
        report.upgraded_finished,
        report.upgraded_forced,
        report.connections_handed_over,
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
            "connections_handed_over" => report.connections_handed_over = count()?,
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
            connections_handed_over: 6,
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
    fn a_ready_line_is_told_from_others_and_says_whether_it_takes_connections() {
        let takes = Ready { connections: true };
        let does_not = Ready { connections: false };
        assert_eq!(
            parse_ready_line(ready_line(42, true).as_bytes()),
            Some(takes)
        );
        assert_eq!(
            parse_ready_line(ready_line(42, false).as_bytes()),
            Some(does_not)
        );
        // An older generation's line, and a newer one's with more to say.
        assert_eq!(parse_ready_line(b"READY=42\n"), Some(does_not));
        assert_eq!(
            parse_ready_line(b"READY=42 later=2 connections=1\n"),
            Some(takes)
        );
        assert_eq!(
            parse_ready_line(b"READY=42 connections=0\n"),
            Some(does_not)
        );
        assert_eq!(parse_ready_line(b"DRAINED upgrade_ms=1\n"), None);
    }
}
