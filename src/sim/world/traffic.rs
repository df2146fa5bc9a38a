//! The steady dispatch traffic of one shard: a seeded stream of events that reference existing
//! guilds, members, channels and roles, and that change the world as they describe.

use actors::gateway::snowflake::DISCORD_EPOCH_MS;
use actors::gateway::{shard_for_guild, Intents, Snowflake};
use rand::RngExt;
use serde::Serialize;
use serde_json::value::RawValue;

use super::guild::Guild;
use super::members::{MemberView, Status, UserView};
use super::objects::{
    channel_type, new_role, new_text_channel, new_voice_channel, GuildChannelView, Role,
};
use super::random::{self, guild_size, Generator, GUILD_CREATED_MS, WORLD_NOW_MS};
use super::wire::{raw, Permissions, Timestamp};
use super::ShardWorld;

/// Most simulated milliseconds between two events. The traffic clock, not the wall clock, stamps
/// new ids and timestamps, so a seed always gives the same events.
const MAX_EVENT_GAP_MS: u64 = 50;

/// Stream number of the traffic generator, apart from the streams of the guilds.
const TRAFFIC_STREAM: u64 = 2;

/// An event kind of the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EventKind {
    MessageCreate,
    PresenceUpdate,
    MemberAdd,
    MemberUpdate,
    MemberRemove,
    RoleCreate,
    RoleUpdate,
    RoleDelete,
    ChannelCreate,
    ChannelUpdate,
    ChannelDelete,
    GuildUpdate,
    GuildJoin,
    GuildLeave,
}

impl EventKind {
    pub(super) const ALL: [Self; 14] = [
        Self::MessageCreate,
        Self::PresenceUpdate,
        Self::MemberAdd,
        Self::MemberUpdate,
        Self::MemberRemove,
        Self::RoleCreate,
        Self::RoleUpdate,
        Self::RoleDelete,
        Self::ChannelCreate,
        Self::ChannelUpdate,
        Self::ChannelDelete,
        Self::GuildUpdate,
        Self::GuildJoin,
        Self::GuildLeave,
    ];

    /// Returns the share of the traffic, in events per 10,000 when every kind is allowed:
    /// messages and presences dominate, joins and leaves of guilds are rare.
    fn weight(self) -> u32 {
        match self {
            Self::MessageCreate => 5000,
            Self::PresenceUpdate => 3500,
            Self::MemberUpdate => 400,
            Self::MemberAdd => 200,
            Self::MemberRemove => 150,
            Self::ChannelUpdate => 100,
            Self::RoleUpdate => 60,
            Self::ChannelCreate => 50,
            Self::ChannelDelete | Self::RoleCreate | Self::GuildUpdate => 30,
            Self::RoleDelete => 20,
            Self::GuildJoin => 5,
            Self::GuildLeave => 4,
        }
    }

    /// Returns the intent that a session needs to receive this kind.
    pub(super) fn intent(self) -> Intents {
        match self {
            Self::MessageCreate => Intents::GUILD_MESSAGES,
            Self::PresenceUpdate => Intents::GUILD_PRESENCES,
            Self::MemberAdd | Self::MemberUpdate | Self::MemberRemove => Intents::GUILD_MEMBERS,
            _ => Intents::GUILDS,
        }
    }

