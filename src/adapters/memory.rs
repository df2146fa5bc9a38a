//! In-memory adapters: [`MemoryStore`] for the guild-state cache and the sweep cursor,
//! [`MemorySink`] for the event output. They back the simulator and the tests, and they lose
//! everything when the process exits.
//!
//! Cached objects are kept as compact JSON text ([`RawValue`]) rather than `serde_json::Value`
//! trees, which take several times the memory for the same member object. Each dispatch is
//! parsed and checked in full before any table changes, so a malformed payload leaves the cache
//! as it was.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

use actors::gateway::Snowflake;
use actors::store::{
    Applied, CacheTotals, CursorStore, EventSink, PortError, ShardRecord, StateStore,
};
use async_trait::async_trait;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// One cached object as compact JSON text.
type Json = Box<RawValue>;

/// The top-level fields of a JSON object, for payloads that are stored minus some fields or
/// merged into a stored object.
type Fields<'a> = BTreeMap<String, &'a RawValue>;

/// A table of the cache, for [`MemoryStore::table`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    /// Roles by role id.
    Roles,
    /// Guild channels by channel id, threads excluded.
    Channels,
    /// Active threads by channel id.
    Threads,
    /// Custom emojis by emoji id.
    Emojis,
    /// Members by user id.
    Members,
    /// Presences by user id. An offline presence is removed rather than stored, so a missing
    /// presence means offline.
    Presences,
    /// Voice states by user id, one per user connected to a voice channel of the guild.
    VoiceStates,
}

/// A thread and the channel it belongs to, kept so that deleting the channel or syncing its
/// thread list can drop its threads.
struct Thread {
    parent_id: Option<u64>,
    object: Json,
}

/// Everything cached for one guild. The tables of a guild live in its entry, so GUILD_DELETE
/// drops them in one step, and within a guild they are keyed as Discord keys them.
#[derive(Default)]
struct GuildTables {
    /// The guild object without the lists that have tables of their own. `None` while only
    /// events for the guild's contents have arrived, before any GUILD_CREATE or GUILD_UPDATE.
    object: Option<Json>,
    roles: HashMap<u64, Json>,
    channels: HashMap<u64, Json>,
    threads: HashMap<u64, Thread>,
    emojis: HashMap<u64, Json>,
    members: HashMap<u64, Json>,
    presences: HashMap<u64, Json>,
    voice_states: HashMap<u64, Json>,
}

/// Member rows added and removed by one write, for the store-wide member total.
#[derive(Clone, Copy, Default)]
struct MemberDelta {
    added: u64,
    removed: u64,
}

impl GuildTables {
    fn put_member(&mut self, user: u64, member: Json, delta: &mut MemberDelta) {
        if self.members.insert(user, member).is_none() {
            delta.added += 1;
        }
    }

    /// Removes a member and the member's presence, because a user who left the guild gets no
    /// more presence updates from it.
    fn remove_member(&mut self, user: u64, delta: &mut MemberDelta) {
        self.presences.remove(&user);
        if self.members.remove(&user).is_some() {
            delta.removed += 1;
        }
    }

    fn put_presence(&mut self, user: u64, presence: Option<Json>) {
        match presence {
            Some(presence) => {
                self.presences.insert(user, presence);
            }
            None => {
                self.presences.remove(&user);
            }
        }
    }

    fn put_voice_state(&mut self, user: u64, state: Option<Json>) {
        match state {
            Some(state) => {
                self.voice_states.insert(user, state);
            }
            None => {
                self.voice_states.remove(&user);
            }
        }
    }

    /// Replaces the threads of the given parent channels, or of the whole guild for `None`.
    fn sync_threads(&mut self, parents: Option<&[u64]>, threads: Vec<(u64, Thread)>) {
        match parents {
            Some(parents) => self.threads.retain(|_, thread| {
                thread
                    .parent_id
                    .is_none_or(|parent| !parents.contains(&parent))
            }),
            None => self.threads.clear(),
        }
        self.threads.extend(threads);
    }

    fn table_rows(&self, table: Table) -> BTreeMap<u64, Value> {
        let rows = match table {
            Table::Threads => {
                let threads = self.threads.iter();
                return threads
                    .map(|(id, thread)| (*id, to_value(&thread.object)))
                    .collect();
            }
            Table::Roles => &self.roles,
            Table::Channels => &self.channels,
            Table::Emojis => &self.emojis,
            Table::Members => &self.members,
            Table::Presences => &self.presences,
            Table::VoiceStates => &self.voice_states,
        };
        rows.iter().map(|(id, row)| (*id, to_value(row))).collect()
    }
}

/// The guild-state cache and the sweep cursors, in memory.
///
/// Guild entries live in a [`DashMap`], whose sharded locks let shard actors write different
/// guilds in parallel. The ids of cached guilds are also kept in a [`BTreeSet`] so that
/// [`StateStore::guild_ids_after`] reads a range instead of sorting every id. No lock is held
/// across an await, because no method awaits.
#[derive(Default)]
pub struct MemoryStore {
    guilds: DashMap<u64, GuildTables>,
    /// Ids of the guilds whose guild object is cached. Changed only while the guild's entry in
    /// `guilds` is locked, so it never disagrees with `guilds` for longer than one write.
    guild_ids: RwLock<BTreeSet<u64>>,
    /// Member rows of all guilds, kept with the member writes for [`StateStore::totals`].
    member_total: AtomicU64,
    shards: Mutex<HashMap<(u32, String), ShardRecord>>,
    cursors: Mutex<HashMap<String, u64>>,
}

impl MemoryStore {
    /// Creates an empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns a cached guild object, without the lists that have tables of their own.
    pub fn guild(&self, guild_id: u64) -> Option<Value> {
        let tables = self.guilds.get(&guild_id)?;
        tables.object.as_deref().map(to_value)
    }

    /// Returns the cached members of a guild in user id order, empty for a guild not cached.
    pub fn members(&self, guild_id: u64) -> Vec<Value> {
        self.table(guild_id, Table::Members).into_values().collect()
    }

    /// Returns the rows of one table of a guild by id, empty for a guild not cached.
    pub fn table(&self, guild_id: u64, table: Table) -> BTreeMap<u64, Value> {
        self.guilds
            .get(&guild_id)
            .map(|tables| tables.table_rows(table))
            .unwrap_or_default()
    }

    /// Returns the number of guilds whose guild object is cached.
    pub fn guild_count(&self) -> usize {
        read(&self.guild_ids).len()
    }

    /// Returns the number of member rows over all guilds, including guilds whose guild object
    /// is not cached yet.
    pub fn member_total(&self) -> u64 {
        self.member_total.load(Ordering::Relaxed)
    }

    /// Applies a checked write and returns whether it cached a new guild.
    fn write(&self, write: Write) -> bool {
        match write {
            Write::Ignore => false,
            Write::GuildCreate(snapshot) => self.create_guild(snapshot),
            Write::GuildUpdate(patch) => {
                self.update_guild(patch);
                false
            }
            Write::GuildDelete { guild } => {
                self.delete_guild(guild);
                false
            }
            Write::Guild { guild, change } => {
                self.change_guild(guild, change);
                false
            }
        }
    }

    /// Stores a GUILD_CREATE. Roles, channels, threads, emojis and voice states replace the
    /// cached ones. Members and presences are merged instead, because the GUILD_CREATE of a
    /// large guild carries only a few of them.
    fn create_guild(&self, snapshot: GuildSnapshot) -> bool {
        let GuildSnapshot {
            guild,
            object,
            roles,
            channels,
            threads,
            emojis,
            members,
            presences,
            voice_states,
        } = snapshot;
        let mut delta = MemberDelta::default();

        let mut entry = self.guilds.entry(guild).or_default();
        let tables = entry.value_mut();
        let new_guild = tables.object.replace(object).is_none();
        if let Some(roles) = roles {
            tables.roles = roles.into_iter().collect();
        }
        if let Some(channels) = channels {
            tables.channels = channels.into_iter().collect();
        }
        if let Some(threads) = threads {
            tables.sync_threads(None, threads);
        }
        if let Some(emojis) = emojis {
            tables.emojis = emojis.into_iter().collect();
        }
        if let Some(voice_states) = voice_states {
            tables.voice_states = voice_states.into_iter().collect();
        }
        for (user, member) in members {
            tables.put_member(user, member, &mut delta);
        }
        for (user, presence) in presences {
            tables.put_presence(user, presence);
        }
        if new_guild {
            write(&self.guild_ids).insert(guild);
        }
        self.count_members(delta);
        drop(entry);

        if new_guild {
            tracing::debug!(guild_id = guild, "guild cached");
        }
        new_guild
    }

    /// Merges a GUILD_UPDATE into the cached guild object, or caches it for a guild not cached.
    fn update_guild(&self, patch: GuildPatch) {
        let mut entry = self.guilds.entry(patch.guild).or_default();
        let tables = entry.value_mut();
        let object = match tables.object.take() {
            Some(old) => merge_object(&old, &patch.fields),
            None => object_from_fields(field_refs(&patch.fields)),
        };
        let new_guild = tables.object.replace(object).is_none();
        if let Some(roles) = patch.roles {
            tables.roles = roles.into_iter().collect();
        }
        if let Some(emojis) = patch.emojis {
            tables.emojis = emojis.into_iter().collect();
        }
        if new_guild {
            write(&self.guild_ids).insert(patch.guild);
        }
    }

