//! `kade user …` and `kade token …`: local users and their API tokens, study share tokens.

use std::time::Duration;

use anyhow::Context;
use kade_audit::{AuditEvent, EventKind, Outcome};
use kade_auth::{Role, TokenInfo};
use kade_core::Uid;

use crate::cli::{TokenCommand, UserCommand};
use crate::config::Config;
use crate::node::Node;

/// How long a share token lives when `--expires` is not given.
const SHARE_DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// `kade user …`.
///
/// # Errors
/// Invalid arguments or database errors.
pub async fn user(cfg: &Config, cmd: UserCommand) -> anyhow::Result<()> {
    let node = Node::open(cfg).await?;
    match cmd {
        UserCommand::Add { name, role } => {
            let role: Role = role.parse()?;
            kade_auth::add_user(&node.index, &name, role).await?;
            record(
                &node,
                format!("user {name} added with role {}", role.as_str()),
            )
            .await;
            println!("user {name} added with role {}", role.as_str());
            eprintln!("give them an API token with: kade token create --user {name}");
        }
        UserCommand::List { json } => {
            let users = kade_auth::list_users(&node.index).await?;
            if json {
                let v: Vec<_> = users
                    .iter()
                    .map(|u| {
                        serde_json::json!({
                            "name": u.name,
                            "role": u.role.as_str(),
                            "created_at": u.created_at,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if users.is_empty() {
                println!("no users; add one with: kade user add NAME --role reader");
            } else {
                println!("{:<32} {:<9} CREATED", "NAME", "ROLE");
                for u in users {
                    println!("{:<32} {:<9} {}", u.name, u.role.as_str(), u.created_at);
                }
            }
        }
    }
    node.index.close().await;
    Ok(())
}

/// `kade token …`.
///
/// # Errors
/// Invalid arguments or database errors.
pub async fn token(cfg: &Config, cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            user,
            study,
            expires,
        } => {
            let ttl = expires
                .as_deref()
                .map(parse_duration)
                .transpose()
                .context("--expires")?;
            // Check the arguments before touching the database.
            let study = study
                .map(|s| {
                    Uid::new(&s)
                        .with_context(|| format!("--study {s:?} is not a Study Instance UID"))
                })
                .transpose()?;
            let node = Node::open(cfg).await?;
            let (issued, what) = match (user, study) {
                (Some(user), None) => {
                    let t = kade_auth::create_token(&node.index, &user, ttl).await?;
                    (t, format!("user {user}"))
                }
                (None, Some(study)) => {
                    if node.index.study_patient(study.as_str()).await?.is_none() {
                        eprintln!(
                            "warning: study {study} is not in the archive (yet); the token will \
                             show it once it arrives"
                        );
                    }
                    let ttl = ttl.unwrap_or(SHARE_DEFAULT_TTL);
                    let t =
                        kade_auth::create_share_token(&node.index, &study, Some(ttl), "admin:cli")
                            .await?;
                    (t, format!("study {study} (read-only share)"))
                }
                _ => anyhow::bail!("give exactly one of --user NAME or --study UID"),
            };
            let expiry = issued
                .expires_at
                .as_deref()
                .map_or("never expires".to_owned(), |e| format!("expires {e}"));
            record(
                &node,
                format!("token {} created for {what}, {expiry}", issued.id),
            )
            .await;
            node.index.close().await;
            // The token alone on stdout, so that scripts can capture it.
            println!("{}", issued.token);
            eprintln!("token {} for {what}, {expiry}", issued.id);
            eprintln!(
                "this is the only time the token is shown: store it now. \
                 Revoke it with: kade token revoke {}",
                issued.id
            );
        }
        TokenCommand::List { json } => {
            let node = Node::open(cfg).await?;
            let tokens = kade_auth::list_tokens(&node.index).await?;
            node.index.close().await;
            let now = chrono::Utc::now();
            if json {
                let v: Vec<_> = tokens
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "id": t.id,
                            "user": t.user,
                            "study": t.study,
                            "created_at": t.created_at,
                            "expires_at": t.expires_at,
                            "revoked_at": t.revoked_at,
                            "status": status(t, now),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if tokens.is_empty() {
                println!("no tokens; make one with: kade token create --user NAME");
            } else {
                println!(
                    "{:<16}  {:<40} {:<20} {:<20} STATUS",
                    "ID", "FOR", "CREATED", "EXPIRES"
                );
                for t in &tokens {
                    let owner = match (&t.user, &t.study) {
                        (Some(u), _) => format!("user {u}"),
                        (None, Some(s)) => format!("study {s}"),
                        (None, None) => "-".to_owned(),
                    };
                    println!(
                        "{:<16}  {:<40} {:<20} {:<20} {}",
                        t.id,
                        owner,
                        t.created_at,
                        t.expires_at.as_deref().unwrap_or("never"),
                        status(t, now)
                    );
                }
            }
        }
        TokenCommand::Revoke { id } => {
            let id = token_id(&id)?;
            let node = Node::open(cfg).await?;
            kade_auth::revoke_token(&node.index, &id).await?;
            record(&node, format!("token {id} revoked")).await;
            node.index.close().await;
            println!("token {id} revoked: every node refuses it from the next request on");
        }
    }
    Ok(())
}

/// The id of `kade token revoke ID`: 16 hex digits, or taken from a whole token.
fn token_id(arg: &str) -> anyhow::Result<String> {
    let arg = arg.trim();
    let id = match arg.strip_prefix("kade_") {
        Some(rest) => rest.split('_').next().unwrap_or_default(),
        None => arg,
    };
    if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id.to_ascii_lowercase())
    } else {
        anyhow::bail!("{arg:?} is not a token id (16 hex digits): see kade token list")
    }
}

/// `revoked`, `expired` or `active`.
fn status(t: &TokenInfo, now: chrono::DateTime<chrono::Utc>) -> &'static str {
    let expired = t
        .expires_at
        .as_deref()
        .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok())
        .is_some_and(|e| e <= now);
    if t.revoked_at.is_some() {
        "revoked"
    } else if expired {
        "expired"
    } else {
        "active"
    }
}

