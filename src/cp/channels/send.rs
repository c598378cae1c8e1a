//! One notification to one channel, in its provider's protocol. Blocking (ureq): callers run
//! it on the blocking pool.
//!
//! Webhooks get the event as JSON, signed: `X-Wrenn-Signature: sha256=<hex>` is the HMAC-SHA256
//! of `<X-Wrenn-Timestamp>.<body>` under the channel's secret, and `X-Wrenn-Delivery` stays the
//! same across retries so receivers can drop duplicates. Chat providers get one line of text.

use std::io;
use std::net::{IpAddr, ToSocketAddrs};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

use super::{ChannelConfig, Provider};
use crate::db::channels::Due;
use crate::id::{public_resource_id, TeamId};

const TELEGRAM_API: &str = "https://api.telegram.org";
/// How much of a refusing receiver's answer is kept in the delivery log.
const ERROR_BODY_BYTES: u64 = 512;

/// One notification, as every provider gets it.
#[derive(Debug, Clone)]
pub struct Notification {
    /// Stable across retries.
    pub delivery_id: String,
    pub event_type: String,
    /// What a webhook receives.
    pub body: Value,
    /// What a chat receives.
    pub text: String,
}

impl Notification {
    pub fn of_event(due: &Due) -> Self {
        let resource_id = public_resource_id(&due.resource_type, &due.resource_id);
        let actor = due
            .actor_name
            .as_deref()
            .or(due.actor_id.as_deref())
            .map(|who| format!(" by {who}"))
            .unwrap_or_default();
        let text = format!(
            "[Wrenn] {}: {} {resource_id}{actor}",
            due.event_type, due.resource_type
        );
        let body = json!({
            "id": due.id.to_string(),
            "type": due.event_type,
            "created_at": due.occurred_at,
            "team_id": TeamId(due.team_id).to_string(),
            "data": {
                "resource": {"type": due.resource_type, "id": resource_id},
                "actor": {"type": due.actor_type, "id": due.actor_id, "name": due.actor_name},
                "metadata": due.metadata,
                "error": due.error,
            },
        });
        Self {
            delivery_id: due.id.to_string(),
            event_type: due.event_type.clone(),
            body,
            text,
        }
    }

    /// What `POST /v1/channels/test` sends.
    pub fn test(team: TeamId, now: DateTime<Utc>) -> Self {
        let delivery_id = format!("test-{}", uuid::Uuid::new_v4());
        Self {
            body: json!({
                "id": delivery_id,
                "type": "test",
                "created_at": now,
                "team_id": team.to_string(),
                "data": {"message": "a test notification from Wrenn"},
            }),
            delivery_id,
            event_type: "test".into(),
            text: "[Wrenn] test: this channel receives Wrenn's notifications".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    pub message: String,
}

/// The HMAC-SHA256 signature header value of `body` sent at `timestamp`.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether `ip` is one a notification must not reach unless the operator allows it: this
/// machine, private and shared networks, link-local ones (cloud metadata services among them),
/// multicast and the unspecified address.
fn internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                // 100.64.0.0/10, carrier-grade NAT.
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal(IpAddr::V4(v4));
            }
            let segments = v6.segments();
            let embedded = |high: u16, low: u16| {
                let [a, b] = high.to_be_bytes();
                let [c, d] = low.to_be_bytes();
                internal(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)))
            };
            // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach the IPv4 address they carry; a
            // local-use NAT64 prefix (64:ff9b:1::/48) is a private network's own.
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return embedded(segments[6], segments[7]);
            }
            if segments[..3] == [0x64, 0xff9b, 1] {
                return true;
            }
            if segments[0] == 0x2002 {
                return embedded(segments[1], segments[2]);
            }
            let first = segments[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // fc00::/7 unique local, fe80::/10 link-local.
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// Why `host` may not be sent to, if one of its `addresses` is internal.
fn internal_target(host: &str, addresses: impl IntoIterator<Item = IpAddr>) -> Option<String> {
    let ip = addresses.into_iter().find(|ip| internal(*ip))?;
    Some(format!(
        "`{host}` is an internal address ({ip}); notifications go to public addresses unless \
         cp.channel_allow_private_targets is set"
    ))
}

/// Refuses a URL whose host is, or resolves to, an internal address, before anything is sent.
fn check_target(url: &str) -> Result<(), SendError> {
    let refused = |message: String| SendError {
        status: None,
        message,
    };
    let parsed = url::Url::parse(url).map_err(|e| refused(format!("not a URL: {e}")))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| refused("the URL has no host".into()))?;
    let port = parsed.port_or_known_default().unwrap_or(443);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => (host, port)
            .to_socket_addrs()
            .map_err(|e| refused(format!("cannot resolve `{host}`: {e}")))?
            .map(|a| a.ip())
            .collect(),
    };
    match internal_target(host, addresses) {
        Some(message) => Err(refused(message)),
        None => Ok(()),
    }
}

