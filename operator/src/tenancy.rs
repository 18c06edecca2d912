//! One stream and one cache prefix per pipeline on a Redis, across namespaces.
//!
//! Two pipelines writing one stream split each other's events between their core databases,
//! and two sharing a cache prefix serve each other's widgets. The defaults are unique per
//! namespace and name (`render::tenant_names`), but explicit names can still collide, and only
//! Redis knows which pipelines share a server: so each pipeline claims its stream and prefix in
//! that Redis (`<stream>.owner`, `<keyPrefix>owner`, holding `<namespace>/<name>/<uid>`). The
//! first claimant keeps them; a later one is refused with the condition reason `Conflict`. A
//! claim whose pipeline no longer exists (or was re-created with a new uid) is taken over.

use redis::Script;
use widget_runtime::config::{Config, RedisMode};

use crate::probe::ProbeError;

/// Who holds a pipeline's names on its Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This pipeline (now, or already).
    Ours,
    /// Another owner holds `key`.
    Taken { key: String, by: Owner },
}

/// A claimant: the pipeline's namespace, name and uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Owner {
    pub fn to_value(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.name, self.uid)
    }

    pub fn parse(value: &str) -> Option<Owner> {
        let mut parts = value.splitn(3, '/');
        let (namespace, name, uid) = (parts.next()?, parts.next()?, parts.next()?);
        Some(Owner {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
        })
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The keys a pipeline claims. In a cluster the claim script must be single-slot, and the
/// prefix's claim must not depend on the stream's tag (two pipelines with different streams
/// and one prefix must meet on the same key), so both claims go under one fixed tag there.
pub fn claim_keys(config: &Config) -> [String; 2] {
    match config.redis.mode {
        RedisMode::Standalone => [
            format!("{}.owner", config.stream_name()),
            format!("{}owner", config.key_prefix()),
        ],
        RedisMode::Cluster => [
            format!("{{hw-claims}}stream:{}", config.stream_name()),
            format!("{{hw-claims}}prefix:{}", config.key_prefix()),
        ],
    }
}

/// Claims every key in one step if each is free, already ours, or held by exactly `stale` (a
/// claimant found gone); otherwise the first key held by anyone else is returned and nothing
/// is written. Replacing only `stale`, never "whatever is there", keeps a take-over of one dead
/// pipeline's stream from taking a live pipeline's cache prefix with it.
const CLAIM: &str = r#"
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v and v ~= ARGV[1] and v ~= ARGV[2] then return {key, v} end
end
for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[1]) end
return 0
"#;

/// Claims `config`'s names on the Redis of `con` for `owner`, replacing claims held by
/// `stale` (a claimant known to be gone), and no other.
pub async fn claim(
    con: &mut widget_runtime::connect::Conn,
    config: &Config,
    owner: &Owner,
    stale: Option<&Owner>,
) -> Result<Claim, ProbeError> {
    let script = Script::new(CLAIM);
    let mut invocation = script.prepare_invoke();
    for key in claim_keys(config) {
        invocation.key(key);
    }
    invocation
        .arg(owner.to_value())
        .arg(stale.map(Owner::to_value).unwrap_or_default());
    let reply: redis::Value = invocation.invoke_async(con).await?;
    Ok(match reply {
        redis::Value::Array(items) => {
            let text = |v: Option<&redis::Value>| match v {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            };
            let (key, by) = (text(items.first()), text(items.get(1)));
            match Owner::parse(&by) {
                Some(by) => Claim::Taken { key, by },
                // Not a claim this operator wrote: treat the key as held by nobody we know.
                None => Claim::Taken {
                    key,
                    by: Owner {
                        namespace: String::new(),
                        name: by,
                        uid: String::new(),
                    },
                },
            }
        }
        _ => Claim::Ours,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_trip() {
        let o = Owner {
            namespace: "team-a".into(),
            name: "home".into(),
            uid: "1234-abcd".into(),
        };
        assert_eq!(Owner::parse(&o.to_value()), Some(o.clone()));
        assert_eq!(o.to_string(), "team-a/home");
        assert_eq!(Owner::parse("nothing"), None);
    }
}
