//! The simulated bot's guilds: generated from a seed, partitioned by shard, and mutated by the
//! steady dispatch traffic.
//!
//! Guild structure (roles, channels, threads, emojis, voice connections) is generated and stored.
//! Members are not: each member is derived from the guild's seed and its slot number when a
//! payload needs it, and only the changes made by the traffic are stored (see `members`). Every
//! payload follows Discord's documented shapes and deserializes with twilight-model 0.18.

mod chunks;
mod generate;
mod guild;
mod members;
mod objects;
mod random;
mod traffic;
mod wire;

use std::collections::{BTreeMap, HashSet};

use actors::gateway::{shard_for_guild, Intents, RequestGuildMembers, Snowflake};
use rand::RngExt;
use serde_json::value::RawValue;

use guild::Guild;
use members::MAX_SLOTS;
use objects::random_id;
use random::{
    generator, guild_size, mix, Generator, BOT_CREATED_MS, GUILD_CREATED_MS, MIN_GUILD_SIZE,
    WORLD_NOW_MS,
};
use traffic::Traffic;
use wire::Timestamp;

/// Discord's `large_threshold` when IDENTIFY omits it. GUILD_CREATEs of guilds that the traffic
/// joins use it unless the caller passes the session's threshold.
pub const DEFAULT_LARGE_THRESHOLD: u32 = 50;

/// Stream number of the generator that draws the guild list.
const GUILD_LIST_STREAM: u64 = 1;

/// Shape of the generated world.
#[derive(Clone, Debug)]
pub struct WorldConfig {
    /// Seed of every random choice: the same seed gives the same guilds, members and traffic.
    pub seed: u64,
    /// Guilds across all shards.
    pub guilds: u32,
    /// Shard count the guild ids are routed by, `(id >> 22) % shard_count`.
    pub shard_count: u32,
    /// Member count of the largest guild; the size distribution is skewed towards small guilds.
    /// Values below 2 are read as 2, values above 4,194,304 (the member slots a guild has) as
    /// 4,194,304.
    pub largest_guild: u32,
}

/// The guilds routed to one shard.
#[derive(Debug)]
pub struct ShardWorld {
    shard_id: u32,
    shard_count: u32,
    /// Member count of the largest guild, which bounds guilds that the traffic joins.
    largest_guild: u32,
    guilds: BTreeMap<Snowflake, Guild>,
    traffic: Traffic,
}

/// The members a REQUEST_GUILD_MEMBERS returns, split into chunks of at most 1000.
///
/// The plan stores slot ranges and slot numbers, not members: each chunk reads the guild as it
/// is when the chunk is built, so a member who left in between is not sent.
#[derive(Clone, Debug)]
pub struct MemberPlan {
    guild_id: Snowflake,
    selection: Selection,
    /// Whether the chunks carry `presences`.
    presences: bool,
    /// The request's nonce if Discord echoes it (at most 32 bytes).
    nonce: Option<String>,
}

/// The members of a [`MemberPlan`].
#[derive(Clone, Debug)]
enum Selection {
    /// Every member: chunk `k` contains the current members in slots `bounds[k]..bounds[k + 1]`,
    /// 1000 of them when the plan was made.
    Ranges { bounds: Vec<u32> },
    /// The members in these slots, in one chunk. `not_found` is set for a request by user ids.
    Listed {
        slots: Vec<u32>,
        not_found: Option<Vec<Snowflake>>,
    },
}

impl MemberPlan {
    /// Returns the number of chunks, at least 1 (an empty result is one empty chunk).
    pub fn chunk_count(&self) -> u32 {
        match &self.selection {
            Selection::Ranges { bounds } => (bounds.len() as u32).saturating_sub(1).max(1),
            Selection::Listed { .. } => 1,
        }
    }
}

