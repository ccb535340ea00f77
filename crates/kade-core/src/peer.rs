//! DIMSE peers: who may connect, from where, and what they may do.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;

use crate::AeTitle;

/// A DIMSE service a peer may be allowed to use.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// C-ECHO (verification).
    Echo,
    /// C-STORE into Kade.
    Store,
    /// C-FIND queries.
    Find,
    /// C-MOVE retrieval (the peer asks Kade to send somewhere).
    Move,
    /// C-GET retrieval on the same association.
    Get,
    /// Storage commitment (N-ACTION).
    Commit,
}

impl Permission {
    /// Every permission, in a fixed order.
    pub const ALL: [Permission; 6] = [
        Permission::Echo,
        Permission::Store,
        Permission::Find,
        Permission::Move,
        Permission::Get,
        Permission::Commit,
    ];

    /// The lowercase name used in configuration and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Echo => "echo",
            Permission::Store => "store",
            Permission::Find => "find",
            Permission::Move => "move",
            Permission::Get => "get",
            Permission::Commit => "commit",
        }
    }
}

impl FromStr for Permission {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Permission::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!("unknown permission {s:?}: use echo, store, find, move, get or commit")
            })
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a comma-separated permission list such as `echo,store`.
///
/// # Errors
/// Names the first unknown permission.
pub fn parse_permissions(s: &str) -> Result<Vec<Permission>, String> {
    let mut v: Vec<Permission> = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    v.sort();
    v.dedup();
    Ok(v)
}

/// Formats permissions as a comma-separated list.
pub fn format_permissions(p: &[Permission]) -> String {
    p.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(",")
}

/// A known DIMSE peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Peer {
    /// The peer's AE title (its calling AE title when it connects to Kade).
    pub ae_title: AeTitle,
    /// The address or network the peer connects from (`10.0.0.5` or `10.0.0.0/24`).
    #[serde(with = "host_serde")]
    pub host: IpNet,
    /// The port the peer listens on, for C-MOVE destinations.
    #[serde(default)]
    pub port: Option<u16>,
    /// What the peer may do.
    pub allow: Vec<Permission>,
    /// Most matches one C-FIND returns to this peer (default: Kade's global cap of 1,000).
    #[serde(default)]
    pub max_matches: Option<u32>,
    /// Only queries that name a patient, a study or a date range are answered (a
    /// `PatientName=*` sweep is refused and audited). Meant for peers outside the department.
    #[serde(default)]
    pub narrow_queries: bool,
    /// SHA-256 fingerprint of the TLS client certificate this AE title must present
    /// (hex, colons optional). Set: the peer may associate only over DICOM TLS with that
    /// certificate; anything else is rejected like an unknown peer.
    #[serde(default)]
    pub tls_cert_sha256: Option<String>,
    /// Connect to this peer over DICOM TLS when it is a C-MOVE destination (its certificate
    /// must verify against `dicom.tls.peer_ca`; Kade presents its own DICOM TLS certificate).
    #[serde(default)]
    pub tls: bool,
}

impl Peer {
    /// Whether a connection presenting a client certificate with this SHA-256 fingerprint
    /// (lower-case hex, no colons; None without TLS or certificate) may speak for this peer.
    pub fn accepts_certificate(&self, fingerprint: Option<&str>) -> bool {
        match &self.tls_cert_sha256 {
            None => true,
            Some(bound) => fingerprint.is_some_and(|f| normalize_fingerprint(bound) == f),
        }
    }

    /// Whether a connection from `addr` matches this peer's host or network.
    pub fn matches_address(&self, addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
            v4 => v4,
        };
        self.host.contains(&addr)
    }

    /// Whether the peer may use `p`.
    pub fn may(&self, p: Permission) -> bool {
        self.allow.contains(&p)
    }
}

/// A certificate fingerprint as lower-case hex without separators.
pub fn normalize_fingerprint(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Parses `ADDR` or `ADDR/PREFIX` (a bare address is a /32 or /128 network).
///
/// # Errors
/// Says what was expected.
pub fn parse_host(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n);
    }
    if s == "localhost" {
        return Ok(IpNet::from(IpAddr::from([127, 0, 0, 1])));
    }
    s.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
        format!("{s:?} is not an IP address or CIDR network (e.g. 10.0.0.5 or 10.0.0.0/24)")
    })
}

mod host_serde {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(n: &IpNet, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&n.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_host(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_round_trip() {
        let p = parse_permissions("store, echo,store").unwrap();
        assert_eq!(p, vec![Permission::Echo, Permission::Store]);
        assert_eq!(format_permissions(&p), "echo,store");
        assert!(
            parse_permissions("echo,delete")
                .unwrap_err()
                .contains("delete")
        );
    }

    #[test]
    fn host_matching() {
        let peer = Peer {
            ae_title: AeTitle::new("CT1").unwrap(),
            host: parse_host("10.1.0.0/16").unwrap(),
            port: None,
            allow: vec![Permission::Store],
            max_matches: None,
            narrow_queries: false,
            tls_cert_sha256: None,
            tls: false,
        };
        assert!(peer.matches_address("10.1.2.3".parse().unwrap()));
        assert!(!peer.matches_address("10.2.0.1".parse().unwrap()));
        assert!(peer.matches_address("::ffff:10.1.0.9".parse().unwrap()));
        assert_eq!(parse_host("127.0.0.1").unwrap().to_string(), "127.0.0.1/32");
        assert!(parse_host("ct.example").is_err());
    }
}