    /// Returns the kinds of the same intent to try when this one is impossible, such as deleting
    /// the last role.
    fn fallbacks(self) -> &'static [Self] {
        match self {
            Self::MemberRemove => &[Self::MemberAdd, Self::MemberUpdate],
            Self::MemberAdd => &[Self::MemberUpdate],
            Self::RoleUpdate | Self::RoleDelete => &[Self::RoleCreate],
            Self::ChannelUpdate | Self::ChannelDelete => &[Self::ChannelCreate],
            Self::GuildLeave => &[Self::GuildUpdate],
            _ => &[],
        }
    }

    /// Returns the dispatch event name.
    pub(super) fn event_name(self) -> &'static str {
        match self {
            Self::MessageCreate => "MESSAGE_CREATE",
            Self::PresenceUpdate => "PRESENCE_UPDATE",
            Self::MemberAdd => "GUILD_MEMBER_ADD",
            Self::MemberUpdate => "GUILD_MEMBER_UPDATE",
            Self::MemberRemove => "GUILD_MEMBER_REMOVE",
            Self::RoleCreate => "GUILD_ROLE_CREATE",
            Self::RoleUpdate => "GUILD_ROLE_UPDATE",
            Self::RoleDelete => "GUILD_ROLE_DELETE",
            Self::ChannelCreate => "CHANNEL_CREATE",
            Self::ChannelUpdate => "CHANNEL_UPDATE",
            Self::ChannelDelete => "CHANNEL_DELETE",
            Self::GuildUpdate => "GUILD_UPDATE",
            Self::GuildJoin => "GUILD_CREATE",
            Self::GuildLeave => "GUILD_DELETE",
        }
    }
}

/// The traffic state of one shard.
#[derive(Debug)]
pub(super) struct Traffic {
    rng: Generator,
    /// Simulated time of the latest event, Unix milliseconds.
    now_ms: u64,
    /// Worker and process bits of minted ids: the shard id, so shards never mint the same id.
    worker: u64,
    /// Increment bits of the latest minted id.
    increment: u64,
    /// Running member totals and guild ids, to pick a guild with a chance proportional to its
    /// member count. Member counts are read when the list is built, after each join or leave.
    picks: Vec<(u64, Snowflake)>,
    picks_stale: bool,
}

impl Traffic {
    pub(super) fn new(seed: u64, shard_id: u32) -> Self {
        Self {
            rng: random::generator(seed, TRAFFIC_STREAM),
            now_ms: WORLD_NOW_MS,
            worker: u64::from(shard_id & 0x3ff),
            increment: 0,
            picks: Vec::new(),
            picks_stale: true,
        }
    }

    /// Mints an id at the traffic clock. Each event advances the clock by at least 1 ms and
    /// mints far fewer than the 4096 increments of one millisecond, so ids never repeat.
    fn mint(&mut self) -> Snowflake {
        self.increment = (self.increment + 1) & 0xfff;
        Snowflake::from_parts(self.now_ms, (self.worker << 12) | self.increment)
    }

    fn now(&self) -> Timestamp {
        Timestamp(self.now_ms)
    }

    /// Picks an allowed event kind by weight.
    fn pick_kind(&mut self, allowed: &[EventKind]) -> EventKind {
        let total: u32 = allowed.iter().map(|kind| kind.weight()).sum();
        let mut ticket = self.rng.random_range(0..total);
        for kind in allowed {
            if ticket < kind.weight() {
                return *kind;
            }
            ticket -= kind.weight();
        }
        allowed[allowed.len() - 1]
    }
}

/// Produces the next event of a shard and applies it (see [`ShardWorld::next_event`]).
pub(super) fn next_event(
    world: &mut ShardWorld,
    intents: Intents,
    large_threshold: u32,
) -> Option<(&'static str, Box<RawValue>)> {
    let allowed: Vec<EventKind> = EventKind::ALL
        .into_iter()
        .filter(|kind| intents.contains(kind.intent()))
        .collect();
    if allowed.is_empty() {
        return None;
    }
    world.traffic.now_ms += world.traffic.rng.random_range(1..=MAX_EVENT_GAP_MS);

    if world.guilds.is_empty() {
        if !allowed.contains(&EventKind::GuildJoin) {
            return None;
        }
        return produce(world, EventKind::GuildJoin, intents, large_threshold);
    }

    let first = world.traffic.pick_kind(&allowed);
    let candidates = std::iter::once(first)
        .chain(first.fallbacks().iter().copied())
        .chain(allowed.iter().copied());
    for kind in candidates {
        if let Some(event) = produce(world, kind, intents, large_threshold) {
            return Some(event);
        }
    }
    None
}