/// The resolver the connection itself uses, refusing internal addresses again: a name that
/// answers differently the second time it is asked (DNS rebinding) still cannot reach one.
/// The operator's own proxy is exempt; through a proxy, the receiver's name is resolved there,
/// so [`check_target`] is the only check.
#[derive(Debug, Default)]
struct PublicOnly(DefaultResolver);

impl Resolver for PublicOnly {
    fn resolve(
        &self,
        uri: &Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let resolved = self.0.resolve(uri, config, timeout)?;
        let host = uri.host().unwrap_or_default();
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        let is_proxy = config
            .proxy()
            .is_some_and(|proxy| proxy.host() == host && Some(proxy.port()) == port);
        if is_proxy {
            return Ok(resolved);
        }
        match internal_target(host, resolved.iter().map(|a| a.ip())) {
            Some(message) => Err(ureq::Error::Io(io::Error::new(
                io::ErrorKind::PermissionDenied,
                message,
            ))),
            None => Ok(resolved),
        }
    }
}

/// An HTTP client for notifications: no redirects (a receiver is where it was configured to
/// be), every attempt bounded by `timeout`, and internal addresses refused unless allowed.
#[derive(Debug, Clone)]
pub struct Sender {
    http: ureq::Agent,
    allow_private: bool,
}

impl Sender {
    pub fn new(timeout: Duration, allow_private: bool) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(timeout))
            .user_agent(concat!("wrenn-notifications/", env!("CARGO_PKG_VERSION")))
            .build();
        let http = if allow_private {
            config.into()
        } else {
            ureq::Agent::with_parts(config, DefaultConnector::default(), PublicOnly::default())
        };
        Self {
            http,
            allow_private,
        }
    }

    /// Sends `notification`; `Ok` carries the receiver's 2xx status.
    pub fn send(
        &self,
        config: &ChannelConfig,
        notification: &Notification,
    ) -> Result<u16, SendError> {
        let text = &notification.text;
        let (url, body, put, headers) = match config.provider {
            Provider::Webhook => {
                let body = serde_json::to_vec(&notification.body).expect("JSON serializes");
                let timestamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let headers = vec![
                    (
                        "X-Wrenn-Signature",
                        signature(config.get("secret"), timestamp, &body),
                    ),
                    ("X-Wrenn-Timestamp", timestamp.to_string()),
                    ("X-Wrenn-Delivery", notification.delivery_id.clone()),
                    ("X-Wrenn-Event", notification.event_type.clone()),
                ];
                (config.get("url").to_owned(), body, false, headers)
            }
            Provider::Discord => chat(config, json!({"content": text})),
            Provider::Slack | Provider::Googlechat => chat(config, json!({"text": text})),
            // Teams' workflow webhooks take an Adaptive Card message.
            Provider::Teams => chat(
                config,
                json!({
                    "type": "message",
                    "attachments": [{
                        "contentType": "application/vnd.microsoft.card.adaptive",
                        "content": {
                            "type": "AdaptiveCard",
                            "version": "1.4",
                            "body": [{"type": "TextBlock", "text": text, "wrap": true}],
                        },
                    }],
                }),
            ),
            Provider::Telegram => {
                let api = config.optional("api_url").unwrap_or(TELEGRAM_API);
                let url = format!(
                    "{}/bot{}/sendMessage",
                    api.trim_end_matches('/'),
                    config.get("bot_token")
                );
                let body = json!({"chat_id": config.get("chat_id"), "text": text});
                (url, body.to_string().into_bytes(), false, Vec::new())
            }
            Provider::Matrix => {
                // The delivery ID as the transaction ID makes a retried send idempotent.
                let url = format!(
                    "{}/_matrix/client/v3/rooms/{}/send/m.room.message/wrenn-{}",
                    config.get("homeserver_url").trim_end_matches('/'),
                    url_segment(config.get("room_id")),
                    url_segment(&notification.delivery_id),
                );
                let body = json!({"msgtype": "m.text", "body": text});
                let auth = format!("Bearer {}", config.get("access_token"));
                (
                    url,
                    body.to_string().into_bytes(),
                    true,
                    vec![("Authorization", auth)],
                )
            }
        };
        if !self.allow_private {
            check_target(&url).map_err(|e| SendError {
                message: redact(&e.message, config),
                ..e
            })?;
        }
        let mut request = if put {
            self.http.put(&url)
        } else {
            self.http.post(&url)
        }
        .header("Content-Type", "application/json");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let mut response = request.send(&body[..]).map_err(|e| SendError {
            status: None,
            message: redact(&refusal_text(e), config),
        })?;
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Ok(status);
        }
        let answer = response
            .body_mut()
            .with_config()
            .limit(ERROR_BODY_BYTES)
            .read_to_string()
            .unwrap_or_default();
        Err(SendError {
            status: Some(status),
            message: redact(
                &format!("the receiver answered {status}: {}", answer.trim()),
                config,
            ),
        })
    }
}

