//! The objects a guild is made of, as Discord's JSON writes them: roles, channels, threads,
//! emojis and voice connections.

use actors::gateway::Snowflake;
use rand::RngExt;
use serde::Serialize;

use super::random::{self, Generator, WORLD_NOW_MS};
use super::wire::{ImageHash, Permissions, Timestamp};

/// Channel type numbers of Discord's channel object.
pub(super) mod channel_type {
    pub(in super::super) const TEXT: u8 = 0;
    pub(in super::super) const VOICE: u8 = 2;
    pub(in super::super) const CATEGORY: u8 = 4;
    pub(in super::super) const ANNOUNCEMENT: u8 = 5;
    pub(in super::super) const PUBLIC_THREAD: u8 = 11;
    pub(in super::super) const STAGE: u8 = 13;
}

/// A role of a guild.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Role {
    pub(super) id: Snowflake,
    pub(super) name: String,
    /// The primary color, kept for clients that predate `colors`; 0 for no color.
    pub(super) color: u32,
    pub(super) colors: RoleColors,
    pub(super) hoist: bool,
    pub(super) icon: Option<ImageHash>,
    pub(super) unicode_emoji: Option<String>,
    pub(super) position: i32,
    pub(super) permissions: Permissions,
    pub(super) managed: bool,
    pub(super) mentionable: bool,
    pub(super) flags: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) tags: Option<RoleTags>,
}

impl Role {
    /// Sets the color and the primary color of `colors` together.
    pub(super) fn set_color(&mut self, color: u32) {
        self.color = color;
        self.colors.primary_color = color;
    }
}

/// The gradient colors of a role; only the primary one is set without the enhanced-colors
/// feature.
#[derive(Clone, Debug, Serialize)]
pub(super) struct RoleColors {
    pub(super) primary_color: u32,
    pub(super) secondary_color: Option<u32>,
    pub(super) tertiary_color: Option<u32>,
}

/// Tags of a managed role. Discord writes a true boolean tag as `null` and omits a false one.
#[derive(Clone, Debug, Serialize)]
pub(super) struct RoleTags {
    pub(super) premium_subscriber: (),
}

/// A permission overwrite of a channel.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Overwrite {
    pub(super) id: Snowflake,
    /// 0 for a role, 1 for a member.
    #[serde(rename = "type")]
    pub(super) kind: u8,
    pub(super) allow: Permissions,
    pub(super) deny: Permissions,
}

/// A guild channel (category, text, announcement, voice or stage), without `guild_id`, as
/// GUILD_CREATE lists it.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Channel {
    pub(super) id: Snowflake,
    #[serde(rename = "type")]
    pub(super) kind: u8,
    pub(super) name: String,
    pub(super) position: i32,
    pub(super) flags: u32,
    pub(super) parent_id: Option<Snowflake>,
    pub(super) permission_overwrites: Vec<Overwrite>,
    #[serde(flatten)]
    pub(super) text: Option<TextFields>,
    #[serde(flatten)]
    pub(super) voice: Option<VoiceFields>,
}

impl Channel {
    /// Returns `true` for a channel that messages can be sent in (text or announcement).
    pub(super) fn is_text(&self) -> bool {
        matches!(self.kind, channel_type::TEXT | channel_type::ANNOUNCEMENT)
    }

    /// Returns `true` for a voice or stage channel.
    pub(super) fn is_voice(&self) -> bool {
        matches!(self.kind, channel_type::VOICE | channel_type::STAGE)
    }
}

/// Fields of text and announcement channels.
#[derive(Clone, Debug, Serialize)]
pub(super) struct TextFields {
    pub(super) topic: Option<String>,
    pub(super) nsfw: bool,
    /// Slowmode in seconds.
    pub(super) rate_limit_per_user: u16,
    pub(super) last_message_id: Option<Snowflake>,
    pub(super) last_pin_timestamp: Option<Timestamp>,
}

/// Fields of voice and stage channels.
#[derive(Clone, Debug, Serialize)]
pub(super) struct VoiceFields {
    /// Bits per second.
    pub(super) bitrate: u32,
    /// 0 for no limit.
    pub(super) user_limit: u32,
    /// `None` picks the region automatically.
    pub(super) rtc_region: Option<String>,
    pub(super) nsfw: bool,
    pub(super) rate_limit_per_user: u16,
    pub(super) last_message_id: Option<Snowflake>,
}

