//! Checked value types for configuration fields: each parses from the string an operator writes
//! and names the offending value when it cannot.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::secret::SecretText;

/// A listen address. `:PORT` means every interface, as in Go's `net.Listen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "`{s}` is not a listen address; expected [IP]:PORT such as :8000 or 127.0.0.1:8000"
            )
        };
        if let Some(port) = s.strip_prefix(':') {
            let port: u16 = port.parse().map_err(|_| bad())?;
            return Ok(Self(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                port,
            )));
        }
        s.parse::<SocketAddr>().map(Self).map_err(|_| bad())
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.ip().is_unspecified() && self.0.is_ipv4() {
            write!(f, ":{}", self.0.port())
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// A `host:port` to dial; the host may be a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not an address; expected HOST:PORT such as 10.0.1.5:50051");
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Self {
                host: addr.ip().to_string(),
                port: addr.port(),
            });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse::<u16>().map_err(|_| bad())?;
        let valid_host = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        if !valid_host || port == 0 {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// An `http://` or `https://` base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(pub url::Url);

impl FromStr for HttpUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let url = url::Url::parse(s).map_err(|e| format!("`{s}` is not a URL: {e}"))?;
        match url.scheme() {
            "http" | "https" if url.host().is_some() => Ok(Self(url)),
            _ => Err(format!(
                "`{s}` is not an http:// or https:// URL with a host"
            )),
        }
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str().trim_end_matches('/'))
    }
}

/// Where the template store lives: `file:///absolute/dir` or `s3://bucket[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Dir(std::path::PathBuf),
    S3 { bucket: String, prefix: String },
}

impl FromStr for StoreUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let url = url::Url::parse(s).map_err(|e| format!("`{s}` is not a URL: {e}"))?;
        match url.scheme() {
            "file" if url.host().is_none() => {
                let dir = url
                    .to_file_path()
                    .map_err(|()| format!("`{s}` does not name an absolute directory"))?;
                Ok(Self::Dir(dir))
            }
            "s3" => {
                let bucket = url
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| format!("`{s}` names no bucket (s3://bucket/prefix)"))?;
                Ok(Self::S3 {
                    bucket: bucket.to_owned(),
                    prefix: url.path().trim_matches('/').to_owned(),
                })
            }
            _ => Err(format!(
                "`{s}` is neither file:///directory nor s3://bucket/prefix"
            )),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dir(dir) => write!(f, "file://{}", dir.display()),
            Self::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Self::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// A PostgreSQL connection URL; its password is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(pub String);

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let url =
            url::Url::parse(s).map_err(|e| format!("`{}` is not a URL: {e}", redact_url(s)))?;
        match url.scheme() {
            "postgres" | "postgresql" => Ok(Self(s.to_owned())),
            other => Err(format!(
                "scheme `{other}` is not postgres:// or postgresql://"
            )),
        }
    }
}

impl DatabaseUrl {
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

fn redact_url(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("REDACTED"));
            url.to_string()
        }
        Ok(_) => s.to_owned(),
        Err(_) => "<unparseable URL>".to_owned(),
    }
}

/// Comma-separated secrets; never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretList(pub Vec<SecretText>);

impl FromStr for SecretList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(SecretText::new)
                .collect(),
        ))
    }
}

impl fmt::Debug for SecretList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} redacted>", self.0.len())
    }
}

/// An IPv4 network in CIDR form, e.g. `10.11.0.0/16`; host bits must be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Cidr {
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<Self, String> {
        if prefix_len > 32 {
            return Err(format!(
                "`{network}/{prefix_len}`: prefix length is longer than 32"
            ));
        }
        let cidr = Self {
            network,
            prefix_len,
        };
        if u32::from(network) & !cidr.mask() != 0 {
            return Err(format!(
                "`{network}/{prefix_len}` has host bits set; the network is {}/{prefix_len}",
                Ipv4Addr::from(u32::from(network) & cidr.mask())
            ));
        }
        Ok(cidr)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }

    /// How many addresses the network spans (2^32 for `/0`).
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix_len))
    }

    /// The `index`-th address of the network, or `None` past its end.
    pub fn nth(&self, index: u64) -> Option<Ipv4Addr> {
        (index < self.size()).then(|| Ipv4Addr::from(u32::from(self.network) + index as u32))
    }

    /// The position of `addr` inside the network, or `None` when it lies outside.
    pub fn index_of(&self, addr: Ipv4Addr) -> Option<u64> {
        let offset = u32::from(addr).wrapping_sub(u32::from(self.network));
        (u64::from(offset) < self.size()).then_some(u64::from(offset))
    }

    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        let shorter = self.prefix_len.min(other.prefix_len);
        let mask = u32::MAX.checked_shl(32 - u32::from(shorter)).unwrap_or(0);
        u32::from(self.network) & mask == u32::from(other.network) & mask
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("`{s}` is not an IPv4 network; expected ADDRESS/PREFIX such as 10.11.0.0/16")
        };
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        Self::new(addr, len)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// A comma-separated list of IPv4 networks; may be empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ipv4CidrList(pub Vec<Ipv4Cidr>);

