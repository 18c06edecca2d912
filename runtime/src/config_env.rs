//! Environment overrides of the config file, applied before the config is validated.
//!
//! `WIDGET__<FIELD>__<FIELD>...=value` sets one field: each segment is the field's camelCase
//! name in SCREAMING_SNAKE_CASE, so `WIDGET__CACHE__FALLBACK_TTL=30m` sets `cache.fallbackTtl`
//! and `WIDGET__STREAM__MAX_LENGTH=2000000` sets `stream.maxLength`. In a list of named items
//! (`sources`, `screens`) a segment picks the item by name, `_` standing for `-`:
//! `WIDGET__SOURCES__DEALS__BATCH_SIZE=1000`. A value that is a number or `true`/`false` is
//! taken as one; a value starting with `[` or `{` is parsed as YAML (e.g.
//! `WIDGET__SCREENS__HOME__WIDGETS='["deals.top-picks"]'`); anything else is a string.
//!
//! Overrides go through the same deserialization and validation as the file, so a misspelt
//! variable fails start-up like a misspelt key would, and the message names the variable.

use serde_yaml::{Mapping, Value};

/// Variables with this prefix override config fields.
pub const PREFIX: &str = "WIDGET__";

/// The process environment as UTF-8 pairs (`std::env::vars` would panic on a variable that is
/// not UTF-8; such a variable cannot be an override anyway).
pub fn process_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
}

/// One override: the variable, its segments as written (`CACHE`, `FALLBACK_TTL`) and the value.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub var: String,
    pub segments: Vec<String>,
    pub value: Value,
}

impl Override {
    /// The field path it names, camelCase: `["cache", "fallbackTtl"]`.
    pub fn path(&self) -> Vec<String> {
        self.segments.iter().map(|s| camel_case(s)).collect()
    }
}

/// The overrides among `vars`, in variable-name order (so the result never depends on the
/// order the environment happens to list them in).
pub fn overrides(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<Override>, String> {
    let mut out = Vec::new();
    for (var, raw) in vars {
        let Some(rest) = var.strip_prefix(PREFIX) else {
            continue;
        };
        let segments: Vec<&str> = rest.split("__").collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(format!(
                "{var}: expected {PREFIX}FIELD[__FIELD...], e.g. {PREFIX}CACHE__FALLBACK_TTL"
            ));
        }
        out.push(Override {
            segments: segments.iter().map(|s| s.to_string()).collect(),
            value: parse_value(&var, &raw)?,
            var,
        });
    }
    out.sort_by(|a, b| a.var.cmp(&b.var));
    Ok(out)
}

/// Sets the override's field in the parsed config document, creating missing sections.
pub fn apply(doc: &mut Value, o: &Override) -> Result<(), String> {
    let path = o.path();
    let mut node = doc;
    for (i, field) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
        node = match node {
            Value::Mapping(map) => {
                let key = Value::String(field.clone());
                if last {
                    map.insert(key, o.value.clone());
                    return Ok(());
                }
                map.entry(key).or_insert(Value::Null)
            }
            Value::Sequence(items) => {
                let name = item_name(&o.segments[i]);
                let found = items
                    .iter_mut()
                    .find(|item| item.get("name").and_then(Value::as_str) == Some(name.as_str()));
                let Some(item) = found else {
                    return Err(format!(
                        "{}: `{}` has no item named `{name}`",
                        o.var,
                        path[..i].join(".")
                    ));
                };
                if last {
                    return Err(format!(
                        "{}: cannot replace a whole item of `{}`; set its fields",
                        o.var,
                        path[..i].join(".")
                    ));
                }
                item
            }
            _ => {
                return Err(format!(
                    "{}: `{}` is a value, not a section",
                    o.var,
                    path[..i].join(".")
                ));
            }
        };
    }
    Ok(())
}

/// `FALLBACK_TTL` -> `fallbackTtl`.
fn camel_case(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for (i, word) in segment.split('_').filter(|w| !w.is_empty()).enumerate() {
        let word = word.to_ascii_lowercase();
        if i == 0 {
            out.push_str(&word);
        } else {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                out.push(first.to_ascii_uppercase());
                out.extend(chars);
            }
        }
    }
    out
}

