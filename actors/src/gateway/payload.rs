//! Typed gateway payloads and the frame envelope `{"op", "d", "s", "t"}` around them.
//!
//! [`ServerPayload`] is what a bot receives and [`ClientPayload`] what it sends; both encode and
//! decode, because the simulator speaks the other side. Dispatch data stays a raw JSON value
//! ([`RawValue`]) until someone needs its fields: the product forwards most events unchanged.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::opcode::OpCode;
use super::snowflake::Snowflake;
use super::token::Token;

/// The envelope of every gateway payload, borrowing from the received text.
#[derive(Debug, Deserialize)]
pub struct Frame<'a> {
    /// The opcode, kept as a number so that an unknown one is reported, not a parse error.
    pub op: u8,
    /// The data; `None` for an absent field and for `null`.
    #[serde(borrow, default)]
    pub d: Option<&'a RawValue>,
    /// The sequence number, for dispatches only.
    #[serde(default)]
    pub s: Option<u64>,
    /// The event name, for dispatches only.
    #[serde(default)]
    pub t: Option<&'a str>,
}

/// Failure to decode a gateway payload.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The text is not JSON of the frame's shape.
    #[error("invalid gateway payload: {0}")]
    Json(#[from] serde_json::Error),
    /// The text is not UTF-8.
    #[error("gateway payload is not valid UTF-8")]
    Utf8(#[from] std::str::Utf8Error),
    /// The opcode is not one Discord defines.
    #[error("unknown gateway opcode {0}")]
    UnknownOpcode(u8),
    /// The opcode is valid but not in this direction.
    #[error("opcode {op:?} is not sent by the {side}")]
    WrongDirection { op: OpCode, side: &'static str },
    /// A field the opcode requires is missing.
    #[error("opcode {op:?} payload lacks field `{field}`")]
    MissingField { op: OpCode, field: &'static str },
    /// The data of an opcode has the wrong shape.
    #[error("invalid data for opcode {op:?}: {source}")]
    Data {
        op: OpCode,
        #[source]
        source: serde_json::Error,
    },
}

/// Data of op 10 HELLO.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Milliseconds between heartbeats.
    pub heartbeat_interval: u64,
}

/// A dispatch (op 0): an event with its sequence number, name and raw data.
#[derive(Clone, Debug)]
pub struct Dispatch {
    pub seq: u64,
    pub event: String,
    pub data: Box<RawValue>,
}

/// A payload the gateway sends to a bot.
#[derive(Clone, Debug)]
pub enum ServerPayload {
    Dispatch(Dispatch),
    /// Op 1: the gateway asks for a heartbeat now.
    Heartbeat,
    /// Op 7: reconnect and resume.
    Reconnect,
    /// Op 9: the session is invalid. `resumable` is the `d` field: resume if `true`, identify anew
    /// if `false`.
    InvalidSession {
        resumable: bool,
    },
    Hello(Hello),
    /// Op 11.
    HeartbeatAck,
}

impl ServerPayload {
    /// Decodes one payload received from the gateway.
    ///
    /// # Errors
    ///
    /// Returns an error for text that is not a gateway frame, an unknown opcode, a client-only
    /// opcode or data of the wrong shape.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let text = std::str::from_utf8(bytes)?;
        let frame: Frame<'_> = serde_json::from_str(text)?;
        let op = OpCode::from_code(frame.op).ok_or(DecodeError::UnknownOpcode(frame.op))?;
        let missing = |field| DecodeError::MissingField { op, field };
        Ok(match op {
            // A dispatch may carry `"d": null` (RESUMED does on some gateways); it stays JSON null.
            OpCode::Dispatch => Self::Dispatch(Dispatch {
                seq: frame.s.ok_or_else(|| missing("s"))?,
                event: frame.t.ok_or_else(|| missing("t"))?.to_owned(),
                data: frame.d.unwrap_or(null()).to_owned(),
            }),
            OpCode::Heartbeat => Self::Heartbeat,
            OpCode::Reconnect => Self::Reconnect,
            OpCode::InvalidSession => Self::InvalidSession {
                resumable: parse_data(op, frame.d)?.unwrap_or(false),
            },
            OpCode::Hello => Self::Hello(parse_data(op, frame.d)?.ok_or_else(|| missing("d"))?),
            OpCode::HeartbeatAck => Self::HeartbeatAck,
            _ => {
                return Err(DecodeError::WrongDirection {
                    op,
                    side: "gateway",
                })
            }
        })
    }

    /// Encodes the payload as gateway JSON text.
    pub fn encode(&self) -> String {
        match self {
            Self::Dispatch(dispatch) => {
                encode_dispatch(dispatch.seq, &dispatch.event, &dispatch.data)
            }
            Self::Heartbeat => r#"{"op":1,"d":null}"#.to_owned(),
            Self::Reconnect => r#"{"op":7,"d":null}"#.to_owned(),
            Self::InvalidSession { resumable } => format!(r#"{{"op":9,"d":{resumable}}}"#),
            Self::Hello(hello) => format!(
                r#"{{"op":10,"d":{{"heartbeat_interval":{}}}}}"#,
                hello.heartbeat_interval
            ),
            Self::HeartbeatAck => r#"{"op":11,"d":null}"#.to_owned(),
        }
    }
}

/// Encodes a dispatch frame around already-serialized data, without parsing it again.
pub fn encode_dispatch(seq: u64, event: &str, data: &RawValue) -> String {
    let event = serde_json::to_string(event).expect("a string always serializes");
    format!(r#"{{"op":0,"s":{seq},"t":{event},"d":{}}}"#, data.get())
}

/// The `properties` object of IDENTIFY.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentifyProperties {
    pub os: String,
    pub browser: String,
    pub device: String,
}

impl Default for IdentifyProperties {
    fn default() -> Self {
        Self {
            os: std::env::consts::OS.to_owned(),
            browser: "shardvisor".to_owned(),
            device: "shardvisor".to_owned(),
        }
    }
}

/// Data of op 2 IDENTIFY.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identify {
    pub token: Token,
    pub properties: IdentifyProperties,
    /// Payload compression; shardvisor uses transport compression instead and leaves it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<bool>,
    /// Member count above which a guild's GUILD_CREATE omits offline members (50 to 250).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub large_threshold: Option<u32>,
    /// `[shard_id, shard_count]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<[u32; 2]>,
    /// Initial presence, forwarded as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<Box<RawValue>>,
    pub intents: u64,
}

/// Data of op 6 RESUME.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Resume {
    pub token: Token,
    pub session_id: String,
    /// The last sequence number the client received.
    pub seq: u64,
}