/// Produces one event of a kind, or `None` if the world allows none now.
pub(super) fn produce(
    world: &mut ShardWorld,
    kind: EventKind,
    intents: Intents,
    large_threshold: u32,
) -> Option<(&'static str, Box<RawValue>)> {
    let data = match kind {
        EventKind::GuildJoin => Some(join_guild(world, intents, large_threshold)),
        EventKind::GuildLeave => leave_guild(world),
        _ => {
            let guild_id = pick_guild(world)?;
            let guild = world.guilds.get_mut(&guild_id)?;
            let traffic = &mut world.traffic;
            match kind {
                EventKind::MessageCreate => message_create(traffic, guild, intents),
                EventKind::PresenceUpdate => presence_update(traffic, guild),
                EventKind::MemberAdd => member_add(traffic, guild),
                EventKind::MemberUpdate => member_update(traffic, guild),
                EventKind::MemberRemove => member_remove(traffic, guild),
                EventKind::RoleCreate => Some(role_create(traffic, guild)),
                EventKind::RoleUpdate => role_update(traffic, guild),
                EventKind::RoleDelete => role_delete(traffic, guild),
                EventKind::ChannelCreate => Some(channel_create(traffic, guild)),
                EventKind::ChannelUpdate => channel_update(traffic, guild),
                EventKind::ChannelDelete => channel_delete(traffic, guild),
                EventKind::GuildUpdate | EventKind::GuildJoin | EventKind::GuildLeave => {
                    Some(guild_update(traffic, guild))
                }
            }
        }
    }?;
    Some((kind.event_name(), data))
}

/// Picks a guild with a chance proportional to its member count: large guilds produce most of
/// the traffic, as on Discord.
fn pick_guild(world: &mut ShardWorld) -> Option<Snowflake> {
    let traffic = &mut world.traffic;
    if traffic.picks_stale {
        let mut total = 0;
        traffic.picks = world
            .guilds
            .iter()
            .map(|(id, guild)| {
                total += u64::from(guild.members.count().max(1));
                (total, *id)
            })
            .collect();
        traffic.picks_stale = false;
    }

    let total = traffic.picks.last()?.0;
    let ticket = traffic.rng.random_range(0..total);
    let index = traffic
        .picks
        .partition_point(|(running, _)| *running <= ticket);
    traffic.picks.get(index).map(|(_, id)| *id)
}

/// Posts a message of a random member in a text channel or an active thread, as
/// MESSAGE_CREATE. Without the MESSAGE_CONTENT intent `content` is empty, as Discord sends it.
fn message_create(
    traffic: &mut Traffic,
    guild: &mut Guild,
    intents: Intents,
) -> Option<Box<RawValue>> {
    let channel_id = pick_message_channel(traffic, guild)?;
    let author = guild
        .members
        .get(guild.members.random_slot(&mut traffic.rng, false)?)?;
    let mentioned = if traffic.rng.random_bool(0.1) {
        let slot = guild.members.random_slot(&mut traffic.rng, false)?;
        guild.members.get(slot)
    } else {
        None
    };
    let id = traffic.mint();
    record_message(guild, channel_id, id);

    let content = if !intents.contains(Intents::MESSAGE_CONTENT) {
        String::new()
    } else if let Some(mentioned) = &mentioned {
        format!(
            "<@{}> {}",
            mentioned.user.id,
            random::message_text(&mut traffic.rng)
        )
    } else {
        random::message_text(&mut traffic.rng)
    };
    let payload = MessageView {
        id,
        channel_id,
        guild_id: guild.id,
        author: UserView::new(&author.user),
        member: guild.member_view(&author, false),
        content,
        timestamp: traffic.now(),
        edited_timestamp: None,
        tts: false,
        mention_everyone: false,
        mentions: mentioned
            .iter()
            .map(|record| MentionView {
                user: UserView::new(&record.user),
                member: guild.member_view(record, false),
            })
            .collect(),
        mention_roles: [],
        attachments: [],
        embeds: [],
        pinned: false,
        kind: 0,
        flags: 0,
        components: [],
    };
    Some(raw(&payload))
}

