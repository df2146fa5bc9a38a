//! One guild: its stored structure, its members, and the guild objects that GUILD_CREATE and
//! GUILD_UPDATE carry.

use actors::gateway::{Intents, Snowflake};
use serde::Serialize;
use serde_json::value::RawValue;

use super::members::{MemberRecord, MemberView, Members, Presence, Status};
use super::objects::{Channel, Emoji, Role, Thread, VoiceConnection};
use super::wire::{raw, ImageHash, Timestamp};

/// Member count above which GUILD_CREATE carries only the bot and the members in voice
/// channels, whatever the intents (Discord's GUILD_CREATE documentation).
pub(super) const MEMBER_LIST_LIMIT: u32 = 75_000;

/// Maximum members in the GUILD_CREATE of a large guild.
///
/// NOTE: Discord sends every online member of a large guild of up to [`MEMBER_LIST_LIMIT`]
/// members. This cap keeps payloads of guilds with tens of thousands online at a few megabytes.
pub(super) const MAX_INITIAL_MEMBERS: usize = 5_000;

/// A voice state as GUILD_CREATE lists it: without `guild_id` and `member`.
#[derive(Debug, Serialize)]
struct VoiceStateView {
    channel_id: Snowflake,
    user_id: Snowflake,
    /// 32 hex digits.
    session_id: String,
    deaf: bool,
    mute: bool,
    self_deaf: bool,
    self_mute: bool,
    self_video: bool,
    self_stream: bool,
    suppress: bool,
    request_to_speak_timestamp: Option<Timestamp>,
}

/// A guild of the world.
#[derive(Debug)]
pub(super) struct Guild {
    pub(super) id: Snowflake,
    pub(super) name: String,
    pub(super) description: Option<String>,
    pub(super) icon: Option<ImageHash>,
    pub(super) splash: Option<ImageHash>,
    pub(super) banner: Option<ImageHash>,
    pub(super) features: Vec<&'static str>,
    pub(super) verification_level: u8,
    pub(super) default_message_notifications: u8,
    pub(super) explicit_content_filter: u8,
    pub(super) mfa_level: u8,
    pub(super) premium_subscription_count: u32,
    pub(super) preferred_locale: &'static str,
    pub(super) afk_channel_id: Option<Snowflake>,
    /// Seconds of inactivity after which a member moves to the AFK channel.
    pub(super) afk_timeout: u32,
    pub(super) system_channel_id: Option<Snowflake>,
    pub(super) system_channel_flags: u32,
    pub(super) rules_channel_id: Option<Snowflake>,
    pub(super) public_updates_channel_id: Option<Snowflake>,
    pub(super) vanity_url_code: Option<String>,
    pub(super) max_members: u64,
    pub(super) premium_progress_bar_enabled: bool,
    /// When the bot joined the guild.
    pub(super) joined_at: Timestamp,
    pub(super) roles: Vec<Role>,
    pub(super) channels: Vec<Channel>,
    pub(super) threads: Vec<Thread>,
    pub(super) emojis: Vec<Emoji>,
    pub(super) voice: Vec<VoiceConnection>,
    pub(super) members: Members,
}

impl Guild {
    /// Returns the premium tier that the boost count unlocks (2, 7 and 14 boosts).
    pub(super) fn premium_tier(&self) -> u8 {
        match self.premium_subscription_count {
            0..=1 => 0,
            2..=6 => 1,
            7..=13 => 2,
            _ => 3,
        }
    }

    /// Returns the bitrate of new voice channels in bits per second: 64 kbps, or 96 kbps in a
    /// boosted guild.
    pub(super) fn voice_bitrate(&self) -> u32 {
        if self.premium_tier() > 0 {
            96_000
        } else {
            64_000
        }
    }

    /// Returns `true` if the guild has a role with this id.
    pub(super) fn has_role(&self, id: Snowflake) -> bool {
        self.roles.iter().any(|role| role.id == id)
    }