impl FromStr for Ipv4CidrList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }
}

impl fmt::Display for Ipv4CidrList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.0.iter().map(Ipv4Cidr::to_string).collect();
        f.write_str(&items.join(","))
    }
}

/// A comma-separated list of DNS servers, `ADDRESS` (port 53) or `ADDRESS:PORT` (IPv6 as
/// `[ADDRESS]:PORT`); may be empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DnsServerList(pub Vec<std::net::SocketAddr>);

impl FromStr for DnsServerList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                item.parse::<std::net::SocketAddr>()
                    .or_else(|_| item.parse::<IpAddr>().map(|ip| (ip, 53).into()))
                    .map_err(|_| format!("`{item}` is not an address or address:port"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }
}

impl fmt::Display for DnsServerList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&items.join(","))
    }
}

/// An IPv4 or IPv6 network, `ADDRESS/PREFIX`; a bare address stands for itself alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpCidr {
    network: IpAddr,
    prefix_len: u8,
}

impl IpCidr {
    fn bits(addr: IpAddr) -> (u128, u8) {
        match addr {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        }
    }

    fn mask(prefix_len: u8) -> u128 {
        u128::MAX
            .checked_shl(128 - u32::from(prefix_len))
            .unwrap_or(0)
    }

    /// Whether `addr` lies in the network; an IPv4 address is never inside an IPv6 network
    /// (callers pass canonical addresses, IPv4-mapped IPv6 turned into IPv4).
    pub fn contains(&self, addr: IpAddr) -> bool {
        if self.network.is_ipv4() != addr.is_ipv4() {
            return false;
        }
        let mask = Self::mask(self.prefix_len);
        Self::bits(addr).0 & mask == Self::bits(self.network).0 & mask
    }
}

impl FromStr for IpCidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "`{s}` is not an IP network; expected ADDRESS/PREFIX such as 10.0.0.0/8 or \
                 fd00::/8, or a single address"
            )
        };
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| bad())?;
        let (bits, width) = Self::bits(network);
        let prefix_len = match len {
            Some(len) => len.parse::<u8>().map_err(|_| bad())?,
            None => width,
        };
        if prefix_len > width {
            return Err(format!("`{s}`: prefix length is longer than {width}"));
        }
        // Prefix lengths count from the top of the address; an IPv4 one sits in the top 32 bits.
        if bits & !Self::mask(prefix_len) != 0 {
            return Err(format!(
                "`{s}` has host bits set; write the network address with /{prefix_len}"
            ));
        }
        Ok(Self {
            network,
            prefix_len,
        })
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// A comma-separated list of IPv4 and IPv6 networks; may be empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpCidrList(pub Vec<IpCidr>);

impl IpCidrList {
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(addr))
    }
}

impl FromStr for IpCidrList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }
}

impl fmt::Display for IpCidrList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.0.iter().map(IpCidr::to_string).collect();
        f.write_str(&items.join(","))
    }
}

/// A network interface name as the kernel accepts it: 1 to 15 bytes, no `/`, `:` or whitespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InterfaceName(String);

impl InterfaceName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for InterfaceName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = (1..=15).contains(&s.len())
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_graphic() && c != '/' && c != ':' && c != '"');
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!("`{s}` is not a network interface name (1-15 printable characters, no `/`, `:` or quotes)"))
        }
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "`{other}` is not a log format; expected `text` or `json`"
            )),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// Whether `POST /v1/auth/signup` creates accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignupMode {
    Open,
    Closed,
}

impl FromStr for SignupMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(Self::Open),
            "closed" => Ok(Self::Closed),
            other => Err(format!(
                "`{other}` is not a signup mode; expected `open` or `closed`"
            )),
        }
    }
}

impl fmt::Display for SignupMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Open => "open",
            Self::Closed => "closed",
        })
    }
}

/// Which VMM the host agent runs sandboxes under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmmKind {
    Firecracker,
    Qemu,
}

impl FromStr for VmmKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "firecracker" => Ok(Self::Firecracker),
            "qemu" => Ok(Self::Qemu),
            other => Err(format!(
                "`{other}` is not a VMM; expected `firecracker` or `qemu`"
            )),
        }
    }
}

impl fmt::Display for VmmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Firecracker => "firecracker",
            Self::Qemu => "qemu",
        })
    }
}