/// Picks a text channel, or in one message of five an active thread if the guild has one.
fn pick_message_channel(traffic: &mut Traffic, guild: &Guild) -> Option<Snowflake> {
    if !guild.threads.is_empty() && traffic.rng.random_bool(0.2) {
        let index = traffic.rng.random_range(0..guild.threads.len());
        return Some(guild.threads[index].id);
    }
    let text: Vec<Snowflake> = guild
        .channels
        .iter()
        .filter(|channel| channel.is_text())
        .map(|channel| channel.id)
        .collect();
    if text.is_empty() {
        return None;
    }
    Some(text[traffic.rng.random_range(0..text.len())])
}

/// Moves the `last_message_id` of a channel or thread to a new message.
fn record_message(guild: &mut Guild, channel_id: Snowflake, message_id: Snowflake) {
    if let Some(thread) = guild
        .threads
        .iter_mut()
        .find(|thread| thread.id == channel_id)
    {
        thread.last_message_id = Some(message_id);
        thread.message_count += 1;
        thread.total_message_sent += 1;
        return;
    }
    let channel = guild
        .channels
        .iter_mut()
        .find(|channel| channel.id == channel_id);
    if let Some(text) = channel.and_then(|channel| channel.text.as_mut()) {
        text.last_message_id = Some(message_id);
    }
}

/// Changes the status of a random member, as PRESENCE_UPDATE.
fn presence_update(traffic: &mut Traffic, guild: &mut Guild) -> Option<Box<RawValue>> {
    let slot = guild.members.random_slot(&mut traffic.rng, false)?;
    let status = match traffic.rng.random_range(0..20) {
        0..=7 => Status::Online,
        8..=12 => Status::Idle,
        13..=14 => Status::Dnd,
        _ => Status::Offline,
    };
    guild.members.set_status(slot, status);

    let record = guild.members.get(slot)?;
    let mut presence = guild.members.presence(&record);
    presence.guild_id = Some(guild.id);
    Some(raw(&presence))
}

/// Adds a new member, as GUILD_MEMBER_ADD. The guild's `member_count` grows by one.
fn member_add(traffic: &mut Traffic, guild: &mut Guild) -> Option<Box<RawValue>> {
    let record = guild.members.join(traffic.now())?;
    let payload = GuildMemberView {
        guild_id: guild.id,
        member: guild.member_view(&record, true),
    };
    Some(raw(&payload))
}

/// Changes the nickname, roles or timeout of a random member, as GUILD_MEMBER_UPDATE.
fn member_update(traffic: &mut Traffic, guild: &mut Guild) -> Option<Box<RawValue>> {
    let slot = guild.members.random_slot(&mut traffic.rng, false)?;
    let mut record = guild.members.get(slot)?;
    let rng = &mut traffic.rng;
    match rng.random_range(0..10) {
        0..=4 => {
            record.nick = match record.nick {
                Some(_) if rng.random_bool(0.5) => None,
                _ => Some(random::display_name(rng)),
            };
        }
        5..=8 => toggle_random_role(rng, guild, &mut record.roles),
        _ => {
            record.communication_disabled_until = match record.communication_disabled_until {
                Some(_) => None,
                None => Some(Timestamp(traffic.now_ms + 600_000)),
            };
        }
    }
    guild.members.store(record.clone());

    let payload = GuildMemberView {
        guild_id: guild.id,
        member: guild.member_view(&record, true),
    };
    Some(raw(&payload))
}