    /// Writes a member object, with its user object when `with_user` is set. A message's
    /// `member` has no user because the message's `author` carries it.
    pub(super) fn member_view<'a>(
        &self,
        record: &'a MemberRecord,
        with_user: bool,
    ) -> MemberView<'a> {
        MemberView::new(record, with_user, |role| self.has_role(role))
    }

    /// Builds the `d` of this guild's GUILD_CREATE.
    ///
    /// `unavailable` adds `"unavailable": false`, which Discord sends when a guild of READY
    /// becomes available and omits when the bot joins a new guild.
    ///
    /// NOTE: `voice_states` is empty without the GUILD_VOICE_STATES intent. Discord's GUILD_CREATE
    /// documentation does not say so; client libraries require that intent for any voice state.
    pub(super) fn guild_create(
        &self,
        large_threshold: u32,
        intents: Intents,
        unavailable: bool,
    ) -> Box<RawValue> {
        let member_count = self.members.count();
        let large = member_count > large_threshold;
        let slots = self.initial_member_slots(large, intents);
        let records: Vec<MemberRecord> = slots
            .iter()
            .filter_map(|slot| self.members.get(*slot))
            .collect();

        let presences = if intents.contains(Intents::GUILD_PRESENCES) {
            self.presences(&records)
        } else {
            Vec::new()
        };
        let voice_states = if intents.contains(Intents::GUILD_VOICE_STATES) {
            self.voice_state_views()
        } else {
            Vec::new()
        };

        let payload = GuildCreateView {
            guild: GuildView::new(self),
            joined_at: self.joined_at,
            large,
            unavailable: unavailable.then_some(false),
            member_count,
            voice_states,
            members: records
                .iter()
                .map(|record| self.member_view(record, true))
                .collect(),
            channels: &self.channels,
            threads: &self.threads,
            presences,
            stage_instances: [],
            guild_scheduled_events: [],
            soundboard_sounds: [],
        };
        raw(&payload)
    }

    /// Builds the guild object that GUILD_UPDATE carries.
    pub(super) fn guild_update(&self) -> Box<RawValue> {
        raw(&GuildView::new(self))
    }

    /// Returns the presences of the members that are not offline.
    pub(super) fn presences(&self, records: &[MemberRecord]) -> Vec<Presence> {
        records
            .iter()
            .filter(|record| self.members.status(record.slot) != Status::Offline)
            .map(|record| self.members.presence(record))
            .collect()
    }

    /// Selects the members of GUILD_CREATE by Discord's rules. Without the GUILD_PRESENCES
    /// intent, or above [`MEMBER_LIST_LIMIT`] members, they are the members in voice channels. A
    /// large guild lists the members in voice and the online members, at most
    /// [`MAX_INITIAL_MEMBERS`]. Any other guild lists every member.
    ///
    /// NOTE: Discord also lists the bot's own member, which is missing here because the world
    /// does not know the bot's user.
    fn initial_member_slots(&self, large: bool, intents: Intents) -> Vec<u32> {
        let mut voice: Vec<u32> = self
            .voice
            .iter()
            .map(|connection| connection.slot)
            .collect();
        voice.sort_unstable();
        voice.dedup();

        let member_count = self.members.count();
        if !intents.contains(Intents::GUILD_PRESENCES) || member_count > MEMBER_LIST_LIMIT {
            return voice;
        }
        if !large {
            return self
                .members
                .live_slots(0..self.members.slot_end())
                .collect();
        }

        let mut slots = voice.clone();
        for slot in self.members.live_slots(0..self.members.slot_end()) {
            if slots.len() >= MAX_INITIAL_MEMBERS {
                break;
            }
            if self.members.status(slot) != Status::Offline && voice.binary_search(&slot).is_err() {
                slots.push(slot);
            }
        }
        slots
    }

    fn voice_state_views(&self) -> Vec<VoiceStateView> {
        self.voice
            .iter()
            .filter_map(|connection| {
                let record = self.members.get(connection.slot)?;
                Some(VoiceStateView {
                    channel_id: connection.channel_id,
                    user_id: record.user.id,
                    session_id: format!("{:032x}", connection.session_id),
                    deaf: record.deaf,
                    mute: record.mute,
                    self_deaf: connection.self_deaf,
                    self_mute: connection.self_mute,
                    self_video: connection.self_video,
                    self_stream: connection.self_stream,
                    suppress: false,
                    request_to_speak_timestamp: None,
                })
            })
            .collect()
    }

    /// Removes a member and its voice connection.
    pub(super) fn remove_member(&mut self, slot: u32) {
        self.members.remove(slot);
        self.voice.retain(|connection| connection.slot != slot);
    }

    /// Removes a channel with its threads, voice connections and the guild settings that
    /// pointed at it. Returns the removed channel.
    pub(super) fn remove_channel(&mut self, id: Snowflake) -> Option<Channel> {
        let index = self.channels.iter().position(|channel| channel.id == id)?;
        let channel = self.channels.remove(index);

        self.threads.retain(|thread| thread.parent_id != id);
        self.voice.retain(|connection| connection.channel_id != id);
        for child in &mut self.channels {
            if child.parent_id == Some(id) {
                child.parent_id = None;
            }
        }
        for setting in [
            &mut self.afk_channel_id,
            &mut self.system_channel_id,
            &mut self.rules_channel_id,
            &mut self.public_updates_channel_id,
        ] {
            if *setting == Some(id) {
                *setting = None;
            }
        }
        Some(channel)
    }

    /// Removes a role and the channel overwrites that name it. Returns `false` if the guild has
    /// no such role.
    pub(super) fn remove_role(&mut self, id: Snowflake) -> bool {
        let before = self.roles.len();
        self.roles.retain(|role| role.id != id);
        for channel in &mut self.channels {
            channel
                .permission_overwrites
                .retain(|overwrite| overwrite.id != id);
        }
        self.roles.len() != before
    }
}

