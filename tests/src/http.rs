//! Plain HTTP/1.1 requests made from inside a lab namespace (one connection
//! each, `Connection: close`): enough for Prometheus's API, the daemon's
//! `/metrics` and CrowdSec's LAPI, with no client library.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::lab::Netns;

/// An answer: its status, its headers (names in lower case) and its body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The body as JSON (`Value::Null` when empty).
    pub fn json(&self) -> Result<serde_json::Value> {
        if self.body.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&self.body).with_context(|| {
            format!(
                "HTTP {} with a body that is no JSON: {:?}",
                self.status, self.body
            )
        })
    }

    /// The first header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `METHOD path` on `addr` from inside `ns`, with extra `headers` and a
/// `body` (sent with its Content-Length; a JSON body should come with a
/// `Content-Type` header). Only a failure to connect, send or read is an
/// error: any status is an answer.
pub fn request(
    ns: &Netns,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<Response> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut raw_request = head.into_bytes();
    raw_request.extend_from_slice(body.unwrap_or("").as_bytes());
    let what = format!("{method} {path}");
    ns.run(move || -> Result<Response> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&raw_request)
            .with_context(|| format!("sending {what}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .with_context(|| format!("reading the answer to {what}"))?;
        parse_response(&raw)
    })?
}

/// `GET path` on `addr` from inside `ns`: the status and the body.
pub fn get(ns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let r = request(ns, addr, "GET", path, &[], None)?;
    Ok((r.status, r.body))
}

/// Status, headers and body of an HTTP/1.1 response (plain or chunked).
pub fn parse_response(raw: &[u8]) -> Result<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            Some((n.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if !chunked {
        return Ok(Response {
            status,
            headers,
            body: body.to_string(),
        });
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").context("a chunk size")?;
        let size = usize::from_str_radix(size.trim(), 16).context("a hex chunk size")?;
        if size == 0 {
            return Ok(Response {
                status,
                headers,
                body: out,
            });
        }
        out.push_str(after.get(..size).context("a whole chunk")?);
        rest = after.get(size + 2..).context("a chunk's CRLF")?;
    }
}

/// `s` percent-encoded for a URL's query.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        let raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let r = parse_response(raw).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "abcde"));
    }

    #[test]
    fn headers_are_kept_in_lower_case() {
        let raw = b"HTTP/1.1 401 Unauthorized\r\nWww-Authenticate: JWT realm=Crowdsec API local\r\nContent-Length: 2\r\n\r\n{}";
        let r = parse_response(raw).unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(
            r.header("WWW-Authenticate"),
            Some("JWT realm=Crowdsec API local")
        );
        assert_eq!(r.json().unwrap(), serde_json::json!({}));
    }
}
