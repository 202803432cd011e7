//! Loading a binary's configuration: one TOML file plus `PREFIX__SECTION__KEY` environment
//! overrides, merged by the `config` crate, for both `lanrage` and `lanrage-relay`. Unknown keys
//! and bad values are refused with a message naming the key and where it came from (the file or
//! the environment variable); the set of known keys is derived from the config struct itself, so
//! it cannot drift; an unknown key is answered with the closest known one ("did you mean"). Keys
//! a binary no longer has can be listed as retired
//! ([`Settings::RETIRED_KEYS`]): a file or variable naming one still loads, with a warning.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a configuration was refused. The message always says which key and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not TOML.
    #[error("{file}: {message}")]
    File {
        /// The file.
        file: String,
        /// What went wrong.
        message: String,
    },
    /// A key the program does not know (a typo, most likely).
    #[error("{origin}: unknown key `{key}`{}", did_you_mean(.suggestion))]
    UnknownKey {
        /// File or environment variable.
        origin: String,
        /// Dotted key.
        key: String,
        /// The known key it most likely meant (see [`closest_key`]), as written where the
        /// unknown one came from (a dotted key, or an environment variable).
        suggestion: Option<String>,
    },
    /// A value of the wrong type or out of range.
    #[error("{origin}: bad value for `{key}`: {message}")]
    BadValue {
        /// File or environment variable.
        origin: String,
        /// Dotted key.
        key: String,
        /// Why.
        message: String,
    },
}

/// A configuration struct that [`load`] can fill. `Default` gives every default.
pub trait Settings: Serialize + DeserializeOwned + Default {
    /// Prefix of environment overrides (`LANRAGE` → `LANRAGE__NETWORK__MTU`).
    const ENV_PREFIX: &'static str;
    /// File read when no path is given, if it exists.
    const DEFAULT_PATH: &'static str;
    /// Dotted keys the program had once and ignores now: naming one gives a warning
    /// ([`load_with_warnings`]) instead of the unknown-key error, so an upgrade does not stop on
    /// an old config file.
    const RETIRED_KEYS: &'static [&'static str] = &[];

    /// The defaults with every optional key set to some value, so that optional keys count as
    /// known.
    fn with_all_keys() -> Self;

    /// Range checks types cannot express; errors name the key, `origin` is the file.
    fn validate(&self, origin: &str) -> Result<(), ConfigError>;
}

/// Loads `path` (if given; it must exist) or `T::DEFAULT_PATH` (if it exists), applies the
/// environment overrides found in `env` (list keys take comma-separated values), then validates.
pub fn load<T: Settings>(path: Option<&Path>, env: &[(String, String)]) -> Result<T, ConfigError> {
    Ok(load_with_warnings(path, env)?.0)
}

/// [`load`], also returning one warning per retired key ([`Settings::RETIRED_KEYS`]) the file or
/// the environment named (each ignored), for the caller to log once its logging is set up.
pub fn load_with_warnings<T: Settings>(
    path: Option<&Path>,
    env: &[(String, String)],
) -> Result<(T, Vec<String>), ConfigError> {
    let mut warnings = Vec::new();
    let retired = |key: &str| T::RETIRED_KEYS.contains(&key);
    let (file, required) = match path {
        Some(p) => (Some(p.to_path_buf()), true),
        None => {
            let p = PathBuf::from(T::DEFAULT_PATH);
            (p.exists().then_some(p), false)
        }
    };
    let origin = file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "defaults".into());
    let (known, lists) = known_keys::<T>();

    let mut builder = config::Config::builder();
    if let Some(file) = &file {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError::File {
            file: file.display().to_string(),
            message: if required {
                e.to_string()
            } else {
                format!("cannot read: {e}")
            },
        })?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::File {
            file: origin.clone(),
            message: e.to_string(),
        })?;
        let mut dropped = false;
        for key in flatten_keys(&table) {
            if retired(&key) {
                warnings.push(format!(
                    "{origin}: `{key}` is no longer used and is ignored; remove it"
                ));
                if let Some((section, leaf)) = key.split_once('.') {
                    if let Some(toml::Value::Table(inner)) = table.get_mut(section) {
                        inner.remove(leaf);
                    }
                }
                dropped = true;
            } else if !known.contains(&key) {
                let suggestion = closest_key(&key, &known).map(|k| format!("`{k}`"));
                return Err(ConfigError::UnknownKey {
                    origin,
                    key,
                    suggestion,
                });
            }
        }
        let text = if dropped {
            toml::to_string(&table).map_err(|e| ConfigError::File {
                file: origin.clone(),
                message: e.to_string(),
            })?
        } else {
            text
        };
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }

    let mut overrides: Vec<(String, String)> = Vec::new();
    let prefix = format!("{}__", T::ENV_PREFIX);
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let key = rest.to_ascii_lowercase().replace("__", ".");
        if retired(&key) {
            warnings.push(format!(
                "environment variable {name}: `{key}` is no longer used and is ignored; unset it"
            ));
            continue;
        }
        if !known.contains(&key) {
            let suggestion = closest_key(&key, &known)
                .map(|k| format!("`{k}` ({prefix}{})", k.replace('.', "__").to_uppercase()));
            return Err(ConfigError::UnknownKey {
                origin: format!("environment variable {name}"),
                key,
                suggestion,
            });
        }
        let set = if lists.contains(&key) {
            let items: Vec<String> = value
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            builder.set_override(key.as_str(), items)
        } else {
            builder.set_override(key.as_str(), value.as_str())
        };
        builder = set.map_err(|e| ConfigError::BadValue {
            origin: format!("environment variable {name}"),
            key: key.clone(),
            message: e.to_string(),
        })?;
        overrides.push((name.clone(), key));
    }
    let from_env = |key: &str| {
        overrides
            .iter()
            .find(|(_, k)| k == key)
            .map(|(var, _)| format!("environment variable {var}"))
    };

    let merged = builder.build().map_err(|e| ConfigError::File {
        file: origin.clone(),
        message: e.to_string(),
    })?;
    let cfg: T = merged.try_deserialize().map_err(|e| {
        let message = e.to_string();
        // Name the environment variable when the bad value came from one.
        match overrides
            .iter()
            .find(|(_, key)| message.contains(key.as_str()))
        {
            Some((var, key)) => ConfigError::BadValue {
                origin: format!("environment variable {var}"),
                key: key.clone(),
                message,
            },
            None => ConfigError::BadValue {
                origin: origin.clone(),
                key: key_in(&message),
                message,
            },
        }
    })?;
    cfg.validate(&origin).map_err(|e| match e {
        ConfigError::BadValue {
            key,
            message,
            origin,
        } => ConfigError::BadValue {
            origin: from_env(&key).unwrap_or(origin),
            key,
            message,
        },
        other => other,
    })?;
    Ok((cfg, warnings))
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    suggestion
        .as_ref()
        .map(|s| format!("; did you mean {s}?"))
        .unwrap_or_default()
}

