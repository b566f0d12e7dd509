//! Guarded address ranges (SPEC §5) and `allow_cidrs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The guarded range `ip` falls in, as CIDR text (for a rule `guarded:<range>`), or `None`.
///
/// IPv4: 0.0.0.0/8 (unspecified, "this network"), loopback, RFC 1918, CGNAT 100.64/10,
/// link-local 169.254/16, multicast 224/4, broadcast 255.255.255.255 and the rest of the
/// reserved 240/4. IPv6: `::`, `::1`, ULA fc00::/7, link-local fe80::/10, the deprecated
/// site-local fec0::/10, multicast ff00::/8, the local-use NAT64 prefix 64:ff9b:1::/48, and
/// every form that embeds an IPv4 address (IPv4-mapped, IPv4-translated, IPv4-compatible,
/// NAT64 64:ff9b::/96, 6to4, Teredo), which is judged by the IPv4 address inside: the range
/// returned is then the IPv4 one.
pub fn guarded_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => guarded_v4(v4),
        IpAddr::V6(v6) => guarded_v6(v6),
    }
}

fn guarded_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(match o {
        [0, ..] => "0.0.0.0/8",
        [127, ..] => "127.0.0.0/8",
        [10, ..] => "10.0.0.0/8",
        [172, b, ..] if (16..32).contains(&b) => "172.16.0.0/12",
        [192, 168, ..] => "192.168.0.0/16",
        [100, b, ..] if (64..128).contains(&b) => "100.64.0.0/10",
        [169, 254, ..] => "169.254.0.0/16",
        [224..=239, ..] => "224.0.0.0/4",
        [255, 255, 255, 255] => "255.255.255.255/32",
        [240..=255, ..] => "240.0.0.0/4",
        _ => return None,
    })
}

fn guarded_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("::/128");
    }
    if ip.is_loopback() {
        return Some("::1/128");
    }
    if let Some(v4) = embedded_ipv4(ip) {
        return guarded_v4(v4);
    }
    let s = ip.segments();
    Some(match s[0] {
        x if x & 0xfe00 == 0xfc00 => "fc00::/7",
        x if x & 0xffc0 == 0xfe80 => "fe80::/10",
        x if x & 0xffc0 == 0xfec0 => "fec0::/10",
        x if x & 0xff00 == 0xff00 => "ff00::/8",
        0x64 if s[1] == 0xff9b && s[2] == 1 => "64:ff9b:1::/48",
        _ => return None,
    })
}

/// The IPv4 address an IPv6 address carries, for the forms a host or a translator on the
/// path would turn into an IPv4 connection: IPv4-mapped `::ffff:0:0/96`, IPv4-translated
/// `::ffff:0:0:0/96`, IPv4-compatible `::/96` (other than `::` and `::1`), NAT64
/// `64:ff9b::/96`, 6to4 `2002::/16` (bits 16..48) and Teredo `2001::/32` (the client
/// address, last 32 bits inverted).
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let last32 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..4] == [0, 0, 0, 0] {
        return match (s[4], s[5]) {
            (0, 0xffff) | (0xffff, 0) => Some(last32),
            (0, 0) if !ip.is_unspecified() && !ip.is_loopback() => Some(last32),
            _ => None,
        };
    }
    match s[0] {
        0x64 if s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] => Some(last32),
        0x2002 => Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        )),
        0x2001 if s[1] == 0 => Some(Ipv4Addr::from(u32::from(last32) ^ 0xffff_ffff)),
        _ => None,
    }
}

