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

#[cfg(test)]
mod tests {
    use super::*;

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
