//! The members of one guild, derived on demand instead of stored.
//!
//! Every member occupies a slot number. The member in a slot is a pure function of the guild's
//! seed and the slot, so a guild of 300,000 members is stored as a few fields. Only what the traffic
//! changed is stored: the slots that left, the records of members who joined or were updated, and
//! presence changes.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use actors::gateway::Snowflake;
use rand::RngExt;
use serde::Serialize;

use super::random::{self, generator, mix, unit, Generator, DISCORD_LAUNCH_MS, WORLD_NOW_MS};
use super::wire::{ImageHash, Timestamp};

/// Number of member slots a guild can use. A user id carries its slot in the 22 low bits
/// (worker, process and increment of a snowflake), so a lookup by user id reads the slot there.
pub(super) const MAX_SLOTS: u32 = 1 << 22;

/// Stream numbers that keep the independent per-member derivations apart.
const RECORD_STREAM: u64 = 1;
const USERNAME_STREAM: u64 = 2;
const USER_ID_STREAM: u64 = 3;
const JOINED_STREAM: u64 = 4;
const STATUS_STREAM: u64 = 5;
const ACTIVITY_STREAM: u64 = 6;

/// A member's presence status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Status {
    Online,
    Idle,
    Dnd,
    Offline,
}

/// A user as the members of a guild see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct UserRecord {
    pub(super) id: Snowflake,
    pub(super) username: String,
    pub(super) global_name: Option<String>,
    pub(super) avatar: Option<ImageHash>,
}

/// One guild member with every field of Discord's guild member object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct MemberRecord {
    pub(super) slot: u32,
    pub(super) user: UserRecord,
    pub(super) nick: Option<String>,
    /// Guild-specific avatar.
    pub(super) avatar: Option<ImageHash>,
    /// Role ids, without @everyone. Ids of deleted roles are filtered out when the member is
    /// written, so a record never needs an update when a role goes.
    pub(super) roles: Vec<Snowflake>,
    pub(super) joined_at: Timestamp,
    /// Start of the member's server boost.
    pub(super) premium_since: Option<Timestamp>,
    pub(super) deaf: bool,
    pub(super) mute: bool,
    /// Guild member flags; bit 1 is COMPLETED_ONBOARDING.
    pub(super) flags: u32,
    /// Whether the member has not yet passed membership screening.
    pub(super) pending: bool,
    /// End of the member's timeout.
    pub(super) communication_disabled_until: Option<Timestamp>,
}

/// The membership of one guild.
#[derive(Debug)]
pub(super) struct Members {
    seed: u64,
    /// Creation time of the guild in Unix milliseconds; no member joined before it.
    created_ms: u64,
    /// Slots in use, `0..slots`, including slots of members who left. Slot 0 is the owner.
    slots: u32,
    /// Slots created with the guild; later slots were joined by the traffic.
    generated: u32,
    /// Share of members whose derived status is not offline, in `[0, 1]`.
    online_share: f64,
    /// Roles that generated members are drawn from.
    assignable_roles: Vec<Snowflake>,
    /// The managed role Discord gives to boosting members, if the guild has boosts.
    booster_role: Option<Snowflake>,
    removed: BTreeSet<u32>,
    changed: BTreeMap<u32, MemberRecord>,
    statuses: BTreeMap<u32, Status>,
}

impl Members {
    /// Creates the membership of a guild with `count` members.
    pub(super) fn new(
        seed: u64,
        created_ms: u64,
        count: u32,
        assignable_roles: Vec<Snowflake>,
        booster_role: Option<Snowflake>,
    ) -> Self {
        let count = count.min(MAX_SLOTS);
        Self {
            seed,
            created_ms,
            slots: count,
            generated: count,
            online_share: online_share(count),
            assignable_roles,
            booster_role,
            removed: BTreeSet::new(),
            changed: BTreeMap::new(),
            statuses: BTreeMap::new(),
        }
    }

