//! Path-to-topic rules: which topic a file of the config repo belongs to.
//!
//! A rule is a glob over the repo path and a topic template; `{N}` in the template is the text the
//! N-th wildcard of the glob matched (`*` one segment part, `**` any number of segments, `?` one
//! character). First matching rule wins; a path no rule matches belongs to no topic and is never sent.

use regex::Regex;

use super::validate::Format;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRule {
    pub pattern: String,
    pub topic: String,
    /// `toml`, `json`, `yaml` or `none`; default: by the file's extension.
    #[serde(default)]
    pub validate: Option<Format>,
}

#[derive(Debug, Clone)]
struct Compiled {
    regex: Regex,
    template: Vec<Piece>,
    validate: Option<Format>,
}

#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    Capture(usize),
}

/// Compiled rules of one repo.
#[derive(Debug, Clone)]
pub struct TopicRules {
    rules: Vec<Compiled>,
}

/// The rule used when a repo configures none: the first path segment is the topic.
pub const DEFAULT_RULE: (&str, &str) = ("*/**", "{1}");

impl Default for TopicRules {
    fn default() -> Self {
        TopicRules::compile(&[]).unwrap_or(TopicRules { rules: Vec::new() })
    }
}

impl TopicRules {
    /// Compiles `rules` (or the default rule when empty). On error returns the rule index and why.
    pub fn compile(rules: &[TopicRule]) -> Result<TopicRules, (usize, String)> {
        let default = [TopicRule {
            pattern: DEFAULT_RULE.0.into(),
            topic: DEFAULT_RULE.1.into(),
            validate: None,
        }];
        let rules = if rules.is_empty() {
            &default[..]
        } else {
            rules
        };
        let compiled = rules
            .iter()
            .enumerate()
            .map(|(i, r)| compile_rule(r).map_err(|m| (i, m)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TopicRules { rules: compiled })
    }

    /// The topic of `path`, or `None` when no rule matches or the rule yields an empty topic.
    pub fn topic_of(&self, path: &str) -> Option<String> {
        for rule in &self.rules {
            if let Some(caps) = rule.regex.captures(path) {
                let mut topic = String::new();
                for piece in &rule.template {
                    match piece {
                        Piece::Text(t) => topic.push_str(t),
                        Piece::Capture(n) => {
                            topic.push_str(caps.get(*n).map_or("", |m| m.as_str()))
                        }
                    }
                }
                let topic = topic.trim_matches('/').to_string();
                return (!topic.is_empty()).then_some(topic);
            }
        }
        None
    }

    /// How a file must parse before its topic is published.
    pub fn format_of(&self, path: &str) -> Format {
        self.rules
            .iter()
            .find(|r| r.regex.is_match(path))
            .and_then(|r| r.validate)
            .unwrap_or_else(|| Format::by_extension(path))
    }

    /// Human-readable rules for `check-config`.
    pub fn describe(&self) -> Vec<String> {
        self.rules
            .iter()
            .map(|r| r.regex.as_str().to_string())
            .collect()
    }
}

fn compile_rule(rule: &TopicRule) -> Result<Compiled, String> {
    if rule.pattern.is_empty() || rule.pattern.starts_with('/') {
        return Err(format!(
            "pattern `{}`: must be a relative repo path glob",
            rule.pattern
        ));
    }
    let mut re = String::from("^");
    let mut wildcards = 0usize;
    let chars: Vec<char> = rule.pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                wildcards += 1;
                let at_segment_start = i == 0 || chars[i - 1] == '/';
                if at_segment_start && chars.get(i + 2) == Some(&'/') {
                    // `**/` : zero or more whole directories
                    re.push_str("((?:[^/]+/)*)");
                    i += 3;
                } else {
                    re.push_str("(.*)");
                    i += 2;
                }
                continue;
            }
            '*' => {
                wildcards += 1;
                re.push_str("([^/]*)");
            }
            '?' => {
                wildcards += 1;
                re.push_str("([^/])");
            }
            c => re.push_str(&regex::escape(&c.to_string())),
        }
        i += 1;
    }
    re.push('$');
    let regex = Regex::new(&re).map_err(|e| format!("pattern `{}`: {e}", rule.pattern))?;
    let template = parse_template(&rule.topic, wildcards)?;
    Ok(Compiled {
        regex,
        template,
        validate: rule.validate,
    })
}

fn parse_template(topic: &str, wildcards: usize) -> Result<Vec<Piece>, String> {
    if topic.is_empty() {
        return Err("topic must not be empty".into());
    }
    let mut pieces = Vec::new();
    let mut rest = topic;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            pieces.push(Piece::Text(rest[..open].to_string()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("topic `{topic}`: unclosed `{{`"))?
            + open;
        let n: usize = rest[open + 1..close].parse().map_err(|_| {
            format!("topic `{topic}`: `{{...}}` must hold a wildcard number such as {{1}}")
        })?;
        if n == 0 || n > wildcards {
            return Err(format!("topic `{topic}`: the pattern has {wildcards} wildcard(s), so {{{n}}} refers to nothing"));
        }
        pieces.push(Piece::Capture(n));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_string()));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(list: &[(&str, &str)]) -> TopicRules {
        let rules: Vec<TopicRule> = list
            .iter()
            .map(|(p, t)| TopicRule {
                pattern: p.to_string(),
                topic: t.to_string(),
                validate: None,
            })
            .collect();
        TopicRules::compile(&rules).expect("rules compile")
    }

    #[test]
    fn default_rule_uses_first_segment() {
        let r = TopicRules::default();
        assert_eq!(r.topic_of("payments/app.toml").as_deref(), Some("payments"));
        assert_eq!(
            r.topic_of("payments/eu/limits.json").as_deref(),
            Some("payments")
        );
        assert_eq!(r.topic_of("README.md"), None);
    }

    #[test]
    fn captures_fill_the_template_and_first_rule_wins() {
        let r = rules(&[
            ("services/*/**", "{1}"),
            ("teams/*/*.yaml", "team-{1}/{2}"),
            ("**", "misc"),
        ]);
        assert_eq!(r.topic_of("services/web/a/b.toml").as_deref(), Some("web"));
        assert_eq!(
            r.topic_of("teams/core/db.yaml").as_deref(),
            Some("team-core/db")
        );
        assert_eq!(r.topic_of("teams/core/db.json").as_deref(), Some("misc"));
        assert_eq!(r.topic_of("x").as_deref(), Some("misc"));
    }

    #[test]
    fn double_star_slash_matches_zero_directories() {
        let r = rules(&[("**/*.env", "env")]);
        assert_eq!(r.topic_of("a.env").as_deref(), Some("env"));
        assert_eq!(r.topic_of("a/b/c.env").as_deref(), Some("env"));
        assert_eq!(r.topic_of("a/b/c.txt"), None);
    }

    #[test]
    fn bad_templates_are_refused_with_the_rule_index() {
        let bad = vec![
            TopicRule {
                pattern: "a/*".into(),
                topic: "{1}".into(),
                validate: None,
            },
            TopicRule {
                pattern: "b/*".into(),
                topic: "{2}".into(),
                validate: None,
            },
        ];
        let err = TopicRules::compile(&bad).expect_err("{2} has no wildcard");
        assert_eq!(err.0, 1);
        assert!(err.1.contains("refers to nothing"), "{}", err.1);
    }
}
