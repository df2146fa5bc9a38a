//! The bot token: sent in IDENTIFY and RESUME, never printed.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A Discord bot token. `Debug` and `Display` print `<redacted>`, so a token inside a payload, a
/// config struct or an error message never reaches a log. Only [`Token::expose`] and
/// serialization reveal it, for the gateway.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a token, dropping a `Bot ` prefix and surrounding whitespace (the gateway takes the
    /// bare token, while HTTP headers and token files often carry the prefix).
    pub fn new(raw: impl Into<String>) -> Self {
        let raw = raw.into();
        let trimmed = raw.trim();
        let bare = trimmed.strip_prefix("Bot ").unwrap_or(trimmed);
        Self(bare.to_owned())
    }

    /// Returns the secret, for the wire and for comparisons.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Returns `true` if the token is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Token {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Token {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::new)
    }
}

#[cfg(test)]
mod tests {
    use super::Token;

    #[test]
    fn token_never_prints() {
        let token = Token::new("Bot very-secret-value");
        assert_eq!(format!("{token}"), "<redacted>");
        assert_eq!(format!("{token:?}"), "Token(<redacted>)");
        assert_eq!(
            format!("{:#?}", Some(&token)),
            "Some(\n    Token(<redacted>),\n)"
        );
        assert!(!format!("{token:?}").contains("secret"));
    }

    #[test]
    fn token_serializes_bare_secret() {
        let token = Token::new("  Bot abc.def  ");
        assert_eq!(token.expose(), "abc.def");
        assert_eq!(serde_json::to_string(&token).unwrap(), "\"abc.def\"");
    }
}
