//! The machine's LAN address for `--local`: read the interfaces with `getifaddrs(3)`, then pick
//! one with the pure rules of [`select`] (unit-tested over synthetic interface lists).
//!
//! Rules (issue 5; Clawket's scoring, minus its mistakes):
//! - only IPv4 addresses that are up and not loopback, link-local (169.254/16) or unspecified;
//! - interfaces of VPNs, tunnels, containers and VMs are skipped by name **prefix** (`utun`,
//!   `tun`, `tap`, `tailscale`, `wg`, `docker`, `veth`, `br-`, `vmnet`, `vboxnet`, `zt`, …).
//!   Prefixes, not substrings: Clawket's substring test skips `wlo1` (contains `lo`), a common
//!   Linux Wi-Fi name;
//! - private RFC 1918 addresses first, then carrier-grade NAT 100.64/10 (some ISPs' and
//!   routers' LANs) on an Ethernet/Wi-Fi interface only: 100.64/10 is also what Tailscale,
//!   NetBird and other overlay VPNs use, and a phone on the same Wi-Fi cannot reach an
//!   overlay address, so on any other interface name it is never guessed; anything else
//!   (public addresses) is never guessed either — `--host` picks it;
//! - within a class, Ethernet/Wi-Fi names (`en*`, `eth*`, `wlan*`, `wl*`, `wifi*`) first, then
//!   the order the system lists the interfaces in (stable, so repeated runs agree).
//!
//! No shelling out to `ipconfig`/`ip`, and no binding to 0.0.0.0: the server binds the address
//! chosen here only.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

/// One address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    /// The interface name, e.g. `en0`, `wlan0`, `utun3`.
    pub name: String,
    /// One of its addresses.
    pub addr: IpAddr,
    /// `IFF_UP` is set.
    pub up: bool,
    /// `IFF_LOOPBACK` is set.
    pub loopback: bool,
}

impl Iface {
    /// An up, non-loopback interface address (for tests and callers building lists).
    pub fn new(name: &str, addr: &str) -> Iface {
        Iface {
            name: name.to_owned(),
            addr: addr.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            up: true,
            loopback: false,
        }
    }
}

/// Name prefixes of interfaces that never carry the phone's LAN: VPNs and tunnels, container
/// and VM bridges, Apple's peer-to-peer links, point-to-point links.
const SKIPPED_PREFIXES: &[&str] = &[
    "lo",
    "utun",
    "tun",
    "tap",
    "tailscale",
    "wg",
    "docker",
    "veth",
    "br-",
    "bridge",
    "virbr",
    "vmnet",
    "vboxnet",
    "vnic",
    "zt",
    "awdl",
    "llw",
    "ppp",
    "ipsec",
    "gif",
    "stf",
    "anpi",
    "ap1",
    "cni",
    "flannel",
    "cali",
    "vxlan",
    "podman",
    "lxc",
    "lxd",
    "kube",
    "nordlynx",
    "proton",
    "mullvad",
];

/// Name prefixes of Ethernet and Wi-Fi interfaces, preferred within an address class.
const PREFERRED_PREFIXES: &[&str] = &["en", "eth", "wlan", "wl", "wifi"];

/// True when the interface's name says it is a VPN, tunnel, container or VM interface.
pub fn is_skipped_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    // `wlo1` is Wi-Fi: only a *leading* `lo` means loopback.
    SKIPPED_PREFIXES.iter().any(|p| lower.starts_with(p)) || lower.contains("vpn")
}

/// True for Ethernet/Wi-Fi names.
fn is_preferred_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    PREFERRED_PREFIXES.iter().any(|p| lower.starts_with(p))
}

/// RFC 1918: 10/8, 172.16/12, 192.168/16.
fn is_rfc1918(ip: Ipv4Addr) -> bool {
    ip.is_private()
}

/// Carrier-grade NAT, RFC 6598: 100.64.0.0/10.
fn is_cgnat(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    a == 100 && (64..128).contains(&b)
}

/// The rank of a usable candidate (lower is better); `None` when it is never chosen.
fn rank(iface: &Iface) -> Option<u8> {
    let IpAddr::V4(ip) = iface.addr else { return None };
    if !iface.up
        || iface.loopback
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || is_skipped_name(&iface.name)
    {
        return None;
    }
    let class = if is_rfc1918(ip) {
        0
    } else if is_cgnat(ip) && is_preferred_name(&iface.name) {
        2
    } else {
        return None;
    };
    Some(class + u8::from(!is_preferred_name(&iface.name)))
}

/// Picks the LAN address from `ifaces` (in the order the system lists them).
pub fn select(ifaces: &[Iface]) -> Option<IpAddr> {
    ifaces
        .iter()
        .enumerate()
        .filter_map(|(i, f)| rank(f).map(|r| (r, i, f.addr)))
        .min_by_key(|(r, i, _)| (*r, *i))
        .map(|(_, _, addr)| addr)
}

