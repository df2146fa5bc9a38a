//! Generation of a guild's structure from its seed: settings, roles, channels, threads, emojis
//! and the members connected to voice.

use actors::gateway::Snowflake;
use rand::RngExt;

use super::guild::Guild;
use super::members::Members;
use super::objects::{
    channel_type, new_channel, new_role, new_text_channel, new_voice_channel, random_id, Channel,
    Emoji, Overwrite, Role, RoleTags, Thread, ThreadMetadata, VoiceConnection,
};
use super::random::{self, generator, mix, Generator, WORLD_NOW_MS};
use super::wire::{ImageHash, Permissions, Timestamp};

/// Role colors of the generated roles, as 0xRRGGBB.
const ROLE_COLORS: &[u32] = &[
    0x1abc9c, 0x2ecc71, 0x3498db, 0x9b59b6, 0xe91e63, 0xf1c40f, 0xe67e22, 0xe74c3c, 0x95a5a6,
    0x607d8b, 0x11806a, 0x1f8b4c, 0x206694, 0x71368a, 0xad1457, 0xc27c0e,
];

/// The color Discord gives the booster role.
const BOOSTER_COLOR: u32 = 0xf47fff;

/// Preferred locales of the generated guilds; repeats weight the draw towards en-US.
const LOCALES: &[&str] = &[
    "en-US", "en-US", "en-US", "en-US", "en-GB", "de", "fr", "es-ES", "pt-BR", "ru", "ja", "ko",
    "pl", "tr",
];

impl Guild {
    /// Generates a guild of `size` members. `seed` determines everything but the id and the
    /// time the bot joined.
    pub(super) fn generate(id: Snowflake, seed: u64, size: u32, joined_at: Timestamp) -> Self {
        let mut rng = generator(seed, 0);
        let created_ms = id.unix_ms();
        // Counts of roles, channels, threads and emojis grow with the decimal digits of the size.
        let scale = f64::from(size.max(1)).log10();
        let premium_subscription_count = boost_count(&mut rng, size);
        let community = size >= 5_000 || (size >= 500 && rng.random_bool(0.6));

        let roles = generate_roles(&mut rng, id, created_ms, scale, premium_subscription_count);
        let assignable_roles = roles
            .iter()
            .filter(|role| !role.managed && role.id != id && role.permissions == Permissions::NONE)
            .map(|role| role.id)
            .collect();
        let booster_role = roles
            .iter()
            .find(|role| role.tags.is_some())
            .map(|role| role.id);
        let members = Members::new(
            mix(seed, 1),
            created_ms,
            size,
            assignable_roles,
            booster_role,
        );

        let mut guild = Self {
            id,
            name: random::guild_name(&mut rng),
            description: None,
            icon: rng.random_bool(0.8).then(|| ImageHash(rng.random())),
            splash: None,
            banner: None,
            features: Vec::new(),
            verification_level: 0,
            default_message_notifications: u8::from(size > 1_000),
            explicit_content_filter: 0,
            mfa_level: 0,
            premium_subscription_count,
            preferred_locale: random::pick(&mut rng, LOCALES),
            afk_channel_id: None,
            afk_timeout: 300,
            system_channel_id: None,
            system_channel_flags: 0,
            rules_channel_id: None,
            public_updates_channel_id: None,
            vanity_url_code: None,
            max_members: if size > 250_000 { 1_000_000 } else { 500_000 },
            premium_progress_bar_enabled: rng.random_bool(0.3),
            joined_at,
            roles,
            channels: Vec::new(),
            threads: Vec::new(),
            emojis: Vec::new(),
            voice: Vec::new(),
            members,
        };

        guild.generate_settings(&mut rng, size, community);
        guild.generate_channels(&mut rng, scale, community);
        guild.generate_threads(&mut rng, scale);
        guild.generate_emojis(&mut rng, scale);
        guild.generate_voice(&mut rng, size);
        guild
    }

