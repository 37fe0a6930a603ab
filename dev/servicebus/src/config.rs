//! Command line: the port, where the issuer's keys are, and the entities (queues, or event hubs
//! with `partitions=N`) to serve.

use std::time::Duration;

/// Azure Standard tier's message size limit (body and properties), the default per entity.
pub const DEFAULT_MAX_SIZE: usize = 256 * 1024;
/// Event Hubs' event (and batch) size limit on the Standard and Premium tiers.
pub const DEFAULT_EVENT_HUB_MAX_SIZE: usize = 1024 * 1024;
/// The most partitions an event hub may have here (Dedicated allows 1024).
pub const MAX_PARTITIONS: u64 = 1024;
/// Azure's default peek-lock duration.
pub const DEFAULT_LOCK_DURATION: Duration = Duration::from_secs(60);
pub const DEFAULT_PORT: u16 = 8410;
pub const DEFAULT_ISSUER_PREFIX: &str = "https://sts.windows.net/";

/// One queue (or event hub) the stand-in serves.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityConfig {
    pub name: String,
    /// Duplicate detection window; `None` when the entity has no duplicate detection.
    pub duplicate_detection: Option<Duration>,
    pub max_size: usize,
    pub lock_duration: Duration,
    /// `Some(n)`: an event hub with n partitions (Event Hubs' audience, send only);
    /// `None`: a Service Bus queue.
    pub partitions: Option<u32>,
}

impl EntityConfig {
    pub fn is_event_hub(&self) -> bool {
        self.partitions.is_some()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub port: u16,
    pub jwks_url: String,
    pub issuer_prefix: String,
    pub entities: Vec<EntityConfig>,
}

pub const USAGE: &str = "usage: servicebus-standin --jwks-url URL --entity SPEC [--entity SPEC ...] \
[--port N (default 8410, 0 = any free port)] [--issuer-prefix PREFIX (default https://sts.windows.net/)]
  SPEC = NAME[:OPTION=VALUE[,OPTION=VALUE...]], options:
    duplicate-detection=SECONDS   drop a MessageId seen within SECONDS (off by default)
    max-size=BYTES                body + properties limit (default 262144; 1048576 for an event hub)
    lock-duration=SECONDS         peek-lock duration (default 60)
    partitions=N                  an event hub with N partitions (1-1024) instead of a queue;
                                  not with duplicate-detection or lock-duration
  e.g. --entity orders --entity dedup:duplicate-detection=60 --entity telemetry:partitions=4";

/// Parse the arguments after the program name.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Config, String> {
    let mut port = DEFAULT_PORT;
    let mut jwks_url = None;
    let mut issuer_prefix = DEFAULT_ISSUER_PREFIX.to_string();
    let mut entities: Vec<EntityConfig> = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--port" => {
                let v = value("--port")?;
                port = v.parse().map_err(|_| format!("--port: not a port: {v}"))?;
            }
            "--jwks-url" => jwks_url = Some(value("--jwks-url")?),
            "--issuer-prefix" => issuer_prefix = value("--issuer-prefix")?,
            "--entity" => {
                let entity = parse_entity(&value("--entity")?)?;
                if entities
                    .iter()
                    .any(|e| e.name.eq_ignore_ascii_case(&entity.name))
                {
                    return Err(format!("--entity {}: declared twice", entity.name));
                }
                entities.push(entity);
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let jwks_url = jwks_url.ok_or_else(|| format!("--jwks-url is required\n{USAGE}"))?;
    if !jwks_url.starts_with("http://") {
        return Err(format!(
            "--jwks-url must be an http:// URL (loopback), got {jwks_url}"
        ));
    }
    if entities.is_empty() {
        return Err(format!("at least one --entity is required\n{USAGE}"));
    }
    Ok(Config {
        port,
        jwks_url,
        issuer_prefix,
        entities,
    })
}