    fn delete_guild(&self, guild: u64) {
        let Entry::Occupied(entry) = self.guilds.entry(guild) else {
            return;
        };
        write(&self.guild_ids).remove(&guild);
        let removed = entry.get().members.len() as u64;
        self.count_members(MemberDelta { added: 0, removed });
        entry.remove();

        tracing::debug!(guild_id = guild, members = removed, "guild removed");
    }

    /// Applies a change to the contents of one guild. Removals on a guild with no entry do
    /// nothing, so they do not create an empty entry.
    fn change_guild(&self, guild: u64, change: GuildChange) {
        let mut delta = MemberDelta::default();
        if change.is_removal() {
            if let Some(mut tables) = self.guilds.get_mut(&guild) {
                change.apply(&mut tables, &mut delta);
                self.count_members(delta);
            }
        } else {
            let mut tables = self.guilds.entry(guild).or_default();
            change.apply(tables.value_mut(), &mut delta);
            self.count_members(delta);
        }
    }

    /// Adds a write's member rows to the total. Called while the guild's entry is locked, so
    /// that a removal is never counted before the addition of the same row.
    fn count_members(&self, delta: MemberDelta) {
        if delta.added > 0 {
            self.member_total.fetch_add(delta.added, Ordering::Relaxed);
        }
        if delta.removed > 0 {
            self.member_total
                .fetch_sub(delta.removed, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn apply(&self, shard: u32, event: &str, data: &RawValue) -> Result<Applied, PortError> {
        let write = parse_dispatch(event, data).map_err(|reason| PortError::InvalidEvent {
            event: event.to_owned(),
            guild: guild_hint(event, data),
            reason,
        })?;
        let new_guild = self.write(write);
        tracing::trace!(shard, event, new_guild, "dispatch applied");
        Ok(Applied { new_guild })
    }

    async fn member_count(&self, guild_id: u64) -> Result<Option<u64>, PortError> {
        let count = self
            .guilds
            .get(&guild_id)
            .and_then(|tables| tables.object.as_ref().map(|_| tables.members.len() as u64));
        Ok(count)
    }

    async fn guild_ids_after(&self, cursor: u64, limit: u32) -> Result<Vec<u64>, PortError> {
        let ids = read(&self.guild_ids);
        let after = (
            std::ops::Bound::Excluded(cursor),
            std::ops::Bound::Unbounded,
        );
        Ok(ids.range(after).take(limit as usize).copied().collect())
    }

    async fn load_shard(&self, shard: u32, name: &str) -> Result<Option<ShardRecord>, PortError> {
        let shards = lock(&self.shards);
        Ok(shards.get(&(shard, name.to_owned())).cloned())
    }

    async fn save_shard(&self, record: &ShardRecord) -> Result<(), PortError> {
        let key = (record.shard, record.name.clone());
        lock(&self.shards).insert(key, record.clone());
        Ok(())
    }

    async fn totals(&self) -> Result<CacheTotals, PortError> {
        Ok(CacheTotals {
            guilds: self.guild_count() as u64,
            members: self.member_total(),
        })
    }
}

#[async_trait]
impl CursorStore for MemoryStore {
    async fn load_cursor(&self, name: &str) -> Result<Option<u64>, PortError> {
        Ok(lock(&self.cursors).get(name).copied())
    }

    async fn save_cursor(&self, name: &str, cursor: u64) -> Result<(), PortError> {
        lock(&self.cursors).insert(name.to_owned(), cursor);
        Ok(())
    }
}

/// The event output in memory: one list per event name in push order, like the Redis lists
/// `gateway:events:<NAME>`. An unbounded sink keeps every event until it is dropped, which suits
/// tests; a bounded one keeps the newest events of each list, for a service left running on the
/// embedded defaults.
#[derive(Default)]
pub struct MemorySink {
    lists: DashMap<String, VecDeque<Json>>,
    total: AtomicU64,
    /// Events kept per list; `None` keeps all.
    max_per_list: Option<usize>,
}

impl MemorySink {
    /// Creates an empty sink that keeps every event.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates an empty sink that keeps the newest `max_per_list` events of each list.
    pub fn bounded(max_per_list: usize) -> Self {
        Self {
            max_per_list: Some(max_per_list.max(1)),
            ..Self::default()
        }
    }

    /// Returns the events pushed under a name, oldest first, as JSON text.
    pub fn list(&self, event: &str) -> Vec<String> {
        self.lists
            .get(event)
            .map(|list| list.iter().map(|data| data.get().to_owned()).collect())
            .unwrap_or_default()
    }

    /// Returns the number of events kept under a name.
    pub fn len(&self, event: &str) -> usize {
        self.lists.get(event).map_or(0, |list| list.len())
    }

    /// Returns the number of events pushed under all names.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Returns the event names that have at least one event, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lists.iter().map(|list| list.key().clone()).collect();
        names.sort_unstable();
        names
    }
}

#[async_trait]
impl EventSink for MemorySink {
    async fn push(&self, event: &str, data: &RawValue) -> Result<(), PortError> {
        let data = data.to_owned();

        // The common case finds the list and skips allocating the name.
        let mut list = match self.lists.get_mut(event) {
            Some(list) => list,
            None => self.lists.entry(event.to_owned()).or_default(),
        };
        if self.max_per_list.is_some_and(|max| list.len() >= max) {
            list.pop_front();
        }
        list.push_back(data);
        drop(list);

        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

// Dispatch parsing. Nothing here touches the store: a dispatch becomes a `Write` or an error.

/// A checked dispatch, ready to apply without further failure.
enum Write {
    Ignore,
    GuildCreate(GuildSnapshot),
    GuildUpdate(GuildPatch),
    GuildDelete { guild: u64 },
    Guild { guild: u64, change: GuildChange },
}

/// A GUILD_CREATE split into the guild object and the rows of each table. A list the payload
/// does not carry is `None` and leaves its table as it is.
struct GuildSnapshot {
    guild: u64,
    object: Json,
    roles: Option<Vec<(u64, Json)>>,
    channels: Option<Vec<(u64, Json)>>,
    threads: Option<Vec<(u64, Thread)>>,
    emojis: Option<Vec<(u64, Json)>>,
    members: Vec<(u64, Json)>,
    presences: Vec<(u64, Option<Json>)>,
    voice_states: Option<Vec<(u64, Json)>>,
}

/// A GUILD_UPDATE: the fields to merge into the cached guild object (or to cache as the guild
/// object when there is none), and the role and emoji lists it carries.
struct GuildPatch {
    guild: u64,
    fields: Vec<(String, Json)>,
    roles: Option<Vec<(u64, Json)>>,
    emojis: Option<Vec<(u64, Json)>>,
}

/// A change to the contents of one guild. `None` in a presence or voice state removes it.
enum GuildChange {
    PutRole(u64, Json),
    RemoveRole(u64),
    PutChannel(u64, Json),
    /// Removes the channel and its threads.
    RemoveChannel(u64),
    PutThread(u64, Thread),
    RemoveThread(u64),
    SyncThreads {
        parents: Option<Vec<u64>>,
        threads: Vec<(u64, Thread)>,
    },
    ReplaceEmojis(Vec<(u64, Json)>),
    PutMember(u64, Json),
    MergeMember(u64, Vec<(String, Json)>),
    RemoveMember(u64),
    PutMembers {
        members: Vec<(u64, Json)>,
        presences: Vec<(u64, Option<Json>)>,
    },
    PutPresence(u64, Option<Json>),
    PutVoiceState(u64, Option<Json>),
}

impl GuildChange {
    fn is_removal(&self) -> bool {
        match self {
            Self::RemoveRole(_)
            | Self::RemoveChannel(_)
            | Self::RemoveThread(_)
            | Self::RemoveMember(_)
            | Self::PutPresence(_, None)
            | Self::PutVoiceState(_, None) => true,
            Self::SyncThreads { threads, .. } => threads.is_empty(),
            _ => false,
        }
    }

    fn apply(self, tables: &mut GuildTables, delta: &mut MemberDelta) {
        match self {
            Self::PutRole(id, role) => {
                tables.roles.insert(id, role);
            }
            Self::RemoveRole(id) => {
                tables.roles.remove(&id);
            }
            Self::PutChannel(id, channel) => {
                tables.channels.insert(id, channel);
            }
            Self::RemoveChannel(id) => {
                tables.channels.remove(&id);
                tables
                    .threads
                    .retain(|_, thread| thread.parent_id != Some(id));
            }
            Self::PutThread(id, thread) => {
                tables.threads.insert(id, thread);
            }
            Self::RemoveThread(id) => {
                tables.threads.remove(&id);
            }
            Self::SyncThreads { parents, threads } => {
                tables.sync_threads(parents.as_deref(), threads);
            }
            Self::ReplaceEmojis(emojis) => tables.emojis = emojis.into_iter().collect(),
            Self::PutMember(user, member) => tables.put_member(user, member, delta),
            Self::MergeMember(user, fields) => {
                let member = match tables.members.get(&user) {
                    Some(old) => merge_object(old, &fields),
                    None => object_from_fields(field_refs(&fields)),
                };
                tables.put_member(user, member, delta);
            }
            Self::RemoveMember(user) => tables.remove_member(user, delta),
            Self::PutMembers { members, presences } => {
                for (user, member) in members {
                    tables.put_member(user, member, delta);
                }
                for (user, presence) in presences {
                    tables.put_presence(user, presence);
                }
            }
            Self::PutPresence(user, presence) => tables.put_presence(user, presence),
            Self::PutVoiceState(user, state) => tables.put_voice_state(user, state),
        }
    }
}

/// Events whose payload is the guild object, so the guild id is its `id` field.
const GUILD_OBJECT_EVENTS: [&str; 3] = ["GUILD_CREATE", "GUILD_UPDATE", "GUILD_DELETE"];

/// Parses and checks a dispatch. The error is the reason the payload cannot be applied, with
/// the path of the offending field.
fn parse_dispatch(event: &str, data: &RawValue) -> Result<Write, String> {
    let json = data.get();
    let write = match event {
        "GUILD_CREATE" => parse_guild_create(json)?,
        "GUILD_UPDATE" => Write::GuildUpdate(parse_guild_update(json)?),
        "GUILD_DELETE" => parse_guild_delete(json)?,
        "GUILD_ROLE_CREATE" | "GUILD_ROLE_UPDATE" => {
            let payload: RolePayload = parse(json)?;
            let id = parse_item::<IdKey>("role", None, payload.role)?.id.get();
            guild_change(
                payload.guild_id,
                GuildChange::PutRole(id, payload.role.to_owned()),
            )
        }
        "GUILD_ROLE_DELETE" => {
            let payload: RoleDeletePayload = parse(json)?;
            guild_change(
                payload.guild_id,
                GuildChange::RemoveRole(payload.role_id.get()),
            )
        }
        "CHANNEL_CREATE" | "CHANNEL_UPDATE" | "CHANNEL_DELETE" => parse_channel(event, data)?,
        "THREAD_CREATE" | "THREAD_UPDATE" | "THREAD_DELETE" => parse_thread(event, data)?,
        "THREAD_LIST_SYNC" => parse_thread_list_sync(json)?,
        "GUILD_EMOJIS_UPDATE" => {
            let payload: EmojisPayload = parse(json)?;
            let emojis = keyed_rows("emojis", payload.emojis, |key: IdKey| key.id.get())?;
            guild_change(payload.guild_id, GuildChange::ReplaceEmojis(emojis))
        }
        "GUILD_MEMBER_ADD" | "GUILD_MEMBER_UPDATE" | "GUILD_MEMBER_REMOVE" | "GUILD_BAN_ADD" => {
            parse_member_event(event, data)?
        }
        "GUILD_MEMBERS_CHUNK" => parse_members_chunk(json)?,
        "PRESENCE_UPDATE" => {
            let payload: PresencePayload = parse(json)?;
            let presence = payload.status.is_online().then(|| data.to_owned());
            let user = payload.user.id.get();
            guild_change(payload.guild_id, GuildChange::PutPresence(user, presence))
        }
        "VOICE_STATE_UPDATE" => parse_voice_state_update(data)?,
        _ => Write::Ignore,
    };
    Ok(write)
}

fn guild_change(guild: Snowflake, change: GuildChange) -> Write {
    Write::Guild {
        guild: guild.get(),
        change,
    }
}

fn parse_guild_create(json: &str) -> Result<Write, String> {
    let mut fields: Fields = parse(json)?;
    let guild = required_id(&fields, "id")?;

    // Discord sends an unavailable guild as `{"id", "unavailable": true}` with no contents.
    if optional_bool(&fields, "unavailable")? {
        tracing::debug!(guild_id = guild, "unavailable GUILD_CREATE ignored");
        return Ok(Write::Ignore);
    }

    let id_of = |key: IdKey| key.id.get();
    let roles = take_list(&mut fields, "roles")?
        .map(|items| keyed_rows("roles", items, id_of))
        .transpose()?;
    let channels = take_list(&mut fields, "channels")?
        .map(|items| keyed_rows("channels", items, id_of))
        .transpose()?;
    let threads = take_list(&mut fields, "threads")?
        .map(|items| thread_rows("threads", items))
        .transpose()?;
    let emojis = take_list(&mut fields, "emojis")?
        .map(|items| keyed_rows("emojis", items, id_of))
        .transpose()?;
    let members = take_list(&mut fields, "members")?
        .map(|items| keyed_rows("members", items, |key: UserKey| key.user.id.get()))
        .transpose()?
        .unwrap_or_default();
    let presences = take_list(&mut fields, "presences")?
        .map(|items| presence_rows("presences", items))
        .transpose()?
        .unwrap_or_default();
    let voice_states = take_list(&mut fields, "voice_states")?
        .map(|items| keyed_rows("voice_states", items, |key: VoiceKey| key.user_id.get()))
        .transpose()?;

    let object = object_from_fields(fields.iter().map(|(key, value)| (key.as_str(), *value)));
    Ok(Write::GuildCreate(GuildSnapshot {
        guild,
        object,
        roles,
        channels,
        threads,
        emojis,
        members,
        presences,
        voice_states,
    }))
}

fn parse_guild_update(json: &str) -> Result<GuildPatch, String> {
    let mut fields: Fields = parse(json)?;
    let guild = required_id(&fields, "id")?;

    let id_of = |key: IdKey| key.id.get();
    let roles = take_list(&mut fields, "roles")?
        .map(|items| keyed_rows("roles", items, id_of))
        .transpose()?;
    let emojis = take_list(&mut fields, "emojis")?
        .map(|items| keyed_rows("emojis", items, id_of))
        .transpose()?;

    Ok(GuildPatch {
        guild,
        fields: owned_fields(fields),
        roles,
        emojis,
    })
}

fn parse_guild_delete(json: &str) -> Result<Write, String> {
    let payload: GuildDeletePayload = parse(json)?;
    let guild = payload.id.get();

    // `unavailable: true` is an outage: the guild comes back with a GUILD_CREATE, and its
    // cache is still valid until then. Without it the bot left or was removed.
    if payload.unavailable == Some(true) {
        tracing::debug!(guild_id = guild, "guild unavailable, cache kept");
        return Ok(Write::Ignore);
    }
    Ok(Write::GuildDelete { guild })
}

/// Parses CHANNEL_CREATE, CHANNEL_UPDATE and CHANNEL_DELETE. A channel without `guild_id` is a
/// DM channel, which the cache does not keep.
fn parse_channel(event: &str, data: &RawValue) -> Result<Write, String> {
    let payload: ChannelKey = parse(data.get())?;
    let Some(guild) = payload.guild_id else {
        return Ok(Write::Ignore);
    };
    let id = payload.id.get();
    let change = if event == "CHANNEL_DELETE" {
        GuildChange::RemoveChannel(id)
    } else {
        GuildChange::PutChannel(id, data.to_owned())
    };
    Ok(guild_change(guild, change))
}

fn parse_thread(event: &str, data: &RawValue) -> Result<Write, String> {
    let payload: ThreadKey = parse(data.get())?;
    let id = payload.id.get();
    let change = if event == "THREAD_DELETE" {
        GuildChange::RemoveThread(id)
    } else {
        let thread = Thread {
            parent_id: payload.parent_id.map(Snowflake::get),
            object: data.to_owned(),
        };
        GuildChange::PutThread(id, thread)
    };
    Ok(guild_change(payload.guild_id, change))
}

/// Parses THREAD_LIST_SYNC. Without `channel_ids` the list covers the whole guild. Thread
/// members (`members`) are not cached.
fn parse_thread_list_sync(json: &str) -> Result<Write, String> {
    let payload: ThreadListSyncPayload = parse(json)?;
    let threads = thread_rows("threads", payload.threads)?;
    let parents = payload
        .channel_ids
        .map(|ids| ids.into_iter().map(Snowflake::get).collect());
    Ok(guild_change(
        payload.guild_id,
        GuildChange::SyncThreads { parents, threads },
    ))
}

/// Parses the member events keyed by `guild_id` and `user.id`. A ban removes the member
/// because a banned user has left the guild, and Discord sends the ban and the removal as
/// separate events.
fn parse_member_event(event: &str, data: &RawValue) -> Result<Write, String> {
    let payload: MemberKey = parse(data.get())?;
    let user = payload.user.id.get();
    let change = match event {
        "GUILD_MEMBER_ADD" => GuildChange::PutMember(user, data.to_owned()),
        "GUILD_MEMBER_UPDATE" => {
            let fields: Fields = parse(data.get())?;
            GuildChange::MergeMember(user, owned_fields(fields))
        }
        _ => GuildChange::RemoveMember(user),
    };
    Ok(guild_change(payload.guild_id, change))
}

fn parse_members_chunk(json: &str) -> Result<Write, String> {
    let payload: ChunkPayload = parse(json)?;
    let members = keyed_rows("members", payload.members, |key: UserKey| key.user.id.get())?;
    let presences = presence_rows("presences", payload.presences.unwrap_or_default())?;
    Ok(guild_change(
        payload.guild_id,
        GuildChange::PutMembers { members, presences },
    ))
}

/// Parses VOICE_STATE_UPDATE. A null `channel_id` means the user left voice. A state without
/// `guild_id` belongs to a DM call, which the cache does not keep.
fn parse_voice_state_update(data: &RawValue) -> Result<Write, String> {
    let payload: VoiceKey = parse(data.get())?;
    let Some(guild) = payload.guild_id else {
        return Ok(Write::Ignore);
    };
    let state = payload.channel_id.map(|_| data.to_owned());
    let change = GuildChange::PutVoiceState(payload.user_id.get(), state);
    Ok(guild_change(guild, change))
}

/// Returns the guild id of a payload that failed to parse, if its guild id field is readable.
fn guild_hint(event: &str, data: &RawValue) -> Option<u64> {
    let field = if GUILD_OBJECT_EVENTS.contains(&event) {
        "id"
    } else {
        "guild_id"
    };
    let fields: Fields = serde_json::from_str(data.get()).ok()?;
    let id: Snowflake = serde_json::from_str(fields.get(field)?.get()).ok()?;
    Some(id.get())
}

// Payload shapes. Each reads only the keys the cache needs, and the stored object is the raw
// JSON.

#[derive(Deserialize)]
struct IdKey {
    id: Snowflake,
}

#[derive(Deserialize)]
struct UserKey {
    user: IdKey,
}

#[derive(Deserialize)]
struct GuildDeletePayload {
    id: Snowflake,
    #[serde(default)]
    unavailable: Option<bool>,
}

#[derive(Deserialize)]
struct RolePayload<'a> {
    guild_id: Snowflake,
    #[serde(borrow)]
    role: &'a RawValue,
}

#[derive(Deserialize)]
struct RoleDeletePayload {
    guild_id: Snowflake,
    role_id: Snowflake,
}

#[derive(Deserialize)]
struct ChannelKey {
    id: Snowflake,
    #[serde(default)]
    guild_id: Option<Snowflake>,
}

/// The keys of a thread. `guild_id` is absent in the thread lists of GUILD_CREATE and
/// THREAD_LIST_SYNC, where the guild is the payload's.
#[derive(Deserialize)]
struct ThreadKey {
    id: Snowflake,
    guild_id: Snowflake,
    #[serde(default)]
    parent_id: Option<Snowflake>,
}

#[derive(Deserialize)]
struct ListedThreadKey {
    id: Snowflake,
    #[serde(default)]
    parent_id: Option<Snowflake>,
}

#[derive(Deserialize)]
struct ThreadListSyncPayload<'a> {
    guild_id: Snowflake,
    #[serde(default)]
    channel_ids: Option<Vec<Snowflake>>,
    #[serde(borrow)]
    threads: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct EmojisPayload<'a> {
    guild_id: Snowflake,
    #[serde(borrow)]
    emojis: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct MemberKey {
    guild_id: Snowflake,
    user: IdKey,
}

#[derive(Deserialize)]
struct ChunkPayload<'a> {
    guild_id: Snowflake,
    #[serde(borrow)]
    members: Vec<&'a RawValue>,
    #[serde(default, borrow)]
    presences: Option<Vec<&'a RawValue>>,
}

/// A presence's status: `online`, `idle`, `dnd` or `offline`. Discord reports invisible users
/// as `offline`.
#[derive(Deserialize)]
#[serde(transparent)]
struct Status<'a>(#[serde(borrow)] Cow<'a, str>);

impl Status<'_> {
    fn is_online(&self) -> bool {
        self.0 != "offline"
    }
}

