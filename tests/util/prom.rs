//! A strict parser of the Prometheus text format 0.0.4 and of OpenMetrics text, for tests that read
//! `/metrics`: any line it does not understand is an error, not skipped, so a malformed exposition
//! fails the test instead of silently losing series.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: a counter's samples carry the family's name.
    Prometheus,
    /// `application/openmetrics-text`: a counter family `x` has samples `x_total`, ends in `# EOF`.
    OpenMetrics,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Family {
    pub kind: String,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

impl Exposition {
    /// The value of the series `name` with exactly the labels `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Like `value`, panicking with the exposition's sample names when the series is missing.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or_else(|| {
            panic!(
                "no series {name}{labels:?}; names: {:?}",
                self.sample_names()
            )
        })
    }

    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.families.values().flat_map(|f| f.samples.iter())
    }

    /// Every sample name in the exposition.
    pub fn sample_names(&self) -> BTreeSet<String> {
        self.samples().map(|s| s.name.clone()).collect()
    }

    /// Every name a query may use: the sample names, and the names every family's samples would
    /// carry (`_bucket`, `_sum`, `_count` of a histogram; `_total` of an OpenMetrics counter).
    pub fn queryable_names(&self, format: Format) -> BTreeSet<String> {
        let mut names = self.sample_names();
        for family in self.families.keys() {
            names.extend(self.names_of(family, format));
        }
        names
    }

    /// The names the samples of `family` carry (or would, once it has some).
    pub fn names_of(&self, family: &str, format: Format) -> Vec<String> {
        let kind = self.families.get(family).map_or("", |f| f.kind.as_str());
        suffixes(kind, format)
            .iter()
            .map(|suffix| format!("{family}{suffix}"))
            .collect()
    }
}

fn suffixes(kind: &str, format: Format) -> &'static [&'static str] {
    match (kind, format) {
        ("histogram", _) => &["_bucket", "_sum", "_count"],
        ("summary", _) => &["", "_sum", "_count"],
        ("counter", Format::OpenMetrics) => &["_total"],
        ("info", Format::OpenMetrics) => &["_info"],
        _ => &[""],
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        other => other
            .parse::<f64>()
            .map_err(|e| format!("value `{other}`: {e}")),
    }
}

/// `{k="v",...}` at the start of `rest`; returns the labels and what follows the `}`.
fn parse_labels(rest: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut s = rest.strip_prefix('{').ok_or("labels must start with `{`")?;
    loop {
        if let Some(after) = s.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = s.find('=').ok_or("label without `=`")?;
        let key = &s[..eq];
        if !valid_name(key) || key.contains(':') {
            return Err(format!("bad label name `{key}`"));
        }
        s = s[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value must be quoted")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in label `{key}`")),
                },
                Some((i, '"')) => break i,
                Some((_, '\n')) | None => return Err(format!("unterminated value of `{key}`")),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(key.to_string(), value).is_some() {
            return Err(format!("label `{key}` given twice"));
        }
        s = &s[end + 1..];
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return Err("expected `,` or `}` after a label".into());
        }
    }
}