/// Generates the world, one [`ShardWorld`] per shard, indexed by shard id.
///
/// # Panics
///
/// Panics if `config.shard_count` is 0.
pub fn generate(config: &WorldConfig) -> Vec<ShardWorld> {
    assert!(
        config.shard_count > 0,
        "invalid world: shard_count is 0; set it to at least 1"
    );
    let largest = config.largest_guild.clamp(MIN_GUILD_SIZE, MAX_SLOTS);
    let mut rng = generator(config.seed, GUILD_LIST_STREAM);
    let mut worlds: Vec<ShardWorld> = (0..config.shard_count)
        .map(|shard_id| ShardWorld::new(config, shard_id, largest))
        .collect();

    let sizes = guild_sizes(&mut rng, config.guilds, largest);
    let mut ids = HashSet::with_capacity(sizes.len());
    for size in sizes {
        let id = unused_guild_id(&mut rng, &mut ids);
        let seed: u64 = rng.random();
        let joined_ms = rng.random_range(id.unix_ms().max(BOT_CREATED_MS)..WORLD_NOW_MS);
        let guild = Guild::generate(id, seed, size, Timestamp(joined_ms));
        let shard = shard_for_guild(id.get(), config.shard_count) as usize;
        worlds[shard].guilds.insert(id, guild);
    }
    worlds
}

/// Draws the member counts of `count` guilds and raises the largest to `largest`, so that the
/// world always has a guild of the configured largest size.
fn guild_sizes(rng: &mut Generator, count: u32, largest: u32) -> Vec<u32> {
    let mut sizes: Vec<u32> = (0..count).map(|_| guild_size(rng, largest)).collect();
    let biggest = sizes
        .iter()
        .enumerate()
        .max_by_key(|(_, size)| **size)
        .map(|(index, _)| index);
    if let Some(index) = biggest {
        sizes[index] = largest;
    }
    sizes
}

/// Mints a guild id created between 2016 and 2025 that no other guild has.
fn unused_guild_id(rng: &mut Generator, ids: &mut HashSet<Snowflake>) -> Snowflake {
    loop {
        let id = random_id(rng, GUILD_CREATED_MS.start, GUILD_CREATED_MS.end - 1);
        if ids.insert(id) {
            return id;
        }
    }
}

impl ShardWorld {
    fn new(config: &WorldConfig, shard_id: u32, largest_guild: u32) -> Self {
        Self {
            shard_id,
            shard_count: config.shard_count,
            largest_guild,
            guilds: BTreeMap::new(),
            traffic: Traffic::new(mix(config.seed, u64::from(shard_id)), shard_id),
        }
    }

    /// Returns the ids of this shard's guilds, sorted.
    pub fn guild_ids(&self) -> Vec<Snowflake> {
        self.guilds.keys().copied().collect()
    }

    /// Returns the `d` of a GUILD_CREATE for a guild, or `None` for a guild not on this shard.
    ///
    /// The payload is the one a guild of READY gets when it becomes available: it carries
    /// `"unavailable": false`. Which members and presences it lists depends on the member count,
    /// `large_threshold` and `intents`, as Discord documents for GUILD_CREATE.
    pub fn guild_create(
        &self,
        guild_id: Snowflake,
        large_threshold: u32,
        intents: Intents,
    ) -> Option<Box<RawValue>> {
        let guild = self.guilds.get(&guild_id)?;
        Some(guild.guild_create(large_threshold, intents, true))
    }

    /// Returns Discord's `member_count` of a guild.
    pub fn member_count(&self, guild_id: Snowflake) -> Option<u64> {
        let guild = self.guilds.get(&guild_id)?;
        Some(u64::from(guild.members.count()))
    }

    /// Resolves a REQUEST_GUILD_MEMBERS into the members it returns, or `None` for a guild not on
    /// this shard. The plan is owned, so the caller can release the world between chunks.
    ///
    /// The caller enforces the rules that reject a request, such as the GUILD_MEMBERS intent for
    /// all-member requests and the rate limit. This method only selects the members.
    pub fn plan_member_request(
        &self,
        request: &RequestGuildMembers,
        intents: Intents,
    ) -> Option<MemberPlan> {
        let guild = self.guilds.get(&request.guild_id)?;
        Some(MemberPlan::resolve(guild, request, intents))
    }

    /// Returns the `d` of GUILD_MEMBERS_CHUNK number `index` of a plan
    /// (`0..plan.chunk_count()`), with `chunk_index`, `chunk_count`, `not_found` and `nonce` set.
    ///
    /// A guild that left the shard since the plan was made gives chunks without members.
    pub fn member_chunk(&self, plan: &MemberPlan, index: u32) -> Box<RawValue> {
        plan.chunk(self.guilds.get(&plan.guild_id), index)
    }