/// A failed send's text; [`PublicOnly`]'s refusal without ureq's `io:` prefix.
fn refusal_text(error: ureq::Error) -> String {
    match error {
        ureq::Error::Io(io) if io.kind() == io::ErrorKind::PermissionDenied => io.to_string(),
        other => other.to_string(),
    }
}

type Request = (String, Vec<u8>, bool, Vec<(&'static str, String)>);

fn chat(config: &ChannelConfig, body: Value) -> Request {
    (
        config.get("webhook_url").to_owned(),
        body.to_string().into_bytes(),
        false,
        Vec::new(),
    )
}

fn url_segment(raw: &str) -> String {
    url::form_urlencoded::byte_serialize(raw.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// Keeps the channel's settings (tokens, and URLs that may carry them) out of errors that end
/// up in logs and the delivery log.
fn redact(message: &str, config: &ChannelConfig) -> String {
    let mut out = message.to_owned();
    for value in config.fields.values() {
        if !value.is_empty() {
            out = out.replace(value.as_str(), "<redacted>");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused() {
        for url in [
            "http://127.0.0.1:8080/h",
            "http://10.1.2.3/",
            "https://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:192.168.1.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:7f00:1::1]/",
            "http://[64:ff9b:1::101:101]/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://localhost:9/",
        ] {
            let error = check_target(url).unwrap_err();
            assert!(error.message.contains("internal address"), "{url}: {error}");
        }
        for url in [
            "https://1.1.1.1/",
            "http://[2606:4700::1111]/",
            "http://[64:ff9b::101:101]/",
        ] {
            check_target(url).unwrap();
        }
    }

    #[test]
    fn connections_to_internal_addresses_are_refused_when_resolved() {
        let resolve = |url: &str, config: &ureq::config::Config| {
            let uri: Uri = url.parse().unwrap();
            PublicOnly::default().resolve(&uri, config, NextTimeout::default())
        };
        let plain = ureq::config::Config::default();
        for url in [
            "http://localhost:9/",
            "http://10.0.0.1/",
            "http://[::1]:80/",
        ] {
            let error = resolve(url, &plain).unwrap_err();
            assert!(
                refusal_text(error).contains("internal address"),
                "{url} was not refused"
            );
        }
        resolve("https://1.1.1.1/", &plain).unwrap();
        // The operator's proxy may be on a private network; it is the one place allowed.
        let proxied = ureq::Agent::config_builder()
            .proxy(Some(ureq::Proxy::new("http://10.0.0.1:3128").unwrap()))
            .build();
        resolve("http://10.0.0.1:3128", &proxied).unwrap();
        assert!(resolve("http://10.0.0.1:80", &proxied).is_err());
        assert!(resolve("http://10.0.0.2:3128", &proxied).is_err());
        assert!(resolve("http://10.0.0.1/", &proxied).is_err());
    }

    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac s3cret
        assert_eq!(
            signature("s3cret", 1_700_000_000, br#"{"a":1}"#),
            "sha256=1698a50bc74d1ff1db85c4e0a5297c2ad9fdba245d5737cdb789e4cc6e098940"
        );
    }
}