/// Data of op 8 REQUEST_GUILD_MEMBERS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestGuildMembers {
    pub guild_id: Snowflake,
    /// Username prefix; `""` with `limit` 0 requests every member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(default)]
    pub limit: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presences: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_ids: Option<Vec<Snowflake>>,
    /// Echoed in the chunks; at most 32 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

impl RequestGuildMembers {
    /// Largest nonce Discord accepts, in bytes; a longer one is dropped from the chunks.
    pub const MAX_NONCE_BYTES: usize = 32;

    /// Builds a request for every member of a guild.
    pub fn all_members(guild_id: Snowflake, nonce: Option<String>) -> Self {
        Self {
            guild_id,
            query: Some(String::new()),
            limit: 0,
            presences: None,
            user_ids: None,
            nonce,
        }
    }

    /// Returns `true` for an all-members request (`query` "" and `limit` 0, no user ids), the
    /// kind Discord limits to one per guild per 30 seconds.
    pub fn is_all_members(&self) -> bool {
        self.user_ids.is_none() && self.limit == 0 && self.query.as_deref().unwrap_or("").is_empty()
    }
}

/// A payload a bot sends to the gateway.
#[derive(Clone, Debug)]
pub enum ClientPayload {
    /// Op 1 with the last sequence received, or `None` before the first dispatch.
    Heartbeat {
        seq: Option<u64>,
    },
    Identify(Identify),
    Resume(Resume),
    RequestGuildMembers(RequestGuildMembers),
    /// Op 3, forwarded as given.
    PresenceUpdate(Box<RawValue>),
    /// Op 4, forwarded as given.
    VoiceStateUpdate(Box<RawValue>),
    /// Op 31, forwarded as given.
    RequestSoundboardSounds(Box<RawValue>),
}

#[derive(Serialize)]
struct OutFrame<'a, T: Serialize> {
    op: u8,
    d: &'a T,
}

impl ClientPayload {
    /// Returns the opcode of the payload.
    pub const fn opcode(&self) -> OpCode {
        match self {
            Self::Heartbeat { .. } => OpCode::Heartbeat,
            Self::Identify(_) => OpCode::Identify,
            Self::Resume(_) => OpCode::Resume,
            Self::RequestGuildMembers(_) => OpCode::RequestGuildMembers,
            Self::PresenceUpdate(_) => OpCode::PresenceUpdate,
            Self::VoiceStateUpdate(_) => OpCode::VoiceStateUpdate,
            Self::RequestSoundboardSounds(_) => OpCode::RequestSoundboardSounds,
        }
    }