    /// Produces the next event of the steady traffic from this shard's own seeded generator,
    /// applying it to the world. Returns `None` when `intents` allow no event kind, or when the
    /// shard has no guild and `intents` lack GUILDS (a guild join is then the only event).
    ///
    /// GUILD_CREATEs of guilds the traffic joins use [`DEFAULT_LARGE_THRESHOLD`]. Pass the
    /// session's threshold with [`ShardWorld::next_event_with_large_threshold`].
    pub fn next_event(&mut self, intents: Intents) -> Option<(&'static str, Box<RawValue>)> {
        self.next_event_with_large_threshold(intents, DEFAULT_LARGE_THRESHOLD)
    }

    /// Does what [`ShardWorld::next_event`] does, with the session's `large_threshold` for the
    /// GUILD_CREATE of a guild the bot joins.
    pub fn next_event_with_large_threshold(
        &mut self,
        intents: Intents,
        large_threshold: u32,
    ) -> Option<(&'static str, Box<RawValue>)> {
        traffic::next_event(self, intents, large_threshold)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;
    use twilight_model::gateway::payload::incoming::{
        ChannelCreate, ChannelDelete, ChannelUpdate, GuildCreate, GuildDelete, GuildUpdate,
        MemberAdd, MemberChunk, MemberRemove, MemberUpdate, MessageCreate, PresenceUpdate,
        RoleCreate, RoleDelete, RoleUpdate,
    };
    use twilight_model::guild::Guild as TwilightGuild;

    use super::guild::{MAX_INITIAL_MEMBERS, MEMBER_LIST_LIMIT};
    use super::traffic::{produce, EventKind};
    use super::*;

    const THRESHOLD: u32 = 250;

    fn config(seed: u64, guilds: u32, shard_count: u32, largest_guild: u32) -> WorldConfig {
        WorldConfig {
            seed,
            guilds,
            shard_count,
            largest_guild,
        }
    }

    /// Generates a world of one shard with a single guild of exactly `size` members.
    fn single_guild(size: u32) -> (ShardWorld, Snowflake) {
        let world = generate(&config(5, 1, 1, size)).pop().unwrap();
        let id = world.guild_ids()[0];
        (world, id)
    }

    fn parse(raw: &RawValue) -> Value {
        serde_json::from_str(raw.get()).unwrap()
    }

    fn available_guild(raw: &RawValue) -> TwilightGuild {
        match serde_json::from_str::<GuildCreate>(raw.get()) {
            Ok(GuildCreate::Available(guild)) => guild,
            Ok(GuildCreate::Unavailable(guild)) => panic!("guild {} read as unavailable", guild.id),
            Err(error) => panic!("GUILD_CREATE rejected: {error}\n{}", raw.get()),
        }
    }

    fn chunk(raw: &RawValue) -> MemberChunk {
        serde_json::from_str(raw.get())
            .unwrap_or_else(|error| panic!("GUILD_MEMBERS_CHUNK rejected: {error}\n{}", raw.get()))
    }

    fn request(guild_id: Snowflake) -> RequestGuildMembers {
        RequestGuildMembers::all_members(guild_id, None)
    }

    /// Deserializes a dispatch with the twilight-model type of its event, panicking on rejection.
    fn check_event(name: &str, raw: &RawValue) {
        fn read<T: serde::de::DeserializeOwned>(name: &str, raw: &RawValue) {
            if let Err(error) = serde_json::from_str::<T>(raw.get()) {
                panic!("{name} rejected: {error}\n{}", raw.get());
            }
        }
        match name {
            "MESSAGE_CREATE" => read::<MessageCreate>(name, raw),
            "PRESENCE_UPDATE" => read::<PresenceUpdate>(name, raw),
            "GUILD_MEMBER_ADD" => read::<MemberAdd>(name, raw),
            "GUILD_MEMBER_UPDATE" => read::<MemberUpdate>(name, raw),
            "GUILD_MEMBER_REMOVE" => read::<MemberRemove>(name, raw),
            "GUILD_ROLE_CREATE" => read::<RoleCreate>(name, raw),
            "GUILD_ROLE_UPDATE" => read::<RoleUpdate>(name, raw),
            "GUILD_ROLE_DELETE" => read::<RoleDelete>(name, raw),
            "CHANNEL_CREATE" => read::<ChannelCreate>(name, raw),
            "CHANNEL_UPDATE" => read::<ChannelUpdate>(name, raw),
            "CHANNEL_DELETE" => read::<ChannelDelete>(name, raw),
            "GUILD_UPDATE" => read::<GuildUpdate>(name, raw),
            "GUILD_DELETE" => read::<GuildDelete>(name, raw),
            "GUILD_CREATE" => {
                available_guild(raw);
            }
            other => panic!("unexpected event {other}"),
        }
    }

    #[test]
    fn generate_is_deterministic() {
        let first = generate(&config(11, 200, 4, 20_000));
        let second = generate(&config(11, 200, 4, 20_000));
        for (a, b) in first.iter().zip(&second) {
            assert_eq!(a.guild_ids(), b.guild_ids());
            for id in a.guild_ids() {
                let left = a.guild_create(id, THRESHOLD, Intents::ALL).unwrap();
                let right = b.guild_create(id, THRESHOLD, Intents::ALL).unwrap();
                assert_eq!(left.get(), right.get());
            }
        }

        let other = generate(&config(12, 200, 4, 20_000));
        assert_ne!(first[0].guild_ids(), other[0].guild_ids());
    }

    #[test]
    fn guilds_route_to_their_shard() {
        let worlds = generate(&config(3, 500, 7, 10_000));
        assert_eq!(worlds.len(), 7);
        let total: usize = worlds.iter().map(|world| world.guild_ids().len()).sum();
        assert_eq!(total, 500);
        for (shard, world) in worlds.iter().enumerate() {
            for id in world.guild_ids() {
                assert_eq!(shard_for_guild(id.get(), 7) as usize, shard, "guild {id}");
            }
        }
    }

    #[test]
    fn guild_ids_are_past_snowflakes() {
        let worlds = generate(&config(3, 300, 2, 1_000));
        for id in worlds.iter().flat_map(ShardWorld::guild_ids) {
            assert!(GUILD_CREATED_MS.contains(&id.unix_ms()), "guild {id}");
        }
    }

    #[test]
    fn sizes_are_skewed_with_largest() {
        let worlds = generate(&config(9, 2_000, 4, 300_000));
        let mut sizes: Vec<u64> = worlds
            .iter()
            .flat_map(|world| {
                world
                    .guild_ids()
                    .into_iter()
                    .map(|id| world.member_count(id).unwrap())
            })
            .collect();
        sizes.sort_unstable();
        assert_eq!(*sizes.last().unwrap(), 300_000);
        assert!(*sizes.first().unwrap() >= 2);
        let median = sizes[sizes.len() / 2];
        assert!((5..=50).contains(&median), "median {median}");
        let above_10k = sizes.iter().filter(|&&size| size > 10_000).count();
        assert!(
            above_10k < sizes.len() / 50,
            "{above_10k} guilds above 10,000"
        );
    }

    #[test]
    fn whole_world_generates_quickly() {
        let started = std::time::Instant::now();
        let worlds = generate(&config(1, 5_000, 16, 300_000));
        let elapsed = started.elapsed();
        let total: usize = worlds.iter().map(|world| world.guild_ids().len()).sum();
        assert_eq!(total, 5_000);
        // A release build took about 60 ms on a 2-core machine. The bound leaves room for debug
        // builds on a busy machine.
        assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
    }

    #[test]
    fn small_guild_create_lists_all() {
        let (world, id) = single_guild(40);
        let raw = world.guild_create(id, THRESHOLD, Intents::ALL).unwrap();
        let guild = available_guild(&raw);

        assert_eq!(guild.id.get(), id.get());
        assert_eq!(guild.member_count, Some(40));
        assert_eq!(guild.members.len(), 40);
        assert!(!guild.large);
        assert_eq!(guild.unavailable, Some(false));
        assert!(guild.joined_at.is_some());
        assert!(guild.roles.iter().any(|role| role.id.get() == id.get()));
        assert!(!guild.channels.is_empty());
        assert!(guild
            .presences
            .iter()
            .all(|presence| presence.status != twilight_model::gateway::presence::Status::Offline));

        let role_ids: BTreeSet<u64> = guild.roles.iter().map(|role| role.id.get()).collect();
        for member in &guild.members {
            assert!(member
                .roles
                .iter()
                .all(|role| role_ids.contains(&role.get())));
        }
    }

    #[test]
    fn member_object_is_complete() {
        let (world, id) = single_guild(10);
        let value = parse(&world.guild_create(id, THRESHOLD, Intents::ALL).unwrap());
        let member = &value["members"][0];
        for key in [
            "user",
            "nick",
            "avatar",
            "roles",
            "joined_at",
            "premium_since",
            "deaf",
            "mute",
            "flags",
            "pending",
            "communication_disabled_until",
        ] {
            assert!(member.get(key).is_some(), "member lacks {key}: {member}");
        }
        let user = &member["user"];
        for key in ["id", "username", "global_name", "avatar"] {
            assert!(user.get(key).is_some(), "user lacks {key}: {user}");
        }
        assert_eq!(user["discriminator"], "0");
        assert_eq!(user["bot"], false);
    }

    #[test]
    fn large_guild_create_lists_online() {
        let (world, id) = single_guild(20_000);
        let raw = world.guild_create(id, THRESHOLD, Intents::ALL).unwrap();
        let guild = available_guild(&raw);

        assert!(guild.large);
        assert_eq!(guild.member_count, Some(20_000));
        assert!(!guild.members.is_empty());
        assert!(guild.members.len() <= MAX_INITIAL_MEMBERS);
        let online: BTreeSet<u64> = guild
            .presences
            .iter()
            .map(|presence| presence.user.id().get())
            .collect();
        let in_voice: BTreeSet<u64> = guild
            .voice_states
            .iter()
            .map(|state| state.user_id.get())
            .collect();
        for member in &guild.members {
            let user = member.user.id.get();
            assert!(
                online.contains(&user) || in_voice.contains(&user),
                "offline member {user}"
            );
        }
    }

    #[test]
    fn guild_create_without_presences_lists_voice_members() {
        let (world, id) = single_guild(2_000);
        let intents = Intents::GUILDS | Intents::GUILD_VOICE_STATES | Intents::GUILD_MEMBERS;
        let guild = available_guild(&world.guild_create(id, THRESHOLD, intents).unwrap());

        assert!(guild.presences.is_empty());
        let members: BTreeSet<u64> = guild
            .members
            .iter()
            .map(|member| member.user.id.get())
            .collect();
        let in_voice: BTreeSet<u64> = guild
            .voice_states
            .iter()
            .map(|state| state.user_id.get())
            .collect();
        assert_eq!(members, in_voice);
    }

    #[test]
    fn huge_guild_create_lists_voice_members() {
        let (world, id) = single_guild(MEMBER_LIST_LIMIT + 1);
        let guild = available_guild(&world.guild_create(id, THRESHOLD, Intents::ALL).unwrap());

        let in_voice: BTreeSet<u64> = guild
            .voice_states
            .iter()
            .map(|state| state.user_id.get())
            .collect();
        assert!(!in_voice.is_empty());
        assert_eq!(guild.members.len(), in_voice.len());
        assert!(guild
            .members
            .iter()
            .all(|member| in_voice.contains(&member.user.id.get())));
    }

    #[test]
    fn guild_create_of_other_shard_is_none() {
        let worlds = generate(&config(3, 50, 2, 1_000));
        let id = worlds[1].guild_ids()[0];
        assert!(worlds[0]
            .guild_create(id, THRESHOLD, Intents::ALL)
            .is_none());
        assert!(worlds[0].member_count(id).is_none());
        assert!(worlds[0]
            .plan_member_request(&request(id), Intents::ALL)
            .is_none());
    }

    #[test]
    fn all_members_come_in_chunks_of_1000() {
        let (world, id) = single_guild(2_500);
        let plan = world
            .plan_member_request(&request(id), Intents::ALL)
            .unwrap();
        assert_eq!(plan.chunk_count(), 3);

        let mut users = BTreeSet::new();
        for (index, expected) in [1000, 1000, 500].into_iter().enumerate() {
            let chunk = chunk(&world.member_chunk(&plan, index as u32));
            assert_eq!(chunk.chunk_index, index as u32);
            assert_eq!(chunk.chunk_count, 3);
            assert_eq!(chunk.guild_id.get(), id.get());
            assert_eq!(chunk.members.len(), expected);
            assert!(chunk.not_found.is_empty());
            assert!(chunk.presences.is_empty());
            users.extend(chunk.members.iter().map(|member| member.user.id.get()));
        }
        assert_eq!(users.len(), 2_500);
    }

    #[test]
    fn chunk_count_covers_exact_multiple() {
        let (world, id) = single_guild(2_000);
        let plan = world
            .plan_member_request(&request(id), Intents::ALL)
            .unwrap();
        assert_eq!(plan.chunk_count(), 2);
        assert_eq!(chunk(&world.member_chunk(&plan, 1)).members.len(), 1000);
    }

    #[test]
    fn user_ids_request_reports_not_found() {
        let (world, id) = single_guild(300);
        let first = chunk(
            &world.member_chunk(
                &world
                    .plan_member_request(&request(id), Intents::ALL)
                    .unwrap(),
                0,
            ),
        );
        let known: Vec<Snowflake> = first.members[..3]
            .iter()
            .map(|member| Snowflake(member.user.id.get()))
            .collect();
        let unknown = Snowflake(175_928_847_299_117_063);

        let mut by_ids = request(id);
        by_ids.user_ids = Some(vec![known[0], unknown, known[1], known[2]]);
        let plan = world.plan_member_request(&by_ids, Intents::ALL).unwrap();
        assert_eq!(plan.chunk_count(), 1);
        let chunk = chunk(&world.member_chunk(&plan, 0));

        let found: Vec<u64> = chunk
            .members
            .iter()
            .map(|member| member.user.id.get())
            .collect();
        assert_eq!(found, known.iter().map(|id| id.get()).collect::<Vec<_>>());
        assert_eq!(chunk.not_found.len(), 1);
        assert_eq!(chunk.not_found[0].get(), unknown.get());
    }

    #[test]
    fn nonce_is_echoed_up_to_32_bytes() {
        let (world, id) = single_guild(30);
        let short = "n".repeat(32);
        let plan = world
            .plan_member_request(
                &RequestGuildMembers::all_members(id, Some(short.clone())),
                Intents::ALL,
            )
            .unwrap();
        assert_eq!(chunk(&world.member_chunk(&plan, 0)).nonce, Some(short));

        let long = "n".repeat(33);
        let plan = world
            .plan_member_request(
                &RequestGuildMembers::all_members(id, Some(long)),
                Intents::ALL,
            )
            .unwrap();
        let raw = world.member_chunk(&plan, 0);
        assert_eq!(chunk(&raw).nonce, None);
        assert!(parse(&raw).get("nonce").is_none());
    }

    #[test]
    fn query_matches_username_prefix() {
        let (world, id) = single_guild(5_000);
        let all = world
            .plan_member_request(&request(id), Intents::ALL)
            .unwrap();
        let first = chunk(&world.member_chunk(&all, 0));
        let prefix: String = first.members[0].user.name.chars().take(2).collect();

        let mut query = request(id);
        query.query = Some(prefix.to_uppercase());
        query.limit = 7;
        let plan = world.plan_member_request(&query, Intents::ALL).unwrap();
        let matched = chunk(&world.member_chunk(&plan, 0));
        assert!(!matched.members.is_empty());
        assert!(matched.members.len() <= 7);
        for member in &matched.members {
            assert!(
                member.user.name.starts_with(&prefix),
                "{}",
                member.user.name
            );
        }

        query.query = Some(String::new());
        query.limit = 500;
        let plan = world.plan_member_request(&query, Intents::ALL).unwrap();
        assert_eq!(chunk(&world.member_chunk(&plan, 0)).members.len(), 100);
    }

    #[test]
    fn presences_need_request_and_intent() {
        let (world, id) = single_guild(200);
        let mut with_presences = request(id);
        with_presences.presences = Some(true);

        let plan = world
            .plan_member_request(&with_presences, Intents::ALL)
            .unwrap();
        let raw = world.member_chunk(&plan, 0);
        assert!(!chunk(&raw).presences.is_empty());

        let without_intent = Intents::GUILDS | Intents::GUILD_MEMBERS;
        let plan = world
            .plan_member_request(&with_presences, without_intent)
            .unwrap();
        assert!(parse(&world.member_chunk(&plan, 0))
            .get("presences")
            .is_none());
    }

    #[test]
    fn traffic_events_deserialize() {
        let mut worlds = generate(&config(21, 60, 2, 30_000));
        let mut seen = BTreeSet::new();
        for world in &mut worlds {
            for intents in [
                Intents::ALL,
                Intents::ALL.intersection(Intents(!Intents::MESSAGE_CONTENT.0)),
            ] {
                for _ in 0..4_000 {
                    let (name, raw) = world.next_event(intents).unwrap();
                    check_event(name, &raw);
                    seen.insert(name);
                }
            }
        }
        for kind in [
            "MESSAGE_CREATE",
            "PRESENCE_UPDATE",
            "GUILD_MEMBER_ADD",
            "GUILD_MEMBER_UPDATE",
        ] {
            assert!(seen.contains(kind), "no {kind} in {seen:?}");
        }
    }

    #[test]
    fn every_event_kind_deserializes() {
        let mut world = generate(&config(22, 40, 1, 5_000)).pop().unwrap();
        for kind in EventKind::ALL {
            for _ in 0..20 {
                let (name, raw) = produce(&mut world, kind, Intents::ALL, THRESHOLD)
                    .unwrap_or_else(|| panic!("no {kind:?} event"));
                assert_eq!(name, kind.event_name());
                check_event(name, &raw);
            }
        }
    }

    #[test]
    fn traffic_respects_intents() {
        let mut world = generate(&config(23, 30, 1, 2_000)).pop().unwrap();
        for _ in 0..500 {
            let (name, raw) = world.next_event(Intents::GUILD_MESSAGES).unwrap();
            assert_eq!(name, "MESSAGE_CREATE");
            assert_eq!(parse(&raw)["content"], "");
        }

        let with_content = Intents::GUILD_MESSAGES | Intents::MESSAGE_CONTENT;
        let (_, raw) = world.next_event(with_content).unwrap();
        assert_ne!(parse(&raw)["content"], "");

        for _ in 0..500 {
            let (name, _) = world.next_event(Intents::GUILD_MEMBERS).unwrap();
            assert!(name.starts_with("GUILD_MEMBER_"), "{name}");
        }

        assert!(world.next_event(Intents(0)).is_none());
        assert!(world.next_event(Intents::DIRECT_MESSAGES).is_none());
    }

    #[test]
    fn traffic_is_deterministic() {
        let mut first = generate(&config(24, 50, 2, 5_000));
        let mut second = generate(&config(24, 50, 2, 5_000));
        for (a, b) in first.iter_mut().zip(&mut second) {
            for _ in 0..1_000 {
                let (left_name, left) = a.next_event(Intents::ALL).unwrap();
                let (right_name, right) = b.next_event(Intents::ALL).unwrap();
                assert_eq!(left_name, right_name);
                assert_eq!(left.get(), right.get());
            }
        }
    }

    #[test]
    fn joined_guilds_route_to_shard() {
        let mut worlds = generate(&config(25, 20, 4, 3_000));
        let world = &mut worlds[2];
        for _ in 0..10 {
            let (name, raw) =
                produce(world, EventKind::GuildJoin, Intents::ALL, THRESHOLD).unwrap();
            assert_eq!(name, "GUILD_CREATE");
            let value = parse(&raw);
            assert!(value.get("unavailable").is_none());
            let id: Snowflake = serde_json::from_value(value["id"].clone()).unwrap();
            assert!(world.guild_ids().contains(&id));
        }
        for id in world.guild_ids() {
            assert_eq!(shard_for_guild(id.get(), 4), 2, "guild {id}");
        }
    }

    #[test]
    fn guild_delete_removes_guild() {
        let mut world = generate(&config(26, 10, 1, 500)).pop().unwrap();
        let before = world.guild_ids().len();
        let (name, raw) =
            produce(&mut world, EventKind::GuildLeave, Intents::ALL, THRESHOLD).unwrap();
        assert_eq!(name, "GUILD_DELETE");

        let value = parse(&raw);
        assert!(value.get("unavailable").is_none());
        let id: Snowflake = serde_json::from_value(value["id"].clone()).unwrap();
        assert_eq!(world.guild_ids().len(), before - 1);
        assert!(world.guild_create(id, THRESHOLD, Intents::ALL).is_none());
    }

    #[test]
    fn removed_member_leaves_chunks_and_count() {
        let (mut world, id) = single_guild(1_500);
        let (name, raw) =
            produce(&mut world, EventKind::MemberRemove, Intents::ALL, THRESHOLD).unwrap();
        assert_eq!(name, "GUILD_MEMBER_REMOVE");
        let user_id: Snowflake = serde_json::from_value(parse(&raw)["user"]["id"].clone()).unwrap();
        assert_eq!(world.member_count(id), Some(1_499));

        let plan = world
            .plan_member_request(&request(id), Intents::ALL)
            .unwrap();
        let mut users = BTreeSet::new();
        for index in 0..plan.chunk_count() {
            let chunk = chunk(&world.member_chunk(&plan, index));
            users.extend(chunk.members.iter().map(|member| member.user.id.get()));
        }
        assert_eq!(users.len(), 1_499);
        assert!(!users.contains(&user_id.get()));

        let mut by_id = request(id);
        by_id.user_ids = Some(vec![user_id]);
        let plan = world.plan_member_request(&by_id, Intents::ALL).unwrap();
        let chunk = chunk(&world.member_chunk(&plan, 0));
        assert!(chunk.members.is_empty());
        assert_eq!(chunk.not_found.len(), 1);
    }

    #[test]
    fn member_removed_mid_request_skipped() {
        let (mut world, id) = single_guild(2_500);
        let plan = world
            .plan_member_request(&request(id), Intents::ALL)
            .unwrap();
        for _ in 0..50 {
            produce(&mut world, EventKind::MemberRemove, Intents::ALL, THRESHOLD).unwrap();
        }
        let sent: usize = (0..plan.chunk_count())
            .map(|index| chunk(&world.member_chunk(&plan, index)).members.len())
            .sum();
        assert_eq!(sent, 2_450);
    }

    #[test]
    fn joined_member_appears_in_later_chunks() {
        let (mut world, id) = single_guild(100);
        let (_, raw) = produce(&mut world, EventKind::MemberAdd, Intents::ALL, THRESHOLD).unwrap();
        let user_id: Snowflake = serde_json::from_value(parse(&raw)["user"]["id"].clone()).unwrap();
        assert_eq!(world.member_count(id), Some(101));

        let plan = world
            .plan_member_request(&request(id), Intents::ALL)
            .unwrap();
        let chunk = chunk(&world.member_chunk(&plan, 0));
        assert_eq!(chunk.members.len(), 101);
        assert!(chunk
            .members
            .iter()
            .any(|member| member.user.id.get() == user_id.get()));
    }

    #[test]
    fn deleted_channel_leaves_guild_create() {
        let (mut world, id) = single_guild(3_000);
        for _ in 0..5 {
            let (_, raw) = produce(
                &mut world,
                EventKind::ChannelDelete,
                Intents::ALL,
                THRESHOLD,
            )
            .unwrap();
            let channel_id = parse(&raw)["id"].clone();
            let guild = parse(&world.guild_create(id, THRESHOLD, Intents::ALL).unwrap());
            let channels = guild["channels"].as_array().unwrap();
            assert!(channels.iter().all(|channel| channel["id"] != channel_id));
        }
    }

    #[test]
    fn deleted_role_is_gone_from_members() {
        let (mut world, id) = single_guild(200);
        for _ in 0..3 {
            let Some((_, raw)) =
                produce(&mut world, EventKind::RoleDelete, Intents::ALL, THRESHOLD)
            else {
                break;
            };
            let role_id = parse(&raw)["role_id"].clone();
            let guild = parse(&world.guild_create(id, THRESHOLD, Intents::ALL).unwrap());
            for member in guild["members"].as_array().unwrap() {
                assert!(member["roles"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|role| *role != role_id));
            }
            assert!(guild["roles"]
                .as_array()
                .unwrap()
                .iter()
                .all(|role| role["id"] != role_id));
        }
    }
}