    fn generate_settings(&mut self, rng: &mut Generator, size: u32, community: bool) {
        let tier = self.premium_tier();
        if community {
            self.features.extend([
                "COMMUNITY",
                "NEWS",
                "WELCOME_SCREEN_ENABLED",
                "MEMBER_VERIFICATION_GATE_ENABLED",
                "PREVIEW_ENABLED",
            ]);
            self.verification_level = rng.random_range(1..=3);
            self.explicit_content_filter = 2;
            self.description = rng.random_bool(0.6).then(|| random::topic(rng));
        } else {
            self.verification_level = rng.random_range(0..=1);
        }
        if size > 50_000 && rng.random_bool(0.5) {
            self.features.extend(["DISCOVERABLE", "PARTNERED"]);
        }
        if tier >= 1 {
            self.features.extend(["ANIMATED_ICON", "INVITE_SPLASH"]);
            self.splash = rng.random_bool(0.3).then(|| ImageHash(rng.random()));
        }
        if tier >= 2 {
            self.features.extend(["BANNER", "ROLE_ICONS"]);
            self.banner = rng.random_bool(0.6).then(|| ImageHash(rng.random()));
        }
        if tier >= 3 {
            self.features.extend(["VANITY_URL", "ANIMATED_BANNER"]);
            self.vanity_url_code = Some(self.name.to_lowercase().replace(' ', ""));
        }
        self.mfa_level = u8::from(size > 1_000 && rng.random_bool(0.7));
        self.afk_timeout = *[60, 300, 900, 1800, 3600]
            .get(rng.random_range(0..5))
            .unwrap_or(&300);
    }

    fn generate_channels(&mut self, rng: &mut Generator, scale: f64, community: bool) {
        let categories = self.generate_categories(rng, scale);
        let staff = categories
            .last()
            .filter(|category| !category.permission_overwrites.is_empty());
        let public = &categories[..categories.len() - usize::from(staff.is_some())];
        let created_ms = self.id.unix_ms();

        let text_count = 1 + rng.random_range(scale as usize..=(scale * 3.0) as usize);
        let mut names = random::text_channel_names(rng, text_count - 1);
        names.insert(0, "general".to_owned());
        let mut channels = Vec::new();
        for (position, name) in names.into_iter().enumerate() {
            let id = channel_id(rng, created_ms, position == 0);
            let mut channel = new_text_channel(rng, id, channel_type::TEXT, name, position);
            place_in_category(rng, &mut channel, public);
            channels.push(channel);
        }
        if community {
            self.add_community_channels(rng, &mut channels, public, staff);
        }

        let voice_count = rng.random_range(1 + (scale / 2.0) as usize..=1 + (scale * 2.0) as usize);
        let names = random::voice_channel_names(rng, voice_count);
        for (position, name) in names.into_iter().enumerate() {
            let id = channel_id(rng, created_ms, position == 0);
            let mut channel = new_voice_channel(rng, id, position, self.voice_bitrate());
            channel.name = name;
            channels.push(channel);
        }
        if community && scale > 4.0 {
            let id = channel_id(rng, created_ms, false);
            let mut stage = new_voice_channel(rng, id, voice_count, self.voice_bitrate());
            stage.kind = channel_type::STAGE;
            stage.name = "Stage".to_owned();
            channels.push(stage);
        }
        for channel in channels.iter_mut().filter(|channel| channel.is_voice()) {
            place_in_category(rng, channel, public);
        }

        self.system_channel_id = channels.first().map(|channel| channel.id);
        if rng.random_bool(0.3) {
            self.afk_channel_id = channels
                .iter()
                .rev()
                .find(|channel| channel.kind == channel_type::VOICE)
                .map(|channel| channel.id);
        }
        self.channels = categories;
        self.channels.extend(channels);
    }

    /// Generates 1 to 7 categories. With a moderator role and more than one category, the last
    /// is a staff category that only moderators can see.
    fn generate_categories(&self, rng: &mut Generator, scale: f64) -> Vec<Channel> {
        let created_ms = self.id.unix_ms();
        let count = 1 + scale as usize;
        let names = random::category_names(rng, count);
        let mut categories: Vec<Channel> = names
            .into_iter()
            .enumerate()
            .map(|(position, name)| {
                let id = channel_id(rng, created_ms, position == 0);
                new_channel(id, channel_type::CATEGORY, name, position as i32)
            })
            .collect();

        let moderator = self
            .roles
            .iter()
            .find(|role| role.permissions == Permissions::MODERATOR)
            .map(|role| role.id);
        let Some(moderator) = moderator else {
            return categories;
        };
        if count < 2 {
            return categories;
        }

        let staff = &mut categories[count - 1];
        staff.name = "Staff".to_owned();
        staff.permission_overwrites = vec![
            Overwrite {
                id: self.id,
                kind: 0,
                allow: Permissions::NONE,
                deny: Permissions(Permissions::VIEW_CHANNEL),
            },
            Overwrite {
                id: moderator,
                kind: 0,
                allow: Permissions(Permissions::VIEW_CHANNEL),
                deny: Permissions::NONE,
            },
        ];
        categories
    }