    /// Encodes the payload as gateway JSON text. The text contains the token for IDENTIFY and
    /// RESUME: send it, never log it.
    pub fn encode(&self) -> String {
        let op = self.opcode().code();
        let result = match self {
            Self::Heartbeat { seq } => serde_json::to_string(&OutFrame { op, d: seq }),
            Self::Identify(identify) => serde_json::to_string(&OutFrame { op, d: identify }),
            Self::Resume(resume) => serde_json::to_string(&OutFrame { op, d: resume }),
            Self::RequestGuildMembers(request) => {
                serde_json::to_string(&OutFrame { op, d: request })
            }
            Self::PresenceUpdate(raw)
            | Self::VoiceStateUpdate(raw)
            | Self::RequestSoundboardSounds(raw) => serde_json::to_string(&OutFrame { op, d: raw }),
        };
        result.expect("client payloads always serialize")
    }

    /// Decodes one payload received from a client.
    ///
    /// # Errors
    ///
    /// Returns an error for text that is not a gateway frame, an unknown opcode, a gateway-only
    /// opcode or data of the wrong shape.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let text = std::str::from_utf8(bytes)?;
        let frame: Frame<'_> = serde_json::from_str(text)?;
        let op = OpCode::from_code(frame.op).ok_or(DecodeError::UnknownOpcode(frame.op))?;
        let required = |d: Option<&RawValue>| {
            d.map(RawValue::to_owned)
                .ok_or(DecodeError::MissingField { op, field: "d" })
        };
        Ok(match op {
            OpCode::Heartbeat => Self::Heartbeat {
                seq: parse_data(op, frame.d)?,
            },
            OpCode::Identify => Self::Identify(
                parse_data(op, frame.d)?.ok_or(DecodeError::MissingField { op, field: "d" })?,
            ),
            OpCode::Resume => Self::Resume(
                parse_data(op, frame.d)?.ok_or(DecodeError::MissingField { op, field: "d" })?,
            ),
            OpCode::RequestGuildMembers => Self::RequestGuildMembers(
                parse_data(op, frame.d)?.ok_or(DecodeError::MissingField { op, field: "d" })?,
            ),
            OpCode::PresenceUpdate => Self::PresenceUpdate(required(frame.d)?),
            OpCode::VoiceStateUpdate => Self::VoiceStateUpdate(required(frame.d)?),
            OpCode::RequestSoundboardSounds => Self::RequestSoundboardSounds(required(frame.d)?),
            _ => return Err(DecodeError::WrongDirection { op, side: "client" }),
        })
    }
}

fn null() -> &'static RawValue {
    serde_json::from_str("null").expect("null is JSON")
}

fn parse_data<T: for<'de> Deserialize<'de>>(
    op: OpCode,
    data: Option<&RawValue>,
) -> Result<Option<T>, DecodeError> {
    match data {
        None => Ok(None),
        Some(raw) => serde_json::from_str(raw.get())
            .map(Some)
            .map_err(|source| DecodeError::Data { op, source }),
    }
}

/// One entry of READY's guild list: every guild starts unavailable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnavailableGuild {
    pub id: Snowflake,
    #[serde(default)]
    pub unavailable: bool,
}

/// The fields of READY that the product reads. The user and application objects stay raw.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ready {
    #[serde(rename = "v")]
    pub version: u8,
    pub user: Box<RawValue>,
    pub guilds: Vec<UnavailableGuild>,
    pub session_id: String,
    /// Address to RESUME at, without the query string.
    pub resume_gateway_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<[u32; 2]>,
    pub application: Box<RawValue>,
}

/// The fields of GUILD_MEMBERS_CHUNK that track a member request; the members stay in the raw
/// data.
#[derive(Clone, Debug, Deserialize)]
pub struct GuildMembersChunkHeader {
    pub guild_id: Snowflake,
    pub chunk_index: u32,
    pub chunk_count: u32,
    #[serde(default)]
    pub not_found: Vec<Snowflake>,
    #[serde(default)]
    pub nonce: Option<String>,
}

/// The `meta` of a RATE_LIMITED dispatch for op 8.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateLimitedMeta {
    pub guild_id: Snowflake,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// A RATE_LIMITED dispatch: a command was rate limited and may be retried after `retry_after`
/// seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateLimited {
    /// Opcode of the limited command (8 for REQUEST_GUILD_MEMBERS).
    pub opcode: u8,
    /// Seconds to wait before retrying.
    pub retry_after: f64,
    pub meta: RateLimitedMeta,
}

/// `session_start_limit` of `GET /gateway/bot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStartLimit {
    /// Session starts allowed per reset period.
    pub total: u32,
    /// Session starts left in the current period.
    pub remaining: u32,
    /// Milliseconds until `remaining` resets to `total`.
    pub reset_after: u64,
    /// Identify rate-limit buckets: shards in different buckets may identify at the same time.
    pub max_concurrency: u32,
}

