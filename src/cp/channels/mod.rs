//! Notification channels: a team's lifecycle events sent to a signed webhook or a chat provider.
//! A trigger queues a delivery for every event a channel wants, in the event's transaction
//! (migration 0018); [`dispatch`] sends them from any replica, with retries; [`send`] speaks
//! each provider; [`seal`] keeps their settings encrypted at rest.

pub mod dispatch;
pub mod seal;
pub mod send;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::cp::tokens::random_hex;

/// The providers of the reference API, by their wire names.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    strum::EnumString,
    strum::AsRefStr,
    strum::VariantNames,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum Provider {
    Discord,
    Slack,
    Teams,
    Googlechat,
    Telegram,
    Matrix,
    Webhook,
}

/// The events a channel can carry, as the reference API names them.
pub const EVENT_TYPES: [&str; 8] = [
    "capsule.created",
    "capsule.running",
    "capsule.paused",
    "capsule.destroyed",
    "template.snapshot.created",
    "template.snapshot.deleted",
    "host.up",
    "host.down",
];

/// A field of a provider's settings.
struct Field {
    name: &'static str,
    required: bool,
    url: bool,
}

const fn field(name: &'static str, required: bool, url: bool) -> Field {
    Field {
        name,
        required,
        url,
    }
}

impl Provider {
    fn fields(self) -> &'static [Field] {
        const CHAT_WEBHOOK: &[Field] = &[field("webhook_url", true, true)];
        // `api_url` points at a self-hosted Bot API server instead of api.telegram.org.
        const TELEGRAM: &[Field] = &[
            field("bot_token", true, false),
            field("chat_id", true, false),
            field("api_url", false, true),
        ];
        const MATRIX: &[Field] = &[
            field("homeserver_url", true, true),
            field("access_token", true, false),
            field("room_id", true, false),
        ];
        const WEBHOOK: &[Field] = &[field("url", true, true), field("secret", false, false)];
        match self {
            Provider::Discord | Provider::Slack | Provider::Teams | Provider::Googlechat => {
                CHAT_WEBHOOK
            }
            Provider::Telegram => TELEGRAM,
            Provider::Matrix => MATRIX,
            Provider::Webhook => WEBHOOK,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// A provider's checked settings: every required field, nothing unknown, URLs that are
/// absolute http(s) URLs. A webhook always has a signing secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelConfig {
    pub provider: Provider,
    fields: BTreeMap<String, String>,
}

/// Names the settings, never their values.
impl std::fmt::Debug for ChannelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelConfig")
            .field("provider", &self.provider)
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The longest value a setting may have.
const MAX_VALUE_BYTES: usize = 2048;
/// Generated webhook secrets: `whsec_` and 32 random bytes in hex.
const SECRET_PREFIX: &str = "whsec_";

impl ChannelConfig {
    /// Checks `raw` for `provider`; a webhook without a secret gets a generated one, returned
    /// beside the settings so the caller can show it once.
    pub fn parse(
        provider: Provider,
        mut raw: BTreeMap<String, String>,
    ) -> Result<(Self, Option<String>), ConfigError> {
        let fields = provider.fields();
        if let Some(unknown) = raw.keys().find(|k| !fields.iter().any(|f| f.name == *k)) {
            let known: Vec<_> = fields.iter().map(|f| f.name).collect();
            return Err(ConfigError(format!(
                "`{unknown}` is not a {} setting; it takes {}",
                provider.as_ref(),
                known.join(", ")
            )));
        }
        for f in fields {
            let value = raw.get(f.name).map(|v| v.trim()).unwrap_or_default();
            if value.is_empty() {
                if f.required {
                    return Err(ConfigError(format!(
                        "{} needs `{}`",
                        provider.as_ref(),
                        f.name
                    )));
                }
                raw.remove(f.name);
                continue;
            }
            if value.len() > MAX_VALUE_BYTES {
                return Err(ConfigError(format!(
                    "`{}` is longer than {MAX_VALUE_BYTES} bytes",
                    f.name
                )));
            }
            if f.url {
                check_url(f.name, value)?;
            }
            let value = value.to_owned();
            raw.insert(f.name.to_owned(), value);
        }
        let generated = (provider == Provider::Webhook && !raw.contains_key("secret"))
            .then(|| format!("{SECRET_PREFIX}{}", random_hex(32)));
        if let Some(secret) = &generated {
            raw.insert("secret".into(), secret.clone());
        }
        Ok((
            Self {
                provider,
                fields: raw,
            },
            generated,
        ))
    }