/// The list item a segment names: `LOYALTY_POINTS` -> `loyalty-points`.
fn item_name(segment: &str) -> String {
    segment.to_ascii_lowercase().replace('_', "-")
}

fn parse_value(var: &str, raw: &str) -> Result<Value, String> {
    let trimmed = raw.trim();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        return serde_yaml::from_str(trimmed)
            .map_err(|e| format!("{var}: value is not valid YAML: {e}"));
    }
    if let Ok(n) = trimmed.parse::<u64>() {
        return Ok(Value::Number(n.into()));
    }
    if let Ok(n) = trimmed.parse::<i64>() {
        return Ok(Value::Number(n.into()));
    }
    match trimmed {
        "true" => Ok(Value::Bool(true)),
        "false" => Ok(Value::Bool(false)),
        _ => Ok(Value::String(raw.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn applied(doc: &str, pairs: &[(&str, &str)]) -> Result<Value, String> {
        let mut doc: Value = serde_yaml::from_str(doc).expect("yaml");
        for o in overrides(vars(pairs))? {
            apply(&mut doc, &o)?;
        }
        Ok(doc)
    }

    #[test]
    fn names_map_to_camel_case_paths_and_values_to_types() {
        let o = overrides(vars(&[
            ("WIDGET__STREAM__MAX_LENGTH", "2000"),
            ("WIDGET__CACHE__FALLBACK_TTL", "30m"),
            ("PATH", "/bin"),
            ("WIDGETS_UNRELATED", "x"),
        ]))
        .expect("valid");
        assert_eq!(o.len(), 2);
        assert_eq!(o[0].path(), vec!["cache", "fallbackTtl"]);
        assert_eq!(o[0].value, Value::String("30m".into()));
        assert_eq!(o[1].path(), vec!["stream", "maxLength"]);
        assert_eq!(o[1].value, Value::Number(2000.into()));
    }

    #[test]
    fn sections_are_created_and_list_items_picked_by_name() {
        let doc = applied(
            "pipeline: home\nsources: [{name: deals}, {name: loyalty-points}]\n",
            &[
                ("WIDGET__CACHE__KEY_PREFIX", "hw:x:"),
                ("WIDGET__SOURCES__LOYALTY_POINTS__BATCH_SIZE", "50"),
            ],
        )
        .expect("applied");
        assert_eq!(doc["cache"]["keyPrefix"], Value::String("hw:x:".into()));
        assert_eq!(doc["sources"][1]["batchSize"], Value::Number(50.into()));
        assert!(doc["sources"][0].get("batchSize").is_none());
    }

    #[test]
    fn yaml_values_replace_lists() {
        let doc = applied(
            "pipeline: home\nsources: [{name: deals}]\nscreens: [{name: home, widgets: [deals.a]}]\n",
            &[("WIDGET__SCREENS__HOME__WIDGETS", r#"["deals.b", "deals.c"]"#)],
        )
        .expect("applied");
        assert_eq!(
            doc["screens"][0]["widgets"][1],
            Value::String("deals.c".into())
        );
    }

    #[test]
    fn bad_overrides_name_the_variable() {
        let e = applied(
            "pipeline: home\nsources: [{name: deals}]\n",
            &[("WIDGET__SOURCES__SHOES__BATCH_SIZE", "5")],
        )
        .expect_err("no such source");
        assert!(
            e.contains("WIDGET__SOURCES__SHOES__BATCH_SIZE") && e.contains("shoes"),
            "{e}"
        );
        let e =
            applied("pipeline: home\n", &[("WIDGET__PIPELINE__NAME", "x")]).expect_err("scalar");
        assert!(e.contains("`pipeline` is a value"), "{e}");
        let e = applied("pipeline: home\n", &[("WIDGET____X", "x")]).expect_err("empty segment");
        assert!(e.starts_with("WIDGET____X"), "{e}");
        let e = applied("pipeline: home\n", &[("WIDGET__SCREENS", "[unclosed")]).expect_err("yaml");
        assert!(e.contains("not valid YAML"), "{e}");
    }
}
