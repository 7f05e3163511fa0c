//! Deriving a child's environment (`docs/PROTOCOL.md` section 7).

use std::collections::BTreeMap;

use crate::protocol::{EnvPolicy, Inherit};

/// Variables kept by `inherit: "core"`.
const CORE_VARS: &[&str] = &[
    "PATH", "SHELL", "TMPDIR", "TEMP", "TMP", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "LOGNAME",
    "USER",
];

/// Names dropped unless `ignoreDefaultExcludes`.
const DEFAULT_EXCLUDES: &[&str] = &["*KEY*", "*SECRET*", "*TOKEN*"];

/// The server's own configuration variables, never passed to children.
const SERVER_PREFIX: &str = "EXEC_SERVER_";

/// The environment a child gets: exactly `env` without a policy; otherwise
/// the policy applied to `base` (the server's own environment), with `env`
/// laid over it.
pub fn child_env(
    policy: Option<&EnvPolicy>,
    env: &BTreeMap<String, String>,
    base: impl IntoIterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    let Some(policy) = policy else {
        return env.clone();
    };
    let mut out: BTreeMap<String, String> = base
        .into_iter()
        .filter(|(name, _)| !name.starts_with(SERVER_PREFIX))
        .filter(|(name, _)| match policy.inherit {
            Inherit::All => true,
            Inherit::None => false,
            Inherit::Core => CORE_VARS.contains(&name.as_str()),
        })
        .collect();
    if !policy.ignore_default_excludes {
        out.retain(|name, _| !DEFAULT_EXCLUDES.iter().any(|p| glob_match(p, name)));
    }
    out.retain(|name, _| !policy.exclude.iter().any(|p| glob_match(p, name)));
    for (name, value) in &policy.set {
        out.insert(name.clone(), value.clone());
    }
    if !policy.include_only.is_empty() {
        out.retain(|name, _| policy.include_only.iter().any(|p| glob_match(p, name)));
    }
    for (name, value) in env {
        out.insert(name.clone(), value.clone());
    }
    out
}

/// Case-insensitive match of `name` against a pattern with `*` (any run of
/// characters) and `?` (one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().flat_map(char::to_lowercase).collect();
    let n: Vec<char> = name.chars().flat_map(char::to_lowercase).collect();
    crate::wildcard::wildcard(&p, &n, '*', '?')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<(String, String)> {
        [
            ("PATH", "/bin"),
            ("HOME", "/root"),
            ("API_KEY", "k"),
            ("GITHUB_TOKEN", "t"),
            ("EXEC_SERVER_LOG", "debug"),
            ("FOO", "1"),
            ("FOOBAR", "2"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn names(env: &BTreeMap<String, String>) -> Vec<&str> {
        env.keys().map(String::as_str).collect()
    }

    #[test]
    fn glob_is_case_insensitive_with_star_and_question_mark() {
        assert!(glob_match("*key*", "API_KEY"));
        assert!(glob_match("F?O", "foo"));
        assert!(!glob_match("F?O", "FOOO"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
    }

    #[test]
    fn without_policy_env_is_exact() {
        let mut env = BTreeMap::new();
        env.insert("A".to_string(), "1".to_string());
        assert_eq!(child_env(None, &env, base()), env);
    }

    #[test]
    fn inherit_all_drops_secrets_and_server_vars() {
        let env = child_env(Some(&EnvPolicy::default()), &BTreeMap::new(), base());
        assert_eq!(names(&env), vec!["FOO", "FOOBAR", "HOME", "PATH"]);
    }

    #[test]
    fn core_then_set_then_include_only_then_env_overlay() {
        let policy = EnvPolicy {
            inherit: Inherit::Core,
            ignore_default_excludes: true,
            exclude: vec!["home".into()],
            set: [("X".to_string(), "x".to_string())].into(),
            include_only: vec!["P*".into(), "X".into()],
        };
        let overlay = [("HOME".to_string(), "/h".to_string())].into();
        let env = child_env(Some(&policy), &overlay, base());
        assert_eq!(names(&env), vec!["HOME", "PATH", "X"]);
        assert_eq!(env["HOME"], "/h");
    }
}
