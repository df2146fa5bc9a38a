//! Close codes and the single decision of what a shard does after its connection closed.
//!
//! Discord's "Opcodes and Status Codes" documentation lists the gateway close codes and whether
//! each one may reconnect. This module turns a close (who closed it, with which code) into one
//! [`CloseAction`], so that no other part of the product decides between resume, a new session and
//! giving up.

use std::fmt;

/// A WebSocket close code as seen on the gateway.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// Normal closure. Sent by a client it invalidates the session.
    pub const NORMAL: Self = Self(1000);
    /// Going away. Sent by a client it invalidates the session.
    pub const GOING_AWAY: Self = Self(1001);
    /// Code the product uses for its own closes when it intends to resume: a zombie connection, a
    /// server RECONNECT, a shutdown for restart.
    pub const RESUMABLE_CLIENT_CLOSE: Self = Self(4900);

    pub const UNKNOWN_ERROR: Self = Self(4000);
    pub const UNKNOWN_OPCODE: Self = Self(4001);
    pub const DECODE_ERROR: Self = Self(4002);
    pub const NOT_AUTHENTICATED: Self = Self(4003);
    pub const AUTHENTICATION_FAILED: Self = Self(4004);
    pub const ALREADY_AUTHENTICATED: Self = Self(4005);
    pub const INVALID_SEQUENCE: Self = Self(4007);
    pub const RATE_LIMITED: Self = Self(4008);
    pub const SESSION_TIMED_OUT: Self = Self(4009);
    pub const INVALID_SHARD: Self = Self(4010);
    pub const SHARDING_REQUIRED: Self = Self(4011);
    pub const INVALID_API_VERSION: Self = Self(4012);
    pub const INVALID_INTENTS: Self = Self(4013);
    pub const DISALLOWED_INTENTS: Self = Self(4014);

    /// Returns Discord's name for a gateway close code, or `None` for another code.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            1000 => "normal closure",
            1001 => "going away",
            4000 => "unknown error",
            4001 => "unknown opcode",
            4002 => "decode error",
            4003 => "not authenticated",
            4004 => "authentication failed",
            4005 => "already authenticated",
            4007 => "invalid seq",
            4008 => "rate limited",
            4009 => "session timed out",
            4010 => "invalid shard",
            4011 => "sharding required",
            4012 => "invalid API version",
            4013 => "invalid intent(s)",
            4014 => "disallowed intent(s)",
            4900 => "client reconnect",
            _ => return None,
        })
    }

    /// Returns `true` for the codes after which Discord says not to reconnect.
    pub const fn is_fatal(self) -> bool {
        matches!(self.0, 4004 | 4010 | 4011 | 4012 | 4013 | 4014)
    }

    /// Returns `true` if a client that closes with this code invalidates its own session.
    pub const fn invalidates_when_sent_by_client(self) -> bool {
        matches!(self.0, 1000 | 1001)
    }

    /// Returns the operator's fix for a fatal code.
    pub const fn fatal_hint(self) -> Option<&'static str> {
        Some(match self.0 {
            4004 => "the bot token is invalid or was reset: set a valid token and restart",
            4010 => "the shard id or shard count in IDENTIFY is invalid: check --shards, --start and --stop",
            4011 => "the bot is in too many guilds for its shard count: raise --shards",
            4012 => "the gateway API version is not supported: upgrade shardvisor",
            4013 => "IDENTIFY sent intent bits Discord does not define: check the intents setting",
            4014 => "a privileged intent is not enabled for this bot: enable it in the developer portal or drop it from the intents setting",
            _ => return None,
        })
    }
}

impl fmt::Debug for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CloseCode({self})")
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{} ({name})", self.0),
            None => write!(f, "{}", self.0),
        }
    }
}

/// Which side ended a connection, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseInitiator {
    /// The gateway sent a close frame with this code (`None` for a frame without a code).
    Server(Option<CloseCode>),
    /// This client sent a close frame with this code.
    Client(CloseCode),
    /// The transport ended without a close frame: a dropped TCP connection, a reset, a timeout.
    Transport,
}

/// What a shard does after its connection closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseAction {
    /// Reconnect and RESUME the session (at its resume URL).
    Resume,
    /// Drop the session, reconnect to the gateway URL and IDENTIFY anew.
    Reidentify,
    /// Stop the shard and do not retry: the configuration must change first.
    Fatal(CloseCode),
}

impl CloseAction {
    /// Decides what follows a close.
    ///
    /// Per Discord's documentation: 4004 and 4010 to 4014 are not reconnectable; 4007 (invalid
    /// seq) and 4009 (session timed out) need a new session; the other 4xxx codes may resume. A
    /// server close with 1000 or 1001 still leads to a reconnect, and the session is resumed if the
    /// gateway still has it (it answers op 9 otherwise). A client close with 1000 or 1001
    /// invalidates the session, so only a new IDENTIFY can follow.
    pub const fn after(initiator: CloseInitiator) -> Self {
        match initiator {
            CloseInitiator::Transport | CloseInitiator::Server(None) => Self::Resume,
            CloseInitiator::Server(Some(code)) => {
                if code.is_fatal() {
                    Self::Fatal(code)
                } else if matches!(code.0, 4007 | 4009) {
                    Self::Reidentify
                } else {
                    Self::Resume
                }
            }
            CloseInitiator::Client(code) => {
                if code.invalidates_when_sent_by_client() {
                    Self::Reidentify
                } else {
                    Self::Resume
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: u16) -> CloseAction {
        CloseAction::after(CloseInitiator::Server(Some(CloseCode(code))))
    }

    #[test]
    fn close_table_matches_discord() {
        for code in [4000, 4001, 4002, 4003, 4005, 4008] {
            assert_eq!(server(code), CloseAction::Resume, "code {code}");
        }
        for code in [4007, 4009] {
            assert_eq!(server(code), CloseAction::Reidentify, "code {code}");
        }
        for code in [4004, 4010, 4011, 4012, 4013, 4014] {
            assert_eq!(
                server(code),
                CloseAction::Fatal(CloseCode(code)),
                "code {code}"
            );
            assert!(CloseCode(code).fatal_hint().is_some(), "code {code}");
        }
    }

    #[test]
    fn server_normal_close_reconnects() {
        assert_eq!(server(1000), CloseAction::Resume);
        assert_eq!(server(1001), CloseAction::Resume);
        assert_eq!(
            CloseAction::after(CloseInitiator::Transport),
            CloseAction::Resume
        );
    }

    #[test]
    fn client_normal_close_invalidates() {
        let client = |code| CloseAction::after(CloseInitiator::Client(CloseCode(code)));
        assert_eq!(client(1000), CloseAction::Reidentify);
        assert_eq!(client(1001), CloseAction::Reidentify);
        assert_eq!(
            client(CloseCode::RESUMABLE_CLIENT_CLOSE.0),
            CloseAction::Resume
        );
    }

    #[test]
    fn close_code_display_names_code() {
        assert_eq!(
            CloseCode::AUTHENTICATION_FAILED.to_string(),
            "4004 (authentication failed)"
        );
        assert_eq!(CloseCode(4999).to_string(), "4999");
    }
}
