//! Credentials and trust for fetching: an https token or an ssh key, the ssh host key checked
//! against a configured known_hosts file (git2's own check only reads `~/.ssh`), one credential
//! attempt only (libgit2 asks again after a rejection and would loop), and a fetch deadline.
//!
//! Errors say what to fix: authentication vs unknown host vs changed host key vs timeout.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use git2::{CertificateCheckStatus, Cred, CredentialType, RemoteCallbacks};
use hmac::{Hmac, Mac};

use super::git::{redact_url, scrub, scrub_error, GitError};
use crate::config::{GitAuth, RepoConfig};

pub fn fetch_timeout(auth: &GitAuth) -> Duration {
    Duration::from_secs(auth.fetch_timeout_secs.unwrap_or(120).max(1))
}

/// Callbacks for one connection; `failure` receives the reason when a callback refuses.
pub fn callbacks<'a>(
    repo: &'a RepoConfig,
    deadline: Instant,
    failure: Rc<RefCell<Option<String>>>,
) -> RemoteCallbacks<'a> {
    let mut cb = RemoteCallbacks::new();
    let tried = Cell::new(false);
    let name = repo.name.clone();
    let auth = &repo.auth;
    let fail = failure.clone();
    cb.credentials(move |_url, username_from_url, allowed| {
        if tried.replace(true) {
            let what = if auth.token.is_some() {
                "the token was rejected (check repos.auth.token_env / token_file and its scopes)"
            } else if auth.ssh_key_file.is_some() {
                "the ssh key was rejected (check repos.auth.ssh_key_file and the deploy key on the forge)"
            } else {
                "the remote wants credentials (set repos.auth.token_env or repos.auth.ssh_key_file)"
            };
            *fail.borrow_mut() = Some(format!("repo `{name}`: authentication failed: {what}"));
            return Err(git2::Error::from_str("credentials rejected; not retrying"));
        }
        if allowed.contains(CredentialType::SSH_KEY) {
            if let Some(key) = &auth.ssh_key_file {
                let user = auth.username.as_deref().or(username_from_url).unwrap_or("git");
                let passphrase = auth.ssh_passphrase.as_ref().and_then(|p| std::str::from_utf8(p.expose()).ok());
                return Cred::ssh_key(user, None, key, passphrase);
            }
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            if let Some(token) = auth.token.as_ref().and_then(|t| std::str::from_utf8(t.expose()).ok()) {
                let user = auth.username.as_deref().or(username_from_url).unwrap_or("x-access-token");
                return Cred::userpass_plaintext(user, token);
            }
        }
        if allowed.contains(CredentialType::USERNAME) {
            return Cred::username(auth.username.as_deref().or(username_from_url).unwrap_or("git"));
        }
        *fail.borrow_mut() = Some(format!(
            "repo `{name}`: authentication failed: the remote wants credentials (set repos.auth.token_env or repos.auth.ssh_key_file)"
        ));
        Err(git2::Error::from_str("no credentials configured"))
    });
    let fail = failure.clone();
    let name = repo.name.clone();
    cb.certificate_check(move |cert, host| {
        let Some(hostkey) = cert.as_hostkey() else {
            // TLS: let libgit2 and the system trust store decide.
            return Ok(CertificateCheckStatus::CertificatePassthrough);
        };
        let Some(key) = hostkey.hostkey() else {
            *fail.borrow_mut() = Some(format!("repo `{name}`: the ssh server sent no host key"));
            return Err(git2::Error::from_str("no host key"));
        };
        let Some(file) = &auth.known_hosts_file else {
            *fail.borrow_mut() = Some(format!("repo `{name}`: ssh host key for {host} cannot be checked (set repos.auth.known_hosts_file)"));
            return Err(git2::Error::from_str("no known_hosts"));
        };
        match check_known_hosts(file, host, port_of(&repo.url), key) {
            HostKey::Match => Ok(CertificateCheckStatus::CertificateOk),
            HostKey::Unknown => {
                *fail.borrow_mut() = Some(format!(
                    "repo `{name}`: ssh host key for {host} is not in {} (add it, e.g. from ssh-keyscan, after checking its fingerprint)",
                    file.display()
                ));
                Err(git2::Error::from_str("unknown host"))
            }
            HostKey::Changed => {
                *fail.borrow_mut() = Some(format!(
                    "repo `{name}`: ssh host key for {host} does not match {} (the key changed: possible man-in-the-middle)",
                    file.display()
                ));
                Err(git2::Error::from_str("host key mismatch"))
            }
        }
    });
    let fail = failure;
    let name = repo.name.clone();
    let timeout = fetch_timeout(&repo.auth);
    cb.transfer_progress(move |_| {
        if Instant::now() > deadline {
            *fail.borrow_mut() = Some(format!(
                "repo `{name}`: fetch took longer than {timeout:?} (repos.auth.fetch_timeout_secs)"
            ));
            return false;
        }
        true
    });
    cb
}