/// Response of `GET /gateway/bot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayBot {
    /// WebSocket address of the gateway, without the query string.
    pub url: String,
    /// Recommended shard count.
    pub shards: u32,
    pub session_start_limit: SessionStartLimit,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_payload_round_trips() {
        let raw = RawValue::from_string(r#"{"content":"hi"}"#.to_owned()).unwrap();
        let cases = [
            ServerPayload::Dispatch(Dispatch {
                seq: 42,
                event: "MESSAGE_CREATE".to_owned(),
                data: raw,
            }),
            ServerPayload::Heartbeat,
            ServerPayload::Reconnect,
            ServerPayload::InvalidSession { resumable: true },
            ServerPayload::InvalidSession { resumable: false },
            ServerPayload::Hello(Hello {
                heartbeat_interval: 41_250,
            }),
            ServerPayload::HeartbeatAck,
        ];
        for payload in cases {
            let text = payload.encode();
            let decoded = ServerPayload::decode(text.as_bytes()).unwrap();
            assert_eq!(decoded.encode(), text);
        }
    }

    #[test]
    fn dispatch_keeps_raw_data() {
        let text = br#"{"op":0,"s":7,"t":"GUILD_CREATE","d":{"id":"1","big":[1,2,3]}}"#;
        let ServerPayload::Dispatch(dispatch) = ServerPayload::decode(text).unwrap() else {
            panic!("expected a dispatch");
        };
        assert_eq!(dispatch.seq, 7);
        assert_eq!(dispatch.event, "GUILD_CREATE");
        assert_eq!(dispatch.data.get(), r#"{"id":"1","big":[1,2,3]}"#);
    }

    #[test]
    fn dispatch_accepts_null_data() {
        let text = br#"{"op":0,"s":9,"t":"RESUMED","d":null}"#;
        let ServerPayload::Dispatch(dispatch) = ServerPayload::decode(text).unwrap() else {
            panic!("expected a dispatch");
        };
        assert_eq!(dispatch.event, "RESUMED");
        assert_eq!(dispatch.data.get(), "null");
    }

    #[test]
    fn decode_reports_bad_frames() {
        assert!(matches!(
            ServerPayload::decode(br#"{"op":5,"d":null}"#),
            Err(DecodeError::UnknownOpcode(5))
        ));
        assert!(matches!(
            ServerPayload::decode(br#"{"op":0,"d":{}}"#),
            Err(DecodeError::MissingField { field: "s", .. })
        ));
        assert!(matches!(
            ServerPayload::decode(br#"{"op":0,"s":3,"d":{}}"#),
            Err(DecodeError::MissingField { field: "t", .. })
        ));
        assert!(matches!(
            ServerPayload::decode(br#"{"op":2,"d":{}}"#),
            Err(DecodeError::WrongDirection { .. })
        ));
        assert!(matches!(
            ClientPayload::decode(br#"{"op":10,"d":{"heartbeat_interval":1}}"#),
            Err(DecodeError::WrongDirection { .. })
        ));
        assert!(matches!(
            ServerPayload::decode(&[0xff, 0xfe]),
            Err(DecodeError::Utf8(_))
        ));
    }

    #[test]
    fn identify_encodes_discord_shape() {
        let identify = ClientPayload::Identify(Identify {
            token: Token::new("abc"),
            properties: IdentifyProperties::default(),
            compress: None,
            large_threshold: Some(250),
            shard: Some([3, 16]),
            presence: None,
            intents: 513,
        });
        let value: serde_json::Value = serde_json::from_str(&identify.encode()).unwrap();
        assert_eq!(value["op"], 2);
        assert_eq!(value["d"]["token"], "abc");
        assert_eq!(value["d"]["shard"], serde_json::json!([3, 16]));
        assert_eq!(value["d"]["intents"], 513);
        assert_eq!(value["d"]["large_threshold"], 250);

        let ClientPayload::Identify(decoded) =
            ClientPayload::decode(identify.encode().as_bytes()).unwrap()
        else {
            panic!("expected identify");
        };
        assert_eq!(decoded.shard, Some([3, 16]));
        assert_eq!(decoded.token.expose(), "abc");
    }

    #[test]
    fn heartbeat_carries_null_before_first_dispatch() {
        assert_eq!(
            ClientPayload::Heartbeat { seq: None }.encode(),
            r#"{"op":1,"d":null}"#
        );
        assert_eq!(
            ClientPayload::Heartbeat { seq: Some(9) }.encode(),
            r#"{"op":1,"d":9}"#
        );
    }

    #[test]
    fn all_members_request_detected() {
        let all = RequestGuildMembers::all_members(Snowflake(1), None);
        assert!(all.is_all_members());
        let by_id = RequestGuildMembers {
            user_ids: Some(vec![Snowflake(2)]),
            ..all.clone()
        };
        assert!(!by_id.is_all_members());
        let by_query = RequestGuildMembers {
            query: Some("ab".to_owned()),
            limit: 10,
            ..all
        };
        assert!(!by_query.is_all_members());
    }
}
