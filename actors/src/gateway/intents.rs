//! Gateway intents: which event groups a session receives.

/// A set of gateway intent bits, as sent in IDENTIFY.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Intents(pub u64);

impl Intents {
    pub const GUILDS: Self = Self(1 << 0);
    pub const GUILD_MEMBERS: Self = Self(1 << 1);
    pub const GUILD_MODERATION: Self = Self(1 << 2);
    pub const GUILD_EXPRESSIONS: Self = Self(1 << 3);
    pub const GUILD_INTEGRATIONS: Self = Self(1 << 4);
    pub const GUILD_WEBHOOKS: Self = Self(1 << 5);
    pub const GUILD_INVITES: Self = Self(1 << 6);
    pub const GUILD_VOICE_STATES: Self = Self(1 << 7);
    pub const GUILD_PRESENCES: Self = Self(1 << 8);
    pub const GUILD_MESSAGES: Self = Self(1 << 9);
    pub const GUILD_MESSAGE_REACTIONS: Self = Self(1 << 10);
    pub const GUILD_MESSAGE_TYPING: Self = Self(1 << 11);
    pub const DIRECT_MESSAGES: Self = Self(1 << 12);
    pub const DIRECT_MESSAGE_REACTIONS: Self = Self(1 << 13);
    pub const DIRECT_MESSAGE_TYPING: Self = Self(1 << 14);
    pub const MESSAGE_CONTENT: Self = Self(1 << 15);
    pub const GUILD_SCHEDULED_EVENTS: Self = Self(1 << 16);
    pub const AUTO_MODERATION_CONFIGURATION: Self = Self(1 << 20);
    pub const AUTO_MODERATION_EXECUTION: Self = Self(1 << 21);
    pub const GUILD_MESSAGE_POLLS: Self = Self(1 << 24);
    pub const DIRECT_MESSAGE_POLLS: Self = Self(1 << 25);

    /// Every intent Discord defines. IDENTIFY with another bit is closed with 4013.
    pub const ALL: Self = Self(
        Self::GUILDS.0
            | Self::GUILD_MEMBERS.0
            | Self::GUILD_MODERATION.0
            | Self::GUILD_EXPRESSIONS.0
            | Self::GUILD_INTEGRATIONS.0
            | Self::GUILD_WEBHOOKS.0
            | Self::GUILD_INVITES.0
            | Self::GUILD_VOICE_STATES.0
            | Self::GUILD_PRESENCES.0
            | Self::GUILD_MESSAGES.0
            | Self::GUILD_MESSAGE_REACTIONS.0
            | Self::GUILD_MESSAGE_TYPING.0
            | Self::DIRECT_MESSAGES.0
            | Self::DIRECT_MESSAGE_REACTIONS.0
            | Self::DIRECT_MESSAGE_TYPING.0
            | Self::MESSAGE_CONTENT.0
            | Self::GUILD_SCHEDULED_EVENTS.0
            | Self::AUTO_MODERATION_CONFIGURATION.0
            | Self::AUTO_MODERATION_EXECUTION.0
            | Self::GUILD_MESSAGE_POLLS.0
            | Self::DIRECT_MESSAGE_POLLS.0,
    );

    /// Intents that a bot must enable in the developer portal first. IDENTIFY with one that is not
    /// enabled is closed with 4014.
    pub const PRIVILEGED: Self =
        Self(Self::GUILD_MEMBERS.0 | Self::GUILD_PRESENCES.0 | Self::MESSAGE_CONTENT.0);

    /// Returns `true` if every bit of `other` is set here.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Returns the bits set in both.
    pub const fn intersection(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }

    /// Returns the bits set in either.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Returns the bits that Discord does not define.
    pub const fn unknown_bits(self) -> u64 {
        self.0 & !Self::ALL.0
    }
}

impl std::ops::BitOr for Intents {
    type Output = Self;

    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

#[cfg(test)]
mod tests {
    use super::Intents;

    #[test]
    fn intents_privileged_are_known() {
        assert!(Intents::ALL.contains(Intents::PRIVILEGED));
        assert_eq!(Intents::PRIVILEGED.0, (1 << 1) | (1 << 8) | (1 << 15));
        assert_eq!(Intents(1 << 30).unknown_bits(), 1 << 30);
        assert_eq!(Intents::ALL.unknown_bits(), 0);
    }
}
