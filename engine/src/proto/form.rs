//! The wire forms a message is encoded into.

/// One wire form of a published message: the complete WebSocket frame or
/// SSE event, in the v1 envelope (`Json`) or as the payload alone (`Raw`).
/// A message is encoded into each form at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// WebSocket text frame carrying the v1 envelope.
    WsJson = 0,
    /// WebSocket frame carrying the payload alone.
    WsRaw = 1,
    /// SSE event whose data is the v1 envelope.
    SseJson = 2,
    /// SSE event whose data is the payload alone.
    SseRaw = 3,
}

impl Form {
    /// Every form, in index order.
    pub const ALL: [Form; 4] = [Form::WsJson, Form::WsRaw, Form::SseJson, Form::SseRaw];

    /// The form's name in metrics labels.
    pub fn label(self) -> &'static str {
        match self {
            Form::WsJson => "ws_json",
            Form::WsRaw => "ws_raw",
            Form::SseJson => "sse_json",
            Form::SseRaw => "sse_raw",
        }
    }
}