    /// Settings read back from storage, checked again as if new.
    pub fn from_stored(provider: Provider, json: &[u8]) -> Result<Self, ConfigError> {
        let raw: BTreeMap<String, String> = serde_json::from_slice(json)
            .map_err(|e| ConfigError(format!("stored settings are not valid: {e}")))?;
        Ok(Self::parse(provider, raw)?.0)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.fields).expect("string maps serialize")
    }

    /// A setting `parse` guarantees for this provider.
    fn get(&self, name: &str) -> &str {
        self.fields.get(name).map_or("", String::as_str)
    }

    fn optional(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

fn check_url(name: &str, value: &str) -> Result<(), ConfigError> {
    let parsed =
        url::Url::parse(value).map_err(|e| ConfigError(format!("`{name}` is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(ConfigError(format!(
            "`{name}` must be an http:// or https:// URL with a host"
        )));
    }
    Ok(())
}

/// Checks a list of channel event types: known, at least one, no repeats.
pub fn event_types(raw: &[String]) -> Result<Vec<String>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError(format!(
            "name at least one event: {}",
            EVENT_TYPES.join(", ")
        )));
    }
    let mut out: Vec<String> = Vec::with_capacity(raw.len());
    for event in raw {
        if !EVENT_TYPES.contains(&event.as_str()) {
            return Err(ConfigError(format!(
                "`{event}` is not an event a channel carries; they are {}",
                EVENT_TYPES.join(", ")
            )));
        }
        if !out.contains(event) {
            out.push(event.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn settings_are_checked_per_provider() {
        let (slack, none) =
            ChannelConfig::parse(Provider::Slack, map(&[("webhook_url", "https://h/x")])).unwrap();
        assert_eq!(none, None);
        assert_eq!(slack.get("webhook_url"), "https://h/x");

        for (provider, raw, complaint) in [
            (Provider::Slack, map(&[]), "needs `webhook_url`"),
            (
                Provider::Discord,
                map(&[("webhook_url", "ftp://h/")]),
                "http://",
            ),
            (
                Provider::Teams,
                map(&[("webhook_url", "not a url")]),
                "not a URL",
            ),
            (
                Provider::Telegram,
                map(&[("bot_token", "t")]),
                "needs `chat_id`",
            ),
            (
                Provider::Webhook,
                map(&[("url", "https://h"), ("token", "x")]),
                "`token` is not a webhook setting",
            ),
            (
                Provider::Matrix,
                map(&[("homeserver_url", "https://m"), ("access_token", "a")]),
                "needs `room_id`",
            ),
        ] {
            let error = ChannelConfig::parse(provider, raw).unwrap_err();
            assert!(error.0.contains(complaint), "{error} lacks {complaint}");
        }
    }

    #[test]
    fn a_webhook_without_a_secret_gets_one_and_keeps_a_given_one() {
        let (hook, secret) =
            ChannelConfig::parse(Provider::Webhook, map(&[("url", "http://h/")])).unwrap();
        let secret = secret.unwrap();
        assert!(secret.starts_with(SECRET_PREFIX) && secret.len() == SECRET_PREFIX.len() + 64);
        assert_eq!(hook.get("secret"), secret);
        let stored = ChannelConfig::from_stored(Provider::Webhook, &hook.to_json()).unwrap();
        assert_eq!(stored, hook);

        let (given, none) = ChannelConfig::parse(
            Provider::Webhook,
            map(&[("url", "http://h/"), ("secret", "mine")]),
        )
        .unwrap();
        assert_eq!((given.get("secret"), none), ("mine", None));
    }

    #[test]
    fn event_types_are_known_and_deduplicated() {
        let twice = vec!["host.up".to_owned(), "host.up".to_owned()];
        assert_eq!(event_types(&twice).unwrap(), vec!["host.up".to_owned()]);
        assert!(event_types(&[]).is_err());
        assert!(event_types(&["capsule.exploded".to_owned()])
            .unwrap_err()
            .0
            .contains("capsule.exploded"));
    }
}