    /// Returns the number of current members.
    pub(super) fn count(&self) -> u32 {
        self.slots - self.removed.len() as u32
    }

    /// Returns the end of the slot range in use: every member's slot is below it.
    pub(super) fn slot_end(&self) -> u32 {
        self.slots
    }

    /// Returns `true` if a member currently occupies `slot`.
    pub(super) fn is_member(&self, slot: u32) -> bool {
        slot < self.slots && !self.removed.contains(&slot)
    }

    /// Returns the slots of current members within `range`, in order.
    pub(super) fn live_slots(&self, range: Range<u32>) -> impl Iterator<Item = u32> + '_ {
        let end = range.end.min(self.slots);
        (range.start..end).filter(|slot| !self.removed.contains(slot))
    }

    /// Returns the slot where the next `count` current members starting at `start` end, so that
    /// `start..end` contains exactly `count` current members (fewer at the end of the slots).
    pub(super) fn advance(&self, start: u32, count: u32) -> u32 {
        let mut end = start.saturating_add(count).min(self.slots);
        loop {
            let removed = self.removed.range(start..end).count() as u32;
            let next = start.saturating_add(count + removed).min(self.slots);
            if next == end {
                return end;
            }
            end = next;
        }
    }

    /// Returns the member in a slot, or `None` for a slot no member occupies.
    pub(super) fn get(&self, slot: u32) -> Option<MemberRecord> {
        if !self.is_member(slot) {
            return None;
        }
        Some(
            self.changed
                .get(&slot)
                .cloned()
                .unwrap_or_else(|| self.derive(slot)),
        )
    }

    /// Returns the slot of the member with this user id.
    pub(super) fn slot_of(&self, user_id: Snowflake) -> Option<u32> {
        let slot = (user_id.get() & u64::from(MAX_SLOTS - 1)) as u32;
        (self.is_member(slot) && self.user_id(slot) == user_id).then_some(slot)
    }

    /// Returns the username of the member in a slot, without deriving the rest of the record.
    pub(super) fn username(&self, slot: u32) -> String {
        random::username(&mut generator(
            mix(self.seed, USERNAME_STREAM),
            u64::from(slot),
        ))
    }

    /// Returns the user id of a slot: an account created between Discord's launch and the
    /// member's join, with the slot in the low bits.
    pub(super) fn user_id(&self, slot: u32) -> Snowflake {
        let joined_ms = self.generated_joined_ms(slot);
        let hash = mix(mix(self.seed, USER_ID_STREAM), u64::from(slot));
        let created_ms = DISCORD_LAUNCH_MS + hash % (joined_ms - DISCORD_LAUNCH_MS);
        Snowflake::from_parts(created_ms, u64::from(slot))
    }

    /// Returns the presence status of the member in a slot. A derived status is not offline for
    /// the guild's online share of members, who are online, idle and dnd in the ratio 60:25:15.
    pub(super) fn status(&self, slot: u32) -> Status {
        if let Some(status) = self.statuses.get(&slot) {
            return *status;
        }
        let draw = unit(mix(mix(self.seed, STATUS_STREAM), u64::from(slot))) / self.online_share;
        if draw >= 1.0 {
            Status::Offline
        } else if draw < 0.6 {
            Status::Online
        } else if draw < 0.85 {
            Status::Idle
        } else {
            Status::Dnd
        }
    }

    /// Sets the presence status of a member.
    pub(super) fn set_status(&mut self, slot: u32, status: Status) {
        self.statuses.insert(slot, status);
    }

    /// Returns the presence of a member, with activities derived from the slot.
    pub(super) fn presence(&self, record: &MemberRecord) -> Presence {
        let status = self.status(record.slot);
        let mut presence = Presence {
            user: UserId { id: record.user.id },
            guild_id: None,
            status,
            activities: Vec::new(),
            client_status: ClientStatus::default(),
        };
        if status == Status::Offline {
            return presence;
        }

        let mut rng = generator(mix(self.seed, ACTIVITY_STREAM), u64::from(record.slot));
        match rng.random_range(0..10) {
            0..=5 => presence.client_status.desktop = Some(status),
            6..=8 => presence.client_status.mobile = Some(status),
            _ => presence.client_status.web = Some(status),
        }
        if rng.random_bool(0.4) {
            presence.activities.push(Activity::generate(&mut rng));
        }
        presence
    }

    /// Stores a changed member record; later reads of the slot return it.
    pub(super) fn store(&mut self, record: MemberRecord) {
        self.changed.insert(record.slot, record);
    }

    /// Adds a member who joined at `joined_at`. Returns `None` when every slot is used.
    pub(super) fn join(&mut self, joined_at: Timestamp) -> Option<MemberRecord> {
        if self.slots >= MAX_SLOTS {
            return None;
        }
        let slot = self.slots;
        self.slots += 1;

        let mut record = self.derive(slot);
        record.joined_at = joined_at;
        record.roles.clear();
        record.premium_since = None;
        record.nick = None;
        record.avatar = None;
        record.communication_disabled_until = None;
        self.changed.insert(slot, record.clone());
        Some(record)
    }

    /// Removes a member; its slot stays unused.
    pub(super) fn remove(&mut self, slot: u32) {
        self.removed.insert(slot);
        self.changed.remove(&slot);
        self.statuses.remove(&slot);
    }

    /// Picks a random current member, the owner (slot 0) excluded when `exclude_owner` is set.
    pub(super) fn random_slot(&self, rng: &mut Generator, exclude_owner: bool) -> Option<u32> {
        let first = u32::from(exclude_owner);
        if first >= self.slots {
            return None;
        }
        for _ in 0..16 {
            let slot = rng.random_range(first..self.slots);
            if !self.removed.contains(&slot) {
                return Some(slot);
            }
        }
        self.live_slots(first..self.slots).next()
    }

    /// Derives the member of a slot as it was generated.
    fn derive(&self, slot: u32) -> MemberRecord {
        let mut rng = generator(mix(self.seed, RECORD_STREAM), u64::from(slot));
        let joined_at = Timestamp(self.generated_joined_ms(slot));
        let premium_since = self.booster_role.and_then(|_| {
            rng.random_bool(0.01)
                .then(|| Timestamp(rng.random_range(joined_at.0..=WORLD_NOW_MS)))
        });
        let user = UserRecord {
            id: self.user_id(slot),
            username: self.username(slot),
            global_name: rng.random_bool(0.7).then(|| random::display_name(&mut rng)),
            avatar: rng.random_bool(0.8).then(|| ImageHash(rng.random())),
        };

        MemberRecord {
            slot,
            nick: rng
                .random_bool(0.12)
                .then(|| random::display_name(&mut rng)),
            avatar: rng.random_bool(0.02).then(|| ImageHash(rng.random())),
            roles: self.derive_roles(&mut rng, premium_since.is_some()),
            joined_at,
            premium_since,
            deaf: false,
            mute: rng.random_bool(0.002),
            flags: if rng.random_bool(0.5) { 1 << 1 } else { 0 },
            pending: false,
            communication_disabled_until: rng
                .random_bool(0.001)
                .then(|| Timestamp(WORLD_NOW_MS + rng.random_range(60_000..604_800_000))),
            user,
        }
    }

    /// Draws 0 to 3 roles: most members have none or one.
    fn derive_roles(&self, rng: &mut Generator, boosting: bool) -> Vec<Snowflake> {
        let mut roles = Vec::new();
        if !self.assignable_roles.is_empty() {
            let count = match rng.random_range(0..10) {
                0..=3 => 0,
                4..=7 => 1,
                8 => 2,
                _ => 3,
            };
            for _ in 0..count {
                let role = self.assignable_roles[rng.random_range(0..self.assignable_roles.len())];
                if !roles.contains(&role) {
                    roles.push(role);
                }
            }
        }
        if boosting {
            roles.extend(self.booster_role);
        }
        roles
    }

    /// Returns the join time of a generated slot in Unix milliseconds: the owner (slot 0) joined
    /// when the guild was created, the other slots join in order between then and now. Slots
    /// joined by the traffic return now, because their record stores the real join time.
    fn generated_joined_ms(&self, slot: u32) -> u64 {
        if slot == 0 {
            return self.created_ms;
        }
        if slot >= self.generated {
            return WORLD_NOW_MS;
        }
        let jitter = unit(mix(mix(self.seed, JOINED_STREAM), u64::from(slot)));
        let position = (f64::from(slot) + jitter) / f64::from(self.generated);
        let span = WORLD_NOW_MS - self.created_ms;
        self.created_ms + (span as f64 * position) as u64
    }
}

