//! Checked value types for configuration fields: each parses from the string an operator writes
//! and names the offending value when it cannot.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A listen address. `:PORT` means every interface, as in Go's `net.Listen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a listen address; expected [IP]:PORT such as :8000 or 127.0.0.1:8000");
        if let Some(port) = s.strip_prefix(':') {
            let port: u16 = port.parse().map_err(|_| bad())?;
            return Ok(Self(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)));
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
            return Ok(Self { host: addr.ip().to_string(), port: addr.port() });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse::<u16>().map_err(|_| bad())?;
        let valid_host = !host.is_empty()
            && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        if !valid_host || port == 0 {
            return Err(bad());
        }
        Ok(Self { host: host.to_owned(), port })
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
            _ => Err(format!("`{s}` is not an http:// or https:// URL with a host")),
        }
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str().trim_end_matches('/'))
    }
}

/// A PostgreSQL connection URL; its password is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(pub String);

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let url = url::Url::parse(s).map_err(|e| format!("`{}` is not a URL: {e}", redact_url(s)))?;
        match url.scheme() {
            "postgres" | "postgresql" => Ok(Self(s.to_owned())),
            other => Err(format!("scheme `{other}` is not postgres:// or postgresql://")),
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

/// A secret string (signing keys); `Debug` and `config show` never reveal it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl FromStr for Secret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
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
            other => Err(format!("`{other}` is not a log format; expected `text` or `json`")),
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
    DatabaseUrl => |v| v.0.clone(),
    Secret => |v| v.0.clone(),
    LogFormat => |v| v.to_string(),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addr_forms() {
        assert_eq!(":8000".parse::<ListenAddr>().unwrap().0, "0.0.0.0:8000".parse().unwrap());
        assert_eq!("127.0.0.1:1".parse::<ListenAddr>().unwrap().to_string(), "127.0.0.1:1");
        assert_eq!("[::1]:9".parse::<ListenAddr>().unwrap().0, "[::1]:9".parse().unwrap());
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
        assert_eq!("[::1]:5".parse::<HostPort>().unwrap().to_string(), "[::1]:5");
        for bad in ["nohost", ":80", "a b:80", "host:0", "host:x"] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad}");
        }
    }

    #[test]
    fn urls() {
        assert!("http://cp:8000".parse::<HttpUrl>().is_ok());
        assert!("ftp://cp".parse::<HttpUrl>().is_err());
        assert!("cp:8000".parse::<HttpUrl>().is_err());
        let db: DatabaseUrl = "postgres://u:hunter2@h/db".parse().unwrap();
        assert!(!format!("{db:?}").contains("hunter2"));
        assert!("mysql://h/db".parse::<DatabaseUrl>().is_err());
    }
}
