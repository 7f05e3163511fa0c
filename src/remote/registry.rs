//! The registry's three calls (`register`, `connect`, `validate`), made by
//! the executor and the harness: `POST` JSON, a bearer token, no
//! redirects followed, a 10 s budget that covers the body, and nothing of a
//! URL, token, authorization or response body in any log line or error.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::noise::{PublicKey, SECURITY_PROFILE};

/// A registry call's whole budget, body included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest error body preview kept.
const PREVIEW: usize = 4096;

/// A secret that never shows in a `Debug` or a log line.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    /// Wrap a token.
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// What a registry call failed with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry is unreachable, or did not answer in time.
    #[error("environment registry is unreachable: {0}")]
    Unreachable(String),
    /// 401 or 403.
    #[error("environment registry authentication failed ({status}): {message}")]
    Auth {
        /// The HTTP status.
        status: u16,
        /// The registry's message (never for `validate`).
        message: String,
    },
    /// Another status.
    #[error("environment registry returned HTTP {status}{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Http {
        /// The HTTP status.
        status: u16,
        /// The registry's `error.code`.
        code: Option<String>,
        /// The registry's `error.message`, or a preview of the body.
        message: String,
    },
    /// A 2xx answer that is not what the call returns.
    #[error("environment registry returned an invalid response: {0}")]
    Invalid(String),
    /// A security profile other than ours.
    #[error("environment registry returned unsupported security profile `{0}`")]
    Profile(String),
    /// A connect bundle with blank members.
    #[error("environment registry returned incomplete Noise connection data")]
    Incomplete,
    /// `validate` failed; nothing of the answer is repeated.
    #[error("environment registry harness key validation failed")]
    Validation,
}

impl RegistryError {
    /// Whether the harness may try again: no answer, 5xx, 408, 429, or
    /// 409 `environment_offline`.
    pub fn retryable(&self) -> bool {
        match self {
            RegistryError::Unreachable(_) => true,
            RegistryError::Http { status, code, .. } => {
                *status >= 500
                    || *status == 408
                    || *status == 429
                    || (*status == 409 && code.as_deref() == Some("environment_offline"))
            }
            _ => false,
        }
    }
}

/// What `register` returns.
#[derive(Clone, Serialize, Deserialize)]
pub struct Registration {
    /// The environment registered.
    pub environment_id: String,
    /// The rendezvous URL the executor connects to (a credential).
    pub url: String,
    /// Always [`SECURITY_PROFILE`].
    pub security_profile: String,
    /// This registration's id; part of every prologue.
    pub executor_registration_id: String,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("environment_id", &self.environment_id)
            .field("url", &strip_query(&self.url))
            .field("executor_registration_id", &self.executor_registration_id)
            .finish()
    }
}

/// What `connect` returns: everything one physical connection needs, used
/// once.
#[derive(Clone, Serialize, Deserialize)]
pub struct Bundle {
    /// The environment.
    pub environment_id: String,
    /// The rendezvous URL for the harness (a credential).
    pub url: String,
    /// Always [`SECURITY_PROFILE`].
    pub security_profile: String,
    /// The executor's registration; part of the prologue.
    pub executor_registration_id: String,
    /// The executor's key, pinned for the handshake.
    pub executor_public_key: PublicKey,
    /// Carried in handshake message 1 (a credential).
    pub harness_key_authorization: String,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("environment_id", &self.environment_id)
            .field("url", &strip_query(&self.url))
            .field("executor_registration_id", &self.executor_registration_id)
            .field("executor_public_key", &self.executor_public_key)
            .field("harness_key_authorization", &"<redacted>")
            .finish()
    }
}

/// A URL as logs may show it: no query, no fragment (they carry
/// signatures).
pub fn strip_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// A registry client for one base URL and token.
#[derive(Clone)]
pub struct Registry {
    base: String,
    token: Secret,
    http: reqwest::Client,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("base", &strip_query(&self.base))
            .field("token", &self.token)
            .finish()
    }
}

#[derive(Serialize)]
struct RegisterBody<'a> {
    security_profile: &'static str,
    executor_public_key: &'a PublicKey,
}

#[derive(Serialize)]
struct ConnectBody<'a> {
    harness_public_key: &'a PublicKey,
}

#[derive(Serialize)]
struct ValidateBody<'a> {
    executor_registration_id: &'a str,
    harness_public_key: &'a PublicKey,
    harness_key_authorization: &'a str,
}

#[derive(Deserialize)]
struct Validated {
    valid: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorMembers,
}

