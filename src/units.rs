//! Sizes and durations as people type them on a command line.
//!
//! - Sizes: `4096`, `512K`, `512M`, `1.5GiB`, `2 TB`, `1p` — binary units (powers of
//!   1024) whatever the spelling, case-insensitive, optional `B`/`iB`, an optional
//!   decimal fraction (rounded down to whole bytes). Zero is refused: no caller wants
//!   an empty device or journal.
//! - Durations: `500ms`, `2s`, `1.5s`, `1m`, `1h`; a unit is required.
//!
//! All arithmetic is checked: an input that does not fit is an error, never a wrap.

use std::time::Duration;

/// Binary units, smallest first: suffix letter and its size in bytes.
const SIZE_UNITS: [(char, u64); 5] = [
    ('K', 1 << 10),
    ('M', 1 << 20),
    ('G', 1 << 30),
    ('T', 1 << 40),
    ('P', 1 << 50),
];

/// Most digits of a decimal fraction we keep: the 19th digit is worth less than a
/// thousandth of a byte of a PiB (or of a nanosecond of an hour).
const FRACTION_DIGITS_MAX: usize = 18;

/// Parses a size such as `512M` or `1.5 GiB` into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(
            "empty size: give a number of bytes or a number with K, M, G, T or P (e.g. 512M)"
                .into(),
        );
    }
    let (number, suffix) = split_number(trimmed);
    if number.is_empty() {
        return Err(format!(
            "bad size {text:?}: it must start with a number (e.g. 512M)"
        ));
    }
    let unit = size_unit(suffix).ok_or_else(|| {
        format!(
            "bad size {text:?}: unknown unit {suffix:?} (use K, M, G, T or P, e.g. 512M or 2GiB)"
        )
    })?;
    let bytes = scale_decimal(number, unit).map_err(|why| format!("bad size {text:?}: {why}"))?;
    if bytes == 0 {
        return Err(format!("bad size {text:?}: the size must be larger than 0"));
    }
    Ok(bytes)
}

/// Parses a duration such as `500ms`, `2s`, `1.5s` or `1m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let (number, suffix) = split_number(trimmed);
    if number.is_empty() {
        return Err(format!(
            "bad duration {text:?}: it must start with a number (e.g. 500ms or 2s)"
        ));
    }
    let nanos_per_unit: u64 = match suffix.to_ascii_lowercase().as_str() {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" | "sec" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "" => {
            return Err(format!(
                "bad duration {text:?}: add a unit (ms, s, m or h), e.g. 500ms or 2s"
            ))
        }
        _ => {
            return Err(format!(
                "bad duration {text:?}: unknown unit {suffix:?} (use ms, s, m or h)"
            ))
        }
    };
    let nanos = scale_decimal(number, nanos_per_unit)
        .map_err(|why| format!("bad duration {text:?}: {why}"))?;
    Ok(Duration::from_nanos(nanos))
}

/// Formats a byte count with the largest binary unit it reaches: `512 MiB`,
/// `1.5 GiB`, `100 bytes`. Exact multiples print without a fraction; others print
/// two decimals (rounded down, so the text never claims more than there is).
pub fn format_size(bytes: u64) -> String {
    let Some(&(letter, unit)) = SIZE_UNITS.iter().rev().find(|(_, unit)| bytes >= *unit) else {
        return if bytes == 1 {
            "1 byte".to_string()
        } else {
            format!("{bytes} bytes")
        };
    };
    let whole = bytes / unit;
    let rest = bytes % unit;
    if rest == 0 {
        return format!("{whole} {letter}iB");
    }
    // rest < unit <= 2^50, so rest * 100 cannot overflow.
    let hundredths = rest * 100 / unit;
    format!("{whole}.{hundredths:02} {letter}iB")
}

/// Splits `12.5 GiB` into (`12.5`, `GiB`): the leading digits and dot, then the rest
/// with surrounding spaces removed.
fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    (&text[..end], text[end..].trim())
}

/// The multiplier of a size suffix, or None when the suffix is not one.
fn size_unit(suffix: &str) -> Option<u64> {
    let upper = suffix.to_ascii_uppercase();
    if upper.is_empty() || upper == "B" {
        return Some(1);
    }
    let mut chars = upper.chars();
    let letter = chars.next()?;
    let tail: String = chars.collect();
    if !matches!(tail.as_str(), "" | "B" | "IB") {
        return None;
    }
    SIZE_UNITS
        .iter()
        .find(|(l, _)| *l == letter)
        .map(|&(_, unit)| unit)
}