/// Turns a libgit2 error into one that says what to fix.
pub fn explain(
    repo: &RepoConfig,
    source: git2::Error,
    failure: &Rc<RefCell<Option<String>>>,
) -> GitError {
    if let Some(message) = failure.borrow_mut().take() {
        return GitError::Remote { message };
    }
    let text = source.message().to_ascii_lowercase();
    if source.class() == git2::ErrorClass::Http
        && (text.contains("401") || text.contains("403") || text.contains("authentication"))
    {
        return GitError::Remote {
            message: format!(
                "repo `{}`: authentication failed at {} ({})",
                repo.name,
                redact_url(&repo.url),
                scrub(source.message(), &repo.url)
            ),
        };
    }
    GitError::Fetch {
        repo: repo.name.clone(),
        branch: repo.branch.clone(),
        url: redact_url(&repo.url),
        source: scrub_error(source, &repo.url),
    }
}

fn port_of(url: &str) -> Option<u16> {
    let rest = url.strip_prefix("ssh://")?;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit('@').next()?;
    host_port.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

#[derive(Debug, PartialEq, Eq)]
pub enum HostKey {
    Match,
    Unknown,
    Changed,
}

/// Looks `host` (and `port` when not 22) up in an OpenSSH known_hosts file, plain or hashed.
pub fn check_known_hosts(file: &Path, host: &str, port: Option<u16>, key: &[u8]) -> HostKey {
    let Ok(text) = std::fs::read_to_string(file) else {
        return HostKey::Unknown;
    };
    let name = match port {
        Some(p) if p != 22 => format!("[{host}]:{p}"),
        _ => host.to_string(),
    };
    let mut seen_host = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let Some(mut hosts) = fields.next() else {
            continue;
        };
        let mut revoked = false;
        if hosts.starts_with('@') {
            revoked = hosts == "@revoked";
            match fields.next() {
                Some(h) if revoked => hosts = h,
                // @cert-authority lines are not supported: skip.
                _ => continue,
            }
        }
        let (Some(_kind), Some(b64)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !hosts.split(',').any(|pattern| host_matches(pattern, &name)) {
            continue;
        }
        let Ok(known) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            continue;
        };
        if known == key {
            return if revoked {
                HostKey::Changed
            } else {
                HostKey::Match
            };
        }
        if !revoked {
            seen_host = true;
        }
    }
    if seen_host {
        HostKey::Changed
    } else {
        HostKey::Unknown
    }
}

fn host_matches(pattern: &str, name: &str) -> bool {
    if let Some(hashed) = pattern.strip_prefix("|1|") {
        let Some((salt, hash)) = hashed.split_once('|') else {
            return false;
        };
        let engine = base64::engine::general_purpose::STANDARD;
        let (Ok(salt), Ok(hash)) = (engine.decode(salt), engine.decode(hash)) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
            return false;
        };
        mac.update(name.as_bytes());
        return mac.verify_slice(&hash).is_ok();
    }
    pattern == name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_plain_hashed_ports_and_changed_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = [1u8, 2, 3, 4];
        let other = [9u8, 9, 9];
        let b64 = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
        // hashed entry for git.example.com
        let salt = [7u8; 20];
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&salt).expect("key");
        mac.update(b"git.example.com");
        let hashed = format!("|1|{}|{}", b64(&salt), b64(&mac.finalize().into_bytes()));
        let text = format!(
            "# comment\nforge.local,10.0.0.1 ssh-ed25519 {}\n[forge.local]:2222 ssh-ed25519 {}\n{hashed} ssh-ed25519 {}\n@revoked bad.host ssh-ed25519 {}\n",
            b64(&key),
            b64(&other),
            b64(&key),
            b64(&key)
        );
        let file = dir.path().join("known_hosts");
        std::fs::write(&file, text).expect("write");
        assert_eq!(
            check_known_hosts(&file, "forge.local", None, &key),
            HostKey::Match
        );
        assert_eq!(
            check_known_hosts(&file, "forge.local", Some(22), &key),
            HostKey::Match
        );
        assert_eq!(
            check_known_hosts(&file, "forge.local", Some(2222), &other),
            HostKey::Match
        );
        assert_eq!(
            check_known_hosts(&file, "forge.local", Some(2222), &key),
            HostKey::Changed
        );
        assert_eq!(
            check_known_hosts(&file, "forge.local", None, &other),
            HostKey::Changed
        );
        assert_eq!(
            check_known_hosts(&file, "git.example.com", None, &key),
            HostKey::Match
        );
        assert_eq!(
            check_known_hosts(&file, "elsewhere", None, &key),
            HostKey::Unknown
        );
        assert_eq!(
            check_known_hosts(&file, "bad.host", None, &key),
            HostKey::Changed,
            "revoked"
        );
        assert_eq!(port_of("ssh://git@forge.local:2222/cfg.git"), Some(2222));
        assert_eq!(port_of("git@forge.local:cfg.git"), None);
    }
}