/// Adds or removes a role that members can be given (not @everyone, not a managed role).
fn toggle_random_role(rng: &mut Generator, guild: &Guild, roles: &mut Vec<Snowflake>) {
    let assignable: Vec<Snowflake> = guild
        .roles
        .iter()
        .filter(|role| !role.managed && role.id != guild.id)
        .map(|role| role.id)
        .collect();
    if assignable.is_empty() {
        return;
    }
    let role = assignable[rng.random_range(0..assignable.len())];
    if let Some(index) = roles.iter().position(|id| *id == role) {
        roles.remove(index);
    } else {
        roles.push(role);
    }
}

/// Removes a random member other than the owner, as GUILD_MEMBER_REMOVE. The guild's
/// `member_count` drops by one.
fn member_remove(traffic: &mut Traffic, guild: &mut Guild) -> Option<Box<RawValue>> {
    let slot = guild.members.random_slot(&mut traffic.rng, true)?;
    let record = guild.members.get(slot)?;
    guild.remove_member(slot);

    let payload = MemberRemoveView {
        guild_id: guild.id,
        user: UserView::new(&record.user),
    };
    Some(raw(&payload))
}

/// Creates a role named "new role", the name Discord gives a role created without one, as
/// GUILD_ROLE_CREATE.
fn role_create(traffic: &mut Traffic, guild: &mut Guild) -> Box<RawValue> {
    let role = new_role(traffic.mint(), "new role".to_owned(), 1, Permissions::NONE);
    let payload = RoleView {
        guild_id: guild.id,
        role: &role,
    };
    let data = raw(&payload);
    guild.roles.push(role);
    data
}

/// Renames, recolors, hoists or toggles the mentionability of a role, as GUILD_ROLE_UPDATE.
fn role_update(traffic: &mut Traffic, guild: &mut Guild) -> Option<Box<RawValue>> {
    let index = pick_editable_role(&mut traffic.rng, guild)?;
    let rng = &mut traffic.rng;
    let role = &mut guild.roles[index];
    match rng.random_range(0..4) {
        0 => role.name = random::role_name(rng),
        1 => role.set_color(rng.random_range(0..0x100_0000)),
        2 => role.hoist = !role.hoist,
        _ => role.mentionable = !role.mentionable,
    }

    let payload = RoleView {
        guild_id: guild.id,
        role: &guild.roles[index],
    };
    Some(raw(&payload))
}

/// Deletes a role, as GUILD_ROLE_DELETE. Members and channel overwrites lose it.
fn role_delete(traffic: &mut Traffic, guild: &mut Guild) -> Option<Box<RawValue>> {
    let index = pick_editable_role(&mut traffic.rng, guild)?;
    let role_id = guild.roles[index].id;
    guild.remove_role(role_id);

    let payload = RoleDeleteView {
        guild_id: guild.id,
        role_id,
    };
    Some(raw(&payload))
}

/// Picks a role that moderators can edit: neither @everyone nor a managed role.
fn pick_editable_role(rng: &mut Generator, guild: &Guild) -> Option<usize> {
    let editable: Vec<usize> = guild
        .roles
        .iter()
        .enumerate()
        .filter(|(_, role)| !role.managed && role.id != guild.id)
        .map(|(index, _)| index)
        .collect();
    if editable.is_empty() {
        return None;
    }
    Some(editable[rng.random_range(0..editable.len())])
}

/// Creates a text or voice channel under a random category if the guild has any, as
/// CHANNEL_CREATE.
fn channel_create(traffic: &mut Traffic, guild: &mut Guild) -> Box<RawValue> {
    let id = traffic.mint();
    let rng = &mut traffic.rng;
    let position = guild.channels.len();
    let mut channel = if rng.random_bool(0.7) {
        let name = random::text_channel_name(rng);
        let mut channel = new_text_channel(rng, id, channel_type::TEXT, name, position);
        if let Some(text) = channel.text.as_mut() {
            text.last_message_id = None;
        }
        channel
    } else {
        new_voice_channel(rng, id, position, guild.voice_bitrate())
    };

    let categories: Vec<Snowflake> = guild
        .channels
        .iter()
        .filter(|channel| channel.kind == channel_type::CATEGORY)
        .map(|channel| channel.id)
        .collect();
    if !categories.is_empty() {
        channel.parent_id = Some(categories[rng.random_range(0..categories.len())]);
    }

    let data = raw(&GuildChannelView {
        guild_id: guild.id,
        channel: &channel,
    });
    guild.channels.push(channel);
    data
}