/// Returns the share of a guild's members that are not offline: about a third in small guilds,
/// falling to a tenth in the largest ones.
fn online_share(count: u32) -> f64 {
    let share = 0.35 - 0.045 * f64::from(count.max(1)).log10();
    share.clamp(0.1, 0.35)
}

/// `{"id": ...}`: the partial user of a presence.
#[derive(Clone, Debug, Serialize)]
pub(super) struct UserId {
    pub(super) id: Snowflake,
}

/// A presence as GUILD_CREATE, GUILD_MEMBERS_CHUNK and PRESENCE_UPDATE carry it. Only
/// PRESENCE_UPDATE has `guild_id`.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Presence {
    pub(super) user: UserId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) guild_id: Option<Snowflake>,
    pub(super) status: Status,
    pub(super) activities: Vec<Activity>,
    pub(super) client_status: ClientStatus,
}

/// The status of a user on each platform; a platform without a session is absent.
#[derive(Clone, Debug, Default, Serialize)]
pub(super) struct ClientStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) desktop: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) mobile: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) web: Option<Status>,
}

/// One activity of a presence: a game, a song or a custom status.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Activity {
    name: String,
    /// Activity type: 0 playing, 2 listening, 4 custom status.
    #[serde(rename = "type")]
    kind: u8,
    /// Unix time in milliseconds when the activity was added to the session.
    created_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamps: Option<ActivityTimestamps>,
}

