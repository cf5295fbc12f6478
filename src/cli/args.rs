//! Value parsers shared by commands, so a bad address or name is refused
//! by the command line with a sentence saying what to give, before
//! anything connects or binds.

/// `HOST:PORT` as `serve --listen` and `--advertise-nbd` take it: a
/// non-empty host (a name, an IPv4 address, or an IPv6 address in
/// brackets) and a port number.
pub fn host_port(s: &str) -> Result<String, String> {
    check_host_port(s, s)?;
    Ok(s.to_owned())
}

/// An API address as `--api`, `--to` and `--advertise-api` take it:
/// `HOST:PORT`, optionally written as an `http://` or `https://` URL.
/// `--to` of `dlsm migrate`: a node's API address (HOST:PORT), or, in
/// cluster mode, a node's name (no colon).
pub fn api_addr_or_node(s: &str) -> Result<String, String> {
    if is_node_name(s) {
        return Ok(s.to_owned());
    }
    api_addr(s)
}

/// Whether `--to` names a cluster node rather than an address: a name
/// (letters, digits, `-`, `_`, `.`) with no colon.
pub fn is_node_name(s: &str) -> bool {
    !s.is_empty()
        && !s.contains(':')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.parse::<std::net::IpAddr>().is_err()
}

pub fn api_addr(s: &str) -> Result<String, String> {
    let bare = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .unwrap_or(s)
        .trim_end_matches('/');
    check_host_port(s, bare)?;
    Ok(s.to_owned())
}

fn check_host_port(given: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty: give HOST:PORT, e.g. 127.0.0.1:7450".into());
    }
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return Err(format!(
            "{given:?} is not HOST:PORT (no spaces or slashes), e.g. 127.0.0.1:7450"
        ));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!(
            "{given:?} has no port: give HOST:PORT, e.g. {s}:7450"
        ));
    };
    if host.is_empty() {
        return Err(format!(
            "{given:?} has no host: give HOST:PORT, e.g. 127.0.0.1{s}"
        ));
    }
    if port.parse::<u16>().is_err() {
        return Err(format!(
            "{given:?}: {port:?} is not a port number (0-65535)"
        ));
    }
    let bracketed = host.starts_with('[') && host.ends_with(']') && host.len() > 2;
    if host.contains(':') && !bracketed {
        return Err(format!(
            "{given:?}: write an IPv6 address in brackets, e.g. [::1]:7450"
        ));
    }
    if !bracketed && (host.contains('[') || host.contains(']')) {
        return Err(format!("{given:?} is not HOST:PORT"));
    }
    Ok(())
}

/// A node's name (`serve --node`): what the ready line, the logs and
/// `node info` call it. Non-empty and one word, since the ready line
/// `dlsm node NAME ready ...` is split on spaces.
pub fn node_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("must not be empty (leave --node out to use the host name)".into());
    }
    if s.len() > 253 {
        return Err("at most 253 characters".into());
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{s:?} must be one word: no spaces or control characters"
        ));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_takes_what_it_should() {
        for ok in [
            "127.0.0.1:7450",
            "hostb:7450",
            "[::1]:0",
            "0.0.0.0:10809",
            "node-b.example:1",
        ] {
            assert_eq!(host_port(ok).unwrap(), ok);
        }
        for bad in [
            "",
            ":7450",
            "hostb",
            "hostb:",
            "hostb:http",
            "::1:7450",
            "a b:1",
            "h:70000",
            "[::1:7450",
            "x/y:1",
        ] {
            assert!(host_port(bad).is_err(), "{bad:?} accepted");
        }
        assert!(host_port("").unwrap_err().contains("must not be empty"));
    }

    #[test]
    fn api_addr_also_takes_urls() {
        for ok in ["127.0.0.1:7450", "http://b:7450", "https://[::1]:7450/"] {
            assert_eq!(api_addr(ok).unwrap(), ok);
        }
        for bad in ["", "http://", "https://:7450", "ftp://b:1"] {
            assert!(api_addr(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn node_names_are_one_word() {
        assert!(node_name("test").is_ok());
        assert!(node_name("").unwrap_err().contains("must not be empty"));
        assert!(node_name("a b").is_err());
        assert!(node_name("a\n").is_err());
    }
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people.
    Text,
    /// One JSON object per line.
    Json,
}
