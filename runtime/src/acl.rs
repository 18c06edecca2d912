//! Least-privilege Redis users, one per component: the ACL rules that let a component of one
//! pipeline do its work and nothing else. A compromised outbox-worker (on the product side of
//! the platform) can then append to its pipeline's stream but cannot rewrite the cache the home
//! screen is served from, read another source's confirmations or touch another pipeline's keys;
//! core-api can read and back-fill the cache but not inject events.
//!
//! `widget-runtime acl` prints them as `ACL SETUSER` lines; `docs/security.md` explains them.

use crate::config::{Config, RedisMode};

/// Which component a user is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component<'a> {
    Worker { source: &'a str },
    Ingester,
    CoreApi,
}

/// Commands every component sends: liveness checks, the client library's connection set-up,
/// scripts (the epoch check, the cache's version guard) and the stats flush.
const COMMON: &[&str] = &[
    "ping",
    // (The client library's `CLIENT SETINFO` at connect is left out: Redis before 7.2 does
    // not know it, and the library ignores its refusal.)
    "eval",
    "evalsha",
    "script|load",
    "hincrby",
    "hset",
    "hgetall",
    // The epoch script's check; and in cluster mode a transaction aborted by a redirect is
    // sent again after one EXISTS has made the client read the slot map again
    // (connect::Conn): refused, the retry meets the same redirect.
    "exists",
    // The stats flush is one transaction. (A refused MULTI makes redis-rs 1.8 panic in debug
    // builds, an index underflow in its transaction bookkeeping: never leave these out.)
    "multi",
    "exec",
    // Optional: the epoch's run-id check (`INFO server`, called with pcall; refused, it is
    // skipped). `CONFIG GET` is left out on purpose: it reads `requirepass` and `masterauth` in
    // clear text, so a worker holding it could become the default user. The eviction-policy
    // check is then skipped (run it, and the operator's probe, with an administrative user).
    "info",
];

const WORKER: &[&str] = &[
    "xadd",
    "xlen",
    "xinfo|groups",
    "xtrim",
    // The oldest pending entry, below which consumed history is trimmed from a full stream.
    "xpending",
    // The epoch script (durability::ensure_epoch) creates the group with the marker.
    "xgroup|create",
    "get",
    "set",
    "srandmember",
    "srem",
];

const INGESTER: &[&str] = &[
    "xreadgroup",
    "xack",
    "xautoclaim",
    "xpending",
    "xinfo|groups",
    "xinfo|consumers",
    "xgroup|create",
    "xgroup|delconsumer",
    "xadd",
    "xlen",
    "xtrim",
    "xrange",
    "xdel",
    "get",
    "set",
    "del",
    "mget",
    "pexpire",
    "pttl",
    "sadd",
];

const CORE_API: &[&str] = &["mget", "get", "set", "pexpire", "pttl"];

/// core-api's in-process cache: RESP3 client tracking on the cache prefix (HELLO needs no
/// permission). Without it the cache cannot stay coherent and is never used.
const LOCAL_CACHE: &[&str] = &["client|tracking"];

/// In cluster mode, what the cluster client sends by itself: the slot map it routes by and
/// re-reads after a redirect, and ASKING before a command redirected by ASK during a
/// resharding.
const CLUSTER: &[&str] = &["cluster|slots", "asking"];

/// core-api in cluster mode: READONLY for reads from replicas (`REDIS_READ_URL`), and the node
/// list its in-process cache tracks every node by (slotless nodes too).
const CLUSTER_CORE_API: &[&str] = &["readonly", "cluster|nodes"];

