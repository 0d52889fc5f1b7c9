//! The client side of Server-Sent Events, as `orchestrix events --follow`
//! reads `GET /v1/events/stream` (the server side is axum's `Sse`).
//! Follows the WHATWG event-stream rules that matter here: `data` lines
//! joined by newlines, `id`, `event`, comments, and CRLF or LF line ends.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseMessage {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Incremental parser: feed it chunks as they arrive, get whole events back.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Vec<String>,
    id: Option<String>,
    event: Option<String>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take the next chunk of the stream (chunks may split lines, even
    /// inside a UTF-8 character); returns the events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseMessage> {
        let mut messages = Vec::new();
        for &byte in chunk {
            if byte != b'\n' {
                self.line.push(byte);
                continue;
            }
            let bytes = std::mem::take(&mut self.line);
            let line = String::from_utf8_lossy(&bytes);
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                if !self.data.is_empty() {
                    messages.push(SseMessage {
                        id: self.id.take(),
                        event: self.event.take(),
                        data: std::mem::take(&mut self.data).join("\n"),
                    });
                }
                self.id = None;
                self.event = None;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "data" => self.data.push(value.to_owned()),
                "id" => self.id = Some(value.to_owned()),
                "event" => self.event = Some(value.to_owned()),
                _ => {}
            }
        }
        messages
    }
}

#[cfg(test)]
mod tests {
    use super::{SseMessage, SseParser};

    #[test]
    fn events_split_across_chunks_are_reassembled() {
        let mut parser = SseParser::new();
        let text = ": keep-alive\n\nid: 7\ndata: {\"a\":\"é\"}\r\ndata: x\n\nevent: error\ndata: gone\n\n".as_bytes();
        let split = text.iter().position(|b| *b == 0xC3).expect("é") + 1; // inside the `é`
        assert!(parser.feed(&text[..split]).is_empty());
        let messages = parser.feed(&text[split..]);
        assert_eq!(
            messages,
            [
                SseMessage { id: Some("7".into()), event: None, data: "{\"a\":\"é\"}\nx".into() },
                SseMessage { id: None, event: Some("error".into()), data: "gone".into() },
            ]
        );
    }
}
