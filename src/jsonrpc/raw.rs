//! JSON-RPC messages read as the bytes they came in, for the hot path.
//!
//! Most messages the broker relays need nothing but their `id` swapped: a
//! server's response goes back to its caller with the caller's id in place
//! of the process-side one. Parsing such a line into a [`Value`] tree,
//! editing one field and writing the tree out again cost about a dozen
//! allocations and two passes over every byte; here the line is scanned
//! once, without allocating, and the new id is spliced into a copy.
//!
//! Invariants: a line is only taken this way when the scan proves it is one
//! well-formed JSON object (valid UTF-8, no duplicate or escaped member names
//! among those read, `"jsonrpc":"2.0"` written plainly) of the shape asked
//! for; anything else returns `None` and goes the parsed way, which decides
//! exactly as before. So the fast path never accepts what
//! [`super::classify`] would refuse, and never guesses.

use bytes::Bytes;
use memchr::memmem::Finder;
use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;
use std::fmt;
use std::ops::Range;
use std::sync::LazyLock;

/// The substrings the hot path looks for, each searcher built once: building
/// one costs about as much as searching a short message with it, and every
/// request and response was building two to four.
struct Needles {
    progress_token: Finder<'static>,
    request_state: Finder<'static>,
    escape: Finder<'static>,
    input_required: Finder<'static>,
    protocol_version: Finder<'static>,
}

static NEEDLES: LazyLock<Needles> = LazyLock::new(|| Needles {
    progress_token: Finder::new(b"progressToken"),
    request_state: Finder::new(b"requestState"),
    escape: Finder::new(b"\\u"),
    input_required: Finder::new(b"input_required"),
    protocol_version: Finder::new(b"protocolVersion"),
});

/// Whether `text` contains `protocolVersion` anywhere (a 2026-07-28
/// client's request names it in `_meta`).
pub fn mentions_protocol_version(text: &[u8]) -> bool {
    NEEDLES.protocol_version.find(text).is_some()
}

/// The members of a message the broker routes by, each as its raw text.
#[derive(Default)]
struct Members<'a> {
    jsonrpc: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
    method: Option<&'a RawValue>,
    result: Option<&'a RawValue>,
    error: Option<&'a RawValue>,
    params: Option<&'a RawValue>,
}

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(MembersVisitor)
    }
}

struct MembersVisitor;

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Members<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON-RPC object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut m = Members::default();
        // `&str` keys: a name written with escapes fails here, and the
        // message goes the parsed way.
        while let Some(key) = map.next_key::<&'de str>()? {
            let value: &'de RawValue = map.next_value()?;
            let slot = match key {
                "jsonrpc" => &mut m.jsonrpc,
                "id" => &mut m.id,
                "method" => &mut m.method,
                "result" => &mut m.result,
                "error" => &mut m.error,
                "params" => &mut m.params,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(A::Error::custom("duplicate member"));
            }
        }
        Ok(m)
    }
}

fn members(text: &str) -> Option<Members<'_>> {
    let m: Members = serde_json::from_str(text).ok()?;
    (m.jsonrpc.map(RawValue::get) == Some("\"2.0\"")).then_some(m)
}

/// Where `part` (a slice of `whole`) starts and ends in `whole`.
fn span(whole: &str, part: &str) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

/// A response, read without parsing it into a tree.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerHead {
    /// Where its id's text sits in the line.
    pub id_at: Range<usize>,
    /// It carries `error` (not `result`).
    pub is_error: bool,
}

/// The head of `line` if it is a response (to any id); `None` for
/// anything else, which the caller parses.
pub fn answer_head(line: &[u8]) -> Option<AnswerHead> {
    let text = std::str::from_utf8(line).ok()?;
    let m = members(text)?;
    if m.method.is_some() || (m.result.is_none() && m.error.is_none()) {
        return None;
    }
    let id = m.id?.get();
    // The same rule as `classify` (`-0` and `1.0` are not integer ids, a
    // `null` id only answers with an error): a small parse of the id alone.
    if !super::id_allowed(&serde_json::from_str(id).ok()?, m.error.is_some()) {
        return None;
    }
    Some(AnswerHead {
        id_at: span(text, id),
        is_error: m.error.is_some(),
    })
}

/// A response from a process, read without parsing it into a tree.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseHead {
    /// The process-side id it answers.
    pub id: u64,
    /// Where that id's text sits in the line.
    pub id_at: Range<usize>,
    /// It carries `error` (not `result`).
    pub is_error: bool,
}

