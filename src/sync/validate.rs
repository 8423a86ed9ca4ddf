//! Validation before broadcast: TOML, JSON and YAML files must parse before their topic's change
//! is published. A broken file holds its topic back (instances stay on the last good version) and
//! the rejection says which file, which line and what the parser said.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Toml,
    Json,
    Yaml,
    /// Never validated.
    None,
}

impl Format {
    /// The format a path's extension implies.
    pub fn by_extension(path: &str) -> Format {
        match path
            .rsplit_once('.')
            .map(|(_, ext)| ext.to_ascii_lowercase())
        {
            Some(ext) if ext == "toml" => Format::Toml,
            Some(ext) if ext == "json" => Format::Json,
            Some(ext) if ext == "yaml" || ext == "yml" => Format::Yaml,
            _ => Format::None,
        }
    }
}

/// Why a file does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based, when the parser says.
    pub line: Option<u32>,
    pub message: String,
}

fn line_of(text: &str, offset: usize) -> u32 {
    let upto = text.get(..offset.min(text.len())).unwrap_or(text);
    u32::try_from(upto.matches('\n').count() + 1).unwrap_or(u32::MAX)
}

/// Checks `bytes` as `format`.
pub fn check(format: Format, bytes: &[u8]) -> Result<(), Problem> {
    if format == Format::None {
        return Ok(());
    }
    let text = std::str::from_utf8(bytes).map_err(|e| Problem {
        line: None,
        message: format!("not valid UTF-8: {e}"),
    })?;
    match format {
        Format::Toml => toml::from_str::<toml::Table>(text)
            .map(|_| ())
            .map_err(|e| Problem {
                line: e.span().map(|s| line_of(text, s.start)),
                message: e.message().to_string(),
            }),
        Format::Json => serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map(|_| ())
            .map_err(|e| Problem {
                line: u32::try_from(e.line()).ok(),
                message: e.to_string(),
            }),
        Format::Yaml => yaml_rust2::YamlLoader::load_from_str(text)
            .map(|_| ())
            .map_err(|e| Problem {
                line: u32::try_from(e.marker().line()).ok(),
                message: e.info().to_string(),
            }),
        Format::None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_format_reports_the_line() {
        assert_eq!(check(Format::Toml, b"a = 1\nb = \"x\"\n"), Ok(()));
        let p = check(Format::Toml, b"a = 1\nb = = 2\n").expect_err("broken toml");
        assert_eq!(p.line, Some(2), "{p:?}");
        assert_eq!(check(Format::Json, br#"{"a": [1, 2]}"#), Ok(()));
        let p = check(Format::Json, b"{\n  \"a\": 1,\n}").expect_err("broken json");
        assert_eq!(p.line, Some(3), "{p:?}");
        assert_eq!(check(Format::Yaml, b"plans:\n  - a\n  - b\n"), Ok(()));
        let p = check(Format::Yaml, b"plans:\n  - a\n - b: [\n").expect_err("broken yaml");
        assert!(p.line.is_some(), "{p:?}");
        assert!(check(Format::Json, &[0xff, 0xfe]).is_err());
        assert_eq!(check(Format::None, b"anything {"), Ok(()));
    }

    #[test]
    fn extensions_pick_the_format() {
        assert_eq!(Format::by_extension("a/b.TOML"), Format::Toml);
        assert_eq!(Format::by_extension("a.yml"), Format::Yaml);
        assert_eq!(Format::by_extension("a.json"), Format::Json);
        assert_eq!(Format::by_extension("README"), Format::None);
    }
}
