//! Build recipes: the Dockerfile-like language a template build runs, one instruction per line.
//!
//! ```text
//! FROM python                      # the template to start from (or the build's base_template)
//! ENV PIP_NO_CACHE_DIR=1 MODE=prod # $VAR, ${VAR} and $$ expand against the build's environment
//! RUN --timeout=5m pip install flask
//! WORKDIR /srv/app                 # created; later steps run there
//! COPY app.py templates /srv/app/  # from the uploaded archive, owned by the current user
//! USER app                         # created when missing; later steps run as it
//! START python3 app.py             # started at every boot of the template
//! ```
//!
//! A line ending in `\` continues on the next. Blank lines and lines starting with `#` are
//! skipped. Every error names the line it is about.

use std::time::Duration;

use super::TemplateName;

/// How long a `RUN` may take unless it says otherwise.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest `--timeout` a step may ask for.
const MAX_RUN_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// Instructions per recipe; each is a round trip into the guest.
const MAX_STEPS: usize = 500;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct RecipeError {
    pub line: usize,
    pub message: String,
}

fn error(line: usize, message: impl Into<String>) -> RecipeError {
    RecipeError {
        line,
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    Run { command: String, timeout: Duration },
    Env(Vec<(String, String)>),
    Workdir(String),
    User(String),
    Copy { sources: Vec<String>, dest: String },
    Start(String),
}

impl Instruction {
    /// The instruction as a log line shows it.
    pub fn summary(&self) -> String {
        match self {
            Self::Run { command, .. } => format!("RUN {command}"),
            Self::Env(pairs) => {
                let names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
                format!("ENV {}", names.join(" "))
            }
            Self::Workdir(dir) => format!("WORKDIR {dir}"),
            Self::User(user) => format!("USER {user}"),
            Self::Copy { sources, dest } => format!("COPY {} {dest}", sources.join(" ")),
            Self::Start(command) => format!("START {command}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub line: usize,
    pub instruction: Instruction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// `FROM`, when the recipe names its base.
    pub from: Option<TemplateName>,
    pub steps: Vec<Step>,
}

impl Recipe {
    pub fn parse(text: &str) -> Result<Self, RecipeError> {
        let mut from = None;
        let mut steps = Vec::new();
        for (line, content) in logical_lines(text)? {
            let (keyword, rest) = match content.split_once(char::is_whitespace) {
                Some((keyword, rest)) => (keyword, rest.trim()),
                None => (content.as_str(), ""),
            };
            let keyword = keyword.to_ascii_uppercase();
            if keyword == "FROM" {
                if from.is_some() || !steps.is_empty() {
                    return Err(error(
                        line,
                        "FROM must be the first instruction, and only once",
                    ));
                }
                let name = rest
                    .parse::<TemplateName>()
                    .map_err(|e| error(line, format!("FROM: {e}")))?;
                from = Some(name);
                continue;
            }
            if rest.is_empty() {
                return Err(error(line, format!("{keyword} needs an argument")));
            }
            let instruction = match keyword.as_str() {
                "RUN" => parse_run(line, rest)?,
                "ENV" => Instruction::Env(parse_env(line, rest)?),
                "WORKDIR" => {
                    if !rest.starts_with('/') {
                        return Err(error(line, "WORKDIR must be an absolute path"));
                    }
                    Instruction::Workdir(rest.to_owned())
                }
                "USER" => {
                    if !valid_user(rest) {
                        return Err(error(
                            line,
                            format!("USER `{rest}` is not a valid user name (lowercase letters, digits, `_` and `-`, at most 32)"),
                        ));
                    }
                    Instruction::User(rest.to_owned())
                }
                "COPY" => parse_copy(line, rest)?,
                "START" => Instruction::Start(rest.to_owned()),
                other => {
                    return Err(error(
                        line,
                        format!("unknown instruction `{other}` (known: FROM, RUN, ENV, WORKDIR, USER, COPY, START)"),
                    ))
                }
            };
            steps.push(Step { line, instruction });
            if steps.len() > MAX_STEPS {
                return Err(error(
                    line,
                    format!("a recipe has at most {MAX_STEPS} instructions"),
                ));
            }
        }
        Ok(Self { from, steps })
    }

    /// Whether a `COPY` needs an uploaded archive.
    pub fn copies(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s.instruction, Instruction::Copy { .. }))
    }
}

/// Lines with continuations joined, comments and blanks dropped, each with the number of its
/// first physical line.
fn logical_lines(text: &str) -> Result<Vec<(usize, String)>, RecipeError> {
    let mut lines = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        let trimmed = raw.trim();
        if pending.is_none() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        let (content, continues) = match trimmed.strip_suffix('\\') {
            Some(head) => (head.trim_end(), true),
            None => (trimmed, false),
        };
        let (start, mut joined) = pending.take().unwrap_or((number, String::new()));
        if !joined.is_empty() && !content.is_empty() {
            joined.push(' ');
        }
        joined.push_str(content);
        if continues {
            pending = Some((start, joined));
        } else {
            lines.push((start, joined));
        }
    }
    if let Some((start, _)) = pending {
        return Err(error(
            start,
            "the recipe ends inside a continued line (`\\`)",
        ));
    }
    Ok(lines)
}

fn parse_run(line: usize, rest: &str) -> Result<Instruction, RecipeError> {
    let mut timeout = DEFAULT_RUN_TIMEOUT;
    let mut command = rest;
    if let Some(flagged) = rest.strip_prefix("--timeout=") {
        let (value, after) = flagged
            .split_once(char::is_whitespace)
            .ok_or_else(|| error(line, "RUN --timeout=<duration> needs a command after it"))?;
        timeout = parse_duration(value)
            .filter(|d| !d.is_zero() && *d <= MAX_RUN_TIMEOUT)
            .ok_or_else(|| {
                error(
                    line,
                    format!("RUN --timeout: `{value}` is not a duration between 1s and 6h (e.g. 90s, 10m, 1h)"),
                )
            })?;
        command = after.trim();
    } else if rest.starts_with("--") {
        let flag = rest.split_whitespace().next().unwrap_or(rest);
        return Err(error(
            line,
            format!("RUN: unknown flag `{flag}` (known: --timeout=)"),
        ));
    }
    Ok(Instruction::Run {
        command: command.to_owned(),
        timeout,
    })
}

/// `90`, `90s`, `10m`, `1h`, `1m30s`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let value: u64 = number.parse().ok()?;
        number.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return None,
        };
        total = total.checked_add(value.checked_mul(unit)?)?;
    }
    number.is_empty().then_some(Duration::from_secs(total))
}