/// `number` (digits, optionally `.` and more digits) times `unit`, rounded down.
fn scale_decimal(number: &str, unit: u64) -> Result<u64, String> {
    let (int_text, frac_text) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int_text.is_empty() && frac_text.is_empty() {
        return Err("no number".into());
    }
    if frac_text.contains('.') || (number.contains('.') && frac_text.is_empty()) {
        return Err("malformed number".into());
    }
    let too_large = || "too large".to_string();
    let int_value: u64 = if int_text.is_empty() {
        0
    } else {
        int_text.parse().map_err(|_| too_large())?
    };
    let mut total = int_value.checked_mul(unit).ok_or_else(too_large)?;
    if !frac_text.is_empty() {
        // Keep 10^digits and the product with `unit` inside u128.
        let kept = &frac_text[..frac_text.len().min(FRACTION_DIGITS_MAX)];
        let frac_value: u128 = kept.parse().map_err(|_| "malformed number".to_string())?;
        let scale = 10u128.pow(kept.len() as u32);
        let frac_part = frac_value * u128::from(unit) / scale;
        let frac_part = u64::try_from(frac_part).map_err(|_| too_large())?;
        total = total.checked_add(frac_part).ok_or_else(too_large)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_with_every_suffix_spelling() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("512mib"), Ok(512 << 20));
        assert_eq!(parse_size("512MB"), Ok(512 << 20));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("3G"), Ok(3 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size(" 8k "), Ok(8192));
        assert_eq!(parse_size(".5K"), Ok(512));
    }

    #[test]
    fn sizes_refused_with_a_reason() {
        for bad in [
            "", "0", "0M", "M", "12X", "12KX", "1.2.3M", "5.", "-1M", "1e6", "12 M B",
        ] {
            let err = parse_size(bad).expect_err(bad);
            assert!(err.contains("size"), "{bad}: {err}");
        }
        assert!(parse_size("0").unwrap_err().contains("larger than 0"));
        assert!(parse_size("16384P").unwrap_err().contains("too large"));
        assert!(parse_size("99999999999999999999")
            .unwrap_err()
            .contains("too large"));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250 MS"), Ok(Duration::from_millis(250)));
        for bad in ["", "5", "s", "5x", "1.2.3s", "-1s", "999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("5").unwrap_err().contains("add a unit"));
    }

    #[test]
    fn formatted_sizes() {
        assert_eq!(format_size(0), "0 bytes");
        assert_eq!(format_size(1), "1 byte");
        assert_eq!(format_size(1023), "1023 bytes");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(512 << 20), "512 MiB");
        assert_eq!(format_size(3 << 29), "1.50 GiB");
        assert_eq!(format_size(1 << 40), "1 TiB");
        assert_eq!(format_size(u64::MAX), "16383.99 PiB");
    }

    fn unit_strategy() -> impl Strategy<Value = (usize, &'static str)> {
        (
            0..SIZE_UNITS.len(),
            prop::sample::select(vec!["", "B", "iB", "ib", "IB", "b"]),
        )
    }

    proptest! {
        #[test]
        fn plain_bytes_round_trip(n in 1u64..=u64::MAX) {
            prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
        }

        #[test]
        fn suffixed_sizes((index, tail) in unit_strategy(), k in 1u64..16384, lower: bool) {
            let (letter, unit) = SIZE_UNITS[index];
            let letter = if lower { letter.to_ascii_lowercase() } else { letter };
            let text = format!("{k}{letter}{tail}");
            prop_assert_eq!(parse_size(&text), Ok(k * unit), "{}", text);
        }

        #[test]
        fn format_then_parse_is_exact_for_whole_units(index in 0..SIZE_UNITS.len(), k in 1u64..1024) {
            let n = k * SIZE_UNITS[index].1;
            prop_assert_eq!(parse_size(&format_size(n)), Ok(n));
        }

        #[test]
        fn format_then_parse_is_close(n in 1u64..=u64::MAX) {
            let back = parse_size(&format_size(n)).map_err(TestCaseError::fail)?;
            // Two decimals of the largest unit, rounded down: under 1% low, never high.
            prop_assert!(back <= n);
            prop_assert!((n - back) as f64 <= n as f64 / 100.0, "{} -> {}", n, back);
        }

        #[test]
        fn milliseconds_round_trip(ms in 0u64..1_000_000_000) {
            prop_assert_eq!(parse_duration(&format!("{ms}ms")), Ok(Duration::from_millis(ms)));
            let text = format!("{}.{:03}s", ms / 1000, ms % 1000);
            prop_assert_eq!(parse_duration(&text), Ok(Duration::from_millis(ms)));
        }

        #[test]
        fn garbage_never_panics(text in "\\PC{0,24}") {
            let _ = parse_size(&text);
            let _ = parse_duration(&text);
        }
    }
}