#[derive(Deserialize)]
struct PresenceKey<'a> {
    user: IdKey,
    #[serde(borrow)]
    status: Status<'a>,
}

#[derive(Deserialize)]
struct PresencePayload<'a> {
    guild_id: Snowflake,
    user: IdKey,
    #[serde(borrow)]
    status: Status<'a>,
}

#[derive(Deserialize)]
struct VoiceKey {
    #[serde(default)]
    guild_id: Option<Snowflake>,
    user_id: Snowflake,
    #[serde(default)]
    channel_id: Option<Snowflake>,
}

// Parsing helpers.

/// Parses a whole payload into `T`, naming the path of the failing field in the error.
fn parse<'a, T: Deserialize<'a>>(json: &'a str) -> Result<T, String> {
    parse_at("", json)
}

/// Parses an element of a list field (`index` given) or an object field, naming its place in
/// the payload in the error, as in `members[3].user.id: invalid type ...`.
fn parse_item<'a, T: Deserialize<'a>>(
    field: &str,
    index: Option<usize>,
    item: &'a RawValue,
) -> Result<T, String> {
    let place = match index {
        Some(index) => format!("{field}[{index}]"),
        None => field.to_owned(),
    };
    parse_at(&place, item.get())
}

/// Parses JSON found at `place` in the payload (empty for the whole payload) into `T`.
fn parse_at<'a, T: Deserialize<'a>>(place: &str, json: &'a str) -> Result<T, String> {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        // `Path` displays as "." when the error is at the top, else as `a.b[3].c`.
        let path = error.path().to_string();
        let inner = error.into_inner();
        let full_path = match (place.is_empty(), path.as_str()) {
            (true, ".") => return inner.to_string(),
            (true, _) => path,
            (false, ".") => place.to_owned(),
            (false, _) if path.starts_with('[') => format!("{place}{path}"),
            (false, _) => format!("{place}.{path}"),
        };
        format!("{full_path}: {inner}")
    })
}