/// `KEY=VALUE` pairs; a value may be double-quoted to hold spaces.
fn parse_env(line: usize, rest: &str) -> Result<Vec<(String, String)>, RecipeError> {
    let mut pairs = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        if chars.next() != Some('=') {
            return Err(error(line, format!("ENV: `{key}` has no `=VALUE`")));
        }
        if !valid_env_name(&key) {
            return Err(error(
                line,
                format!("ENV: `{key}` is not a valid variable name"),
            ));
        }
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(escaped) => value.push(escaped),
                        None => return Err(error(line, "ENV: unterminated quoted value")),
                    },
                    Some(c) => value.push(c),
                    None => return Err(error(line, "ENV: unterminated quoted value")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn parse_copy(line: usize, rest: &str) -> Result<Instruction, RecipeError> {
    let mut words: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
    if words.len() < 2 {
        return Err(error(
            line,
            "COPY needs at least one source and a destination",
        ));
    }
    let dest = words.pop().expect("two words or more");
    for source in &words {
        let escapes = source.starts_with('/') || source.split('/').any(|part| part == "..");
        if escapes {
            return Err(error(
                line,
                format!("COPY: source `{source}` must be a relative path inside the archive, without `..`"),
            ));
        }
    }
    Ok(Instruction::Copy {
        sources: words,
        dest,
    })
}

pub fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn valid_user(name: &str) -> bool {
    name.len() <= 32
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Expands `$VAR`, `${VAR}` and `$$` (a literal `$`) against `env`; unknown names expand to
/// nothing, as in a shell.
pub fn expand(value: &str, env: &std::collections::BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('$') => {
                chars.next();
                out.push('$');
            }
            Some('{') => {
                chars.next();
                let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                out.push_str(env.get(&name).map_or("", String::as_str));
            }
            Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                let mut name = String::new();
                while let Some(c) = chars.next_if(|c| c.is_ascii_alphanumeric() || *c == '_') {
                    name.push(c);
                }
                out.push_str(env.get(&name).map_or("", String::as_str));
            }
            _ => out.push('$'),
        }
    }
    out
}

/// A healthcheck: `[--interval=3s] [--timeout=60s] [--start-period=0s] [--retries=0] <cmd>`.
/// `--timeout` bounds each attempt; zero retries means attempts go on for up to five minutes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthcheck {
    pub command: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub start_period: Duration,
    pub retries: u32,
}