#[derive(Deserialize, Default)]
struct ErrorMembers {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

impl Registry {
    /// A client for the registry at `base` (`http://` or `https://`; a
    /// trailing `/` is trimmed). Proxies come from the process's
    /// environment (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`).
    pub fn new(base: &str, token: Secret) -> Result<Registry, RegistryError> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(RegistryError::Invalid(
                "the registry URL must start with http:// or https://".into(),
            ));
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| {
                RegistryError::Unreachable(format!("cannot build the HTTP client: {e}"))
            })?;
        Ok(Registry { base, token, http })
    }

    /// Register `key` as `environment_id`'s executor.
    pub async fn register(
        &self,
        environment_id: &str,
        key: &PublicKey,
    ) -> Result<Registration, RegistryError> {
        let body = RegisterBody {
            security_profile: SECURITY_PROFILE,
            executor_public_key: key,
        };
        let answer: Registration = self.post(environment_id, "register", &body, true).await?;
        check_common(
            environment_id,
            &answer.environment_id,
            &answer.security_profile,
        )?;
        if answer.url.trim().is_empty() || answer.executor_registration_id.trim().is_empty() {
            return Err(RegistryError::Incomplete);
        }
        Ok(answer)
    }

    /// A connect bundle for the harness key `key`.
    pub async fn connect(
        &self,
        environment_id: &str,
        key: &PublicKey,
    ) -> Result<Bundle, RegistryError> {
        let body = ConnectBody {
            harness_public_key: key,
        };
        let answer: Bundle = self.post(environment_id, "connect", &body, true).await?;
        check_common(
            environment_id,
            &answer.environment_id,
            &answer.security_profile,
        )?;
        if answer.url.trim().is_empty()
            || answer.executor_registration_id.trim().is_empty()
            || answer.harness_key_authorization.trim().is_empty()
        {
            return Err(RegistryError::Incomplete);
        }
        Ok(answer)
    }

    /// Whether `authorization` authorizes `key` for this registration:
    /// only an explicit `valid: true` does.
    pub async fn validate(
        &self,
        environment_id: &str,
        registration_id: &str,
        key: &PublicKey,
        authorization: &str,
    ) -> Result<bool, RegistryError> {
        let body = ValidateBody {
            executor_registration_id: registration_id,
            harness_public_key: key,
            harness_key_authorization: authorization,
        };
        let answer: Validated = self
            .post(environment_id, "validate", &body, false)
            .await
            .map_err(|e| match e {
                RegistryError::Auth { status, .. } => RegistryError::Auth {
                    status,
                    message: "harness key validation".into(),
                },
                _ => RegistryError::Validation,
            })?;
        Ok(answer.valid == Some(serde_json::Value::Bool(true)))
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        environment_id: &str,
        call: &str,
        body: &impl Serialize,
        echo_errors: bool,
    ) -> Result<T, RegistryError> {
        let url = format!(
            "{}/cloud/environment/{}/{call}",
            self.base,
            super::path_segment(environment_id)
        );
        let body = serde_json::to_vec(body).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let mut request = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if !self.token.expose().is_empty() {
            request = request.bearer_auth(self.token.expose());
        }
        let exchange = async {
            let response = request.send().await.map_err(unreachable)?;
            let status = response.status().as_u16();
            let bytes = response.bytes().await.map_err(unreachable)?;
            Ok::<_, RegistryError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| RegistryError::Unreachable(format!("no answer to {call} in time")))??;
        tracing::debug!(call, status, "registry call");
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes)
                .map_err(|e| RegistryError::Invalid(format!("{call}: {e}")));
        }
        let parsed: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_default();
        let message = if echo_errors {
            parsed.error.message.unwrap_or_else(|| {
                let text = String::from_utf8_lossy(&bytes);
                text.chars().take(PREVIEW).collect()
            })
        } else {
            String::new()
        };
        if status == 401 || status == 403 {
            return Err(RegistryError::Auth { status, message });
        }
        Err(RegistryError::Http {
            status,
            code: parsed.error.code,
            message,
        })
    }
}

/// Say why the registry could not be reached, without its URL.
fn unreachable(err: reqwest::Error) -> RegistryError {
    let what = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "cannot connect"
    } else if err.is_redirect() || err.status().is_some_and(|s| s.is_redirection()) {
        "redirected"
    } else {
        "request failed"
    };
    RegistryError::Unreachable(what.into())
}

fn check_common(asked: &str, got: &str, profile: &str) -> Result<(), RegistryError> {
    if got != asked {
        return Err(RegistryError::Invalid(
            "the answer names another environment".into(),
        ));
    }
    if profile != SECURITY_PROFILE {
        return Err(RegistryError::Profile(profile.to_string()));
    }
    Ok(())
}
