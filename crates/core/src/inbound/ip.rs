//! IP allow and deny lists on the client address Cloudflare reports (`CF-Connecting-IP`).

use std::net::IpAddr;

/// An address range: `10.0.0.0/8`, `2001:db8::/32`, or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses a CIDR; the error says what was expected.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("an IPv4 or IPv6 address or CIDR such as 203.0.113.0/24 or 2001:db8::/32, got \"{text}\""))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("a prefix length of 0 to {max}, got \"{text}\""))?,
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => masked(
                u128::from(u32::from(net)),
                u128::from(u32::from(ip)),
                self.prefix,
                32,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            // An IPv4-mapped IPv6 client (::ffff:a.b.c.d) matches IPv4 ranges.
            (IpAddr::V4(net), IpAddr::V6(ip)) => ip.to_ipv4_mapped().is_some_and(|v4| {
                masked(
                    u128::from(u32::from(net)),
                    u128::from(u32::from(v4)),
                    self.prefix,
                    32,
                )
            }),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

fn masked(net: u128, ip: u128, prefix: u8, bits: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = u32::from(bits - prefix);
    (net >> shift) == (ip >> shift)
}

/// Whether `client` may call, given the lists (already validated). Deny wins; with an allow
/// list, only listed addresses pass; an unknown or unparsable address passes only when there
/// is no allow list.
pub fn allowed(allow: &[Cidr], deny: &[Cidr], client: Option<&str>) -> bool {
    let ip = client.and_then(|c| c.trim().parse::<IpAddr>().ok());
    let any = |list: &[Cidr], ip: IpAddr| list.iter().any(|c| c.contains(ip));
    match ip {
        Some(ip) if any(deny, ip) => false,
        Some(ip) => allow.is_empty() || any(allow, ip),
        None => allow.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<Cidr> {
        items.iter().map(|s| Cidr::parse(s).unwrap()).collect()
    }

    #[test]
    fn ipv4_ranges_and_single_addresses() {
        let allow = list(&["203.0.113.0/24", "198.51.100.7"]);
        assert!(allowed(&allow, &[], Some("203.0.113.200")));
        assert!(allowed(&allow, &[], Some("198.51.100.7")));
        assert!(!allowed(&allow, &[], Some("198.51.100.8")));
        assert!(!allowed(&allow, &[], Some("203.0.114.1")));
        assert!(allowed(&list(&["0.0.0.0/0"]), &[], Some("8.8.8.8")));
    }

    #[test]
    fn ipv6_ranges_and_mapped_ipv4() {
        let allow = list(&["2001:db8::/32", "10.0.0.0/8"]);
        assert!(allowed(&allow, &[], Some("2001:db8:ffff::1")));
        assert!(!allowed(&allow, &[], Some("2001:db9::1")));
        assert!(allowed(&allow, &[], Some("::ffff:10.1.2.3")));
        assert!(!allowed(&list(&["2001:db8::/32"]), &[], Some("10.1.2.3")));
        assert!(allowed(
            &list(&["2001:db8:0:0:8000::/65"]),
            &[],
            Some("2001:db8::8000:0:0:1")
        ));
        assert!(!allowed(
            &list(&["2001:db8:0:0:8000::/65"]),
            &[],
            Some("2001:db8::7fff:0:0:1")
        ));
    }

    #[test]
    fn deny_wins_and_unknown_clients_pass_only_without_an_allow_list() {
        let deny = list(&["203.0.113.66"]);
        assert!(!allowed(
            &list(&["203.0.113.0/24"]),
            &deny,
            Some("203.0.113.66")
        ));
        assert!(!allowed(&[], &deny, Some("203.0.113.66")));
        assert!(allowed(&[], &deny, Some("203.0.113.67")));
        assert!(allowed(&[], &deny, None));
        assert!(!allowed(&list(&["203.0.113.0/24"]), &[], None));
        assert!(!allowed(&list(&["203.0.113.0/24"]), &[], Some("not-an-ip")));
    }

    #[test]
    fn malformed_ranges_say_what_was_expected() {
        assert!(Cidr::parse("10.0.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(Cidr::parse("2001:db8::/129")
            .unwrap_err()
            .contains("0 to 128"));
        assert!(Cidr::parse("10.0.0/8")
            .unwrap_err()
            .contains("IPv4 or IPv6"));
    }
}
