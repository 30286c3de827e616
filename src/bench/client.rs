//! The bench's MCP client: one Streamable HTTP session over its own
//! HTTP/1.1 connection ([`HttpSession`]), request templates with a
//! per-request token, and the check every answer goes through.
//!
//! Every call ends in exactly one [`Outcome`], and every wait is bounded by
//! the caller's timeout. An answer counts as `Ok` only if it carries the
//! request's id and, when the request carried a token, echoes that token:
//! an answer meant for another request is `Crossed`, never `Ok`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

/// Protocol version the bench's clients speak.
pub const PROTOCOL_VERSION: &str = "2025-06-18";
/// Placeholder in tool arguments replaced by a unique token per request.
pub const TOKEN: &str = "{seq}";

/// How one call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The right answer.
    Ok,
    /// A JSON-RPC error or a tool result with `isError`.
    RpcError,
    /// An answer with the wrong id or the wrong echo.
    Crossed,
    /// HTTP, pipe or parse failure, or an unexpected HTTP status.
    Transport,
    /// No answer within the timeout.
    Timeout,
}

/// A `tools/call` request with a per-request token spliced into its arguments.
#[derive(Debug, Clone)]
pub struct Template {
    head: String,
    pieces: Vec<String>,
}

impl Template {
    /// `args` is a JSON object; every `{seq}` in it becomes the request's token.
    pub fn new(tool: &str, args: &str) -> anyhow::Result<Self> {
        let probe: Value = serde_json::from_str(&args.replace(TOKEN, "x"))
            .map_err(|e| anyhow::anyhow!("--args is not JSON: {e}"))?;
        anyhow::ensure!(probe.is_object(), "--args must be a JSON object");
        let head = format!(
            r#","method":"tools/call","params":{{"name":{},"arguments":"#,
            Value::from(tool)
        );
        Ok(Self {
            head,
            pieces: args.split(TOKEN).map(str::to_string).collect(),
        })
    }

    /// True when answers can be checked against a token.
    pub fn has_token(&self) -> bool {
        self.pieces.len() > 1
    }

    /// The request body for `id`, with `token` spliced in.
    pub fn body(&self, id: u64, token: &str) -> Bytes {
        let mut s = String::with_capacity(128);
        s.push_str(r#"{"jsonrpc":"2.0","id":"#);
        s.push_str(&id.to_string());
        s.push_str(&self.head);
        s.push_str(&self.pieces.join(token));
        s.push_str("}}");
        Bytes::from(s)
    }
}

/// The token for request `seq`: delimited so no token contains another.
pub fn token(seq: u64) -> String {
    format!("q{seq}q")
}

/// Judges one answer.
pub fn check(msg: &Value, id: u64, token: Option<&str>) -> Outcome {
    if msg.get("id").and_then(Value::as_u64) != Some(id) {
        return Outcome::Crossed;
    }
    if msg.get("error").is_some() {
        return Outcome::RpcError;
    }
    let Some(result) = msg.get("result") else {
        return Outcome::Transport;
    };
    if result.get("isError").and_then(Value::as_bool) == Some(true) {
        return Outcome::RpcError;
    }
    let Some(t) = token else {
        return Outcome::Ok;
    };
    let echoed = result
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("text").and_then(Value::as_str))
        .any(|text| text.contains(t));
    if echoed {
        Outcome::Ok
    } else {
        Outcome::Crossed
    }
}

/// The JSON-RPC response with id `id` in an HTTP body (JSON or SSE).
fn find_response(content_type: &str, body: &[u8], id: u64) -> Option<Value> {
    if content_type.starts_with("text/event-stream") {
        let text = std::str::from_utf8(body).ok()?;
        let mut last = None;
        for event in text.split("\n\n") {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            if data.is_empty() {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&data.join("\n")) else {
                continue;
            };
            let is_response = v.get("result").is_some() || v.get("error").is_some();
            if is_response && v.get("id").and_then(Value::as_u64) == Some(id) {
                return Some(v);
            }
            if is_response {
                last = Some(v);
            }
        }
        last
    } else {
        serde_json::from_slice(body).ok()
    }
}