/// The interfaces' addresses, as `getifaddrs(3)` lists them (IPv4 and IPv6).
pub fn interfaces() -> io::Result<Vec<Iface>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`; we free it below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        // SAFETY: ifa_addr is non-null and points at a sockaddr whose family says its type.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let addr = match family {
            libc::AF_INET => {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        let flags = ifa.ifa_flags as libc::c_int;
        out.push(Iface {
            name,
            addr,
            up: flags & libc::IFF_UP != 0,
            loopback: flags & libc::IFF_LOOPBACK != 0,
        });
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once; no reference into the
    // list outlives this point (names and addresses were copied).
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Detects the LAN address; the error says what was seen and what to do.
pub fn detect() -> Result<IpAddr, String> {
    let ifaces = interfaces().map_err(|e| format!("cannot list the network interfaces: {e}"))?;
    select(&ifaces).ok_or_else(|| {
        let seen: Vec<String> = ifaces
            .iter()
            .filter(|f| f.addr.is_ipv4())
            .map(|f| format!("{} {}", f.name, f.addr))
            .collect();
        format!(
            "no usable LAN address found (need a private 10.x / 172.16-31.x / 192.168.x IPv4 \
             address on an interface that is not a VPN, tunnel, container or VM, or a 100.64/10 \
             one on an Ethernet/Wi-Fi interface; saw: {}).\n  Join the same Wi-Fi as your \
             phone, or pass --host <this machine's LAN IP>.",
            if seen.is_empty() { "none".to_owned() } else { seen.join(", ") }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(list: &[Iface]) -> Option<String> {
        select(list).map(|a| a.to_string())
    }

    #[test]
    fn skips_loopback_link_local_vpn_and_containers() {
        let list = [
            Iface { loopback: true, ..Iface::new("lo", "127.0.0.1") },
            Iface::new("docker0", "172.17.0.1"),
            Iface::new("br-1a2b3c", "172.18.0.1"),
            Iface::new("veth12ab", "172.17.0.5"),
            Iface::new("utun3", "10.8.0.2"),
            Iface::new("tun0", "10.9.0.2"),
            Iface::new("tap0", "10.10.0.2"),
            Iface::new("wg0", "10.11.0.2"),
            Iface::new("tailscale0", "100.101.102.103"),
            Iface::new("zt5u4y", "10.147.17.3"),
            Iface::new("vmnet8", "192.168.200.1"),
            Iface::new("vboxnet0", "192.168.56.1"),
            Iface::new("virbr0", "192.168.122.1"),
            Iface::new("en0", "169.254.10.20"),
            Iface::new("myvpn", "10.12.0.1"),
        ];
        assert_eq!(pick(&list), None);
        let mut with_lan = list.to_vec();
        with_lan.push(Iface::new("en0", "192.168.1.23"));
        assert_eq!(pick(&with_lan).as_deref(), Some("192.168.1.23"));
    }

    #[test]
    fn prefers_rfc1918_on_ethernet_and_wifi_names() {
        let list = [
            Iface::new("bond0", "10.0.0.5"),
            Iface::new("wlan0", "192.168.0.42"),
            Iface::new("eth0", "172.20.1.9"),
        ];
        // Both wlan0 and eth0 are preferred names: the system's order decides.
        assert_eq!(pick(&list).as_deref(), Some("192.168.0.42"));
        assert_eq!(pick(&list[..1]).as_deref(), Some("10.0.0.5"));
        // Linux names: enp3s0, wlp2s0, wlo1 (not loopback despite the "lo").
        assert_eq!(
            pick(&[Iface::new("bond0", "10.0.0.5"), Iface::new("wlo1", "10.1.2.3")]).as_deref(),
            Some("10.1.2.3")
        );
        assert_eq!(
            pick(&[Iface::new("x0", "10.0.0.5"), Iface::new("enp3s0", "10.1.2.4")]).as_deref(),
            Some("10.1.2.4")
        );
    }

    #[test]
    fn cgnat_only_after_rfc1918_and_public_never() {
        let list = [Iface::new("en0", "100.72.1.2"), Iface::new("bond0", "192.168.1.9")];
        assert_eq!(pick(&list).as_deref(), Some("192.168.1.9"));
        assert_eq!(pick(&list[..1]).as_deref(), Some("100.72.1.2"));
        // 100.64/10 elsewhere is an overlay VPN's (NetBird's wt0, a renamed WireGuard link),
        // which the phone cannot reach; RFC 1918 on such a name is still taken.
        assert_eq!(pick(&[Iface::new("wt0", "100.70.1.2")]), None);
        assert_eq!(pick(&[Iface::new("home", "100.101.102.103")]), None);
        assert_eq!(pick(&[Iface::new("bond0", "100.72.1.2")]), None);
        assert_eq!(pick(&[Iface::new("wlan0", "100.72.1.2")]).as_deref(), Some("100.72.1.2"));
        // 100.128/9 is outside 100.64/10: public.
        assert_eq!(pick(&[Iface::new("en0", "100.128.0.1")]), None);
        assert_eq!(pick(&[Iface::new("eth0", "203.0.113.7")]), None);
        // 172.32/12 is not RFC 1918.
        assert_eq!(pick(&[Iface::new("eth0", "172.32.0.1")]), None);
    }

    #[test]
    fn skips_down_interfaces_and_ipv6() {
        let list = [
            Iface { up: false, ..Iface::new("en0", "192.168.1.2") },
            Iface::new("en1", "fe80::1"),
            Iface::new("en1", "fd00::5"),
        ];
        assert_eq!(pick(&list), None);
    }

    #[test]
    fn name_rules() {
        for name in ["lo0", "utun0", "awdl0", "llw0", "bridge100", "ppp0", "Tailscale", "NordVPN"] {
            assert!(is_skipped_name(name), "{name}");
        }
        for name in ["en0", "eth0", "wlan0", "wlo1", "wlp2s0", "enp0s31f6", "bond0"] {
            assert!(!is_skipped_name(name), "{name}");
        }
    }

    #[test]
    fn real_interfaces_can_be_listed() {
        // Whatever the machine has, listing works and loopback is present and never chosen.
        let list = interfaces().unwrap();
        assert!(list.iter().any(|f| f.addr.is_loopback()), "{list:?}");
        if let Some(addr) = select(&list) {
            assert!(!addr.is_loopback());
        }
    }
}