/// Changes the topic, slowmode, name or user limit of a channel, as CHANNEL_UPDATE.
fn channel_update(traffic: &mut Traffic, guild: &mut Guild) -> Option<Box<RawValue>> {
    let candidates: Vec<usize> = guild
        .channels
        .iter()
        .enumerate()
        .filter(|(_, channel)| channel.kind != channel_type::CATEGORY)
        .map(|(index, _)| index)
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let rng = &mut traffic.rng;
    let index = candidates[rng.random_range(0..candidates.len())];
    let channel = &mut guild.channels[index];

    if let Some(text) = channel.text.as_mut() {
        match rng.random_range(0..3) {
            0 => text.topic = Some(random::topic(rng)),
            1 => text.rate_limit_per_user = [0, 5, 10, 30, 60][rng.random_range(0..5)],
            _ => channel.name = random::text_channel_name(rng),
        }
    } else if let Some(voice) = channel.voice.as_mut() {
        match rng.random_range(0..2) {
            0 => voice.user_limit = rng.random_range(0..=25),
            _ => channel.name = random::voice_channel_name(rng),
        }
    }

    Some(raw(&GuildChannelView {
        guild_id: guild.id,
        channel: &guild.channels[index],
    }))
}

/// Deletes a text or voice channel, as CHANNEL_DELETE. The last text channel stays, because
/// messages need one.
fn channel_delete(traffic: &mut Traffic, guild: &mut Guild) -> Option<Box<RawValue>> {
    let text_count = guild
        .channels
        .iter()
        .filter(|channel| channel.is_text())
        .count();
    let candidates: Vec<Snowflake> = guild
        .channels
        .iter()
        .filter(|channel| channel.is_voice() || (channel.is_text() && text_count > 1))
        .map(|channel| channel.id)
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let id = candidates[traffic.rng.random_range(0..candidates.len())];
    let channel = guild.remove_channel(id)?;

    Some(raw(&GuildChannelView {
        guild_id: guild.id,
        channel: &channel,
    }))
}

/// Renames a guild, changes its verification level or adds or removes a boost, as
/// GUILD_UPDATE.
fn guild_update(traffic: &mut Traffic, guild: &mut Guild) -> Box<RawValue> {
    let rng = &mut traffic.rng;
    match rng.random_range(0..3) {
        0 => guild.name = random::guild_name(rng),
        1 => guild.verification_level = rng.random_range(0..=4),
        _ => {
            guild.premium_subscription_count = if rng.random_bool(0.6) {
                guild.premium_subscription_count + 1
            } else {
                guild.premium_subscription_count.saturating_sub(1)
            };
        }
    }
    guild.guild_update()
}

/// Joins the bot to a new guild whose id routes to this shard, as GUILD_CREATE without
/// `unavailable`.
///
/// NOTE: Discord's documentation does not describe `unavailable` for a join. Omitting it follows
/// twilight-model 0.18, whose `Guild::unavailable` documentation ties a missing field to a new
/// guild.
fn join_guild(world: &mut ShardWorld, intents: Intents, large_threshold: u32) -> Box<RawValue> {
    let traffic = &mut world.traffic;
    let size = guild_size(&mut traffic.rng, world.largest_guild);
    let id = loop {
        let id = routed_guild_id(
            &mut traffic.rng,
            world.shard_id,
            world.shard_count,
            traffic.now_ms,
        );
        if !world.guilds.contains_key(&id) {
            break id;
        }
    };
    let seed = traffic.rng.random();
    let guild = Guild::generate(id, seed, size, traffic.now());
    let data = guild.guild_create(large_threshold, intents, false);

    world.guilds.insert(id, guild);
    world.traffic.picks_stale = true;
    data
}