/// Start of an activity, in Unix milliseconds.
#[derive(Clone, Debug, Serialize)]
struct ActivityTimestamps {
    start: u64,
}

impl Activity {
    fn generate(rng: &mut Generator) -> Self {
        let created_at = WORLD_NOW_MS - rng.random_range(0..7_200_000);
        match rng.random_range(0..10) {
            0..=4 => Self {
                name: random::game_name(rng).to_owned(),
                kind: 0,
                created_at,
                id: None,
                details: None,
                state: None,
                timestamps: Some(ActivityTimestamps { start: created_at }),
            },
            5..=6 => Self {
                name: "Spotify".to_owned(),
                kind: 2,
                created_at,
                id: Some("spotify:1"),
                details: Some(random::display_name(rng)),
                state: Some(random::display_name(rng)),
                timestamps: Some(ActivityTimestamps { start: created_at }),
            },
            _ => Self {
                name: "Custom Status".to_owned(),
                kind: 4,
                created_at,
                id: Some("custom"),
                details: None,
                state: Some(random::message_text(rng)),
                timestamps: None,
            },
        }
    }
}

/// A user object as member lists and messages carry it.
#[derive(Debug, Serialize)]
pub(super) struct UserView<'a> {
    id: Snowflake,
    username: &'a str,
    /// Always "0": Discord dropped discriminators for users with the new usernames.
    discriminator: &'static str,
    global_name: Option<&'a str>,
    avatar: Option<ImageHash>,
    avatar_decoration_data: Option<()>,
    bot: bool,
    public_flags: u64,
}