/// The head of `line` if it is a response to a process-side (unsigned
/// integer) id; `None` for anything else, which the caller parses.
pub fn response_head(line: &[u8]) -> Option<ResponseHead> {
    let AnswerHead { id_at, is_error } = answer_head(line)?;
    let id = &line[id_at.clone()];
    // Digits only: `1.0`, `-1` and `1e3` are not ids this broker handed out.
    if !id.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(ResponseHead {
        id: std::str::from_utf8(id).ok()?.parse().ok()?,
        id_at,
        is_error,
    })
}

/// False when a response's line cannot hold an `input_required` result
/// (an `InputRequiredResult`, which the broker seals and the proxy may
/// relay as questions), so it need not be parsed. Any `\\u` escape counts
/// as possible: the value could be spelt with them.
pub fn may_require_input(line: &[u8]) -> bool {
    let n = &*NEEDLES;
    n.input_required.find(line).is_some() || n.escape.find(line).is_some()
}

/// A client request kept as the text it came in, for a process: the
/// common case of a request whose only edit on the way is its id.
#[derive(Debug, Clone)]
pub struct RawRequest {
    text: Bytes,
    id_at: Range<usize>,
    /// The caller's id.
    pub id: Value,
}

impl RawRequest {
    /// `text` as a request whose id is the only thing the broker changes,
    /// and its method; or `None` (parse it). Refused here, so parsed: anything
    /// [`super::classify`] would not call a request, a progress token or a
    /// `requestState` to rewrite, any `\u` escape (which could spell
    /// either of those names), and a line break (a pretty-printed body: the
    /// process reads one message per line).
    pub fn parse(text: Bytes) -> Option<(RawRequest, String)> {
        if memchr::memchr2(b'\n', b'\r', &text).is_some() {
            return None;
        }
        let s = std::str::from_utf8(&text).ok()?;
        let m = members(s)?;
        let method = m.method?.get();
        // A plain string: no escapes to undo.
        let method = method.strip_prefix('"')?.strip_suffix('"')?;
        if method.contains(['\\', '"']) {
            return None;
        }
        let raw_id = m.id?.get();
        let id: Value = serde_json::from_str(raw_id).ok()?;
        if !super::id_allowed(&id, false) {
            return None;
        }
        let (n, b) = (&*NEEDLES, s.as_bytes());
        if [&n.progress_token, &n.request_state, &n.escape]
            .iter()
            .any(|f| f.find(b).is_some())
        {
            return None;
        }
        let id_at = span(s, raw_id);
        let method = method.to_string();
        Some((RawRequest { text, id_at, id }, method))
    }

    /// Its text as one line for the process, with `id` in place of the
    /// caller's.
    pub fn line_with_id(&self, id: &Value) -> Vec<u8> {
        with_id(&self.text, self.id_at.clone(), id)
    }

    /// The request parsed, for the rare paths that edit more than its id.
    /// Fails only where a tree cannot hold what the scan accepted: a number
    /// beyond a float's range (`1e400`).
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_slice(&self.text)
    }

    /// Its text, as it came in.
    pub fn text(&self) -> &[u8] {
        &self.text
    }
}