/// Redis glob characters in a key name are matched literally.
fn literal(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The ACL rules of `component` for `config`'s pipeline, to follow `ACL SETUSER <user> reset
/// on >password`: its key patterns, then its commands, everything else refused.
pub fn rules(config: &Config, component: Component<'_>) -> Vec<String> {
    let stream = config.stream_name();
    let cache = format!("{}w:*", literal(&config.key_prefix()));
    let mut keys = vec![literal(&stream), literal(&config.epoch_key())];
    let cluster = config.redis.mode == RedisMode::Cluster;
    let mut extra: Vec<&[&str]> = Vec::new();
    if cluster {
        extra.push(CLUSTER);
    }
    let commands = match component {
        Component::Worker { source } => {
            keys.push(literal(&config.confirmed_key(source)));
            WORKER
        }
        Component::Ingester => {
            keys.push(literal(&config.dead_letter_stream()));
            keys.push(format!("{}*", literal(&config.confirmed_key(""))));
            keys.push(format!("{}*", literal(&config.warm_key(""))));
            keys.push(cache);
            INGESTER
        }
        Component::CoreApi => {
            keys = vec![cache];
            if config.local_cache.enabled {
                extra.push(LOCAL_CACHE);
            }
            if cluster {
                extra.push(CLUSTER_CORE_API);
            }
            CORE_API
        }
    };
    keys.push(literal(&config.stats_key()));
    let mut out = vec!["resetkeys".into(), "resetchannels".into(), "-@all".into()];
    out.extend(keys.into_iter().map(|k| format!("~{k}")));
    let mut names: Vec<&str> = COMMON
        .iter()
        .chain(commands)
        .chain(extra.into_iter().flatten())
        .copied()
        .collect();
    names.sort_unstable();
    names.dedup();
    out.extend(names.into_iter().map(|c| format!("+{c}")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_yaml_str("pipeline: home\nsources: [{name: deals}, {name: loyalty}]\n")
            .expect("config")
    }

    #[test]
    fn a_worker_reaches_its_stream_and_confirmations_but_not_the_cache() {
        let r = rules(&config(), Component::Worker { source: "deals" });
        assert!(r.contains(&"~home.widget-events".to_string()), "{r:?}");
        assert!(r.contains(&"~home.widget-events.confirmed.deals".to_string()));
        assert!(!r.iter().any(|k| k.contains("confirmed.loyalty")));
        assert!(
            !r.iter().any(|k| k.ends_with(":w:*")),
            "no cache keys: {r:?}"
        );
        assert!(r.contains(&"+xadd".to_string()));
        assert!(!r.contains(&"+xreadgroup".to_string()));
        assert!(!r.contains(&"+mget".to_string()));
    }

    #[test]
    fn core_api_reaches_only_the_cache_and_the_stats() {
        let r = rules(&config(), Component::CoreApi);
        let keys: Vec<&String> = r.iter().filter(|k| k.starts_with('~')).collect();
        assert_eq!(keys, ["~hw:home:w:*", "~hw:home:stats"]);
        assert!(!r.contains(&"+xadd".to_string()));
    }

    #[test]
    fn core_api_may_track_keys_for_its_in_process_cache_unless_it_is_off() {
        let on = rules(&config(), Component::CoreApi);
        assert!(on.contains(&"+client|tracking".to_string()), "{on:?}");
        let off = Config::from_yaml_str(
            "pipeline: home\nsources: [{name: deals}]\nlocalCache: {enabled: false}\n",
        )
        .expect("config");
        let off = rules(&off, Component::CoreApi);
        assert!(!off.iter().any(|r| r.starts_with("+client")), "{off:?}");
    }

    #[test]
    fn cluster_mode_adds_only_what_the_cluster_client_and_replica_reads_send() {
        let standalone = rules(&config(), Component::Ingester);
        assert!(
            !standalone
                .iter()
                .any(|r| r.contains("cluster") || r == "+asking")
        );
        let c = Config::from_yaml_str(
            "pipeline: home\nredis: {mode: cluster}\nsources: [{name: deals}]\n",
        )
        .expect("config");
        for component in [Component::Worker { source: "deals" }, Component::Ingester] {
            let r = rules(&c, component);
            assert!(r.contains(&"+cluster|slots".to_string()), "{r:?}");
            assert!(r.contains(&"+asking".to_string()), "{r:?}");
            assert!(!r.contains(&"+readonly".to_string()), "{r:?}");
        }
        let api = rules(&c, Component::CoreApi);
        for cmd in ["+cluster|slots", "+cluster|nodes", "+asking", "+readonly"] {
            assert!(api.contains(&cmd.to_string()), "{cmd}: {api:?}");
        }
        assert!(!api.iter().any(|r| r == "+cluster" || r == "+@admin"));
    }

    #[test]
    fn glob_characters_in_names_are_literal() {
        assert_eq!(literal("a*b?[c]"), "a\\*b\\?\\[c\\]");
    }
}

#[cfg(test)]
mod no_secrets {
    use super::*;

    #[test]
    fn no_user_may_read_the_server_config() {
        let config = Config::from_yaml_str("pipeline: p\nsources: [{name: s}]\n").expect("config");
        for c in [
            Component::Worker { source: "s" },
            Component::Ingester,
            Component::CoreApi,
        ] {
            let r = rules(&config, c);
            assert!(!r.iter().any(|x| x.starts_with("+config")), "{c:?}: {r:?}");
            assert!(
                !r.iter().any(|x| x.starts_with("+@")),
                "no whole categories: {r:?}"
            );
        }
    }
}