impl<'a> UserView<'a> {
    pub(super) fn new(user: &'a UserRecord) -> Self {
        Self {
            id: user.id,
            username: &user.username,
            discriminator: "0",
            global_name: user.global_name.as_deref(),
            avatar: user.avatar,
            avatar_decoration_data: None,
            bot: false,
            public_flags: 0,
        }
    }
}

/// A guild member object. `user` is absent where Discord omits it (the `member` of a message).
#[derive(Debug, Serialize)]
pub(super) struct MemberView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<UserView<'a>>,
    nick: Option<&'a str>,
    avatar: Option<ImageHash>,
    banner: Option<ImageHash>,
    roles: Vec<Snowflake>,
    joined_at: Timestamp,
    premium_since: Option<Timestamp>,
    deaf: bool,
    mute: bool,
    flags: u32,
    pending: bool,
    communication_disabled_until: Option<Timestamp>,
}

impl<'a> MemberView<'a> {
    /// Writes a member, keeping only the roles for which `role_exists` returns `true`.
    pub(super) fn new(
        record: &'a MemberRecord,
        with_user: bool,
        role_exists: impl Fn(Snowflake) -> bool,
    ) -> Self {
        Self {
            user: with_user.then(|| UserView::new(&record.user)),
            nick: record.nick.as_deref(),
            avatar: record.avatar,
            banner: None,
            roles: record
                .roles
                .iter()
                .copied()
                .filter(|role| role_exists(*role))
                .collect(),
            joined_at: record.joined_at,
            premium_since: record.premium_since,
            deaf: record.deaf,
            mute: record.mute,
            flags: record.flags,
            pending: record.pending,
            communication_disabled_until: record.communication_disabled_until,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(count: u32) -> Members {
        Members::new(
            42,
            1_500_000_000_000,
            count,
            vec![Snowflake(10), Snowflake(11)],
            None,
        )
    }

    #[test]
    fn derived_member_is_stable() {
        let members = members(1000);
        assert_eq!(members.get(17), members.get(17));
        assert_ne!(members.get(17), members.get(18));
    }

    #[test]
    fn user_id_finds_slot() {
        let members = members(1000);
        for slot in [0, 1, 500, 999] {
            let record = members.get(slot).unwrap();
            assert_eq!(members.slot_of(record.user.id), Some(slot));
            assert!(record.user.id.unix_ms() <= record.joined_at.0);
        }
        assert_eq!(members.slot_of(Snowflake(12345)), None);
    }

    #[test]
    fn advance_skips_removed_slots() {
        let mut members = members(10);
        members.remove(2);
        members.remove(3);
        assert_eq!(members.advance(0, 4), 6);
        assert_eq!(members.live_slots(0..6).count(), 4);
        assert_eq!(members.advance(6, 100), 10);
    }

    #[test]
    fn removed_member_is_gone() {
        let mut members = members(10);
        let user_id = members.get(4).unwrap().user.id;
        members.remove(4);
        assert_eq!(members.count(), 9);
        assert_eq!(members.get(4), None);
        assert_eq!(members.slot_of(user_id), None);
    }

    #[test]
    fn joined_member_gets_new_slot() {
        let mut members = members(10);
        let record = members.join(Timestamp(WORLD_NOW_MS + 5)).unwrap();
        assert_eq!(record.slot, 10);
        assert_eq!(members.count(), 11);
        assert_eq!(
            members.get(10).unwrap().joined_at,
            Timestamp(WORLD_NOW_MS + 5)
        );
        assert_eq!(members.slot_of(record.user.id), Some(10));
    }

    #[test]
    fn online_share_matches_status() {
        let members = members(100_000);
        let online = (0..100_000)
            .filter(|slot| members.status(*slot) != Status::Offline)
            .count() as f64;
        let expected = online_share(100_000) * 100_000.0;
        assert!(
            (online - expected).abs() < expected * 0.05,
            "{online} vs {expected}"
        );
    }
}