/// `line` with the text at `at` replaced by `id`, as one NDJSON line
/// (ending in `\n`).
pub fn with_id(line: &[u8], at: Range<usize>, id: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len() + 24);
    out.extend_from_slice(&line[..at.start]);
    serde_json::to_writer(&mut out, id).expect("Value serializes");
    out.extend_from_slice(&line[at.end..]);
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn head(s: &str) -> Option<ResponseHead> {
        response_head(s.as_bytes())
    }

    #[test]
    fn reads_responses_and_splices_the_callers_id() {
        let line =
            r#"{"jsonrpc":"2.0", "id" : 17 ,"result":{"content":[{"type":"text","text":"id"}]}}"#;
        let h = head(line).expect("a response");
        assert_eq!((h.id, h.is_error), (17, false));
        assert_eq!(&line[h.id_at.clone()], "17");
        for client in [json!("abc\"q"), json!(-3), json!(null)] {
            let out = with_id(line.as_bytes(), h.id_at.clone(), &client);
            assert_eq!(out.last(), Some(&b'\n'));
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["id"], client);
            assert_eq!(v["result"]["content"][0]["text"], "id");
        }
        let e = head(r#"{"id":2,"error":{"code":-1,"message":"m"},"jsonrpc":"2.0"}"#).unwrap();
        assert_eq!((e.id, e.is_error), (2, true));
        let null_result = head(r#"{"jsonrpc":"2.0","id":3,"result":null}"#).unwrap();
        assert_eq!(null_result.id, 3, "a null result is still a result");
    }

    fn request(s: &str) -> Option<(RawRequest, String)> {
        RawRequest::parse(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn plain_requests_keep_their_text_and_swap_the_id() {
        let text = r#"{"jsonrpc":"2.0","id":"a-1","method":"tools/call","params":{"name":"echo","arguments":{"text":"héllo"}}}"#;
        let (r, method) = request(text).expect("a plain request");
        assert_eq!(
            (r.id.clone(), method.as_str()),
            (json!("a-1"), "tools/call")
        );
        let line = r.line_with_id(&json!(41));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["id"], 41);
        assert_eq!(v["params"]["arguments"]["text"], "héllo");
        assert_eq!(
            r.to_value().unwrap(),
            serde_json::from_str::<Value>(text).unwrap()
        );
        let (huge, _) = request(r#"{"jsonrpc":"2.0","id":1,"method":"m","params":{"x":1e400}}"#)
            .expect("plain: the scan checks syntax, not range");
        assert!(huge.to_value().is_err(), "an error, not a panic");
        let (ping, method) = request(r#"{"method":"ping","id":-5,"jsonrpc":"2.0"}"#).unwrap();
        assert_eq!((ping.id, method.as_str()), (json!(-5), "ping"));
    }

    #[test]
    fn requests_needing_more_than_an_id_are_parsed() {
        for text in [
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            r#"{"jsonrpc":"2.0","id":1.5,"method":"m"}"#,
            r#"{"jsonrpc":"2.0","id":null,"method":"m"}"#,
            r#"{"jsonrpc":"2.0","id":{},"method":"m"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":7}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"a\"b"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"m","params":{"_meta":{"progressToken":1}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"m","params":{"requestState":"s"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"m","params":{"_meta":{"progress\u0054oken":1}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"m","params":{},"params":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"m""#,
            "{\"jsonrpc\":\"2.0\",\n\"id\":1,\"method\":\"m\"}",
            "{\"jsonrpc\":\"2.0\",\r\"id\":1,\"method\":\"m\"}",
        ] {
            assert!(request(text).is_none(), "{text}");
        }
    }

    #[test]
    fn answers_to_any_id_and_what_may_ask_for_input() {
        let line = br#"{"jsonrpc":"2.0","id":"c-9","result":{"resultType":"complete"}}"#;
        let h = answer_head(line).expect("an answer");
        assert_eq!(
            (&line[h.id_at.clone()], h.is_error),
            (&br#""c-9""#[..], false)
        );
        assert_eq!(response_head(line), None, "not a process-side id");
        // Ids as `classify` takes them.
        for (text, ok) in [
            (&br#"{"jsonrpc":"2.0","id":null,"result":null}"#[..], false),
            (br#"{"jsonrpc":"2.0","id":-0,"result":1}"#, false),
            (br#"{"jsonrpc":"2.0","id":1.0,"result":1}"#, false),
            (br#"{"jsonrpc":"2.0","id":[1],"result":1}"#, false),
            (br#"{"jsonrpc":"2.0","id":-7,"result":1}"#, true),
            (
                br#"{"jsonrpc":"2.0","id":null,"error":{"code":1,"message":"m"}}"#,
                true,
            ),
        ] {
            assert_eq!(
                answer_head(text).is_some(),
                ok,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
        assert!(!may_require_input(line));
        assert!(may_require_input(
            br#"{"result":{"resultType":"input_required"}}"#
        ));
        assert!(may_require_input(
            br#"{"result":{"resultType":"input\u005frequired"}}"#
        ));
    }

    #[test]
    fn anything_unusual_goes_the_parsed_way() {
        for line in [
            r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{}}"#,
            r#"{"jsonrpc":"2.0","id":1}"#,
            r#"{"jsonrpc":"2.0","id":"1","result":{}}"#,
            r#"{"jsonrpc":"2.0","id":-1,"result":{}}"#,
            r#"{"jsonrpc":"2.0","id":1.0,"result":{}}"#,
            r#"{"jsonrpc":"2.0","id":99999999999999999999,"result":{}}"#,
            r#"{"jsonrpc":"1.0","id":1,"result":{}}"#,
            r#"{"id":1,"result":{}}"#,
            r#"{"jsonrpc":"2\u002e0","id":1,"result":{}}"#,
            r#"{"jsonrpc":"2.0","i\u0064":1,"result":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"id":2,"result":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{}} x"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{]}"#,
            r#"{"jsonrpc":"2.0","id":null,"result":null}"#,
            r#"[{"jsonrpc":"2.0","id":1,"result":{}}]"#,
        ] {
            assert_eq!(head(line), None, "{line}");
        }
        assert_eq!(
            response_head(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":\"\xff\"}"),
            None
        );
    }
}
