//! Text that must never reach a log or a panic message: passwords, tokens, API keys, private
//! keys, signing secrets. Serialized as the plain string (it is sent or stored where it
//! belongs); `Debug` shows only that something is there.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretText(String);

impl SecretText {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn into_exposed(self) -> String {
        self.0
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Shows an environment's names, not its values: sandbox environments are where users put
/// their API keys.
pub struct EnvNames<'a>(pub &'a BTreeMap<String, String>);

impl fmt::Debug for EnvNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|name| (name, format_args!("<redacted>"))))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_text_and_serde_keeps_it() {
        let secret = SecretText::new("hunter2");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"hunter2\"");
        let back: SecretText = serde_json::from_str("\"hunter2\"").unwrap();
        assert_eq!(back.expose(), "hunter2");
    }

    /// Every type that carries a password, a session token, an API key or a sandbox's
    /// environment, as it would appear in a `{:?}` (the API's request and response bodies are
    /// checked beside them, in `cp::routes`).
    #[test]
    fn no_credential_shows_in_debug_output() {
        use crate::cp::services::accounts::Session;
        use crate::cp::services::capsules::guest::ws::ClientFrame;
        use crate::cp::services::input::Password;

        const SECRET: &str = "hunter2-hunter2";
        let shown = |what: &dyn fmt::Debug| {
            let text = format!("{what:?}");
            assert!(!text.contains(SECRET), "{text}");
            text
        };
        shown(&Password::parse("password", SECRET).unwrap());
        let session = Session {
            token: SecretText::new(SECRET),
            user_id: crate::id::UserId(uuid::Uuid::nil()),
            team_id: crate::id::TeamId(uuid::Uuid::nil()),
            email: "a@example.com".into(),
            name: "A".into(),
        };
        shown(&session);
        let frame: ClientFrame =
            serde_json::from_value(serde_json::json!({"type": "auth", "token": SECRET})).unwrap();
        shown(&frame);
        let envs = BTreeMap::from([("OPENAI_API_KEY".to_owned(), SECRET.to_owned())]);
        let init = crate::envd::api::InitRequest {
            env_vars: envs.clone(),
            access_token: Some(SecretText::new(SECRET)),
            ..Default::default()
        };
        assert!(shown(&init).contains("OPENAI_API_KEY"));
        let create: crate::agent::wire::CreateSandbox = serde_json::from_value(serde_json::json!({
            "sandbox_id": crate::id::SandboxId::new_random().to_string(),
            "template": "minimal", "vcpus": 1, "memory_mb": 256, "envs": envs,
        }))
        .unwrap();
        assert!(shown(&create).contains("OPENAI_API_KEY"));
        let user = crate::db::users::User {
            id: uuid::Uuid::nil(),
            email: "a@example.com".into(),
            password_hash: SECRET.into(),
            name: "A".into(),
            is_admin: false,
            status: crate::db::users::UserStatus::Active,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        };
        shown(&user);
    }
}
