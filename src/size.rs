//! Human sizes: `512M`, `10G`, `1T`, `4096` (binary units).

/// Parses a size with an optional binary suffix (K, M, G, T, P; `iB`/`B` allowed).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("{s:?} is not a size (try 512M, 10G, 1T)"));
    }
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is too large"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        other => {
            return Err(format!(
                "unknown size suffix {other:?} in {s:?} (use K, M, G, T, P)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Formats bytes in the largest binary unit in which the number, rounded
/// to one decimal, stays below 1024: `1.5 GiB`, `1.0 TiB` (never
/// `1024.0 GiB`), `512 B`.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut u = 0;
    let mut v = n as f64;
    // Step up while the value would print as 1024.0 or more in this unit
    // (1023.96 GiB rounds to "1024.0 GiB": that is 1.0 TiB).
    while u < UNITS.len() - 1 && (v * 10.0).round() >= 1024.0 * 10.0 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("8k").unwrap(), 8192);
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("10X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999P").is_err());
    }

    #[test]
    fn sizes_format() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1.0 KiB");
        assert_eq!(format_size(1536 << 20), "1.5 GiB");
        assert_eq!(format_size(64 << 10), "64.0 KiB");
    }

    #[test]
    fn sizes_format_in_the_largest_fitting_unit() {
        assert_eq!(format_size(1 << 40), "1.0 TiB");
        assert_eq!(format_size(1 << 30), "1.0 GiB");
        assert_eq!(format_size(1 << 50), "1.0 PiB");
        assert_eq!(format_size(1 << 60), "1.0 EiB");
        assert_eq!(format_size(u64::MAX), "16.0 EiB");
        // Just under a unit boundary: what would round to "1024.0" moves up.
        assert_eq!(format_size((1 << 40) - 1), "1.0 TiB");
        assert_eq!(format_size((1 << 40) - (1 << 30) / 32), "1.0 TiB");
        assert_eq!(format_size((1 << 20) - 1), "1.0 MiB");
        // Still below: stays in the smaller unit.
        assert_eq!(format_size(1023 << 30), "1023.0 GiB");
        assert_eq!(format_size((1 << 40) - (1 << 30) / 10), "1023.9 GiB");
        // Every power of two prints below 1024 and reads back as itself.
        for shift in 10..64 {
            let n = 1u64 << shift;
            let s = format_size(n);
            let (num, unit) = s.split_once(' ').unwrap();
            let num: f64 = num.parse().unwrap();
            assert!(num < 1024.0, "{s}");
            let scale = match unit {
                "KiB" => 10,
                "MiB" => 20,
                "GiB" => 30,
                "TiB" => 40,
                "PiB" => 50,
                "EiB" => 60,
                other => panic!("{other}"),
            };
            assert_eq!(num * (1u64 << scale) as f64, n as f64, "{s}");
        }
    }
}