/// Reads the key of each element of a list with `K` and pairs it with the element's JSON.
fn keyed_rows<'a, K: Deserialize<'a>>(
    field: &str,
    items: Vec<&'a RawValue>,
    key: impl Fn(K) -> u64,
) -> Result<Vec<(u64, Json)>, String> {
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            let id = key(parse_item(field, Some(index), item)?);
            Ok((id, item.to_owned()))
        })
        .collect()
}

fn thread_rows(field: &str, items: Vec<&RawValue>) -> Result<Vec<(u64, Thread)>, String> {
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            let key: ListedThreadKey = parse_item(field, Some(index), item)?;
            let thread = Thread {
                parent_id: key.parent_id.map(Snowflake::get),
                object: item.to_owned(),
            };
            Ok((key.id.get(), thread))
        })
        .collect()
}

/// Pairs each presence with its user id. An offline presence becomes `None`.
fn presence_rows(field: &str, items: Vec<&RawValue>) -> Result<Vec<(u64, Option<Json>)>, String> {
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            let key: PresenceKey = parse_item(field, Some(index), item)?;
            let presence = key.status.is_online().then(|| item.to_owned());
            Ok((key.user.id.get(), presence))
        })
        .collect()
}

fn required_id(fields: &Fields, field: &str) -> Result<u64, String> {
    let raw = fields
        .get(field)
        .ok_or_else(|| format!("missing field `{field}`"))?;
    let id: Snowflake = parse_item(field, None, raw)?;
    Ok(id.get())
}

/// Reads an optional boolean field. Absent and null read as false.
fn optional_bool(fields: &Fields, field: &str) -> Result<bool, String> {
    match fields.get(field) {
        Some(raw) => Ok(parse_item::<Option<bool>>(field, None, raw)?.unwrap_or(false)),
        None => Ok(false),
    }
}

/// Removes a list field from `fields` and returns its elements. Absent and null read as `None`.
fn take_list<'a>(
    fields: &mut Fields<'a>,
    field: &str,
) -> Result<Option<Vec<&'a RawValue>>, String> {
    match fields.remove(field) {
        Some(raw) => parse_item(field, None, raw),
        None => Ok(None),
    }
}

fn owned_fields(fields: Fields) -> Vec<(String, Json)> {
    fields
        .into_iter()
        .map(|(key, value)| (key, value.to_owned()))
        .collect()
}

/// Writes a JSON object from its fields.
fn object_from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, &'a RawValue)>) -> Json {
    let mut text = String::from("{");
    for (index, (key, value)) in fields.into_iter().enumerate() {
        if index > 0 {
            text.push(',');
        }
        text.push_str(&Value::from(key).to_string());
        text.push(':');
        text.push_str(value.get());
    }
    text.push('}');
    RawValue::from_string(text).expect("escaped keys and valid JSON values make a valid object")
}

/// Returns `old` with `fields` set, for the partial updates of GUILD_UPDATE and
/// GUILD_MEMBER_UPDATE.
fn merge_object(old: &RawValue, fields: &[(String, Json)]) -> Json {
    // Every stored object was written by `object_from_fields` or is a payload's JSON object,
    // so it parses back into fields.
    let mut merged: BTreeMap<&str, &RawValue> = BTreeMap::new();
    let old_fields: Fields = serde_json::from_str(old.get()).unwrap_or_default();
    for (key, value) in &old_fields {
        merged.insert(key, value);
    }
    merged.extend(field_refs(fields));
    object_from_fields(merged)
}