/// Mints a guild id created before `now_ms` that routes to `shard_id`: the creation time is
/// moved to the nearest earlier millisecond whose count since Discord's epoch is `shard_id`
/// modulo `shard_count`.
fn routed_guild_id(rng: &mut Generator, shard_id: u32, shard_count: u32, now_ms: u64) -> Snowflake {
    let shard_count = u64::from(shard_count);
    let unix_ms = rng.random_range(GUILD_CREATED_MS.start..now_ms);
    let offset = unix_ms - DISCORD_EPOCH_MS;
    let mut routed = offset - offset % shard_count + u64::from(shard_id);
    if routed > offset {
        routed -= shard_count;
    }
    let id = Snowflake::from_parts(DISCORD_EPOCH_MS + routed, rng.random_range(0..1 << 22));
    debug_assert_eq!(shard_for_guild(id.get(), shard_count as u32), shard_id);
    id
}

/// Removes the bot from a random guild, as GUILD_DELETE without `unavailable`: Discord's
/// documentation marks a removal by the missing field and an outage by `true`. The shard's last
/// guild stays.
fn leave_guild(world: &mut ShardWorld) -> Option<Box<RawValue>> {
    if world.guilds.len() < 2 {
        return None;
    }
    let index = world.traffic.rng.random_range(0..world.guilds.len());
    let id = *world.guilds.keys().nth(index)?;
    world.guilds.remove(&id);
    world.traffic.picks_stale = true;
    Some(raw(&GuildDeleteView { id }))
}

/// The `d` of MESSAGE_CREATE.
#[derive(Serialize)]
struct MessageView<'a> {
    id: Snowflake,
    channel_id: Snowflake,
    guild_id: Snowflake,
    author: UserView<'a>,
    /// The author's member object, without `user`.
    member: MemberView<'a>,
    content: String,
    timestamp: Timestamp,
    edited_timestamp: Option<Timestamp>,
    tts: bool,
    mention_everyone: bool,
    mentions: Vec<MentionView<'a>>,
    mention_roles: [(); 0],
    attachments: [(); 0],
    embeds: [(); 0],
    pinned: bool,
    /// Message type: 0 is a default message.
    #[serde(rename = "type")]
    kind: u8,
    flags: u32,
    components: [(); 0],
}

/// A mentioned user with its member object.
#[derive(Serialize)]
struct MentionView<'a> {
    #[serde(flatten)]
    user: UserView<'a>,
    member: MemberView<'a>,
}

/// The `d` of GUILD_MEMBER_ADD and GUILD_MEMBER_UPDATE.
#[derive(Serialize)]
struct GuildMemberView<'a> {
    guild_id: Snowflake,
    #[serde(flatten)]
    member: MemberView<'a>,
}

/// The `d` of GUILD_MEMBER_REMOVE.
#[derive(Serialize)]
struct MemberRemoveView<'a> {
    guild_id: Snowflake,
    user: UserView<'a>,
}

/// The `d` of GUILD_ROLE_CREATE and GUILD_ROLE_UPDATE.
#[derive(Serialize)]
struct RoleView<'a> {
    guild_id: Snowflake,
    role: &'a Role,
}

/// The `d` of GUILD_ROLE_DELETE.
#[derive(Serialize)]
struct RoleDeleteView {
    guild_id: Snowflake,
    role_id: Snowflake,
}

/// The `d` of GUILD_DELETE for a guild the bot left.
#[derive(Serialize)]
struct GuildDeleteView {
    id: Snowflake,
}