/// An active public thread.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Thread {
    pub(super) id: Snowflake,
    #[serde(rename = "type")]
    pub(super) kind: u8,
    pub(super) guild_id: Snowflake,
    pub(super) parent_id: Snowflake,
    pub(super) owner_id: Snowflake,
    pub(super) name: String,
    pub(super) last_message_id: Option<Snowflake>,
    pub(super) message_count: u32,
    /// Discord stops counting at 50.
    pub(super) member_count: u8,
    pub(super) rate_limit_per_user: u16,
    pub(super) flags: u32,
    pub(super) total_message_sent: u32,
    pub(super) thread_metadata: ThreadMetadata,
}

/// The archive state of a thread.
#[derive(Clone, Debug, Serialize)]
pub(super) struct ThreadMetadata {
    pub(super) archived: bool,
    /// Minutes of inactivity after which the thread archives.
    pub(super) auto_archive_duration: u32,
    pub(super) archive_timestamp: Timestamp,
    pub(super) locked: bool,
    pub(super) create_timestamp: Timestamp,
}

/// A custom emoji.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Emoji {
    pub(super) id: Snowflake,
    pub(super) name: String,
    pub(super) roles: Vec<Snowflake>,
    pub(super) require_colons: bool,
    pub(super) managed: bool,
    pub(super) animated: bool,
    pub(super) available: bool,
}

/// A member connected to a voice channel.
#[derive(Clone, Debug)]
pub(super) struct VoiceConnection {
    pub(super) slot: u32,
    pub(super) channel_id: Snowflake,
    pub(super) session_id: u128,
    pub(super) self_mute: bool,
    pub(super) self_deaf: bool,
    pub(super) self_video: bool,
    pub(super) self_stream: bool,
}

/// Builds a role without color, hoist, mention or tags.
pub(super) fn new_role(
    id: Snowflake,
    name: String,
    position: i32,
    permissions: Permissions,
) -> Role {
    Role {
        id,
        name,
        color: 0,
        colors: RoleColors {
            primary_color: 0,
            secondary_color: None,
            tertiary_color: None,
        },
        hoist: false,
        icon: None,
        unicode_emoji: None,
        position,
        permissions,
        managed: false,
        mentionable: false,
        flags: 0,
        tags: None,
    }
}

/// Builds a channel without overwrites, parent or type-specific fields.
pub(super) fn new_channel(id: Snowflake, kind: u8, name: String, position: i32) -> Channel {
    Channel {
        id,
        kind,
        name,
        position,
        flags: 0,
        parent_id: None,
        permission_overwrites: Vec::new(),
        text: None,
        voice: None,
    }
}

/// Builds a text or announcement channel.
pub(super) fn new_text_channel(
    rng: &mut Generator,
    id: Snowflake,
    kind: u8,
    name: String,
    position: usize,
) -> Channel {
    let mut channel = new_channel(id, kind, name, position as i32);
    channel.text = Some(TextFields {
        topic: rng.random_bool(0.4).then(|| random::topic(rng)),
        nsfw: false,
        rate_limit_per_user: if rng.random_bool(0.1) { 5 } else { 0 },
        last_message_id: rng
            .random_bool(0.9)
            .then(|| random_id(rng, id.unix_ms(), WORLD_NOW_MS)),
        last_pin_timestamp: None,
    });
    channel
}

/// Builds a voice channel with a bitrate in bits per second.
pub(super) fn new_voice_channel(
    rng: &mut Generator,
    id: Snowflake,
    position: usize,
    bitrate: u32,
) -> Channel {
    let mut channel = new_channel(
        id,
        channel_type::VOICE,
        random::voice_channel_name(rng),
        position as i32,
    );
    channel.voice = Some(VoiceFields {
        bitrate,
        user_limit: if rng.random_bool(0.3) {
            rng.random_range(2..=25)
        } else {
            0
        },
        rtc_region: None,
        nsfw: false,
        rate_limit_per_user: 0,
        last_message_id: None,
    });
    channel
}

/// Mints an id with a random creation time in `[from_ms, to_ms]` and random low bits.
pub(super) fn random_id(rng: &mut Generator, from_ms: u64, to_ms: u64) -> Snowflake {
    let unix_ms = rng.random_range(from_ms..=to_ms.max(from_ms));
    Snowflake::from_parts(unix_ms, rng.random_range(0..1 << 22))
}

/// A channel with `guild_id`, as the CHANNEL_* events carry it.
#[derive(Serialize)]
pub(super) struct GuildChannelView<'a> {
    pub(super) guild_id: Snowflake,
    #[serde(flatten)]
    pub(super) channel: &'a Channel,
}
