//! One notification to one channel, in its provider's protocol. Blocking (ureq): callers run
//! it on the blocking pool.
//!
//! Webhooks get the event as JSON, signed: `X-Wrenn-Signature: sha256=<hex>` is the HMAC-SHA256
//! of `<X-Wrenn-Timestamp>.<body>` under the channel's secret, and `X-Wrenn-Delivery` stays the
//! same across retries so receivers can drop duplicates. Chat providers get one line of text.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

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

/// An HTTP client for notifications: no redirects (a receiver is where it was configured to
/// be), every attempt bounded by `timeout`.
#[derive(Debug, Clone)]
pub struct Sender {
    http: ureq::Agent,
}

impl Sender {
    pub fn new(timeout: Duration) -> Self {
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(timeout))
            .user_agent(concat!("wrenn-notifications/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self { http }
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
            message: redact(&e.to_string(), config),
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

/// Keeps the channel's secrets (tokens in URLs, above all) out of errors that end up in logs
/// and the delivery log.
fn redact(message: &str, config: &ChannelConfig) -> String {
    let mut out = message.to_owned();
    for (name, value) in &config.fields {
        let secret = matches!(
            name.as_str(),
            "webhook_url" | "bot_token" | "access_token" | "secret"
        );
        if secret && !value.is_empty() {
            out = out.replace(value.as_str(), "<redacted>");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac s3cret
        assert_eq!(
            signature("s3cret", 1_700_000_000, br#"{"a":1}"#),
            "sha256=1698a50bc74d1ff1db85c4e0a5297c2ad9fdba245d5737cdb789e4cc6e098940"
        );
    }
}