fn field_refs(fields: &[(String, Json)]) -> impl Iterator<Item = (&str, &RawValue)> {
    fields.iter().map(|(key, value)| (key.as_str(), &**value))
}

fn to_value(json: &RawValue) -> Value {
    serde_json::from_str(json.get()).expect("stored objects are valid JSON")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave a map half-written, so the data
    // of a poisoned lock is still sound.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    const GUILD: u64 = 81_384_788_765_712_384;
    const OTHER_GUILD: u64 = 81_384_788_765_712_385;
    const TEXT_CHANNEL: u64 = 41_771_983_423_143_937;
    const VOICE_CHANNEL: u64 = 41_771_983_423_143_938;

    fn raw(value: &Value) -> Json {
        serde_json::value::to_raw_value(value).unwrap()
    }

    async fn apply(store: &MemoryStore, event: &str, data: Value) -> Result<Applied, PortError> {
        store.apply(0, event, &raw(&data)).await
    }

    async fn apply_ok(store: &MemoryStore, event: &str, data: Value) -> Applied {
        match apply(store, event, data).await {
            Ok(applied) => applied,
            Err(error) => panic!("{event} rejected: {error}"),
        }
    }

    fn user(id: u64) -> Value {
        json!({"id": id.to_string(), "username": format!("user{id}"), "discriminator": "0",
               "global_name": null, "avatar": null})
    }

    fn member(user_id: u64) -> Value {
        json!({"user": user(user_id), "roles": [], "nick": null,
               "joined_at": "2021-06-01T12:00:00.000000+00:00",
               "deaf": false, "mute": false, "flags": 0, "pending": false})
    }

    fn member_in(guild: u64, user_id: u64) -> Value {
        let mut member = member(user_id);
        member["guild_id"] = json!(guild.to_string());
        member
    }

    fn role(id: u64, name: &str) -> Value {
        json!({"id": id.to_string(), "name": name, "color": 0,
               "colors": {"primary_color": 0, "secondary_color": null, "tertiary_color": null},
               "hoist": false, "position": 1, "permissions": "0", "managed": false,
               "mentionable": false, "flags": 0})
    }

    fn channel(id: u64, name: &str) -> Value {
        json!({"id": id.to_string(), "type": 0, "name": name, "position": 0})
    }

    fn thread(id: u64, parent: u64) -> Value {
        json!({"id": id.to_string(), "type": 11, "parent_id": parent.to_string(),
               "name": format!("thread {id}"),
               "thread_metadata": {"archived": false, "auto_archive_duration": 1440,
                                   "archive_timestamp": "2024-01-01T00:00:00.000000+00:00",
                                   "locked": false}})
    }

    fn thread_in(guild: u64, id: u64, parent: u64) -> Value {
        let mut thread = thread(id, parent);
        thread["guild_id"] = json!(guild.to_string());
        thread
    }

    fn emoji(id: u64, name: &str) -> Value {
        json!({"id": id.to_string(), "name": name, "roles": [], "require_colons": true,
               "managed": false, "animated": false, "available": true})
    }

    fn presence(user_id: u64, status: &str) -> Value {
        json!({"user": {"id": user_id.to_string()}, "status": status, "activities": [],
               "client_status": {"desktop": status}})
    }

    fn presence_in(guild: u64, user_id: u64, status: &str) -> Value {
        let mut presence = presence(user_id, status);
        presence["guild_id"] = json!(guild.to_string());
        presence
    }

    fn voice_state(user_id: u64, channel: Option<u64>) -> Value {
        json!({"user_id": user_id.to_string(), "channel_id": channel.map(|id| id.to_string()),
               "session_id": format!("session{user_id}"), "deaf": false, "mute": false,
               "self_deaf": false, "self_mute": false, "self_video": false, "suppress": false,
               "request_to_speak_timestamp": null})
    }

    fn voice_state_in(guild: u64, user_id: u64, channel: Option<u64>) -> Value {
        let mut state = voice_state(user_id, channel);
        state["guild_id"] = json!(guild.to_string());
        state
    }

    /// Returns a GUILD_CREATE with two roles, two channels, a thread, an emoji, two members, an
    /// online and an offline presence and a voice state.
    fn guild_create(guild: u64) -> Value {
        json!({
            "id": guild.to_string(),
            "name": "Test guild",
            "owner_id": "1",
            "member_count": 2,
            "large": false,
            "unavailable": false,
            "roles": [role(guild, "@everyone"), role(500, "moderator")],
            "channels": [channel(TEXT_CHANNEL, "general"), channel(VOICE_CHANNEL, "voice")],
            "threads": [thread(700, TEXT_CHANNEL)],
            "emojis": [emoji(900, "wave")],
            "members": [member(1), member(2)],
            "presences": [presence(1, "online"), presence(2, "offline")],
            "voice_states": [voice_state(1, Some(VOICE_CHANNEL))],
        })
    }

    fn ids(rows: &BTreeMap<u64, Value>) -> Vec<u64> {
        rows.keys().copied().collect()
    }

    #[tokio::test]
    async fn bounded_sink_keeps_newest() {
        let sink = MemorySink::bounded(2);
        for index in 0..5 {
            let data = RawValue::from_string(index.to_string()).unwrap();
            sink.push("MESSAGE_CREATE", &data).await.unwrap();
        }
        assert_eq!(sink.list("MESSAGE_CREATE"), vec!["3", "4"]);
        assert_eq!(sink.total(), 5);
    }

    #[tokio::test]
    async fn guild_create_fills_every_table() {
        let store = MemoryStore::new();

        let applied = apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;

        assert!(applied.new_guild);
        let guild = store.guild(GUILD).expect("guild cached");
        assert_eq!(guild["name"], "Test guild");
        assert_eq!(guild["member_count"], 2);
        for list in [
            "roles",
            "channels",
            "threads",
            "emojis",
            "members",
            "presences",
            "voice_states",
        ] {
            assert!(guild.get(list).is_none(), "guild object keeps {list}");
        }
        assert_eq!(ids(&store.table(GUILD, Table::Roles)), [500, GUILD]);
        assert_eq!(
            ids(&store.table(GUILD, Table::Channels)),
            [TEXT_CHANNEL, VOICE_CHANNEL]
        );
        assert_eq!(ids(&store.table(GUILD, Table::Threads)), [700]);
        assert_eq!(ids(&store.table(GUILD, Table::Emojis)), [900]);
        assert_eq!(ids(&store.table(GUILD, Table::Members)), [1, 2]);
        assert_eq!(ids(&store.table(GUILD, Table::Presences)), [1]);
        assert_eq!(ids(&store.table(GUILD, Table::VoiceStates)), [1]);
        assert_eq!(store.member_count(GUILD).await.unwrap(), Some(2));
        assert_eq!(store.members(GUILD)[1]["user"]["id"], "2");
        assert_eq!(
            store.totals().await.unwrap(),
            CacheTotals {
                guilds: 1,
                members: 2
            }
        );
    }

    #[tokio::test]
    async fn guild_create_of_known_guild() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;

        // A reconnect's GUILD_CREATE of a large guild: one role left, one member listed.
        let mut again = guild_create(GUILD);
        again["name"] = json!("Renamed");
        again["roles"] = json!([role(GUILD, "@everyone")]);
        again["members"] = json!([member(3)]);
        again["presences"] = json!([]);
        again["voice_states"] = json!([]);
        let applied = apply_ok(&store, "GUILD_CREATE", again).await;

        assert!(!applied.new_guild);
        assert_eq!(store.guild(GUILD).unwrap()["name"], "Renamed");
        assert_eq!(ids(&store.table(GUILD, Table::Roles)), [GUILD]);
        assert_eq!(ids(&store.table(GUILD, Table::Members)), [1, 2, 3]);
        assert_eq!(ids(&store.table(GUILD, Table::Presences)), [1]);
        assert!(store.table(GUILD, Table::VoiceStates).is_empty());
        assert_eq!(store.member_count(GUILD).await.unwrap(), Some(3));
        assert_eq!(store.member_total(), 3);
    }

    #[tokio::test]
    async fn unavailable_guild_create_ignored() {
        let store = MemoryStore::new();

        let unavailable = json!({"id": GUILD.to_string(), "unavailable": true});
        let applied = apply_ok(&store, "GUILD_CREATE", unavailable).await;

        assert!(!applied.new_guild);
        assert_eq!(store.guild(GUILD), None);
        assert_eq!(store.guild_count(), 0);
    }

    #[tokio::test]
    async fn guild_update_merges_fields() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;

        let update = json!({
            "id": GUILD.to_string(),
            "name": "New name",
            "owner_id": "2",
            "roles": [role(GUILD, "@everyone"), role(501, "admin")],
            "emojis": [],
        });
        let applied = apply_ok(&store, "GUILD_UPDATE", update).await;

        assert!(!applied.new_guild);
        let guild = store.guild(GUILD).unwrap();
        assert_eq!(guild["name"], "New name");
        assert_eq!(guild["owner_id"], "2");
        assert_eq!(
            guild["member_count"], 2,
            "fields not in the update are kept"
        );
        assert!(guild.get("roles").is_none());
        assert_eq!(ids(&store.table(GUILD, Table::Roles)), [501, GUILD]);
        assert!(store.table(GUILD, Table::Emojis).is_empty());
        assert_eq!(ids(&store.table(GUILD, Table::Channels)).len(), 2);
    }

    #[tokio::test]
    async fn guild_update_of_unknown_guild_caches_it() {
        let store = MemoryStore::new();

        let update = json!({"id": GUILD.to_string(), "name": "Late"});
        apply_ok(&store, "GUILD_UPDATE", update).await;

        assert_eq!(store.guild(GUILD).unwrap()["name"], "Late");
        assert_eq!(store.guild_ids_after(0, 10).await.unwrap(), [GUILD]);
    }

    #[tokio::test]
    async fn guild_delete_removes_guild_contents() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
        apply_ok(&store, "GUILD_CREATE", guild_create(OTHER_GUILD)).await;

        let delete = json!({"id": GUILD.to_string()});
        apply_ok(&store, "GUILD_DELETE", delete).await;

        assert_eq!(store.guild(GUILD), None);
        assert_eq!(store.member_count(GUILD).await.unwrap(), None);
        assert!(store.members(GUILD).is_empty());
        for table in [
            Table::Roles,
            Table::Channels,
            Table::Threads,
            Table::Presences,
        ] {
            assert!(store.table(GUILD, table).is_empty(), "{table:?} kept");
        }
        assert_eq!(store.guild_ids_after(0, 10).await.unwrap(), [OTHER_GUILD]);
        assert_eq!(
            store.totals().await.unwrap(),
            CacheTotals {
                guilds: 1,
                members: 2
            }
        );
    }

    #[tokio::test]
    async fn unavailable_guild_delete_keeps_cache() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;

        let outage = json!({"id": GUILD.to_string(), "unavailable": true});
        apply_ok(&store, "GUILD_DELETE", outage).await;

        assert!(store.guild(GUILD).is_some());
        assert_eq!(store.member_count(GUILD).await.unwrap(), Some(2));
        assert_eq!(ids(&store.table(GUILD, Table::Roles)).len(), 2);

        // The guild comes back: it was never dropped, so it is not new.
        let applied = apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
        assert!(!applied.new_guild);
    }

    #[tokio::test]
    async fn role_events() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
        let guild_id = GUILD.to_string();

        let created = json!({"guild_id": guild_id, "role": role(502, "new")});
        apply_ok(&store, "GUILD_ROLE_CREATE", created).await;
        let updated = json!({"guild_id": guild_id, "role": role(502, "renamed")});
        apply_ok(&store, "GUILD_ROLE_UPDATE", updated).await;

        let roles = store.table(GUILD, Table::Roles);
        assert_eq!(roles[&502]["name"], "renamed");

        let deleted = json!({"guild_id": guild_id, "role_id": "500"});
        apply_ok(&store, "GUILD_ROLE_DELETE", deleted).await;
        assert_eq!(ids(&store.table(GUILD, Table::Roles)), [502, GUILD]);
    }

    #[tokio::test]
    async fn channel_events() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
        let guild_id = GUILD.to_string();

        let mut created = channel(42, "new");
        created["guild_id"] = json!(guild_id);
        apply_ok(&store, "CHANNEL_CREATE", created.clone()).await;
        created["name"] = json!("renamed");
        apply_ok(&store, "CHANNEL_UPDATE", created).await;
        assert_eq!(store.table(GUILD, Table::Channels)[&42]["name"], "renamed");

        // Deleting a channel drops its threads with it.
        let mut deleted = channel(TEXT_CHANNEL, "general");
        deleted["guild_id"] = json!(guild_id);
        apply_ok(&store, "CHANNEL_DELETE", deleted).await;
        assert_eq!(
            ids(&store.table(GUILD, Table::Channels)),
            [42, VOICE_CHANNEL]
        );
        assert!(store.table(GUILD, Table::Threads).is_empty());
    }

    #[tokio::test]
    async fn dm_channel_ignored() {
        let store = MemoryStore::new();

        let dm = json!({"id": "77", "type": 1, "recipients": [user(1)]});
        apply_ok(&store, "CHANNEL_CREATE", dm).await;

        assert_eq!(store.guild_count(), 0);
        assert!(
            store.guilds.is_empty(),
            "a DM channel created a guild entry"
        );
    }

    #[tokio::test]
    async fn thread_events() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;

        apply_ok(&store, "THREAD_CREATE", thread_in(GUILD, 701, TEXT_CHANNEL)).await;
        let mut updated = thread_in(GUILD, 701, TEXT_CHANNEL);
        updated["name"] = json!("renamed");
        apply_ok(&store, "THREAD_UPDATE", updated).await;
        let threads = store.table(GUILD, Table::Threads);
        assert_eq!(ids(&threads), [700, 701]);
        assert_eq!(threads[&701]["name"], "renamed");

        let deleted = json!({"id": "700", "guild_id": GUILD.to_string(),
                             "parent_id": TEXT_CHANNEL.to_string(), "type": 11});
        apply_ok(&store, "THREAD_DELETE", deleted).await;
        assert_eq!(ids(&store.table(GUILD, Table::Threads)), [701]);
    }

    #[tokio::test]
    async fn thread_list_sync_replaces_listed_parents() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
        apply_ok(
            &store,
            "THREAD_CREATE",
            thread_in(GUILD, 710, VOICE_CHANNEL),
        )
        .await;
        let guild_id = GUILD.to_string();

        // A sync of the text channel replaces its thread 700 and leaves 710 of the voice channel.
        let partial = json!({"guild_id": guild_id, "channel_ids": [TEXT_CHANNEL.to_string()],
                             "threads": [thread(720, TEXT_CHANNEL)], "members": []});
        apply_ok(&store, "THREAD_LIST_SYNC", partial).await;
        assert_eq!(ids(&store.table(GUILD, Table::Threads)), [710, 720]);

        // A sync without channel_ids covers the whole guild.
        let full = json!({"guild_id": guild_id, "threads": [thread(730, VOICE_CHANNEL)],
                          "members": []});
        apply_ok(&store, "THREAD_LIST_SYNC", full).await;
        assert_eq!(ids(&store.table(GUILD, Table::Threads)), [730]);
    }

    #[tokio::test]
    async fn emojis_update_replaces_emojis() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;

        let update = json!({"guild_id": GUILD.to_string(),
                            "emojis": [emoji(901, "smile"), emoji(902, "frown")]});
        apply_ok(&store, "GUILD_EMOJIS_UPDATE", update).await;

        assert_eq!(ids(&store.table(GUILD, Table::Emojis)), [901, 902]);
    }

    #[tokio::test]
    async fn member_add_update_remove() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
        let guild_id = GUILD.to_string();

        apply_ok(&store, "GUILD_MEMBER_ADD", member_in(GUILD, 3)).await;
        assert_eq!(store.member_count(GUILD).await.unwrap(), Some(3));

        let update = json!({"guild_id": guild_id, "user": user(3), "roles": ["500"],
                            "nick": "three", "joined_at": "2021-06-01T12:00:00.000000+00:00"});
        apply_ok(&store, "GUILD_MEMBER_UPDATE", update).await;
        let updated = &store.table(GUILD, Table::Members)[&3];
        assert_eq!(updated["nick"], "three");
        assert_eq!(updated["roles"], json!(["500"]));
        assert_eq!(updated["deaf"], false, "fields not in the update are kept");
        assert_eq!(store.member_count(GUILD).await.unwrap(), Some(3));

        let remove = json!({"guild_id": guild_id, "user": user(1)});
        apply_ok(&store, "GUILD_MEMBER_REMOVE", remove).await;
        assert_eq!(ids(&store.table(GUILD, Table::Members)), [2, 3]);
        assert!(
            store.table(GUILD, Table::Presences).is_empty(),
            "presence of a removed member kept"
        );
        assert_eq!(store.member_count(GUILD).await.unwrap(), Some(2));
        assert_eq!(store.member_total(), 2);
    }

    #[tokio::test]
    async fn member_update_of_unknown_member_inserts() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;

        let update = json!({"guild_id": GUILD.to_string(), "user": user(9), "roles": [],
                            "joined_at": null});
        apply_ok(&store, "GUILD_MEMBER_UPDATE", update).await;

        assert_eq!(store.table(GUILD, Table::Members)[&9]["user"]["id"], "9");
        assert_eq!(store.member_count(GUILD).await.unwrap(), Some(3));
    }

    #[tokio::test]
    async fn ban_removes_member() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;

        let ban = json!({"guild_id": GUILD.to_string(), "user": user(2)});
        apply_ok(&store, "GUILD_BAN_ADD", ban).await;

        assert_eq!(ids(&store.table(GUILD, Table::Members)), [1]);
        assert_eq!(store.member_count(GUILD).await.unwrap(), Some(1));
    }

    #[tokio::test]
    async fn members_chunk_stores_members_and_presences() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;

        let chunk = json!({
            "guild_id": GUILD.to_string(),
            "members": [member(2), member(3), member(4)],
            "presences": [presence(3, "idle"), presence(1, "offline")],
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
        });
        apply_ok(&store, "GUILD_MEMBERS_CHUNK", chunk).await;

        assert_eq!(ids(&store.table(GUILD, Table::Members)), [1, 2, 3, 4]);
        assert_eq!(ids(&store.table(GUILD, Table::Presences)), [3]);
        assert_eq!(store.member_count(GUILD).await.unwrap(), Some(4));
        assert_eq!(store.member_total(), 4);
    }

    #[tokio::test]
    async fn presence_update_online_and_offline() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;

        apply_ok(&store, "PRESENCE_UPDATE", presence_in(GUILD, 2, "dnd")).await;
        let presences = store.table(GUILD, Table::Presences);
        assert_eq!(ids(&presences), [1, 2]);
        assert_eq!(presences[&2]["status"], "dnd");

        apply_ok(&store, "PRESENCE_UPDATE", presence_in(GUILD, 1, "offline")).await;
        assert_eq!(ids(&store.table(GUILD, Table::Presences)), [2]);
    }

    #[tokio::test]
    async fn voice_state_join_move_leave() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;

        let joined = voice_state_in(GUILD, 2, Some(VOICE_CHANNEL));
        apply_ok(&store, "VOICE_STATE_UPDATE", joined).await;
        assert_eq!(ids(&store.table(GUILD, Table::VoiceStates)), [1, 2]);

        let moved = voice_state_in(GUILD, 2, Some(TEXT_CHANNEL));
        apply_ok(&store, "VOICE_STATE_UPDATE", moved).await;
        let states = store.table(GUILD, Table::VoiceStates);
        assert_eq!(states[&2]["channel_id"], TEXT_CHANNEL.to_string());

        let left = voice_state_in(GUILD, 1, None);
        apply_ok(&store, "VOICE_STATE_UPDATE", left).await;
        assert_eq!(ids(&store.table(GUILD, Table::VoiceStates)), [2]);

        // A DM call has no guild and is not cached.
        apply_ok(&store, "VOICE_STATE_UPDATE", voice_state(5, Some(77))).await;
        assert_eq!(ids(&store.table(GUILD, Table::VoiceStates)), [2]);
    }

    #[tokio::test]
    async fn uncached_events_accepted() {
        let store = MemoryStore::new();

        let message = json!({"id": "1", "channel_id": "2", "content": "hello"});
        let applied = apply_ok(&store, "MESSAGE_CREATE", message).await;

        assert_eq!(applied, Applied::default());
        assert!(store.guilds.is_empty());
    }

    #[tokio::test]
    async fn malformed_chunk_names_field() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;

        let mut bad_member = member(4);
        bad_member["user"]["id"] = json!("not-an-id");
        let chunk = json!({"guild_id": GUILD.to_string(), "members": [member(3), bad_member],
                           "chunk_index": 0, "chunk_count": 1, "not_found": []});
        let error = apply(&store, "GUILD_MEMBERS_CHUNK", chunk)
            .await
            .expect_err("malformed chunk accepted");

        let PortError::InvalidEvent {
            event,
            guild,
            reason,
        } = &error
        else {
            panic!("expected InvalidEvent, got {error:?}");
        };
        assert_eq!(event, "GUILD_MEMBERS_CHUNK");
        assert_eq!(*guild, Some(GUILD));
        assert!(reason.starts_with("members[1].user.id: "), "{reason}");
        assert!(reason.contains("not-an-id"), "{reason}");
        let message = error.to_string();
        assert!(message.contains(&GUILD.to_string()), "{message}");

        // The valid member before the bad one was not stored either.
        assert_eq!(ids(&store.table(GUILD, Table::Members)), [1, 2]);
        assert_eq!(store.member_total(), 2);
    }

    #[tokio::test]
    async fn malformed_payloads_rejected() {
        let store = MemoryStore::new();
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
        let guild_id = GUILD.to_string();

        let mut bad_create = guild_create(OTHER_GUILD);
        bad_create["roles"][1] = json!({"name": "no id"});
        let cases = [
            (
                "GUILD_CREATE",
                json!({"name": "no id"}),
                None,
                "missing field `id`",
            ),
            (
                "GUILD_CREATE",
                bad_create,
                Some(OTHER_GUILD),
                "roles[1]: missing field `id`",
            ),
            (
                "GUILD_DELETE",
                json!({"id": null}),
                None,
                "id: invalid type: null",
            ),
            (
                "GUILD_ROLE_CREATE",
                json!({"guild_id": guild_id}),
                Some(GUILD),
                "missing field `role`",
            ),
            (
                "GUILD_MEMBER_ADD",
                json!({"guild_id": guild_id, "roles": []}),
                Some(GUILD),
                "missing field `user`",
            ),
            (
                "GUILD_MEMBER_REMOVE",
                json!({"user": user(1)}),
                None,
                "missing field `guild_id`",
            ),
            (
                "THREAD_CREATE",
                thread(750, TEXT_CHANNEL),
                None,
                "missing field `guild_id`",
            ),
            (
                "PRESENCE_UPDATE",
                json!({"guild_id": guild_id, "user": {"id": "1"}}),
                Some(GUILD),
                "missing field `status`",
            ),
            (
                "VOICE_STATE_UPDATE",
                json!({"guild_id": guild_id, "channel_id": null}),
                Some(GUILD),
                "missing field `user_id`",
            ),
            (
                "GUILD_EMOJIS_UPDATE",
                json!({"guild_id": guild_id, "emojis": {}}),
                Some(GUILD),
                "emojis: invalid type: map",
            ),
            (
                "GUILD_MEMBERS_CHUNK",
                json!("chunk"),
                None,
                "invalid type: string \"chunk\"",
            ),
        ];

        for (event, data, expected_guild, expected_reason) in cases {
            let error = apply(&store, event, data).await.expect_err(event);
            let PortError::InvalidEvent {
                event: error_event,
                guild,
                reason,
            } = error
            else {
                panic!("{event}: expected InvalidEvent, got {error:?}");
            };
            assert_eq!(error_event, event);
            assert_eq!(guild, expected_guild, "{event}: {reason}");
            assert!(
                reason.starts_with(expected_reason),
                "{event}: {reason:?} does not start with {expected_reason:?}"
            );
        }

        assert_eq!(store.guild_count(), 1);
        assert_eq!(store.member_total(), 2);
    }

    #[tokio::test]
    async fn guild_ids_after_pages_in_order() {
        let store = MemoryStore::new();
        let guilds: Vec<u64> = (1..=25).map(|k| k * 1_000).rev().collect();
        for &guild in &guilds {
            apply_ok(&store, "GUILD_CREATE", guild_create(guild)).await;
        }

        let mut seen: Vec<u64> = Vec::new();
        let mut cursor = 0;
        loop {
            let page = store.guild_ids_after(cursor, 10).await.unwrap();
            assert!(page.len() <= 10);
            let Some(&last) = page.last() else { break };
            seen.extend(&page);
            cursor = last;
        }

        let expected: Vec<u64> = (1..=25).map(|k| k * 1_000).collect();
        assert_eq!(seen, expected);
        assert_eq!(
            store.guild_ids_after(12_500, 2).await.unwrap(),
            [13_000, 14_000]
        );
        assert!(store.guild_ids_after(25_000, 10).await.unwrap().is_empty());
        assert!(store.guild_ids_after(0, 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn guild_ids_after_skips_contents_only_guilds() {
        let store = MemoryStore::new();

        // Members of a guild whose GUILD_CREATE has not been cached.
        apply_ok(&store, "GUILD_MEMBER_ADD", member_in(GUILD, 1)).await;

        assert!(store.guild_ids_after(0, 10).await.unwrap().is_empty());
        assert_eq!(store.member_count(GUILD).await.unwrap(), None);
        assert_eq!(store.member_total(), 1);

        let applied = apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
        assert!(applied.new_guild);
        assert_eq!(store.member_count(GUILD).await.unwrap(), Some(2));
    }

    #[tokio::test]
    async fn shard_record_round_trip() {
        let store = MemoryStore::new();
        let record = ShardRecord {
            shard: 3,
            name: "bot-a".to_owned(),
            seq: 1_234,
            session_id: Some("session".to_owned()),
            resume_url: Some("wss://resume.example".to_owned()),
            status: "steady".to_owned(),
        };

        assert_eq!(store.load_shard(3, "bot-a").await.unwrap(), None);
        store.save_shard(&record).await.unwrap();

        assert_eq!(
            store.load_shard(3, "bot-a").await.unwrap(),
            Some(record.clone())
        );
        assert_eq!(store.load_shard(3, "bot-b").await.unwrap(), None);
        assert_eq!(store.load_shard(4, "bot-a").await.unwrap(), None);

        let newer = ShardRecord {
            seq: 2_000,
            ..record
        };
        store.save_shard(&newer).await.unwrap();
        assert_eq!(store.load_shard(3, "bot-a").await.unwrap(), Some(newer));
    }

    #[tokio::test]
    async fn cursor_round_trip() {
        let store = MemoryStore::new();

        assert_eq!(store.load_cursor("bot-a").await.unwrap(), None);
        store.save_cursor("bot-a", 42).await.unwrap();
        store.save_cursor("bot-b", 7).await.unwrap();
        store.save_cursor("bot-a", 43).await.unwrap();

        assert_eq!(store.load_cursor("bot-a").await.unwrap(), Some(43));
        assert_eq!(store.load_cursor("bot-b").await.unwrap(), Some(7));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_keep_totals() {
        let store = std::sync::Arc::new(MemoryStore::new());

        let writers: Vec<_> = (0..8u64)
            .map(|writer| {
                let store = store.clone();
                tokio::spawn(async move {
                    for index in 0..50 {
                        let guild = 1_000 + writer * 100 + index;
                        apply_ok(&store, "GUILD_CREATE", guild_create(guild)).await;
                        apply_ok(&store, "GUILD_MEMBER_ADD", member_in(guild, 9)).await;
                        if index % 5 == 0 {
                            let delete = json!({"id": guild.to_string()});
                            apply_ok(&store, "GUILD_DELETE", delete).await;
                        }
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }

        // 400 guilds created, every fifth deleted, three members each.
        assert_eq!(
            store.totals().await.unwrap(),
            CacheTotals {
                guilds: 320,
                members: 960
            }
        );
        assert_eq!(store.guild_ids_after(0, 1_000).await.unwrap().len(), 320);
    }

    /// One step of the member-count property test.
    #[derive(Clone, Debug)]
    enum MemberOp {
        Create { guild: u64, users: Vec<u64> },
        Add { guild: u64, user: u64 },
        Remove { guild: u64, user: u64 },
        Ban { guild: u64, user: u64 },
        Chunk { guild: u64, users: Vec<u64> },
        Delete { guild: u64, unavailable: bool },
    }

    fn member_op() -> impl Strategy<Value = MemberOp> {
        // Few guilds and users, so that operations collide on the same rows.
        let guild = 1..4u64;
        let user = 1..12u64;
        let users = prop::collection::vec(1..12u64, 0..6);
        prop_oneof![
            (guild.clone(), users.clone())
                .prop_map(|(guild, users)| MemberOp::Create { guild, users }),
            (guild.clone(), user.clone()).prop_map(|(guild, user)| MemberOp::Add { guild, user }),
            (guild.clone(), user.clone())
                .prop_map(|(guild, user)| MemberOp::Remove { guild, user }),
            (guild.clone(), user).prop_map(|(guild, user)| MemberOp::Ban { guild, user }),
            (guild.clone(), users).prop_map(|(guild, users)| MemberOp::Chunk { guild, users }),
            (guild, any::<bool>())
                .prop_map(|(guild, unavailable)| MemberOp::Delete { guild, unavailable }),
        ]
    }

    /// Applies one operation to the store and to a model of member rows.
    async fn apply_member_op(
        store: &MemoryStore,
        model: &mut HashMap<u64, HashSet<u64>>,
        cached: &mut HashSet<u64>,
        op: MemberOp,
    ) {
        match op {
            MemberOp::Create { guild, users } => {
                let mut create = guild_create(guild);
                create["members"] = users.iter().map(|&user| member(user)).collect();
                apply_ok(store, "GUILD_CREATE", create).await;
                model.entry(guild).or_default().extend(users);
                cached.insert(guild);
            }
            MemberOp::Add { guild, user } => {
                apply_ok(store, "GUILD_MEMBER_ADD", member_in(guild, user)).await;
                model.entry(guild).or_default().insert(user);
            }
            MemberOp::Remove {
                guild,
                user: user_id,
            }
            | MemberOp::Ban {
                guild,
                user: user_id,
            } => {
                let event = if matches!(op, MemberOp::Ban { .. }) {
                    "GUILD_BAN_ADD"
                } else {
                    "GUILD_MEMBER_REMOVE"
                };
                let data = json!({"guild_id": guild.to_string(), "user": user(user_id)});
                apply_ok(store, event, data).await;
                if let Some(members) = model.get_mut(&guild) {
                    members.remove(&user_id);
                }
            }
            MemberOp::Chunk { guild, users } => {
                let members: Vec<Value> = users.iter().map(|&user| member(user)).collect();
                let chunk = json!({"guild_id": guild.to_string(), "members": members,
                                   "chunk_index": 0, "chunk_count": 1, "not_found": []});
                apply_ok(store, "GUILD_MEMBERS_CHUNK", chunk).await;
                model.entry(guild).or_default().extend(users);
            }
            MemberOp::Delete { guild, unavailable } => {
                let delete = json!({"id": guild.to_string(), "unavailable": unavailable});
                apply_ok(store, "GUILD_DELETE", delete).await;
                if !unavailable {
                    model.remove(&guild);
                    cached.remove(&guild);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn member_count_matches_rows(ops in prop::collection::vec(member_op(), 1..60)) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                let store = MemoryStore::new();
                let mut model: HashMap<u64, HashSet<u64>> = HashMap::new();
                let mut cached: HashSet<u64> = HashSet::new();

                for op in ops {
                    apply_member_op(&store, &mut model, &mut cached, op).await;
                }

                for guild in 1..4u64 {
                    let expected = cached
                        .contains(&guild)
                        .then(|| model.get(&guild).map_or(0, |members| members.len() as u64));
                    assert_eq!(store.member_count(guild).await.unwrap(), expected, "guild {guild}");
                    let rows = store.members(guild).len() as u64;
                    assert_eq!(rows, model.get(&guild).map_or(0, |members| members.len() as u64));
                }
                let total: usize = model.values().map(HashSet::len).sum();
                assert_eq!(store.member_total(), total as u64);
            });
        }
    }

    /// The fixtures above follow Discord's payload shapes, checked against twilight-model.
    #[test]
    fn fixtures_parse_as_discord_payloads() {
        use twilight_model::gateway::payload::incoming as discord;

        fn check<T: serde::de::DeserializeOwned>(name: &str, value: Value) {
            if let Err(error) = serde_json::from_value::<T>(value) {
                panic!("{name} fixture does not parse as Discord's shape: {error}");
            }
        }

        let guild_id = GUILD.to_string();
        check::<discord::MemberAdd>("GUILD_MEMBER_ADD", member_in(GUILD, 1));
        check::<discord::MemberRemove>(
            "GUILD_MEMBER_REMOVE",
            json!({"guild_id": guild_id, "user": user(1)}),
        );
        check::<discord::BanAdd>(
            "GUILD_BAN_ADD",
            json!({"guild_id": guild_id, "user": user(1)}),
        );
        check::<discord::MemberChunk>(
            "GUILD_MEMBERS_CHUNK",
            json!({"guild_id": guild_id, "members": [member(1)],
                   "presences": [presence_in(GUILD, 1, "online")],
                   "chunk_index": 0, "chunk_count": 1, "not_found": []}),
        );
        check::<discord::RoleCreate>(
            "GUILD_ROLE_CREATE",
            json!({"guild_id": guild_id, "role": role(500, "moderator")}),
        );
        check::<discord::RoleDelete>(
            "GUILD_ROLE_DELETE",
            json!({"guild_id": guild_id, "role_id": "500"}),
        );
        check::<discord::GuildEmojisUpdate>(
            "GUILD_EMOJIS_UPDATE",
            json!({"guild_id": guild_id, "emojis": [emoji(900, "wave")]}),
        );
        check::<discord::ThreadCreate>("THREAD_CREATE", thread_in(GUILD, 700, TEXT_CHANNEL));
        check::<discord::ThreadDelete>(
            "THREAD_DELETE",
            json!({"id": "700", "guild_id": guild_id, "parent_id": TEXT_CHANNEL.to_string(),
                   "type": 11}),
        );
        check::<discord::ThreadListSync>(
            "THREAD_LIST_SYNC",
            json!({"guild_id": guild_id, "channel_ids": [TEXT_CHANNEL.to_string()],
                   "threads": [thread(720, TEXT_CHANNEL)], "members": []}),
        );
        check::<discord::PresenceUpdate>("PRESENCE_UPDATE", presence_in(GUILD, 1, "idle"));
        check::<discord::VoiceStateUpdate>(
            "VOICE_STATE_UPDATE",
            voice_state_in(GUILD, 1, Some(VOICE_CHANNEL)),
        );
        check::<discord::GuildDelete>("GUILD_DELETE", json!({"id": guild_id, "unavailable": true}));
    }

    #[tokio::test]
    async fn sink_keeps_lists_per_event() {
        let sink = MemorySink::new();

        for (event, data) in [
            ("MESSAGE_CREATE", json!({"id": "1"})),
            ("GUILD_CREATE", json!({"id": "2"})),
            ("MESSAGE_CREATE", json!({"id": "3"})),
        ] {
            sink.push(event, &raw(&data)).await.unwrap();
        }

        assert_eq!(
            sink.list("MESSAGE_CREATE"),
            [r#"{"id":"1"}"#, r#"{"id":"3"}"#]
        );
        assert_eq!(sink.len("MESSAGE_CREATE"), 2);
        assert_eq!(sink.len("GUILD_CREATE"), 1);
        assert_eq!(sink.len("TYPING_START"), 0);
        assert!(sink.list("TYPING_START").is_empty());
        assert_eq!(sink.total(), 3);
        assert_eq!(sink.names(), ["GUILD_CREATE", "MESSAGE_CREATE"]);
    }
}