    /// Adds the rules, moderator-only and announcement channels of a community guild.
    fn add_community_channels(
        &mut self,
        rng: &mut Generator,
        channels: &mut Vec<Channel>,
        public: &[Channel],
        staff: Option<&Channel>,
    ) {
        let created_ms = self.id.unix_ms();
        let next_position = channels.len();

        let id = random_id(rng, created_ms, WORLD_NOW_MS);
        let mut rules = new_text_channel(
            rng,
            id,
            channel_type::TEXT,
            "rules".to_owned(),
            next_position,
        );
        rules.permission_overwrites.push(Overwrite {
            id: self.id,
            kind: 0,
            allow: Permissions::NONE,
            deny: Permissions(Permissions::SEND_MESSAGES),
        });
        let id = random_id(rng, created_ms, WORLD_NOW_MS);
        let mut updates = new_text_channel(
            rng,
            id,
            channel_type::TEXT,
            "moderator-only".to_owned(),
            next_position + 1,
        );
        if let Some(staff) = staff {
            updates.parent_id = Some(staff.id);
            updates.permission_overwrites = staff.permission_overwrites.clone();
        }
        let id = random_id(rng, created_ms, WORLD_NOW_MS);
        let mut announcements = new_text_channel(
            rng,
            id,
            channel_type::ANNOUNCEMENT,
            "announcements".to_owned(),
            next_position + 2,
        );
        announcements.permission_overwrites = rules.permission_overwrites.clone();
        announcements.parent_id = public.first().map(|category| category.id);

        self.rules_channel_id = Some(rules.id);
        self.public_updates_channel_id = Some(updates.id);
        channels.extend([rules, updates, announcements]);
    }

    fn generate_threads(&mut self, rng: &mut Generator, scale: f64) {
        let parents: Vec<Snowflake> = self
            .channels
            .iter()
            .filter(|channel| channel.kind == channel_type::TEXT)
            .map(|channel| channel.id)
            .collect();
        if parents.is_empty() {
            return;
        }

        let count = rng.random_range(0..=(scale * 2.0) as usize);
        for _ in 0..count {
            let Some(owner) = self.members.random_slot(rng, false) else {
                return;
            };
            let parent_id = parents[rng.random_range(0..parents.len())];
            let created_ms = WORLD_NOW_MS - rng.random_range(60_000..7 * 86_400_000);
            let id = random_id(rng, created_ms, created_ms);
            let message_count = rng.random_range(1..500);
            let thread = Thread {
                id,
                kind: channel_type::PUBLIC_THREAD,
                guild_id: self.id,
                parent_id,
                owner_id: self.members.user_id(owner),
                name: random::thread_name(rng),
                last_message_id: Some(random_id(rng, created_ms, WORLD_NOW_MS)),
                message_count,
                member_count: rng.random_range(1..=self.members.count().clamp(1, 50) as u8),
                rate_limit_per_user: 0,
                flags: 0,
                total_message_sent: message_count,
                thread_metadata: ThreadMetadata {
                    archived: false,
                    auto_archive_duration: 1440,
                    archive_timestamp: Timestamp(created_ms),
                    locked: false,
                    create_timestamp: Timestamp(created_ms),
                },
            };
            self.threads.push(thread);
        }
    }

    fn generate_emojis(&mut self, rng: &mut Generator, scale: f64) {
        let slots = match self.premium_tier() {
            0 => 50,
            1 => 100,
            2 => 150,
            _ => 250,
        };
        let target = (scale * scale * 5.0) as usize;
        let count = rng.random_range(0..=target.min(slots));
        let created_ms = self.id.unix_ms();
        for _ in 0..count {
            let emoji = Emoji {
                id: random_id(rng, created_ms, WORLD_NOW_MS),
                name: random::emoji_name(rng),
                roles: Vec::new(),
                require_colons: true,
                managed: false,
                animated: rng.random_bool(0.2),
                available: true,
            };
            self.emojis.push(emoji);
        }
    }

