//! Server URLs and the credentials they may carry (`nats://user:password@host`,
//! `nats://token@host`). The credentials are taken out of the URLs before the client sees
//! them (async-nats logs the URLs it connects to) and handed over as options instead; every
//! URL this crate prints is redacted.

use crate::config::{Auth, Secret};
pub(crate) use eventbus_core::redact_url;

/// One URL without its credentials, and the credentials.
fn split_one(url: &str) -> (String, Option<&str>) {
    let start = url.find("://").map_or(0, |s| s + 3);
    match url.rfind('@') {
        Some(at) if at >= start => (
            format!("{}{}", &url[..start], &url[at + 1..]),
            Some(&url[start..at]),
        ),
        _ => (url.to_string(), None),
    }
}

/// The comma-separated URLs without credentials, and the credentials they carried
/// (`Auth::None` if none). URLs carrying different credentials are refused.
pub(crate) fn split_credentials(urls: &str) -> Result<(Vec<String>, Auth), String> {
    let mut found: Option<&str> = None;
    let mut out = Vec::new();
    for u in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (rest, creds) = split_one(u);
        if let Some(c) = creds {
            if found.is_some_and(|f| f != c) {
                return Err("the server URLs carry different credentials".into());
            }
            found = Some(c);
        }
        out.push(rest);
    }
    let auth = match found {
        None => Auth::None,
        Some(c) => match c.split_once(':') {
            Some((user, password)) => Auth::UserPassword {
                user: user.to_string(),
                password: Secret::new(password),
            },
            None => Auth::Token(Secret::new(c)),
        },
    };
    Ok((out, auth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("nats://bob:pw@h:4222,nats://h2:4222"),
            "nats://***@h:4222,nats://h2:4222"
        );
        assert_eq!(redact_url("tok@h:1"), "***@h:1");
        assert_eq!(redact_url("nats://h:1"), "nats://h:1");
    }

    #[test]
    fn credentials_leave_the_urls() {
        let (urls, auth) =
            split_credentials("nats://bob:pw@h:4222, nats://bob:pw@h2:4222").unwrap();
        assert_eq!(urls, ["nats://h:4222", "nats://h2:4222"]);
        assert_eq!(
            auth,
            Auth::UserPassword {
                user: "bob".into(),
                password: Secret::new("pw")
            }
        );
        let (urls, auth) = split_credentials("tok@h:1,h2:1").unwrap();
        assert_eq!(urls, ["h:1", "h2:1"]);
        assert_eq!(auth, Auth::Token(Secret::new("tok")));
        let (_, auth) = split_credentials("nats://h:1").unwrap();
        assert_eq!(auth, Auth::None);
        assert!(split_credentials("nats://a@h:1,nats://b@h:2").is_err());
    }
}