async fn record(node: &Node, detail: String) {
    let ev = AuditEvent::new(EventKind::Admin, Outcome::Success, "admin:cli").detail(detail);
    if let Err(e) = node.audit.record(&ev).await {
        eprintln!("warning: could not write audit entry: {e}");
    }
}

/// Parses `30d`, `24h`, `90m` or `3600s`.
///
/// # Errors
/// A message saying what form is expected.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let bad = || {
        anyhow::anyhow!(
            "{s:?} is not a duration: use a number and a unit, e.g. 30d, 24h, 90m or 3600s"
        )
    };
    let s = s.trim();
    let unit = s.chars().last().ok_or_else(bad)?;
    let secs_per: u64 = match unit {
        'd' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return Err(bad()),
    };
    let n: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
    if n == 0 {
        anyhow::bail!("{s:?}: a token must live longer than zero");
    }
    let secs = n
        .checked_mul(secs_per)
        .filter(|&x| x <= 100 * 365 * 86_400)
        .ok_or_else(|| anyhow::anyhow!("{s:?} is too long: at most 100 years"))?;
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids() {
        assert_eq!(token_id("3f9c0a7d12e4b856").unwrap(), "3f9c0a7d12e4b856");
        assert_eq!(token_id(" 3F9C0A7D12E4B856\n").unwrap(), "3f9c0a7d12e4b856");
        assert_eq!(
            token_id("kade_3f9c0a7d12e4b856_abc_def").unwrap(),
            "3f9c0a7d12e4b856"
        );
        for bad in ["", "3f9c", "kade_", "zz9c0a7d12e4b856", "3f9c0a7d12e4b8567"] {
            assert!(token_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        let d = |s| parse_duration(s).unwrap().as_secs();
        assert_eq!(d("30d"), 30 * 86_400);
        assert_eq!(d("24h"), 86_400);
        assert_eq!(d("90m"), 5_400);
        assert_eq!(d("3600s"), 3_600);
        for bad in [
            "",
            "d",
            "30",
            "30w",
            "-1d",
            "1.5h",
            "0s",
            "h24",
            "99999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
