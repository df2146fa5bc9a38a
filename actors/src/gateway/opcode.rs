//! Gateway opcodes, as listed in Discord's "Opcodes and Status Codes" documentation.

use serde::{Deserialize, Serialize};

/// Opcode of a gateway payload (the `op` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum OpCode {
    /// Server to client: an event, with a sequence number and an event name.
    Dispatch,
    /// Both directions: a heartbeat. The client answers a server heartbeat at once.
    Heartbeat,
    /// Client to server: start a new session.
    Identify,
    /// Client to server: change the bot's presence.
    PresenceUpdate,
    /// Client to server: join, move or leave a voice channel.
    VoiceStateUpdate,
    /// Client to server: resume a dropped session.
    Resume,
    /// Server to client: reconnect and resume.
    Reconnect,
    /// Client to server: request the members of a guild.
    RequestGuildMembers,
    /// Server to client: the session is invalid; `d` tells whether it can be resumed.
    InvalidSession,
    /// Server to client: the first payload of a connection, with the heartbeat interval.
    Hello,
    /// Server to client: acknowledges a heartbeat.
    HeartbeatAck,
    /// Client to server: request soundboard sounds of guilds.
    RequestSoundboardSounds,
}

impl OpCode {
    /// Returns the number that goes on the wire.
    pub const fn code(self) -> u8 {
        match self {
            Self::Dispatch => 0,
            Self::Heartbeat => 1,
            Self::Identify => 2,
            Self::PresenceUpdate => 3,
            Self::VoiceStateUpdate => 4,
            Self::Resume => 6,
            Self::Reconnect => 7,
            Self::RequestGuildMembers => 8,
            Self::InvalidSession => 9,
            Self::Hello => 10,
            Self::HeartbeatAck => 11,
            Self::RequestSoundboardSounds => 31,
        }
    }

    /// Returns the opcode for a wire number, or `None` for a number Discord does not define.
    pub const fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Dispatch,
            1 => Self::Heartbeat,
            2 => Self::Identify,
            3 => Self::PresenceUpdate,
            4 => Self::VoiceStateUpdate,
            6 => Self::Resume,
            7 => Self::Reconnect,
            8 => Self::RequestGuildMembers,
            9 => Self::InvalidSession,
            10 => Self::Hello,
            11 => Self::HeartbeatAck,
            31 => Self::RequestSoundboardSounds,
            _ => return None,
        })
    }
}

impl From<OpCode> for u8 {
    fn from(op: OpCode) -> Self {
        op.code()
    }
}

impl TryFrom<u8> for OpCode {
    type Error = String;

    fn try_from(code: u8) -> Result<Self, Self::Error> {
        Self::from_code(code).ok_or_else(|| format!("unknown gateway opcode {code}"))
    }
}

#[cfg(test)]
mod tests {
    use super::OpCode;

    #[test]
    fn opcode_round_trips_every_code() {
        for code in 0..=u8::MAX {
            if let Some(op) = OpCode::from_code(code) {
                assert_eq!(op.code(), code);
            }
        }
        assert_eq!(OpCode::from_code(5), None);
        assert_eq!(OpCode::from_code(12), None);
    }
}
