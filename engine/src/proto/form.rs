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
    /// [`Form::SseJson`] with an `id:` line holding the message's position
    /// (one-channel streams).
    SseJsonId = 4,
    /// [`Form::SseRaw`] with an `id:` line.
    SseRawId = 5,
    /// [`Form::WsJson`] compressed (permessage-deflate), or the plain frame
    /// when it is too small to gain.
    WsJsonDeflate = 6,
    /// [`Form::WsRaw`] compressed, or plain when too small to gain.
    WsRawDeflate = 7,
}

impl Form {
    /// Every form, in index order.
    pub const ALL: [Form; 8] =
        [Form::WsJson, Form::WsRaw, Form::SseJson, Form::SseRaw, Form::SseJsonId, Form::SseRawId, Form::WsJsonDeflate, Form::WsRawDeflate];

    /// The compressed counterpart (WebSocket forms only).
    pub fn deflated(self) -> Form {
        match self {
            Form::WsJson => Form::WsJsonDeflate,
            Form::WsRaw => Form::WsRawDeflate,
            other => other,
        }
    }

    /// The plain form a compressed one is made from.
    pub fn plain(self) -> Form {
        match self {
            Form::WsJsonDeflate => Form::WsJson,
            Form::WsRawDeflate => Form::WsRaw,
            other => other,
        }
    }

    /// A permessage-deflate form.
    pub fn is_deflate(self) -> bool {
        matches!(self, Form::WsJsonDeflate | Form::WsRawDeflate)
    }

    /// The same form with the event's `id:` line (SSE forms only).
    pub fn with_id(self) -> Form {
        match self {
            Form::SseJson => Form::SseJsonId,
            Form::SseRaw => Form::SseRawId,
            other => other,
        }
    }

    /// The form's name in metrics labels.
    pub fn label(self) -> &'static str {
        match self {
            Form::WsJson => "ws_json",
            Form::WsRaw => "ws_raw",
            Form::SseJson => "sse_json",
            Form::SseRaw => "sse_raw",
            Form::SseJsonId => "sse_json_id",
            Form::SseRawId => "sse_raw_id",
            Form::WsJsonDeflate => "ws_json_deflate",
            Form::WsRawDeflate => "ws_raw_deflate",
        }
    }
}