/// The guild object, as GUILD_UPDATE carries it and GUILD_CREATE extends it.
#[derive(Debug, Serialize)]
struct GuildView<'a> {
    id: Snowflake,
    name: &'a str,
    icon: Option<ImageHash>,
    splash: Option<ImageHash>,
    discovery_splash: Option<ImageHash>,
    owner_id: Snowflake,
    afk_channel_id: Option<Snowflake>,
    afk_timeout: u32,
    widget_enabled: bool,
    widget_channel_id: Option<Snowflake>,
    verification_level: u8,
    default_message_notifications: u8,
    explicit_content_filter: u8,
    roles: &'a [Role],
    emojis: &'a [Emoji],
    features: &'a [&'static str],
    mfa_level: u8,
    application_id: Option<Snowflake>,
    system_channel_id: Option<Snowflake>,
    system_channel_flags: u32,
    rules_channel_id: Option<Snowflake>,
    max_presences: Option<u64>,
    max_members: u64,
    vanity_url_code: Option<&'a str>,
    description: Option<&'a str>,
    banner: Option<ImageHash>,
    premium_tier: u8,
    premium_subscription_count: u32,
    preferred_locale: &'static str,
    public_updates_channel_id: Option<Snowflake>,
    max_video_channel_users: u32,
    max_stage_video_channel_users: u32,
    nsfw_level: u8,
    stickers: [(); 0],
    premium_progress_bar_enabled: bool,
    safety_alerts_channel_id: Option<Snowflake>,
}

impl<'a> GuildView<'a> {
    fn new(guild: &'a Guild) -> Self {
        Self {
            id: guild.id,
            name: &guild.name,
            icon: guild.icon,
            splash: guild.splash,
            discovery_splash: None,
            owner_id: guild.members.user_id(0),
            afk_channel_id: guild.afk_channel_id,
            afk_timeout: guild.afk_timeout,
            widget_enabled: false,
            widget_channel_id: None,
            verification_level: guild.verification_level,
            default_message_notifications: guild.default_message_notifications,
            explicit_content_filter: guild.explicit_content_filter,
            roles: &guild.roles,
            emojis: &guild.emojis,
            features: &guild.features,
            mfa_level: guild.mfa_level,
            application_id: None,
            system_channel_id: guild.system_channel_id,
            system_channel_flags: guild.system_channel_flags,
            rules_channel_id: guild.rules_channel_id,
            max_presences: None,
            max_members: guild.max_members,
            vanity_url_code: guild.vanity_url_code.as_deref(),
            description: guild.description.as_deref(),
            banner: guild.banner,
            premium_tier: guild.premium_tier(),
            premium_subscription_count: guild.premium_subscription_count,
            preferred_locale: guild.preferred_locale,
            public_updates_channel_id: guild.public_updates_channel_id,
            max_video_channel_users: 25,
            max_stage_video_channel_users: 50,
            nsfw_level: 0,
            stickers: [],
            premium_progress_bar_enabled: guild.premium_progress_bar_enabled,
            safety_alerts_channel_id: None,
        }
    }
}

/// The `d` of GUILD_CREATE: the guild object with the fields only GUILD_CREATE has.
#[derive(Serialize)]
struct GuildCreateView<'a> {
    #[serde(flatten)]
    guild: GuildView<'a>,
    joined_at: Timestamp,
    large: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    unavailable: Option<bool>,
    member_count: u32,
    voice_states: Vec<VoiceStateView>,
    members: Vec<MemberView<'a>>,
    channels: &'a [Channel],
    threads: &'a [Thread],
    presences: Vec<Presence>,
    stage_instances: [(); 0],
    guild_scheduled_events: [(); 0],
    soundboard_sounds: [(); 0],
}
