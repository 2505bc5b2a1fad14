//! [`Secret`]: a credential that never appears in `Debug` output or logs, and
//! [`redact_url`] for URLs that carry one.

/// A secret string (password, token, key). `Debug` prints `Secret(***)`.
///
/// ```
/// use eventbus_core::Secret;
/// let s = Secret::new("hunter2");
/// assert_eq!(format!("{s:?}"), "Secret(***)");
/// assert_eq!(s.expose(), "hunter2");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A secret in a configuration file or variable: a string (numbers and booleans are taken as
/// written, as an environment variable's value may look like one). There is deliberately no
/// `Serialize`: a secret is not written back out.
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SecretVisitor;
        impl serde::de::Visitor<'_> for SecretVisitor {
            type Value = Secret;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a secret string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
        }
        d.deserialize_any(SecretVisitor)
    }
}

/// A server URL (or a comma-separated list) with any `user:password@` or `token@` part
/// replaced by `***@`, for errors, logs and `Debug` output.
///
/// ```
/// use eventbus_core::redact_url;
/// assert_eq!(redact_url("nats://bob:pw@h:4222,nats://h2:4222"), "nats://***@h:4222,nats://h2:4222");
/// assert_eq!(redact_url("tok@h:1"), "***@h:1");
/// ```
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| {
            let start = u.find("://").map_or(0, |s| s + 3);
            match u.rfind('@') {
                Some(at) if at >= start => format!("{}***@{}", &u[..start], &u[at + 1..]),
                _ => u.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}