/// Parses `text` strictly as `format`.
pub fn parse(text: &str, format: Format) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut current: Option<String> = None;
    let mut eof = false;
    let body = text
        .strip_suffix('\n')
        .ok_or("the exposition must end with a newline")?;
    for (n, line) in body.split('\n').enumerate() {
        let at = |e: String| format!("line {}: {e}: `{line}`", n + 1);
        if eof {
            return Err(at("text after `# EOF`".into()));
        }
        if line == "# EOF" && format == Format::OpenMetrics {
            eof = true;
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (word, name, rest) = (parts.next(), parts.next(), parts.next());
            let Some(name) = name.filter(|n| valid_name(n)) else {
                if format == Format::OpenMetrics {
                    return Err(at("a comment that is not HELP, TYPE or UNIT".into()));
                }
                continue;
            };
            match word {
                Some("TYPE") => {
                    let kind = rest.ok_or_else(|| at("TYPE without a type".into()))?;
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "untyped",
                        "unknown",
                        "info",
                        "stateset",
                    ];
                    if !known.contains(&kind) {
                        return Err(at(format!("unknown type `{kind}`")));
                    }
                    let family = out.families.entry(name.to_string()).or_default();
                    if !family.kind.is_empty() || !family.samples.is_empty() {
                        return Err(at("TYPE given twice or after the family's samples".into()));
                    }
                    family.kind = kind.to_string();
                    current = Some(name.to_string());
                }
                Some("HELP") => {
                    let family = out.families.entry(name.to_string()).or_default();
                    if family
                        .help
                        .replace(rest.unwrap_or("").to_string())
                        .is_some()
                    {
                        return Err(at("HELP given twice".into()));
                    }
                }
                Some("UNIT")
                    if format == Format::OpenMetrics
                        && !name.ends_with(&format!("_{}", rest.unwrap_or(""))) =>
                {
                    return Err(at("a family's name must end with its unit".into()));
                }
                Some("UNIT") if format == Format::OpenMetrics => {}
                _ if format == Format::OpenMetrics => {
                    return Err(at("a comment that is not HELP, TYPE or UNIT".into()));
                }
                _ => {}
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            return Err(at("not a sample, HELP or TYPE line".into()));
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(at(format!("bad metric name `{name}`")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("one space before the value".into()))?
            .split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<f64>()
                .map_err(|e| at(format!("timestamp: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(at("text after the timestamp".into()));
        }
        let family_name = current
            .as_deref()
            .ok_or_else(|| at("a sample before any TYPE".into()))?;
        let family = out
            .families
            .get_mut(family_name)
            .ok_or_else(|| at("family lost".into()))?;
        let suffix = name
            .strip_prefix(family_name)
            .ok_or_else(|| at(format!("sample outside its family `{family_name}`")))?;
        let allowed: &[&str] = match (family.kind.as_str(), format) {
            ("histogram", _) => &["_bucket", "_sum", "_count", "_created"],
            ("counter", Format::OpenMetrics) => &["_total", "_created"],
            ("info", Format::OpenMetrics) => &["_info"],
            _ => &[""],
        };
        if !allowed.contains(&suffix) {
            return Err(at(format!(
                "a {} family `{family_name}` has no sample `{name}`",
                family.kind
            )));
        }
        if family.kind == "counter" && suffix != "_created" && (value.is_nan() || value < 0.0) {
            return Err(at("a counter below 0".into()));
        }
        if (suffix == "_bucket") != labels.contains_key("le") {
            return Err(at("`le` belongs on buckets and only there".into()));
        }
        let sample = Sample {
            name: name.to_string(),
            labels,
            value,
        };
        if family
            .samples
            .iter()
            .any(|s| s.name == sample.name && s.labels == sample.labels)
        {
            return Err(at("the same series twice".into()));
        }
        family.samples.push(sample);
    }
    if format == Format::OpenMetrics && !eof {
        return Err("an OpenMetrics exposition ends with `# EOF`".into());
    }
    for (name, family) in &out.families {
        if family.kind.is_empty() {
            return Err(format!("family `{name}` has HELP but no TYPE"));
        }
        if family.kind == "histogram" {
            check_histogram(name, family)?;
        }
    }
    Ok(out)
}

/// Buckets never decrease as `le` grows, and the `+Inf` bucket equals `_count`, per series.
fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
    /// Per label set without `le`: (le, cumulative count) of each bucket.
    type Buckets = BTreeMap<Vec<(String, String)>, Vec<(f64, f64)>>;
    let mut series: Buckets = BTreeMap::new();
    for s in family
        .samples
        .iter()
        .filter(|s| s.name.ends_with("_bucket"))
    {
        let le = parse_value(&s.labels["le"])?;
        let key: Vec<(String, String)> = s
            .labels
            .iter()
            .filter(|(k, _)| *k != "le")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        series.entry(key).or_default().push((le, s.value));
    }
    for (key, mut buckets) in series {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
            return Err(format!("{name}{key:?}: a bucket below a smaller one"));
        }
        let inf = buckets
            .last()
            .filter(|b| b.0 == f64::INFINITY)
            .ok_or_else(|| format!("{name}{key:?}: no +Inf bucket"))?
            .1;
        let labels: BTreeMap<String, String> = key.into_iter().collect();
        let count = family
            .samples
            .iter()
            .find(|s| s.name == format!("{name}_count") && s.labels == labels)
            .ok_or_else(|| format!("{name}{labels:?}: no _count"))?;
        if count.value != inf {
            return Err(format!("{name}{labels:?}: _count is not the +Inf bucket"));
        }
    }
    Ok(())
}

/// Checks the parser on hand-written text, so a parser that accepts everything cannot pass.
pub fn self_check() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 3\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n";
    let e = parse(good, Format::Prometheus).expect("valid text parses");
    assert_eq!(e.get("a_total", &[("x", "1"), ("y", "q\"")]), 3.0);
    let om = "# TYPE a counter\na_total 1\n# EOF\n";
    assert_eq!(
        parse(om, Format::OpenMetrics)
            .expect("valid OpenMetrics parses")
            .get("a_total", &[]),
        1.0
    );
    for bad in [
        "a 1\n",                         // no TYPE
        "# TYPE a gauge\na 1",           // no final newline
        "# TYPE a gauge\na{x=\"1\" 1\n", // unterminated labels
        "# TYPE a gauge\na{x=1} 1\n",    // unquoted value
        "# TYPE a gauge\nb 1\n",         // outside its family
        "# TYPE a gauge\na one\n",       // not a number
        "# TYPE a gauge\na 1\na 2\n",    // same series twice
        "# TYPE a counter\na -1\n",      // negative counter
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 1\n",
        "# TYPE a gauge\n\na 1\n", // blank line
    ] {
        assert!(parse(bad, Format::Prometheus).is_err(), "accepted: {bad:?}");
    }
    assert!(
        parse("# TYPE a counter\na_total 1\n", Format::OpenMetrics).is_err(),
        "no EOF"
    );
    assert!(parse("# TYPE a counter\na 1\n# EOF\n", Format::OpenMetrics).is_err());
}
