//! Time as plain numbers: milliseconds since the Unix epoch, passed in by the edge (the core
//! never reads a clock, so tests use a fake one). Formatting for `x-ms-date` and templates;
//! the calendar from the `time` crate.

/// Civil date and time (UTC) of a Unix time in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Sunday.
    pub weekday: u32,
}

impl Utc {
    /// From the `time` crate's calendar; its years are -9999 to 9999, and an instant outside
    /// them is taken as the nearest it has.
    pub fn from_millis(ms: f64) -> Utc {
        let (first, last) = (
            time::UtcDateTime::MIN.unix_timestamp(),
            time::UtcDateTime::MAX.unix_timestamp(),
        );
        // Not `clamp`: its assertion on bounds it cannot see brings `Debug` for `i64` into the wasm.
        let secs = ((ms / 1000.0).floor() as i64).max(first).min(last);
        let t =
            time::UtcDateTime::from_unix_timestamp(secs).unwrap_or(time::UtcDateTime::UNIX_EPOCH);
        Utc {
            year: i64::from(t.year()),
            month: u32::from(u8::from(t.month())),
            day: u32::from(t.day()),
            hour: u32::from(t.hour()),
            minute: u32::from(t.minute()),
            second: u32::from(t.second()),
            weekday: u32::from(t.weekday().number_days_from_sunday()),
        }
    }

    /// RFC 1123 / IMF-fixdate, as `x-ms-date` and `Date` use: `Sun, 06 Nov 1994 08:49:37 GMT`.
    pub fn http_date(&self) -> String {
        const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        format!(
            "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
            DAYS[self.weekday as usize % 7],
            self.day,
            MONTHS[(self.month as usize + 11) % 12],
            self.year,
            self.hour,
            self.minute,
            self.second
        )
    }

    /// Formats with `%Y %m %d %H %M %S %%`; anything else is copied as it is.
    pub fn format(&self, fmt: &str) -> String {
        let mut out = String::new();
        let mut chars = fmt.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('Y') => out.push_str(&format!("{:04}", self.year)),
                Some('m') => out.push_str(&format!("{:02}", self.month)),
                Some('d') => out.push_str(&format!("{:02}", self.day)),
                Some('H') => out.push_str(&format!("{:02}", self.hour)),
                Some('M') => out.push_str(&format!("{:02}", self.minute)),
                Some('S') => out.push_str(&format!("{:02}", self.second)),
                Some(other) => {
                    out.push('%');
                    if other != '%' {
                        out.push(other);
                    }
                }
                None => out.push('%'),
            }
        }
        out
    }
}

/// `value` brought within `low..=high` (`low` for NaN). Not `f64::clamp`: its check that
/// `low <= high` formats both with `Debug` when it fails, which links core's float formatting
/// (about 7 KiB of the upload's gzip) into the wasm for a panic that cannot happen here.
/// clippy.toml disallows `f64::clamp` for that reason.
pub fn within(value: f64, low: f64, high: f64) -> f64 {
    value.max(low).min(high)
}

/// `YYYY-MM-DDThh:mm:ss[.fraction]Z` (as Storage writes a key's expiry) in Unix milliseconds,
/// to the second; `None` for anything else.
pub fn parse_iso_utc(text: &str) -> Option<f64> {
    let b = text.as_bytes();
    let shape = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[b.len() - 1] == b'Z';
    if !shape {
        return None;
    }
    let fraction = &b[19..b.len() - 1];
    if !(fraction.is_empty()
        || (fraction[0] == b'.'
            && fraction.len() > 1
            && fraction[1..].iter().all(u8::is_ascii_digit)))
    {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let digits = text.get(range)?;
        digits
            .bytes()
            .all(|d| d.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let month = time::Month::try_from(u8::try_from(number(5..7)?).ok()?).ok()?;
    let date = time::Date::from_calendar_date(
        i32::try_from(number(0..4)?).ok()?,
        month,
        u8::try_from(number(8..10)?).ok()?,
    )
    .ok()?;
    let at = time::Time::from_hms(
        u8::try_from(number(11..13)?).ok()?,
        u8::try_from(number(14..16)?).ok()?,
        u8::try_from(number(17..19)?).ok()?,
    )
    .ok()?;
    Some(time::UtcDateTime::new(date, at).unix_timestamp() as f64 * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_iso_instants_as_storage_writes_them() {
        let leap = 1_709_210_096_000.0; // 2024-02-29T12:34:56Z
        assert_eq!(parse_iso_utc("2024-02-29T12:34:56Z"), Some(leap));
        assert_eq!(parse_iso_utc("2024-02-29T12:34:56.1234567Z"), Some(leap));
        assert_eq!(
            parse_iso_utc(&Utc::from_millis(leap).format("%Y-%m-%dT%H:%M:%SZ")),
            Some(leap)
        );
        for bad in [
            "",
            "2024-02-30T12:34:56Z",
            "2024-02-29T24:00:00Z",
            "2024-02-29 12:34:56Z",
            "2024-02-29T12:34:56",
            "2024-02-29T12:34:56.Z",
            "2024-02-29T12:34:56+01:00",
            "+024-02-29T12:34:56Z",
        ] {
            assert_eq!(parse_iso_utc(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(
            Utc::from_millis(784_111_777_000.0).http_date(),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            Utc::from_millis(0.0).http_date(),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
        let leap = Utc::from_millis(1_709_210_096_000.0); // 2024-02-29T12:34:56Z
        assert_eq!(
            leap.format("%Y/%m/%d %H:%M:%S 100%%"),
            "2024/02/29 12:34:56 100%"
        );
        assert_eq!(
            Utc::from_millis(1_798_761_600_000.0).format("%Y-%m-%d"),
            "2027-01-01"
        );
    }
}