/// `NAME[:duplicate-detection=S,max-size=B,lock-duration=S]`.
pub fn parse_entity(spec: &str) -> Result<EntityConfig, String> {
    let (name, options) = match spec.split_once(':') {
        Some((n, o)) => (n, Some(o)),
        None => (spec, None),
    };
    if !valid_entity_name(name) {
        return Err(format!(
            "entity name {name:?}: use 1-260 letters, digits, '.', '-' or '_', starting with a letter or digit"
        ));
    }
    let mut entity = EntityConfig {
        name: name.to_string(),
        duplicate_detection: None,
        max_size: DEFAULT_MAX_SIZE,
        lock_duration: DEFAULT_LOCK_DURATION,
        partitions: None,
    };
    let mut given: Vec<&str> = Vec::new();
    for option in options.into_iter().flat_map(|o| o.split(',')) {
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| format!("entity {name}: option {option:?} is not KEY=VALUE"))?;
        let number: u64 = value
            .parse()
            .map_err(|_| format!("entity {name}: {key}={value} is not a whole number"))?;
        given.push(key);
        match key {
            "duplicate-detection" if number > 0 => {
                entity.duplicate_detection = Some(Duration::from_secs(number))
            }
            "max-size" if number > 0 => {
                entity.max_size = usize::try_from(number)
                    .map_err(|_| format!("entity {name}: max-size too large"))?
            }
            "lock-duration" if number > 0 => entity.lock_duration = Duration::from_secs(number),
            "partitions" if (1..=MAX_PARTITIONS).contains(&number) => {
                entity.partitions = Some(number as u32)
            }
            "partitions" => {
                return Err(format!(
                    "entity {name}: partitions must be 1..={MAX_PARTITIONS}"
                ))
            }
            "duplicate-detection" | "max-size" | "lock-duration" => {
                return Err(format!("entity {name}: {key} must be positive"))
            }
            _ => return Err(format!("entity {name}: unknown option {key}")),
        }
    }
    if entity.is_event_hub() {
        // Event Hubs has neither duplicate detection nor peek-lock.
        if let Some(queue_only) = given
            .iter()
            .find(|k| matches!(**k, "duplicate-detection" | "lock-duration"))
        {
            return Err(format!(
                "entity {name}: {queue_only} is a queue option; an event hub (partitions=) has none"
            ));
        }
        if !given.contains(&"max-size") {
            entity.max_size = DEFAULT_EVENT_HUB_MAX_SIZE;
        }
    }
    Ok(entity)
}

/// Azure queue names: letters, digits, periods, hyphens, underscores (slashes left out here:
/// they would collide with the `/messages/...` routes), up to 260 characters.
pub fn valid_entity_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 260
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && !name.starts_with("__")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn entity_specs() {
        let plain = parse_entity("orders").unwrap();
        assert_eq!(plain.name, "orders");
        assert_eq!(plain.duplicate_detection, None);
        assert_eq!(plain.max_size, DEFAULT_MAX_SIZE);
        let dedup =
            parse_entity("dedup:duplicate-detection=60,max-size=1024,lock-duration=5").unwrap();
        assert_eq!(dedup.duplicate_detection, Some(Duration::from_secs(60)));
        assert_eq!(dedup.max_size, 1024);
        assert_eq!(dedup.lock_duration, Duration::from_secs(5));
        assert!(parse_entity("x:colour=blue").is_err());
        assert!(parse_entity("x:max-size=0").is_err());
        assert!(parse_entity("x:max-size").is_err());
        assert!(parse_entity("x:duplicate-detection=1m").is_err());
        assert!(parse_entity("").is_err());
        assert!(parse_entity("a/b").is_err());
        assert!(parse_entity("__control").is_err());
        assert_eq!(plain.partitions, None);
        assert!(!plain.is_event_hub());
    }

    #[test]
    fn event_hub_specs() {
        let hub = parse_entity("telemetry:partitions=4").unwrap();
        assert_eq!(hub.partitions, Some(4));
        assert!(hub.is_event_hub());
        assert_eq!(hub.max_size, DEFAULT_EVENT_HUB_MAX_SIZE);
        assert_eq!(hub.duplicate_detection, None);
        let small = parse_entity("t:partitions=1,max-size=2048").unwrap();
        assert_eq!((small.partitions, small.max_size), (Some(1), 2048));
        assert!(parse_entity("t:partitions=1024").is_ok());
        assert!(parse_entity("t:partitions=0").is_err());
        assert!(parse_entity("t:partitions=1025").is_err());
        assert!(parse_entity("t:partitions=2,duplicate-detection=60").is_err());
        assert!(parse_entity("t:lock-duration=5,partitions=2").is_err());
    }

    #[test]
    fn command_line() {
        let config = parse_args(args(&[
            "--port",
            "0",
            "--jwks-url=http://127.0.0.1:8400/t/discovery/v2.0/keys",
            "--entity",
            "orders",
            "--entity",
            "dedup:duplicate-detection=60",
        ]))
        .unwrap();
        assert_eq!(config.port, 0);
        assert_eq!(config.issuer_prefix, DEFAULT_ISSUER_PREFIX);
        assert_eq!(config.entities.len(), 2);
        assert!(
            parse_args(args(&["--entity", "a"])).is_err(),
            "jwks url required"
        );
        assert!(
            parse_args(args(&["--jwks-url", "http://x/"])).is_err(),
            "an entity required"
        );
        assert!(parse_args(args(&[
            "--jwks-url",
            "http://x/",
            "--entity",
            "a",
            "--entity",
            "A"
        ]))
        .is_err());
        assert!(parse_args(args(&["--jwks-url", "https://x/", "--entity", "a"])).is_err());
        assert!(parse_args(args(&[
            "--jwks-url",
            "http://x/",
            "--entity",
            "a",
            "--bogus"
        ]))
        .is_err());
    }
}