/// The known key closest to the unknown `key`: by edit distance on the dotted key (Damerau-
/// Levenshtein from `strsim`, so a swapped pair of letters counts once), where the same key name
/// in another section counts as one edit (`node.operator_group` → `api.operator_group`). Only
/// near misses are suggested (at most a quarter of the key's length, at least one and at most
/// three edits); ties go to the first key in order.
pub fn closest_key<'a>(key: &str, known: &'a BTreeSet<String>) -> Option<&'a str> {
    let leaf = |k: &str| k.rsplit('.').next().map(str::to_owned);
    let limit = (key.chars().count() / 4).clamp(1, 3);
    known
        .iter()
        .map(|k| {
            let mut d = strsim::damerau_levenshtein(key, k);
            if key.contains('.') && leaf(key) == leaf(k) {
                d = d.min(1);
            }
            (d, k.as_str())
        })
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Every dotted key `T` knows, and those that hold lists.
pub fn known_keys<T: Settings>() -> (BTreeSet<String>, BTreeSet<String>) {
    let table = toml::Table::try_from(T::with_all_keys()).unwrap_or_default();
    let mut lists = BTreeSet::new();
    for (section, value) in &table {
        if let toml::Value::Table(inner) = value {
            for (key, v) in inner {
                if v.is_array() {
                    lists.insert(format!("{section}.{key}"));
                }
            }
        }
    }
    (flatten_keys(&table).into_iter().collect(), lists)
}

fn flatten_keys(table: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    for (section, value) in table {
        match value {
            toml::Value::Table(inner) => {
                out.extend(inner.keys().map(|key| format!("{section}.{key}")))
            }
            _ => out.push(section.clone()),
        }
    }
    out
}

/// Pulls "`a.b`" out of a `config` crate message ("... for key `network.mtu` ...").
fn key_in(message: &str) -> String {
    message
        .split('`')
        .skip(1)
        .step_by(2)
        .find(|k| k.contains('.'))
        .map(|k| k.split('[').next().unwrap_or(k).to_string())
        .unwrap_or_else(|| "?".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_key_suggests_near_misses_only() {
        let known: BTreeSet<String> = [
            "network.mtu",
            "network.listen_port",
            "api.listen",
            "api.operator_group",
            "node.name",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(closest_key("network.mtux", &known), Some("network.mtu"));
        assert_eq!(closest_key("netwrok.mtu", &known), Some("network.mtu"));
        assert_eq!(
            closest_key("network.listen_prot", &known),
            Some("network.listen_port")
        );
        assert_eq!(
            closest_key("node.operator_group", &known),
            Some("api.operator_group")
        );
        assert_eq!(closest_key("colour.scheme", &known), None);
        assert_eq!(closest_key("x", &known), None);
    }
}