    /// Connects a few members to voice channels: up to 2 in a small guild, about one in 1,000 in
    /// a large one, at most 300.
    fn generate_voice(&mut self, rng: &mut Generator, size: u32) {
        let channels: Vec<Snowflake> = self
            .channels
            .iter()
            .filter(|channel| channel.is_voice())
            .map(|channel| channel.id)
            .collect();
        if channels.is_empty() {
            return;
        }

        let max_connected = (size / 500).clamp(2, 300);
        let count = rng.random_range(0..=max_connected).min(size / 2);
        for _ in 0..count {
            let Some(slot) = self.members.random_slot(rng, false) else {
                return;
            };
            if self.voice.iter().any(|connection| connection.slot == slot) {
                continue;
            }
            let connection = VoiceConnection {
                slot,
                channel_id: channels[rng.random_range(0..channels.len())],
                session_id: rng.random(),
                self_mute: rng.random_bool(0.2),
                self_deaf: rng.random_bool(0.05),
                self_video: rng.random_bool(0.03),
                self_stream: rng.random_bool(0.05),
            };
            self.voice.push(connection);
        }
    }
}

/// Draws a boost count. The chance of any boost grows with the guild's size (2 % below 40
/// members, 95 % from 1,900), and a boosted guild has up to one boost per 100 members (at least
/// 2, at most 400).
fn boost_count(rng: &mut Generator, size: u32) -> u32 {
    let chance = (f64::from(size) / 2_000.0).clamp(0.02, 0.95);
    if !rng.random_bool(chance) {
        return 0;
    }
    let max_boosts = (size / 100).clamp(2, 400);
    rng.random_range(1..=max_boosts)
}

/// Generates the roles: @everyone (id = guild id, position 0), an admin and a moderator role,
/// cosmetic and pronoun roles without permissions, and the booster role of a boosted guild.
fn generate_roles(
    rng: &mut Generator,
    guild_id: Snowflake,
    created_ms: u64,
    scale: f64,
    boosts: u32,
) -> Vec<Role> {
    let mut roles = vec![new_role(
        guild_id,
        "@everyone".to_owned(),
        0,
        Permissions::EVERYONE,
    )];

    let count = rng.random_range(1..=2 + (scale * 6.0) as usize);
    let mut names = random::role_names(rng, count.saturating_sub(2)).into_iter();
    for index in 0..count {
        let (name, permissions) = match index {
            0 => ("Admin".to_owned(), Permissions(Permissions::ADMINISTRATOR)),
            1 => ("Moderator".to_owned(), Permissions::MODERATOR),
            _ => (names.next().unwrap_or_default(), Permissions::NONE),
        };
        let mut role = new_role(
            random_id(rng, created_ms, WORLD_NOW_MS),
            name,
            0,
            permissions,
        );
        role.set_color(if rng.random_bool(0.7) {
            ROLE_COLORS[rng.random_range(0..ROLE_COLORS.len())]
        } else {
            0
        });
        role.hoist = index < 3 && rng.random_bool(0.7);
        role.mentionable = rng.random_bool(0.3);
        roles.push(role);
    }

    if boosts > 0 {
        let mut booster = new_role(
            random_id(rng, created_ms, WORLD_NOW_MS),
            "Server Booster".to_owned(),
            0,
            Permissions::NONE,
        );
        booster.set_color(BOOSTER_COLOR);
        booster.managed = true;
        booster.tags = Some(RoleTags {
            premium_subscriber: (),
        });
        roles.push(booster);
    }

    let top = roles.len() as i32;
    for (index, role) in roles.iter_mut().enumerate().skip(1) {
        role.position = top - index as i32;
    }
    roles
}

/// Puts a channel under a random category (nine in ten channels) and copies the category's
/// overwrites, as Discord does for synced channels.
fn place_in_category(rng: &mut Generator, channel: &mut Channel, categories: &[Channel]) {
    if categories.is_empty() || rng.random_bool(0.1) {
        return;
    }
    let category = &categories[rng.random_range(0..categories.len())];
    channel.parent_id = Some(category.id);
    channel
        .permission_overwrites
        .extend(category.permission_overwrites.iter().cloned());
}

/// Mints a channel id: the default channels Discord creates with a guild share its creation
/// time, later channels are created at a random time since.
fn channel_id(rng: &mut Generator, guild_created_ms: u64, default: bool) -> Snowflake {
    if default {
        random_id(rng, guild_created_ms, guild_created_ms)
    } else {
        random_id(rng, guild_created_ms, WORLD_NOW_MS)
    }
}