/// The first net of `cidrs` that admits `ip`. An IPv4 net also admits the IPv4-mapped IPv6
/// form of its addresses, and an IPv4-mapped IPv6 net the plain IPv4 form.
pub fn allowing_cidr(cidrs: &[IpNet], ip: IpAddr) -> Option<&IpNet> {
    let alt = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
    };
    cidrs
        .iter()
        .find(|net| net.contains(&ip) || alt.is_some_and(|a| net.contains(&a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> Option<&'static str> {
        guarded_range(s.parse().unwrap())
    }

    #[test]
    fn ipv4_ranges() {
        for (ip, range) in [
            ("0.0.0.0", "0.0.0.0/8"),
            ("127.0.0.1", "127.0.0.0/8"),
            ("127.255.1.2", "127.0.0.0/8"),
            ("10.1.2.3", "10.0.0.0/8"),
            ("172.16.0.1", "172.16.0.0/12"),
            ("172.31.255.255", "172.16.0.0/12"),
            ("192.168.1.1", "192.168.0.0/16"),
            ("100.64.0.1", "100.64.0.0/10"),
            ("100.127.255.255", "100.64.0.0/10"),
            ("169.254.169.254", "169.254.0.0/16"),
            ("224.0.0.1", "224.0.0.0/4"),
            ("239.255.255.250", "224.0.0.0/4"),
            ("255.255.255.255", "255.255.255.255/32"),
            ("240.0.0.1", "240.0.0.0/4"),
        ] {
            assert_eq!(g(ip), Some(range), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.0.1",
            "172.32.0.1",
            "100.63.0.1",
            "100.128.0.1",
            "192.167.1.1",
            "169.253.1.1",
        ] {
            assert_eq!(g(ip), None, "{ip}");
        }
    }

    #[test]
    fn ipv6_native_ranges() {
        for (ip, range) in [
            ("::", "::/128"),
            ("::1", "::1/128"),
            ("fc00::1", "fc00::/7"),
            ("fd12:3456::1", "fc00::/7"),
            ("fe80::1", "fe80::/10"),
            ("febf::1", "fe80::/10"),
            ("fec0::1", "fec0::/10"),
            ("ff02::1", "ff00::/8"),
            ("64:ff9b:1::a00:1", "64:ff9b:1::/48"),
        ] {
            assert_eq!(g(ip), Some(range), "{ip}");
        }
        for ip in ["2606:4700::1111", "2a00:1450:4001::200e", "fb00::1"] {
            assert_eq!(g(ip), None, "{ip}");
        }
    }

    #[test]
    fn embedded_ipv4_forms() {
        // IPv4-mapped
        assert_eq!(g("::ffff:127.0.0.1"), Some("127.0.0.0/8"));
        assert_eq!(g("::ffff:169.254.169.254"), Some("169.254.0.0/16"));
        assert_eq!(g("::ffff:8.8.8.8"), None);
        // IPv4-translated (SIIT)
        assert_eq!(g("::ffff:0:10.0.0.1"), Some("10.0.0.0/8"));
        assert_eq!(g("::ffff:0:8.8.8.8"), None);
        // IPv4-compatible
        assert_eq!(g("::127.0.0.1"), Some("127.0.0.0/8"));
        assert_eq!(g("::192.168.0.1"), Some("192.168.0.0/16"));
        assert_eq!(g("::8.8.8.8"), None);
        // NAT64
        assert_eq!(g("64:ff9b::7f00:1"), Some("127.0.0.0/8"));
        assert_eq!(g("64:ff9b::a9fe:a9fe"), Some("169.254.0.0/16"));
        assert_eq!(g("64:ff9b::808:808"), None);
        // 6to4: IPv4 in bits 16..48
        assert_eq!(g("2002:7f00:1::1"), Some("127.0.0.0/8"));
        assert_eq!(g("2002:c0a8:101::"), Some("192.168.0.0/16"));
        assert_eq!(g("2002:808:808::1"), None);
        // Teredo: client = last 32 bits inverted; 0x80ffff fe = !127.0.0.1
        assert_eq!(
            g("2001:0:4136:e378:8000:63bf:80ff:fffe"),
            Some("127.0.0.0/8")
        );
        assert_eq!(
            g("2001:0:4136:e378:8000:63bf:f5ff:fffe"),
            Some("10.0.0.0/8")
        );
        assert_eq!(g("2001:0:4136:e378:8000:63bf:f7f7:f7f7"), None); // 8.8.8.8
                                                                     // 2001:db8 (documentation) is not Teredo
        assert_eq!(embedded_ipv4("2001:db8::1".parse().unwrap()), None);
    }

    #[test]
    fn allow_cidrs_admit_mapped_forms() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert!(allowing_cidr(&nets, "10.1.1.1".parse().unwrap()).is_some());
        assert!(allowing_cidr(&nets, "::ffff:10.1.1.1".parse().unwrap()).is_some());
        assert!(allowing_cidr(&nets, "fd00::1".parse().unwrap()).is_some());
        assert!(allowing_cidr(&nets, "11.1.1.1".parse().unwrap()).is_none());
        let mapped: Vec<IpNet> = vec!["::ffff:192.168.0.0/112".parse().unwrap()];
        assert!(allowing_cidr(&mapped, "192.168.3.4".parse().unwrap()).is_some());
    }
}
