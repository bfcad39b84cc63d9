//! Units as `slabtop`, `free -h` and `/proc/meminfo` readers expect them.

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
}
