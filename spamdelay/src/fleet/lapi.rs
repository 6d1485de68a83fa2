//! CrowdSec's Local API over HTTP: a machine's login, alerts and decision
//! deletes (publishing), and a bouncer's decision stream (subscribing).
//! Each failure is one `LapiError` that says what to do about it.

use std::time::{Duration, Instant};

use reqwest::{Client, Method, RequestBuilder, Response, StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::allow::Cidr;

/// LAPI checks the User-Agent at login: it must hold exactly one `/`.
const USER_AGENT: &str = concat!("spamdelay/", env!("CARGO_PKG_VERSION"));
/// A request that takes longer means a LAPI in trouble: give up, retry later.
const TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Tokens last an hour; log in again a little before.
const TOKEN_LIFE: Duration = Duration::from_secs(50 * 60);

/// What went wrong talking to LAPI, as one line for the log.
#[derive(Debug, thiserror::Error)]
pub enum LapiError {
    #[error("LAPI {url} unreachable: {why}; bans stay local and are sent when it is back")]
    Unreachable { url: String, why: String },
    #[error(
        "LAPI refused the login of machine '{machine}': wrong password or unknown machine (on the LAPI host: `cscli machines list`, `cscli machines add {machine} --password ...`)"
    )]
    BadCredentials { machine: String },
    #[error(
        "machine '{machine}' is not validated: on the LAPI host run `cscli machines validate {machine}`"
    )]
    NotValidated { machine: String },
    #[error(
        "LAPI refused the bouncer key (HTTP {status}): check --crowdsec-bouncer-key-file (on the LAPI host: `cscli bouncers add NAME`)"
    )]
    BadKey { status: u16 },
    #[error("LAPI answered HTTP {status} to {what}: {message}")]
    Http {
        status: u16,
        what: &'static str,
        message: String,
    },
}

impl LapiError {
    /// The counter a failure adds to (`spamdelay status`, metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            LapiError::Unreachable { .. } => "unreachable",
            LapiError::BadCredentials { .. } => "bad_credentials",
            LapiError::NotValidated { .. } => "not_validated",
            LapiError::BadKey { .. } => "bad_key",
            LapiError::Http { .. } => "http_error",
        }
    }
}

/// A decision as the stream gives it.
#[derive(Clone, Debug, Deserialize)]
pub struct Decision {
    #[serde(default)]
    pub id: i64,
    #[serde(default)]
    pub origin: String,
    #[serde(default)]
    pub scenario: String,
    #[serde(default)]
    pub scope: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub value: String,
    /// Time left, in Go's syntax (`3h59m58.9s`).
    #[serde(default)]
    pub duration: String,
}

/// One pull of `/v1/decisions/stream`.
#[derive(Debug, Default, Deserialize)]
pub struct Stream {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub new: Vec<Decision>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub deleted: Vec<Decision>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Decision>, D::Error> {
    Ok(Option::<Vec<Decision>>::deserialize(d)?.unwrap_or_default())
}

/// The HTTP side of LAPI, shared by the publisher and the subscriber.
#[derive(Clone)]
pub struct Lapi {
    http: Client,
    base: Url,
}

impl Lapi {
    pub fn new(base: Url) -> anyhow::Result<Lapi> {
        let http = Client::builder()
            .user_agent(USER_AGENT)
            .timeout(TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| anyhow::anyhow!("setting up the HTTP client: {e}"))?;
        Ok(Lapi { http, base })
    }

    pub fn url(&self) -> &Url {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut url = self.base.clone();
        let base_path = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{base_path}{path}"));
        self.http.request(method, url)
    }

    async fn send(&self, req: RequestBuilder) -> Result<Response, LapiError> {
        req.send().await.map_err(|e| LapiError::Unreachable {
            url: self.base.to_string(),
            why: reason(&e),
        })
    }

    /// The bouncer's pull: the whole state with `startup`, else the changes.
    pub async fn stream(&self, key: &str, startup: bool) -> Result<Stream, LapiError> {
        let path = if startup {
            "/v1/decisions/stream?startup=true"
        } else {
            "/v1/decisions/stream"
        };
        let mut req = self.request(Method::GET, "/v1/decisions/stream");
        if startup {
            req = req.query(&[("startup", "true")]);
        }
        let resp = self.send(req.header("X-Api-Key", key)).await?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(LapiError::BadKey {
                status: status.as_u16(),
            });
        }
        let body = self.body(resp, "the decision stream").await?;
        if body.trim().is_empty() || body.trim() == "null" {
            return Ok(Stream::default());
        }
        serde_json::from_str(&body).map_err(|e| LapiError::Http {
            status: status.as_u16(),
            what: "the decision stream",
            message: format!("unreadable answer to GET {path}: {e}"),
        })
    }

    /// The body of a 2xx answer; any other status is an error with LAPI's
    /// message.
    async fn body(&self, resp: Response, what: &'static str) -> Result<String, LapiError> {
        let status = resp.status();
        let body = resp.text().await.map_err(|e| LapiError::Unreachable {
            url: self.base.to_string(),
            why: reason(&e),
        })?;
        if status.is_success() {
            return Ok(body);
        }
        Err(LapiError::Http {
            status: status.as_u16(),
            what,
            message: message(&body),
        })
    }
}