/// QEMU's accelerator: `auto` probes KVM once and falls back to TCG when KVM cannot run a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QemuAccel {
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for QemuAccel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(format!(
                "`{other}` is not a QEMU accelerator; expected `auto`, `kvm` or `tcg`"
            )),
        }
    }
}

impl fmt::Display for QemuAccel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// The most bytes one sandbox's guest console may take on the host, the current log and the
/// older one it rotated to together. The guest decides what it writes, so this is what stands
/// between a chatty (or hostile) guest and a full host disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct ConsoleLogMaxBytes(u64);

impl ConsoleLogMaxBytes {
    /// Half of it is the most recent output always kept: enough for the lines that explain a
    /// failed boot.
    pub const MIN: u64 = 8192;

    pub fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for ConsoleLogMaxBytes {
    type Error = String;

    fn try_from(bytes: u64) -> Result<Self, Self::Error> {
        if bytes >= Self::MIN {
            Ok(Self(bytes))
        } else {
            Err(format!(
                "{bytes} bytes is below the {} byte minimum for the guest console log",
                Self::MIN
            ))
        }
    }
}

impl From<ConsoleLogMaxBytes> for u64 {
    fn from(cap: ConsoleLogMaxBytes) -> u64 {
        cap.0
    }
}

impl FromStr for ConsoleLogMaxBytes {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes: u64 = s
            .parse()
            .map_err(|_| format!("`{s}` is not a number of bytes"))?;
        bytes.try_into()
    }
}

impl fmt::Display for ConsoleLogMaxBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Serde glue: every type above travels as its string form.
macro_rules! string_serde {
    ($($ty:ty => $to_string:expr),* $(,)?) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let to_string: fn(&$ty) -> String = $to_string;
                s.serialize_str(&to_string(self))
            }
        }
    )*};
}

