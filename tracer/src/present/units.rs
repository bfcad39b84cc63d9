//! Units as `slabtop`, `free -h` and `/proc/meminfo` readers expect them, for
//! every view of both tools: counts, bytes, durations.

/// Binary units with one decimal, as `slabtop`/`free -h` users expect: `512B`, `2.4M`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// 1234567 -> "1,234,567": counts are read at a glance during an incident.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A live-object table's totals, as both tools' headers show them:
/// `N outstanding (BYTES)   allocs N   frees N`. `bytes`: None where the tool
/// does not sum them; `allocs`: the tool's name for its allocations and
/// their number (memcg counts charges).
pub fn tracked(outstanding: u64, bytes: Option<u64>, allocs: (&str, u64), frees: u64) -> String {
    let bytes = bytes.map_or_else(String::new, |b| format!(" ({})", human_bytes(b)));
    let (name, n) = allocs;
    format!(
        "{} outstanding{bytes}   {name} {}   frees {}",
        group(outstanding),
        group(n),
        group(frees)
    )
}

/// Milliseconds as the age of an object: `850ms`, `1.5s`, `3.2m`.
pub fn human_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 120_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{:.1}m", ms as f64 / 60_000.0)
    }
}

/// Seconds as `top` shows an uptime: `1.2s`, `1m15s`, `2h01m`.
pub fn human_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{:.0}m{:02.0}s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{:.0}h{:02.0}m", (s / 3600.0).floor(), (s % 3600.0) / 60.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1023), "1023B");
        assert_eq!(human_bytes(1024), "1.0K");
        assert_eq!(human_bytes(2_474_000), "2.4M");
        assert_eq!(human_bytes(55 << 30), "55.0G");
        assert_eq!(human_bytes(u64::MAX), "16384.0P");
    }

    #[test]
    fn numbers_read_like_slabtop() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1234567), "1,234,567");
        assert_eq!(
            tracked(1234, Some(2048), ("allocs", 5000), 3766),
            "1,234 outstanding (2.0K)   allocs 5,000   frees 3,766"
        );
        assert_eq!(
            tracked(1, None, ("charges", 2), 1),
            "1 outstanding   charges 2   frees 1"
        );
    }

    #[test]
    fn durations_read_like_top() {
        assert_eq!(human_ms(1500), "1.5s");
        assert_eq!(human_secs(1.25), "1.2s");
        assert_eq!(human_secs(75.0), "1m15s");
        assert_eq!(human_secs(7260.0), "2h01m");
    }
}