/// One MCP session over its own HTTP/1.1 keep-alive connection.
pub struct HttpSession {
    addr: SocketAddr,
    path: String,
    sender: Option<SendRequest<Full<Bytes>>>,
    session: Option<String>,
    timeout: Duration,
}

impl HttpSession {
    /// Connects and runs the `initialize` handshake.
    pub async fn open(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<Self> {
        let mut s = Self {
            addr,
            path: path.to_string(),
            sender: None,
            session: None,
            timeout,
        };
        let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
            "clientInfo": {"name":"mcp-broker-bench","version":env!("CARGO_PKG_VERSION")}}});
        let (status, headers, body) = s
            .post(Bytes::from(init.to_string()))
            .await
            .map_err(|e| anyhow::anyhow!("initialize: {e}"))?;
        anyhow::ensure!(
            status.is_success(),
            "initialize answered HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
        s.session = headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
        s.post(Bytes::from_static(note.as_bytes()))
            .await
            .map_err(|e| anyhow::anyhow!("notifications/initialized: {e}"))?;
        Ok(s)
    }

    async fn connect(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, String> {
        if self.sender.as_ref().is_some_and(|s| !s.is_closed()) {
            return self.sender.as_mut().ok_or_else(String::new);
        }
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(self.sender.insert(sender))
    }

    async fn exchange(
        &mut self,
        method: http::Method,
        body: Bytes,
    ) -> Result<(http::StatusCode, http::HeaderMap, Bytes), String> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(&self.path)
            .header(http::header::HOST, self.addr.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json, text/event-stream")
            .header("mcp-protocol-version", PROTOCOL_VERSION);
        if let Some(s) = &self.session {
            req = req.header("mcp-session-id", s);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let sender = self.connect().await?;
        sender.ready().await.map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }

    async fn post(
        &mut self,
        body: Bytes,
    ) -> Result<(http::StatusCode, http::HeaderMap, Bytes), String> {
        match tokio::time::timeout(self.timeout, self.exchange(http::Method::POST, body)).await {
            Ok(r) => r,
            Err(_) => {
                self.sender = None;
                Err("timeout".into())
            }
        }
    }

    /// One request; `body` must carry id `id`.
    pub async fn call(&mut self, id: u64, body: Bytes, token: Option<&str>) -> Outcome {
        match self.post(body).await {
            Ok((status, headers, bytes)) => {
                let ct = headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                match find_response(ct, &bytes, id) {
                    Some(v) => check(&v, id, token),
                    None if status.is_success() => Outcome::Transport,
                    None => Outcome::RpcError,
                }
            }
            Err(e) if e == "timeout" => Outcome::Timeout,
            Err(_) => {
                self.sender = None;
                Outcome::Transport
            }
        }
    }

    /// Ends the session (`DELETE`), best effort.
    pub async fn close(mut self) {
        if self.session.is_some() {
            let _ = tokio::time::timeout(
                self.timeout.min(Duration::from_secs(5)),
                self.exchange(http::Method::DELETE, Bytes::new()),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_and_check() {
        let t = Template::new("echo", r#"{"text":"{seq}"}"#).unwrap();
        assert!(t.has_token());
        let b = t.body(7, &token(7));
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["params"]["arguments"]["text"], "q7q");
        let ok = json!({"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"Echo: q7q"}]}});
        assert_eq!(check(&ok, 7, Some("q7q")), Outcome::Ok);
        assert_eq!(check(&ok, 8, Some("q7q")), Outcome::Crossed);
        assert_eq!(check(&ok, 7, Some("q77q")), Outcome::Crossed);
        let err = json!({"jsonrpc":"2.0","id":7,"error":{"code":1,"message":"x"}});
        assert_eq!(check(&err, 7, None), Outcome::RpcError);
        assert!(Template::new("echo", "[1]").is_err());
        assert!(Template::new("echo", "{").is_err());
    }

    #[test]
    fn sse_bodies() {
        let body = b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"n\"}\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{}}\n\n";
        let v = find_response("text/event-stream", body, 3).unwrap();
        assert_eq!(v["id"], 3);
        assert!(find_response("application/json", b"nope", 3).is_none());
    }
}