string_serde! {
    ListenAddr => |v| v.to_string(),
    HostPort => |v| v.to_string(),
    HttpUrl => |v| v.to_string(),
    StoreUrl => |v| v.to_string(),
    DatabaseUrl => |v| v.0.clone(),
    SecretList => |v| v.0.iter().map(SecretText::expose).collect::<Vec<_>>().join(","),
    LogFormat => |v| v.to_string(),
    SignupMode => |v| v.to_string(),
    Ipv4Cidr => |v| v.to_string(),
    Ipv4CidrList => |v| v.to_string(),
    DnsServerList => |v| v.to_string(),
    IpCidrList => |v| v.to_string(),
    InterfaceName => |v| v.to_string(),
    VmmKind => |v| v.to_string(),
    QemuAccel => |v| v.to_string(),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addr_forms() {
        assert_eq!(
            ":8000".parse::<ListenAddr>().unwrap().0,
            "0.0.0.0:8000".parse().unwrap()
        );
        assert_eq!(
            "127.0.0.1:1".parse::<ListenAddr>().unwrap().to_string(),
            "127.0.0.1:1"
        );
        assert_eq!(
            "[::1]:9".parse::<ListenAddr>().unwrap().0,
            "[::1]:9".parse().unwrap()
        );
        assert_eq!(":8000".parse::<ListenAddr>().unwrap().to_string(), ":8000");
        for bad in ["8000", ":", ":99999", "localhost:80", "1.2.3.4"] {
            let err = bad.parse::<ListenAddr>().unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn host_port_forms() {
        let hp: HostPort = "cp.internal:50051".parse().unwrap();
        assert_eq!((hp.host.as_str(), hp.port), ("cp.internal", 50051));
        assert_eq!(
            "[::1]:5".parse::<HostPort>().unwrap().to_string(),
            "[::1]:5"
        );
        for bad in ["nohost", ":80", "a b:80", "host:0", "host:x"] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad}");
        }
    }

    #[test]
    fn urls() {
        assert!("http://cp:8000".parse::<HttpUrl>().is_ok());
        assert!("ftp://cp".parse::<HttpUrl>().is_err());
        assert!("cp:8000".parse::<HttpUrl>().is_err());
        assert_eq!(
            "file:///srv/store".parse::<StoreUrl>(),
            Ok(StoreUrl::Dir("/srv/store".into()))
        );
        assert_eq!(
            "s3://templates/wrenn/prod/".parse::<StoreUrl>(),
            Ok(StoreUrl::S3 {
                bucket: "templates".into(),
                prefix: "wrenn/prod".into()
            })
        );
        assert_eq!(
            "s3://templates".parse::<StoreUrl>().unwrap().to_string(),
            "s3://templates"
        );
        assert!("file://host/srv".parse::<StoreUrl>().is_err());
        assert!("s3:///prefix".parse::<StoreUrl>().is_err());
        assert!("/srv/store".parse::<StoreUrl>().is_err());
        let db: DatabaseUrl = "postgres://u:hunter2@h/db".parse().unwrap();
        assert!(!format!("{db:?}").contains("hunter2"));
        assert!("mysql://h/db".parse::<DatabaseUrl>().is_err());
    }

    #[test]
    fn ipv4_cidr_forms_and_arithmetic() {
        let net: Ipv4Cidr = "10.12.0.0/16".parse().unwrap();
        assert_eq!(net.to_string(), "10.12.0.0/16");
        assert_eq!(net.size(), 65536);
        assert_eq!(net.nth(65535), Some(Ipv4Addr::new(10, 12, 255, 255)));
        assert_eq!(net.nth(65536), None);
        assert_eq!(net.index_of(Ipv4Addr::new(10, 12, 1, 2)), Some(258));
        assert_eq!(net.index_of(Ipv4Addr::new(10, 13, 0, 0)), None);
        assert_eq!(net.index_of(Ipv4Addr::new(10, 11, 255, 255)), None);
        assert_eq!("0.0.0.0/0".parse::<Ipv4Cidr>().unwrap().size(), 1 << 32);
        assert!(net.overlaps(&"10.0.0.0/8".parse().unwrap()));
        assert!(!net.overlaps(&"10.11.0.0/16".parse().unwrap()));
        for bad in [
            "10.12.0.1/16",
            "10.12.0.0",
            "10.12.0.0/33",
            "ten/8",
            "10.12.0.0/x",
        ] {
            let err = bad.parse::<Ipv4Cidr>().unwrap_err();
            assert!(err.contains(bad.split('/').next().unwrap()), "{err}");
        }
        let list: Ipv4CidrList = " 10.0.0.0/8, 192.168.0.0/16 ,".parse().unwrap();
        assert_eq!(list.to_string(), "10.0.0.0/8,192.168.0.0/16");
        assert_eq!("".parse::<Ipv4CidrList>().unwrap().0, vec![]);
        assert!("10.0.0.0/8,nope".parse::<Ipv4CidrList>().is_err());
        let servers: DnsServerList = "192.0.2.1, 192.0.2.2:5353,[2001:db8::1]:53"
            .parse()
            .unwrap();
        assert_eq!(
            servers.to_string(),
            "192.0.2.1:53,192.0.2.2:5353,[2001:db8::1]:53"
        );
        assert!("nope".parse::<DnsServerList>().is_err());
    }

    #[test]
    fn ip_networks_of_both_families() {
        let v4: IpCidr = "10.0.0.0/8".parse().unwrap();
        assert!(v4.contains("10.200.1.2".parse().unwrap()));
        assert!(!v4.contains("11.0.0.1".parse().unwrap()));
        assert!(
            !v4.contains("::a00:1".parse().unwrap()),
            "families never mix"
        );
        let one: IpCidr = "192.0.2.7".parse().unwrap();
        assert_eq!(one.to_string(), "192.0.2.7/32");
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let v6: IpCidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert_eq!("::1".parse::<IpCidr>().unwrap().to_string(), "::1/128");
        let all: IpCidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "::1/129",
            "2001:db8::1/32",
            "proxy",
            "1.2.3.4/x",
        ] {
            let err = bad.parse::<IpCidr>().unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
        let list: IpCidrList = "127.0.0.1, fd00::/8,".parse().unwrap();
        assert_eq!(list.to_string(), "127.0.0.1/32,fd00::/8");
        assert!(list.contains("fd12::1".parse().unwrap()));
        assert!(!list.contains("127.0.0.2".parse().unwrap()));
        assert!("".parse::<IpCidrList>().unwrap().0.is_empty());
    }

    #[test]
    fn console_log_caps_below_the_minimum_are_refused() {
        let cap: ConsoleLogMaxBytes = "1048576".parse().unwrap();
        assert_eq!(cap.get(), 1 << 20);
        assert_eq!(cap.to_string(), "1048576");
        assert!(ConsoleLogMaxBytes::try_from(ConsoleLogMaxBytes::MIN).is_ok());
        let err = ConsoleLogMaxBytes::try_from(100).unwrap_err();
        assert!(err.contains("100") && err.contains("8192"), "{err}");
        assert!("1MiB"
            .parse::<ConsoleLogMaxBytes>()
            .unwrap_err()
            .contains("1MiB"));
    }

    #[test]
    fn interface_names() {
        assert!("eth0".parse::<InterfaceName>().is_ok());
        assert!("enp0s31f6.100".parse::<InterfaceName>().is_ok());
        for bad in ["", "a/b", "sixteen-chars-xx", "a b", "a:1"] {
            assert!(bad.parse::<InterfaceName>().is_err(), "{bad}");
        }
    }
}