impl Healthcheck {
    pub fn parse(text: &str) -> Result<Self, RecipeError> {
        let mut check = Self {
            command: String::new(),
            interval: Duration::from_secs(3),
            timeout: Duration::from_secs(60),
            start_period: Duration::ZERO,
            retries: 0,
        };
        let mut rest = text.trim();
        while let Some(flag) = rest.strip_prefix("--") {
            let (flag, after) = flag
                .split_once(char::is_whitespace)
                .ok_or_else(|| error(1, "healthcheck: a command must follow its flags"))?;
            let (name, value) = flag
                .split_once('=')
                .ok_or_else(|| error(1, format!("healthcheck: `--{flag}` needs `=VALUE`")))?;
            let duration = || {
                parse_duration(value).ok_or_else(|| {
                    error(
                        1,
                        format!("healthcheck: --{name}: `{value}` is not a duration"),
                    )
                })
            };
            match name {
                "interval" => check.interval = duration()?.max(Duration::from_millis(100)),
                "timeout" => check.timeout = duration()?,
                "start-period" => check.start_period = duration()?,
                "retries" => {
                    check.retries = value.parse().map_err(|_| {
                        error(1, format!("healthcheck: --retries: `{value}` is not a number"))
                    })?
                }
                other => {
                    return Err(error(
                        1,
                        format!("healthcheck: unknown flag `--{other}` (known: --interval, --timeout, --start-period, --retries)"),
                    ))
                }
            }
            rest = after.trim_start();
        }
        if rest.is_empty() {
            return Err(error(1, "healthcheck: no command"));
        }
        check.command = rest.to_owned();
        Ok(check)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn parses_every_instruction_with_line_numbers() {
        let recipe = Recipe::parse(
            "# a comment\nFROM python\n\nENV A=1 B=\"two words\" C=$A\nRUN --timeout=5m pip install \\\n    flask\nWORKDIR /srv/app\nCOPY app.py static/ .\nUSER app\nstart python3 app.py\n",
        )
        .unwrap();
        assert_eq!(recipe.from.as_ref().unwrap().as_str(), "python");
        let lines: Vec<usize> = recipe.steps.iter().map(|s| s.line).collect();
        assert_eq!(lines, [4, 5, 7, 8, 9, 10]);
        assert_eq!(
            recipe.steps[0].instruction,
            Instruction::Env(vec![
                ("A".into(), "1".into()),
                ("B".into(), "two words".into()),
                ("C".into(), "$A".into())
            ])
        );
        assert_eq!(
            recipe.steps[1].instruction,
            Instruction::Run {
                command: "pip install flask".into(),
                timeout: Duration::from_secs(300)
            }
        );
        assert_eq!(
            recipe.steps[3].instruction,
            Instruction::Copy {
                sources: vec!["app.py".into(), "static/".into()],
                dest: ".".into()
            }
        );
        assert_eq!(
            recipe.steps[5].instruction,
            Instruction::Start("python3 app.py".into())
        );
        assert!(recipe.copies());
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let cases = [
            ("RUN true\nFROM python", 2, "first instruction"),
            ("\n\nFETCH x", 3, "unknown instruction `FETCH`"),
            ("RUN", 1, "RUN needs an argument"),
            ("RUN --timeout=forever x", 1, "not a duration"),
            ("RUN --timeout=0 x", 1, "not a duration"),
            ("RUN --user=root x", 1, "unknown flag `--user=root`"),
            ("ENV 1A=x", 1, "not a valid variable name"),
            ("ENV A", 1, "has no `=VALUE`"),
            ("ENV A=\"open", 1, "unterminated"),
            ("WORKDIR relative", 1, "absolute"),
            ("USER Root", 1, "not a valid user name"),
            ("COPY ../etc/passwd /x", 1, "without `..`"),
            ("COPY /etc/passwd /x", 1, "relative path"),
            ("COPY only", 1, "at least one source"),
            ("FROM ../x", 1, "FROM:"),
            ("RUN a \\", 1, "continued line"),
        ];
        for (text, line, needle) in cases {
            let err = Recipe::parse(text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
            assert!(err.to_string().contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn durations_and_expansion() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("10x"), None);
        assert_eq!(parse_duration("5m3"), None);
        let env = BTreeMap::from([("HOME".to_owned(), "/root".to_owned())]);
        assert_eq!(
            expand("$HOME/bin:${HOME}:$$:$NOPE:$", &env),
            "/root/bin:/root:$::$"
        );
    }

    #[test]
    fn healthchecks_take_flags_then_a_command() {
        let check = Healthcheck::parse("--interval=1s --retries=5 curl -f localhost:8888").unwrap();
        assert_eq!(check.command, "curl -f localhost:8888");
        assert_eq!(check.interval, Duration::from_secs(1));
        assert_eq!(check.retries, 5);
        assert!(Healthcheck::parse("--interval=1s").is_err());
        assert!(Healthcheck::parse("--color=red true").is_err());
    }
}