/// LAPI's `{"message": ...}`, or the body itself, on one line.
fn message(body: &str) -> String {
    let text = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(String::from))
        .unwrap_or_else(|| body.trim().to_string());
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        "(no message)".into()
    } else {
        line.chars().take(300).collect()
    }
}

/// A transport error's cause, without reqwest's URL repeated.
fn reason(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    if e.is_timeout() {
        "no answer within 5 s".into()
    } else if e.is_connect() {
        format!("cannot connect ({cause})")
    } else {
        cause.to_string()
    }
}

/// A watcher machine: logs in for a JWT, again on any 401.
pub struct Machine {
    lapi: Lapi,
    id: String,
    password: String,
    token: Option<(String, Instant)>,
}

#[derive(Serialize)]
struct Login<'a> {
    machine_id: &'a str,
    password: &'a str,
}

impl Machine {
    pub fn new(lapi: Lapi, id: String, password: String) -> Machine {
        Machine {
            lapi,
            id,
            password,
            token: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    async fn login(&mut self) -> Result<String, LapiError> {
        let req = self
            .lapi
            .request(Method::POST, "/v1/watchers/login")
            .json(&Login {
                machine_id: &self.id,
                password: &self.password,
            });
        let resp = self.lapi.send(req).await?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let body = resp.text().await.unwrap_or_default();
            let text = message(&body);
            return Err(if text.contains("not validated") {
                LapiError::NotValidated {
                    machine: self.id.clone(),
                }
            } else {
                LapiError::BadCredentials {
                    machine: self.id.clone(),
                }
            });
        }
        let body = self.lapi.body(resp, "the login").await?;
        let token = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("token").and_then(Value::as_str).map(String::from))
            .ok_or_else(|| LapiError::Http {
                status: status.as_u16(),
                what: "the login",
                message: format!("no token in the answer: {}", message(&body)),
            })?;
        self.token = Some((token.clone(), Instant::now()));
        Ok(token)
    }

    async fn token(&mut self) -> Result<String, LapiError> {
        match &self.token {
            Some((t, at)) if at.elapsed() < TOKEN_LIFE => Ok(t.clone()),
            _ => self.login().await,
        }
    }

    /// Sends `build(request)` with the token, logging in again once on 401
    /// (a restarted LAPI has a new secret).
    async fn authorized(
        &mut self,
        method: Method,
        path: &str,
        what: &'static str,
        build: impl Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<String, LapiError> {
        for attempt in 0..2 {
            let token = self.token().await?;
            let req = build(self.lapi.request(method.clone(), path)).bearer_auth(token);
            let resp = self.lapi.send(req).await?;
            if resp.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                self.token = None;
                continue;
            }
            return self.lapi.body(resp, what).await;
        }
        Err(LapiError::BadCredentials {
            machine: self.id.clone(),
        })
    }

    /// `POST /v1/alerts`: alerts with their decisions.
    pub async fn post_alerts(&mut self, alerts: &[Value]) -> Result<(), LapiError> {
        self.authorized(Method::POST, "/v1/alerts", "the alerts", |r| r.json(alerts))
            .await
            .map(drop)
    }

    /// `DELETE /v1/decisions?ip=` (or `range=`): lifts every decision on it.
    pub async fn delete_decisions(&mut self, cidr: &Cidr) -> Result<(), LapiError> {
        let (key, value) = if cidr.is_host() {
            ("ip", cidr.addr().to_string())
        } else {
            ("range", cidr.to_string())
        };
        self.authorized(
            Method::DELETE,
            "/v1/decisions",
            "the decision delete",
            |r| r.query(&[(key, value.as_str())]),
        )
        .await
        .map(drop)
    }

    /// `GET /v1/alerts` of the last `since` from `origin`, with their active
    /// decisions: who made each decision.
    pub async fn recent_alerts(&mut self, since: Duration) -> Result<Vec<Value>, LapiError> {
        let since = format!("{}s", since.as_secs().max(1));
        let body = self
            .authorized(Method::GET, "/v1/alerts", "the alert lookup", |r| {
                r.query(&[
                    ("since", since.as_str()),
                    ("origin", super::ORIGIN),
                    ("has_active_decision", "true"),
                    ("limit", "1000"),
                ])
            })
            .await?;
        Ok(serde_json::from_str::<Option<Vec<Value>>>(&body)
            .ok()
            .flatten()
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_agent_has_one_slash() {
        assert_eq!(USER_AGENT.matches('/').count(), 1);
    }

    #[test]
    fn messages_are_one_line() {
        assert_eq!(
            message(r#"{"message":"while parsing\n duration: 1d"}"#),
            "while parsing duration: 1d"
        );
        assert_eq!(message("plain\ntext "), "plain text");
        assert_eq!(message(""), "(no message)");
    }

    #[test]
    fn an_empty_stream_reads_as_nothing_new() {
        let s: Stream = serde_json::from_str(r#"{"new":null,"deleted":null}"#).unwrap();
        assert!(s.new.is_empty() && s.deleted.is_empty());
        let s: Stream = serde_json::from_str(
            r#"{"new":[{"duration":"59m58.9s","id":3,"origin":"spamdelay","scenario":"spamdelay/early-talk","scope":"Ip","type":"ban","value":"198.51.100.10"}],"deleted":[]}"#,
        )
        .unwrap();
        assert_eq!(s.new[0].value, "198.51.100.10");
        assert_eq!(s.new[0].kind, "ban");
    }
}
